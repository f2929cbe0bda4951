"""``scatter_rows_`` / ``scatter_rows``: write rows into a batch at given positions, the last duplicate winning
(C++/CUDA ops ``calexnet_fast::scatter_rows_`` in place and ``calexnet_fast::scatter_rows`` on a copy).

Registers the ops' fake kernels (``torch.compile``, ``torch.export``) and the autograd of ``scatter_rows``.
Reference twins: ``calexnet_fast.reference.scatter_rows__reference`` and ``scatter_rows_reference``.
"""

from __future__ import annotations

import torch

from ..reference import check_scatter_args, check_scatter_out, last_occurrence
from . import _library  # noqa: F401  (defines torch.ops.calexnet_fast.scatter_rows* before the registrations below)


@torch.library.register_fake("calexnet_fast::scatter_rows_")
def _scatter_rows__fake(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    check_scatter_args(out, src, index)
    check_scatter_out(out)


@torch.library.register_fake("calexnet_fast::scatter_rows")
def _scatter_rows_fake(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check_scatter_args(out, src, index)
    return torch.empty_like(out)


def _scatter_setup(ctx, inputs, output) -> None:
    out, _, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = out.shape[0]


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    winner = last_occurrence(index, ctx.rows).view(-1, *([1] * (grad.dim() - 1)))
    # Rows of `out` that were overwritten get no gradient; a src row gets one only if it was written.
    grad_out = grad.index_fill(0, index, 0)
    grad_src = grad.index_select(0, index) * winner
    return grad_out, grad_src, None


torch.library.register_autograd("calexnet_fast::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


def scatter_rows_(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write ``src[j]`` into ``out[index[j]]`` in place (last duplicate wins) and return ``out``.

    Args:
        out: [N, ...] destination, modified in place.
        src: [n, ...] rows to write; same dtype, device and trailing shape as ``out``.
        index: [n] int64 in ``[0, N)``; an out-of-range value raises before anything is written.

    ``src`` and ``index`` may share memory with ``out`` (they are read as they were before the call); an ``out``
    whose elements share memory (an expanded or overlapping view) is refused.
    """
    torch.ops.calexnet_fast.scatter_rows_(out, src, index)
    return out


def scatter_rows(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``scatter_rows_``: a copy of ``out`` with ``src`` written at ``index`` (differentiable)."""
    return torch.ops.calexnet_fast.scatter_rows(out, src, index)
