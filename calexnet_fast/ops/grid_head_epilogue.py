"""``grid_head_epilogue``: the folded grid head after its two matrix products, and the exit decision, in one
pass on CPU (C++ op ``calexnet_fast::grid_head_epilogue``; the CPU counterpart of the fused Triton kernel's
epilogue).

``calexnet_fast.heads.grid_plan.GridHeadPlan.exit`` runs the head's two matrix products in PyTorch (BLAS) and
this op for the rest: the cosine's division, every grid cell's max and mean, the classifier and the exit
rule, one sample at a time with no intermediate tensors. Reference twin:
``calexnet_fast.reference.grid_head_epilogue_reference`` (registered in its place where the C++ library is
not loaded, and on CUDA, where the Triton kernel is the fast path).
"""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (defines torch.ops.calexnet_fast.grid_head_epilogue first)

__all__ = ["grid_head_epilogue"]


@torch.library.register_fake("calexnet_fast::grid_head_epilogue")
def _grid_head_epilogue_fake(u, s, x, s_windows, x_windows, cls_weight, cls_bias, thresholds, eps):
    n, n_classes = u.shape[0], cls_bias.shape[0]
    return (
        u.new_empty((n, n_classes)),
        u.new_empty((n,), dtype=torch.bool),
        u.new_empty((n,), dtype=torch.int64),
        u.new_empty((n,), dtype=torch.float32),
    )


def grid_head_epilogue(
    u: torch.Tensor,
    s: torch.Tensor,
    x: torch.Tensor,
    s_windows: torch.Tensor,
    x_windows: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, exit, pred and conf of the grid head from its products ``u``, ``s`` and working map ``x``
    (arguments and semantics: :func:`calexnet_fast.reference.grid_head_epilogue_reference`). The C++ kernel
    takes float32 or float64 CPU tensors."""
    return torch.ops.calexnet_fast.grid_head_epilogue(
        u, s, x, s_windows, x_windows, cls_weight, cls_bias, thresholds, float(eps)
    )
