"""The exit rule of DESIGN.md §1, in plain PyTorch.

This is the reference twin of the Triton kernel ``calexnet_fast.kernels.exit_decision`` and the single
definition of "does a sample exit here" that the cascades, calibration and evaluation share.
"""

from __future__ import annotations

import torch


def check_thresholds(thresholds: torch.Tensor, n_classes: int, name: str = "thresholds") -> None:
    """Raise ``ValueError`` unless ``thresholds`` is a floating 1-D tensor of ``n_classes`` values."""
    if not isinstance(thresholds, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape [{n_classes}], got {type(thresholds).__name__}")
    if thresholds.dim() != 1 or thresholds.shape[0] != n_classes:
        raise ValueError(
            f"{name}: expected shape [{n_classes}] (one threshold per class), got {list(thresholds.shape)}"
        )
    if not thresholds.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {thresholds.dtype}")


def exit_decision_reference(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax confidence, prediction and per-class threshold test for one branch.

    Args:
        logits: [N, C] branch logits, any floating dtype (computed in float32).
        thresholds: [C] per-class thresholds τ; ``+inf`` means the class never exits.

    Returns:
        exit: [N] bool, ``conf >= thresholds[pred]``; a NaN confidence never exits.
        pred: [N] int64, ``torch.argmax`` of the logits (first maximum on ties).
        conf: [N] float32, the maximum softmax probability.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [N, C], got shape {list(logits.shape)}")
    check_thresholds(thresholds, logits.shape[1])
    if thresholds.device != logits.device:
        raise ValueError(f"thresholds: expected device {logits.device} (that of logits), got {thresholds.device}")
    z = logits.float()
    pred = torch.argmax(z, dim=1)
    # max softmax probability = 1 / sum(exp(z - max z)); gather at argmax keeps NaN rows NaN.
    conf = torch.softmax(z, dim=1).gather(1, pred.unsqueeze(1)).squeeze(1)
    exit_ = conf >= thresholds.float()[pred]
    return exit_, pred, conf
