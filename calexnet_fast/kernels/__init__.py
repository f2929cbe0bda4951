"""Triton kernels of calexnet_fast, wrapped as torch custom ops. They take tensors, never modules.

- ``exit_decision(logits, thresholds) -> (exit, pred, conf)``: ``torch.ops.calexnet_fast.exit_decision``.
- ``proto_head_exit(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
  -> (logits, exit, pred, conf)``: ``torch.ops.calexnet_fast.proto_head_exit``, the fused prototype-pooling
  head + exit decision, on a folded head's buffers (``FoldedPrototypeHead.operands()``);
  ``proto_head_operand_dtypes`` says in which dtypes the kernel reads them.
- ``grid_head_exit(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid,
  feature_grid, max_size) -> (logits, exit, pred, conf)``: ``torch.ops.calexnet_fast.grid_head_exit``, the fused
  grid prototype-pooling head + exit decision, on a folded grid head's buffers (``FoldedGridPrototypeHead``);
  ``grid_head_operand_dtypes`` says in which dtypes the kernel reads them.
- ``triton_status() -> (usable, how)``: whether Triton can run here and how.

Importing this package needs neither triton nor a GPU: CPU tensors (and CUDA tensors where Triton cannot
run, with one warning) use the PyTorch reference twins ``calexnet_fast.exit_rule.exit_decision_reference``,
``calexnet_fast.reference.proto_head_exit_reference`` and ``grid_head_exit_reference``. Triton itself is
imported on the first kernel launch.
"""

from ._triton import triton_status
from .exit_decision import exit_decision, exit_decision_launch_config
from .grid_head import grid_head_exit, grid_head_launch_config, grid_head_operand_dtypes
from .proto_head import proto_head_exit, proto_head_launch_config, proto_head_operand_dtypes

__all__ = [
    "exit_decision",
    "exit_decision_launch_config",
    "grid_head_exit",
    "grid_head_launch_config",
    "grid_head_operand_dtypes",
    "proto_head_exit",
    "proto_head_launch_config",
    "proto_head_operand_dtypes",
    "triton_status",
]
