"""Benchmark of the compaction op against torch indexing, on feature-map rows.

    python bench/compact.py [--device cpu|cuda] [--quick] [--json PATH]

For each shape ([B, 64, 32, 32] and [B, 256, 8, 8] float32), B in 64/256/1024 and keep fraction 0.1..0.9:
median time of ``calexnet_fast.ops.compact``, ``x[mask]`` and ``x.index_select(0, mask.nonzero()[:, 0])``
(each returns the rows; compact also returns their positions), measured in interleaved rounds, the ratio
torch/compact (> 1 means compact is faster) and the achieved GB/s (bytes read + written). On CUDA it also
measures the device's copy bandwidth (a large device-to-device copy) and reports compact's fraction of it.
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
from calexnet_fast.ops import compact  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(64, 32, 32), (256, 8, 8)]
    batches = [64, 256] if args.quick else [64, 256, 1024]
    keeps = [0.1, 0.5, 0.9] if args.quick else [0.1, 0.3, 0.5, 0.7, 0.9]
    repeats = args.repeats or (5 if args.quick else (15 if device.type == "cpu" else 50))
    peak = copy_bandwidth(device, KernelTimer(device, repeats)) if device.type == "cuda" else None

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [(s, b, k) for s in shapes for b in batches for k in keeps]
    for shape, batch, keep in tqdm(cases, desc="compact", disable=None):
        x = torch.randn(batch, *shape, generator=gen).to(device)
        mask = (torch.rand(batch, generator=gen) < keep).to(device)
        times = interleaved_medians(
            {
                "compact": lambda: compact(x, mask),
                "bool_index": lambda: x[mask],
                "index_select": lambda: x.index_select(0, mask.nonzero()[:, 0]),
            },
            device,
            repeats,
        )
        moved = 2 * int(mask.sum()) * x[0].numel() * x.element_size()
        case = {"shape": [batch, *shape], "keep": keep, "kept": int(mask.sum())}
        rows.append(speedup_row(case, times, "compact", moved, peak))
    print_speedups(rows, "compact", peak)
    result = {"benchmark": "compact", "environment": environment(device), "copy_GBps": peak, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    with torch.inference_mode():  # how the cascade calls it
        main()
