"""Benchmark of the compaction op against torch indexing, on feature-map rows.

    python bench/compact.py [--device cpu|cuda] [--quick] [--json PATH]

For each shape ([B, 64, 32, 32] and [B, 256, 8, 8] float32), B in 64/256/1024 and keep fraction 0.1..0.9:
median time of ``calexnet_fast.ops.compact``, ``x[mask]`` and ``x.index_select(0, mask.nonzero()[:, 0])``
(each returns the rows; compact also returns their positions), measured in interleaved rounds, the ratio
torch/compact (> 1 means compact is faster) and the achieved GB/s (bytes read + written). On CUDA it also
measures the device's copy bandwidth (a large device-to-device copy) and reports compact's fraction of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import op_cases, op_result, op_setup, speedup_row  # noqa: E402

from calexnet_fast.evaluation.timing import interleaved_medians  # noqa: E402
from calexnet_fast.ops import compact  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args, device, repeats, peak = op_setup(__doc__, argv)
    rows, gen = [], torch.Generator().manual_seed(0)
    cases = op_cases([(64, 32, 32), (256, 8, 8)], args.quick)
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
    return op_result("compact", rows, device, peak, args.json)


if __name__ == "__main__":
    with torch.inference_mode():  # how the cascade calls it
        main()
