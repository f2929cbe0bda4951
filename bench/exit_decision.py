"""Micro-benchmark of the exit-decision Triton kernel (``exit_decision``: softmax, argmax, threshold test).

    python bench/exit_decision.py [--device cpu|cuda] [--quick] [--rows N ...] [--json PATH]

N x classes float32 logits (classes 10 / 100 / 1000; N = 256 and 65536 on CUDA): the fused kernel
(``calexnet_fast.kernels.exit_decision``, CUDA only) against the eager exit rule
(``calexnet_fast.exit_rule.exit_decision_reference``) and its torch.compile. GB/s counts the logits read once;
``%bw`` is that rate over the measured device copy bandwidth. On CUDA times come from
``triton.testing.do_bench`` (median, L2 flushed between runs); without a GPU only the eager rule and
torch.compile are timed (median wall time of a few runs).
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from kernel_timing import bench_parser, cell, compile_static, kernel_result, kernel_row, timer_and_bandwidth  # noqa: E402

from calexnet_fast.exit_rule import exit_decision_reference  # noqa: E402
from calexnet_fast.kernels import exit_decision, triton_status  # noqa: E402

EXIT_CLASSES = [10, 100, 1000]


def bench_exit(device, timer, fused_ok, peak_bw, n_rows_list) -> list[dict]:
    rows = []
    cases = list(itertools.product(n_rows_list, EXIT_CLASSES))
    for n, c in tqdm(cases, desc="exit_decision", disable=None):
        z = torch.randn(n, c, device=device) * 3
        thr = torch.full((c,), 0.5, device=device)
        compiled = partial(compile_static(exit_decision_reference), z, thr)
        compiled()
        times = {"eager": timer(partial(exit_decision_reference, z, thr)), "compile": timer(compiled)}
        if fused_ok:
            assert torch.equal(exit_decision(z, thr)[1], exit_decision_reference(z, thr)[1])
            times["fused"] = timer(partial(exit_decision, z, thr))
        nbytes = z.numel() * z.element_size()
        rows.append(kernel_row({"N": n, "classes": c, "logit_bytes": nbytes}, times, nbytes, peak_bw))
    return rows


def print_table(exit_rows) -> None:
    print()
    print(
        f"{'exit N':>8}{'classes':>8}  {'eager ms':>9}{'compile ms':>11}{'fused ms':>9}{'x eager':>8}{'x compile':>10}"
    )
    for r in exit_rows:
        ms = r["ms"]
        line = f"{r['N']:>8}{r['classes']:>8}  {ms['eager']:>9.4f}{ms['compile']:>11.4f}"
        line += f"{cell(ms, 'fused', '.4f'):>9}"
        line += f"{cell(r, 'speedup_vs_eager', '.2f'):>8}{cell(r, 'speedup_vs_compile', '.2f'):>10}"
        print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, repeats="CPU timing repeats")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="N (default 256 65536 on CUDA, 256 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    usable, how = triton_status()
    fused_ok = cuda and usable
    if not fused_ok:
        print("Triton cannot run here; benchmarking the eager exit rule and torch.compile only.")
    print(f"triton: {how}")
    timer, peak_bw = timer_and_bandwidth(device, args.repeats or (3 if args.quick else 5))
    n_rows = args.rows or (([256] if args.quick else [256, 65536]) if cuda else [256])
    exit_rows = bench_exit(device, timer, fused_ok, peak_bw, n_rows)
    print_table(exit_rows)
    result = kernel_result("bench/exit_decision.py", argv, device, how, fused_ok, peak_bw, exit_decision=exit_rows)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
