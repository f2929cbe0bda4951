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
from common import environment, interleaved_medians, median_time, write_json  # noqa: E402

from calexnet_fast import ops  # noqa: E402


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a plain 512 MiB device-to-device copy (read + write)."""
    src = torch.empty(128 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats=20)
    return 2 * src.numel() * 4 / t / 1e9


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
    peak = copy_bandwidth(device) if device.type == "cuda" else None

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [(s, b, k) for s in shapes for b in batches for k in keeps]
    for shape, batch, keep in tqdm(cases, desc="compact", disable=None):
        x = torch.randn(batch, *shape, generator=gen).to(device)
        mask = (torch.rand(batch, generator=gen) < keep).to(device)
        times = interleaved_medians(
            {
                "compact": lambda: ops.compact(x, mask),
                "bool_index": lambda: x[mask],
                "index_select": lambda: x.index_select(0, mask.nonzero()[:, 0]),
            },
            device,
            repeats,
        )
        moved = 2 * int(mask.sum()) * x[0].numel() * x.element_size()
        row = {
            "shape": [batch, *shape],
            "keep": keep,
            "kept": int(mask.sum()),
            **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "speedup_vs_bool_index": times["bool_index"] / times["compact"],
            "speedup_vs_index_select": times["index_select"] / times["compact"],
            "compact_GBps": moved / times["compact"] / 1e9,
        }
        if peak:
            row["fraction_of_copy_bandwidth"] = row["compact_GBps"] / peak
        rows.append(row)

    header = (
        f"{'shape':>20} {'keep':>5} {'compact ms':>11} {'x[mask] ms':>11} {'idx_sel ms':>11} "
        f"{'vs x[mask]':>10} {'vs idx_sel':>10} {'GB/s':>8}"
    )
    print(header + ("  of copy BW" if peak else ""))
    for r in rows:
        line = (
            f"{str(r['shape']):>20} {r['keep']:>5.1f} {r['compact_ms']:>11.3f} {r['bool_index_ms']:>11.3f} "
            f"{r['index_select_ms']:>11.3f} {r['speedup_vs_bool_index']:>9.2f}x {r['speedup_vs_index_select']:>9.2f}x "
            f"{r['compact_GBps']:>8.1f}"
        )
        if peak:
            line += f"  {100 * r['fraction_of_copy_bandwidth']:>5.1f} %"
        print(line)
    worst = min(min(r["speedup_vs_bool_index"], r["speedup_vs_index_select"]) for r in rows)
    print(
        f"slowest ratio torch/compact over all cases: {worst:.2f}x"
        + (f"; device copy bandwidth {peak:.0f} GB/s" if peak else "")
    )
    result = {"benchmark": "compact", "environment": environment(device), "copy_GBps": peak, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    with torch.inference_mode():  # how the cascade calls it
        main()
