"""Benchmark of the inference form's max pool (the C++ op ``max_pool2d``) against PyTorch's, on a ResNet stem map.

    python bench/max_pool.py [--quick] [--repeats R] [--json PATH]

CPU only (the op is a CPU op). For contiguous float32 maps [B, 64, H, W] pooled 3x3 / stride 2 / padding 1 (a
torchvision ResNet's stem pool; 16x16 is ResNet-18's at 32x32 inputs, 56x56 at 112x112), median time of
``calexnet_fast.ops.max_pool2d``, of ``F.max_pool2d`` on the NCHW map, and of ``F.max_pool2d`` in channels_last
with the two layout copies (what the inference form ran before the op), measured in interleaved rounds; the
ratio torch/op (> 1: the op is faster) and the op's GB/s (map read once, output written once).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import op_result, op_setup, speedup_row  # noqa: E402

from calexnet_fast.evaluation.timing import interleaved_medians  # noqa: E402
from calexnet_fast.ops import max_pool2d  # noqa: E402


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 2, 1).contiguous()


def main(argv: list[str] | None = None) -> dict:
    args, device, repeats, peak = op_setup(__doc__, argv)
    if device.type != "cpu":
        raise SystemExit("bench/max_pool.py: max_pool2d is a CPU op (on CUDA the inference form keeps torch's pool)")
    cases = [(64, 64, 16, 16)] if args.quick else [(64, 64, 16, 16), (256, 64, 16, 16), (64, 64, 56, 56)]
    rows, gen = [], torch.Generator().manual_seed(0)
    for shape in tqdm(cases, desc="max_pool2d", disable=None):
        x = torch.randn(*shape, generator=gen)
        times = interleaved_medians(
            {
                "op": lambda: max_pool2d(x, 3, 2, 1),
                "nchw": lambda: F.max_pool2d(x, 3, 2, 1),
                "channels_last": lambda: _channels_last(x),
            },
            device,
            repeats,
        )
        moved = (x.numel() + max_pool2d(x, 3, 2, 1).numel()) * x.element_size()
        rows.append(speedup_row({"shape": list(shape)}, times, "op", moved, peak))
    return op_result("max_pool2d", rows, device, peak, args.json)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as bench/throughput.py on this CPU
    with torch.inference_mode():  # how the inference form calls it
        main()
