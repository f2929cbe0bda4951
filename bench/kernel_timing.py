"""What the op and kernel benchmarks (compact, scatter_rows, exit_decision, proto_head) share besides the
timing harness: their common options, a per-kernel timer and the measured copy bandwidth (their roofline),
and the result rows, tables and JSON of the op benchmarks (torch candidates vs the op) and of the kernel
benchmarks (the fused Triton kernel vs its eager reference and torch.compile)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from common import write_json

from calexnet_fast.evaluation.timing import environment, median_time


def bench_parser(description: str, quick: str = "fewer sizes and repeats", repeats: str | None = None):
    """The options every op and kernel benchmark takes: ``--device``, ``--quick``, ``--repeats``, ``--json``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeats", type=int, default=None, help=repeats)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


class KernelTimer:
    """Median seconds per call of ``fn``: ``triton.testing.do_bench`` on CUDA (L2 flushed between runs), the
    harness's ``median_time`` over ``repeats`` calls elsewhere."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        return median_time(fn, self.device, repeats=self.repeats, warmup=1)


def copy_bandwidth(device: torch.device, timer: KernelTimer) -> float:
    """GB/s of a plain large copy (read + write; 1 GiB on CUDA, 128 MiB elsewhere): the measured bandwidth."""
    n = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timer(lambda: dst.copy_(src)) / 1e9


# --------------------------------------------------------------------------------------------------
# op benchmarks: torch candidates against the op


def op_setup(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, int, float | None]:
    """The parsed options (:func:`bench_parser`), the device, the timing repeats (``--repeats``, else 5 with
    ``--quick``, 15 on CPU, 50 on CUDA) and, on CUDA, the measured copy bandwidth."""
    args = bench_parser(description).parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else (15 if device.type == "cpu" else 50))
    peak = copy_bandwidth(device, KernelTimer(device, repeats)) if device.type == "cuda" else None
    return args, device, repeats, peak


def op_cases(shapes: list[tuple[int, ...]], quick: bool) -> list[tuple]:
    """(row shape, batch size, fraction of the rows) of every case: batches 64, 256 (and 1024), fractions
    0.1 ... 0.9 (fewer with ``quick``)."""
    batches = [64, 256] if quick else [64, 256, 1024]
    fractions = [0.1, 0.5, 0.9] if quick else [0.1, 0.3, 0.5, 0.7, 0.9]
    return [(s, b, f) for s in shapes for b in batches for f in fractions]


def op_result(op: str, rows: list[dict], device: torch.device, peak: float | None, path: str | None) -> dict:
    """Print the rows of ``speedup_row``, write the result JSON to ``path`` (if given) and return it."""
    print_speedups(rows, op, peak)
    result = {"benchmark": op, "environment": environment(device), "copy_GBps": peak, "rows": rows}
    write_json(path, result)
    return result


def speedup_row(case: dict, times: dict[str, float], op: str, moved_bytes: int, peak: float | None) -> dict:
    """One result row: ``case`` (what was timed), the median ms of every candidate, each torch candidate's
    time over ``op``'s (> 1: ``op`` is faster), ``op``'s GB/s for ``moved_bytes`` and its share of ``peak``."""
    row = {
        **case,
        "ms": {name: t * 1e3 for name, t in times.items()},
        "speedup": {name: t / times[op] for name, t in times.items() if name != op},
        "GBps": moved_bytes / times[op] / 1e9,
    }
    if peak:
        row["fraction_of_copy_bandwidth"] = row["GBps"] / peak
    return row


def print_speedups(rows: list[dict], op: str, peak: float | None) -> None:
    """The rows of ``speedup_row`` as a table, then the slowest ratio torch/``op`` over all of them."""
    case_keys = [k for k in rows[0] if k not in ("ms", "speedup", "GBps", "fraction_of_copy_bandwidth")]
    names, others = list(rows[0]["ms"]), list(rows[0]["speedup"])
    header = "".join(f"{k:>20}" if k == "shape" else f"{k:>9}" for k in case_keys)
    header += "".join(f"{n + ' ms':>16}" for n in names) + "".join(f"{'vs ' + n:>16}" for n in others)
    print(header + f"{'GB/s':>9}" + ("  of copy BW" if peak else ""))
    for r in rows:
        line = "".join(f"{str(r[k]):>20}" if k == "shape" else f"{r[k]:>9}" for k in case_keys)
        line += "".join(f"{r['ms'][n]:>16.3f}" for n in names)
        line += "".join(f"{r['speedup'][n]:>15.2f}x" for n in others) + f"{r['GBps']:>9.1f}"
        if peak:
            line += f"  {100 * r['fraction_of_copy_bandwidth']:>9.1f} %"
        print(line)
    worst = min(min(r["speedup"].values()) for r in rows)
    print(
        f"slowest ratio torch/{op} over all cases: {worst:.2f}x"
        + (f"; device copy bandwidth {peak:.0f} GB/s" if peak else "")
    )


# --------------------------------------------------------------------------------------------------
# kernel benchmarks: the fused Triton kernel against its eager reference and torch.compile


def compile_static(fn):
    """``torch.compile`` of ``fn`` as the kernel benchmarks time it: full graph, static shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def timer_and_bandwidth(device: torch.device, repeats: int) -> tuple[KernelTimer, float]:
    """A :class:`KernelTimer` and the measured copy bandwidth (printed)."""
    timer = KernelTimer(device, repeats)
    peak = copy_bandwidth(device, timer)
    print(f"measured copy bandwidth: {peak:.0f} GB/s ({device})")
    return timer, peak


def kernel_row(case: dict, times: dict[str, float], nbytes: int, peak: float | None, extra: dict | None = None):
    """One result row: ``case``, ms and GB/s (``nbytes`` read once) of every method (``eager``, ``compile``,
    ``fused`` if it ran), ``extra``, each rate's share of the copy bandwidth ``peak``, and the fused kernel's
    speedups over ``eager`` and ``compile``."""
    row = {
        **case,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "GBps": {k: nbytes / v / 1e9 for k, v in times.items()},
        **(extra or {}),
    }
    if peak:
        row["pct_of_copy_bw"] = {k: 100 * nbytes / v / 1e9 / peak for k, v in times.items()}
    if "fused" in times:
        row["speedup_vs_eager"] = times["eager"] / times["fused"]
        row["speedup_vs_compile"] = times["compile"] / times["fused"]
    return row


def cell(d: dict, key: str, spec: str = ".3f") -> str:
    """``d[key]`` formatted, or ``-`` where it was not measured."""
    return format(d[key], spec) if key in d else "-"


def kernel_result(script: str, argv: list[str] | None, device, how: str, fused_ok: bool, peak: float, **tables):
    """The result JSON of a kernel benchmark: where and how it ran, then its ``tables``."""
    return {
        "environment": environment(device),
        "triton_status": how,
        "fused_measured": fused_ok,
        "copy_bandwidth_GBps": peak,
        "command": " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])]),
        **tables,
    }


# ---------------------------------------------------------------------------------------------------------
# --sass: compile a fused kernel for a GPU target without a GPU.

_PTR = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1", torch.int64: "i64"}


def compile_for_target(fn, args, kwargs, arch: int):
    """triton.compile the @triton.jit kernel ``fn`` for sm_<arch> with the arguments of a real launch (the JIT's
    specialisation: unit ints become constants, 16-divisible ints and pointers get divisibility hints)."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    consts = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig, attrs = {}, {}
    for i, (name, a) in enumerate(zip(names, args, strict=False)):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _PTR[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool) or (isinstance(a, int) and a == 1):
            consts[name] = a
        elif isinstance(a, int):
            sig[name] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
    sig.update({name: "constexpr" for name in consts})
    src = triton.compiler.ASTSource(fn=fn, signature={n: sig[n] for n in names}, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
