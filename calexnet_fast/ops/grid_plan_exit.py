"""``grid_plan_exit``: the folded grid head on its working map, and the exit decision, in one pass per sample
on CPU (C++ op ``calexnet_fast::grid_plan_exit``; the CPU counterpart of the fused Triton kernel
``grid_head_exit``).

``calexnet_fast.heads.grid_plan.GridHeadPlan.exit`` builds the operands once per geometry (the classifier's
columns over each part's distinct pixel windows) and calls this op on the working map: per sample, the
projection with its ReLU and the prototype products (accumulated in registers), the cosine's division, every
window's max and mean, the classifier and the exit rule, with no intermediate tensors. Reference twin:
``calexnet_fast.reference.grid_plan_exit_reference`` (registered in its place where the C++ library is not
loaded, and on CUDA, where the Triton kernel is the fast path).
"""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (defines torch.ops.calexnet_fast.grid_plan_exit first)

__all__ = ["grid_plan_exit"]


@torch.library.register_fake("calexnet_fast::grid_plan_exit")
def _grid_plan_exit_fake(x, proj_weight_t, proj_bias, prototypes_t, s_windows, x_windows, cls_weight, cls_bias, *_):
    n, n_classes = x.shape[0], cls_bias.shape[0]
    return (
        x.new_empty((n, n_classes)),
        x.new_empty((n,), dtype=torch.bool),
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.float32),
    )


def grid_plan_exit(
    x: torch.Tensor,
    proj_weight_t: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes_t: torch.Tensor,
    s_windows: torch.Tensor,
    x_windows: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, exit, pred and conf of the grid head from its working map ``x`` (arguments and semantics:
    :func:`calexnet_fast.reference.grid_plan_exit_reference`). The C++ kernel takes float32 or float64 CPU
    tensors."""
    operands = (proj_weight_t, proj_bias, prototypes_t, s_windows, x_windows, cls_weight, cls_bias, thresholds)
    return _OP(x, *operands, float(eps))


_OP = torch.ops.calexnet_fast.grid_plan_exit.default  # the overload itself: no lookup per call (a hot path)
