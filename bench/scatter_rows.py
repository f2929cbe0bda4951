"""Benchmark of the in-place row scatter against torch indexing, on feature-map and logit rows.

    python bench/scatter_rows.py [--device cpu|cuda] [--quick] [--json PATH]

For each row shape ([B, 64, 32, 32] and [B, 256, 8, 8] feature maps, [B, 1000] logits, float32), B in
64/256/1024 and a written fraction 0.1..0.9 (distinct random target rows, as a cascade writes its exits back):
median time of ``calexnet_fast.ops.scatter_rows_(out, src, index)``, ``out[index] = src`` and
``out.index_copy_(0, index, src)`` (all in place), measured in interleaved rounds, the ratio torch/scatter_rows_
(> 1 means scatter_rows_ is faster) and the achieved GB/s (bytes read + written). On CUDA it also measures the
device's copy bandwidth (a large device-to-device copy) and reports scatter_rows_'s fraction of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from kernel_timing import KernelTimer, copy_bandwidth, print_speedups, speedup_row  # noqa: E402

from calexnet_fast.evaluation.timing import environment, interleaved_medians  # noqa: E402
from calexnet_fast.ops import scatter_rows_  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(64, 32, 32), (256, 8, 8), (1000,)]
    batches = [64, 256] if args.quick else [64, 256, 1024]
    fractions = [0.1, 0.5, 0.9] if args.quick else [0.1, 0.3, 0.5, 0.7, 0.9]
    repeats = args.repeats or (5 if args.quick else (15 if device.type == "cpu" else 50))
    peak = copy_bandwidth(device, KernelTimer(device, repeats)) if device.type == "cuda" else None

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [(s, b, f) for s in shapes for b in batches for f in fractions]
    for shape, batch, fraction in tqdm(cases, desc="scatter_rows_", disable=None):
        n = max(1, round(fraction * batch))
        out = torch.randn(batch, *shape, generator=gen).to(device)
        src = torch.randn(n, *shape, generator=gen).to(device)
        index = torch.randperm(batch, generator=gen)[:n].to(device)

        def index_put():
            out[index] = src

        times = interleaved_medians(
            {
                "scatter_rows_": lambda: scatter_rows_(out, src, index),
                "index_put": index_put,
                "index_copy": lambda: out.index_copy_(0, index, src),
            },
            device,
            repeats,
        )
        moved = 2 * n * src[0].numel() * src.element_size()
        case = {"shape": [batch, *shape], "fraction": fraction, "written": n}
        rows.append(speedup_row(case, times, "scatter_rows_", moved, peak))
    print_speedups(rows, "scatter_rows_", peak)
    result = {"benchmark": "scatter_rows_", "environment": environment(device), "copy_GBps": peak, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    with torch.inference_mode():  # how the cascade calls it
        main()
