"""Triton kernels of calexnet_fast, wrapped as torch custom ops (shipped as ``calexnet_fast.kernels``).

- ``exit_decision(logits, thresholds) -> (exit, pred, conf)``: ``torch.ops.calexnet_fast.exit_decision``.
- ``proto_head_exit(features, folded, thresholds) -> (logits, exit, pred, conf)``:
  ``torch.ops.calexnet_fast.proto_head_exit``, the fused prototype-pooling head + exit decision.
- ``triton_status() -> (usable, how)``: whether Triton can run here and how.

Importing this package needs neither triton nor a GPU: CPU tensors (and CUDA tensors where Triton cannot
run, with one warning) use the PyTorch reference twins ``calexnet_fast.exit_rule.exit_decision_reference``
and ``proto_head_exit_reference``. Triton itself is imported on the first kernel launch.
"""

from ._triton import interpreting, triton_status
from .exit_decision import exit_decision, exit_decision_launch_config
from .proto_head import proto_head_exit, proto_head_exit_reference, proto_head_launch_config

__all__ = [
    "exit_decision",
    "exit_decision_launch_config",
    "interpreting",
    "proto_head_exit",
    "proto_head_exit_reference",
    "proto_head_launch_config",
    "triton_status",
]
