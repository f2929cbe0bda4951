"""``compact``: gather the rows of a batch where a mask is true (C++/CUDA op ``calexnet_fast::compact``).

Registers the op's fake kernel (``torch.compile``, ``torch.export``) and autograd (the gradient of the rows
is scattered back into a zero batch). Reference twin: ``calexnet_fast.reference.compact_reference``.
"""

from __future__ import annotations

import torch

from ..reference import check_compact_args, row_format
from . import _library  # noqa: F401  (defines torch.ops.calexnet_fast.compact before the registrations below)


@torch.library.register_fake("calexnet_fast::compact")
def _compact_fake(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_compact_args(x, mask)
    n = torch.library.get_ctx().new_dynamic_size()
    rows = x.new_empty((n, *x.shape[1:])).contiguous(memory_format=row_format(x))
    return rows, x.new_empty((n,), dtype=torch.int64)


def _compact_setup(ctx, inputs, output) -> None:
    x, _ = inputs
    _, index = output
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _compact_backward(ctx, grad_rows, _grad_index):
    (index,) = ctx.saved_tensors
    zeros = grad_rows.new_zeros(ctx.x_shape)
    return torch.ops.calexnet_fast.scatter_rows(zeros, grad_rows.contiguous(), index), None


torch.library.register_autograd("calexnet_fast::compact", _compact_backward, setup_context=_compact_setup)


def compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the rows of ``x`` where ``mask`` is true into a new dense batch.

    Args:
        x: [B, ...] any dtype; contiguous, channels_last or strided.
        mask: [B] bool on the same device.

    Returns:
        rows: [n, ...] the selected rows in order (channels_last inputs give channels_last rows).
        index: [n] int64 positions of the selected rows in ``x``.
    """
    return torch.ops.calexnet_fast.compact(x, mask)
