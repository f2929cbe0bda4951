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

import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import op_cases, op_result, op_setup, speedup_row  # noqa: E402

from calexnet_fast.evaluation.timing import interleaved_medians  # noqa: E402
from calexnet_fast.ops import scatter_rows_  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args, device, repeats, peak = op_setup(__doc__, argv)
    rows, gen = [], torch.Generator().manual_seed(0)
    cases = op_cases([(64, 32, 32), (256, 8, 8), (1000,)], args.quick)
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
    return op_result("scatter_rows_", rows, device, peak, args.json)


if __name__ == "__main__":
    with torch.inference_mode():  # how the cascade calls it
        main()
