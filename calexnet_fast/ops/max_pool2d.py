"""``max_pool2d``: max pooling of a contiguous (NCHW) CPU map in one pass (C++ op ``calexnet_fast::max_pool2d``),
what the frozen stages' inference form runs for their max pools (``calexnet_fast.backbones.InferenceMaxPool2d``).

PyTorch's NCHW CPU kernel for the stem pool of a ResNet is many times slower than the convolutions around it
(docs/design.md §2). Reference twin: ``calexnet_fast.reference.max_pool2d_reference`` (registered in its place
where the C++ library is not loaded, and on CUDA).
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from . import _library  # noqa: F401  (defines torch.ops.calexnet_fast.max_pool2d first)

__all__ = ["max_pool2d"]


@torch.library.register_fake("calexnet_fast::max_pool2d")
def _max_pool2d_fake(x, kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w):
    n, c, h, w = x.shape
    return x.new_empty(
        (n, c, (h + 2 * padding_h - kernel_h) // stride_h + 1, (w + 2 * padding_w - kernel_w) // stride_w + 1)
    )


def max_pool2d(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor mode) of a
    contiguous 4-D float32 / float64 CPU tensor, as the C++ kernel computes it (same values)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    return torch.ops.calexnet_fast.max_pool2d(x, kh, kw, sh, sw, ph, pw)
