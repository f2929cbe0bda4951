"""The exit rule, in plain PyTorch: the one definition of "does a sample leave the cascade here".

CalexNet's rule (per-class thresholds): a sample leaves at the first branch ``k`` whose softmax confidence
reaches the threshold of its predicted class, ``max softmax(z_k) >= thresholds[k - 1, argmax z_k]``; a NaN
confidence never exits, ``+inf`` means the class never exits there, ``-inf`` that it always does; a sample
that exits nowhere takes the backbone's logits. ``exit_index`` is ``k`` (1-based) for branch ``k`` and
``K + 1`` for the backbone.

- :func:`exit_test` is the test itself, ``score >= thresholds[pred]``, for any score (the baselines'
  exit heads give their own score and prediction; a global threshold is the matrix filled with it).
- :func:`exit_decision_reference` is one branch: softmax confidence, prediction, test. It is the reference
  twin of the Triton kernel ``calexnet_fast.kernels.exit_decision`` and what the cascades, calibration,
  training weights and evaluation use.
- :func:`apply_exit_rule` is the whole cascade's output computed from every branch's logits (the simulated
  evaluation); the real cascades give the very same output.
- :func:`global_threshold_exit` is the baselines' score rule: one global threshold on a score per exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "CascadeOutput",
    "apply_exit_rule",
    "check_cascade_thresholds",
    "check_thresholds",
    "exit_decision_reference",
    "exit_test",
    "first_exit",
    "global_threshold_exit",
]


class CascadeOutput(NamedTuple):
    """What a cascade returns, in the input order (and what :func:`apply_exit_rule` gives).

    Attributes:
        logits: [B, n_classes] the logits of the exit each sample took.
        exit_index: [B] int64, ``k`` for branch ``k`` (1-based), ``K + 1`` for the backbone.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor


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


def check_cascade_thresholds(
    thresholds: torch.Tensor | Sequence, n_branches: int, n_classes: int, name: str = "thresholds"
) -> torch.Tensor:
    """Validate a cascade's thresholds and return them as a float32 tensor (same device as given).

    Args:
        thresholds: [K, n_classes] floating values; ``+inf`` (never exits) and ``-inf`` (always exits) are
            allowed, NaN is not. Array-likes are converted with ``torch.as_tensor``.
        n_branches: ``K``.
        n_classes: number of classes.

    Raises:
        ValueError: naming ``name``, the expected and the given shape / dtype / value.
    """
    if not isinstance(thresholds, torch.Tensor):
        try:
            if isinstance(thresholds, (str, bytes)):
                raise TypeError(type(thresholds).__name__)
            thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{name}: expected a tensor of shape [{n_branches}, {n_classes}], got {type(thresholds).__name__}"
            ) from None
    if thresholds.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with values (on cpu or cuda), got a meta tensor")
    if thresholds.dim() != 2 or tuple(thresholds.shape) != (n_branches, n_classes):
        raise ValueError(
            f"{name}: expected shape [{n_branches}, {n_classes}] (K branches x n_classes), got {list(thresholds.shape)}"
        )
    if not thresholds.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {thresholds.dtype}")
    if bool(torch.isnan(thresholds).any()):
        bad = torch.isnan(thresholds).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected no NaN (use +inf for 'never exits'), got NaN at {bad}")
    return thresholds.to(torch.float32)


def exit_test(score: torch.Tensor, pred: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The exit test: ``score >= thresholds[pred]`` in float32 ([N] bool; a NaN score never exits).

    Args:
        score: [N] the exit score (CalexNet: the maximum softmax probability).
        pred: [N] int64 predicted classes, indices into ``thresholds``.
        thresholds: [C] per-class thresholds.
    """
    return score.float() >= thresholds.float()[pred]


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
    return exit_test(conf, pred, thresholds), pred, conf


def first_exit(hit: torch.Tensor) -> torch.Tensor:
    """Exit index of every sample from its per-exit test results: the first ``k`` whose test passed.

    Args:
        hit: [..., K, N] bool, ``hit[..., k - 1, i]``: sample ``i`` passes the test at exit ``k``.

    Returns:
        [..., N] int64 in ``1 .. K + 1`` (``K + 1``: no exit passed, the backbone).
    """
    k_count = hit.shape[-2]
    none = torch.full(hit.shape[:-2] + hit.shape[-1:], k_count + 1, dtype=torch.int64, device=hit.device)
    if k_count == 0:
        return none
    first = hit.to(torch.uint8).argmax(dim=-2) + 1  # argmax of a bool finds the first maximum
    return torch.where(hit.any(dim=-2), first, none)


def apply_exit_rule(
    branch_logits: torch.Tensor, backbone_logits: torch.Tensor, thresholds: torch.Tensor
) -> CascadeOutput:
    """The cascade's output computed from simulated logits (identical to the real cascade's).

    Args:
        branch_logits: [K, B, C] logits of every branch for every sample.
        backbone_logits: [B, C] the backbone's logits.
        thresholds: [K, C] per-branch, per-class thresholds.

    Returns:
        :class:`CascadeOutput`; logits in ``branch_logits``' dtype.
    """
    if branch_logits.dim() != 3:
        raise ValueError(f"branch_logits: expected a 3-D tensor [K, B, C], got shape {list(branch_logits.shape)}")
    n_branches, batch, n_classes = branch_logits.shape[0], branch_logits.shape[1], branch_logits.shape[2]
    if backbone_logits.dim() != 2 or backbone_logits.shape[0] != batch or backbone_logits.shape[1] != n_classes:
        raise ValueError(f"backbone_logits: expected shape [{batch}, {n_classes}], got {list(backbone_logits.shape)}")
    if thresholds.dim() != 2 or thresholds.shape[0] != n_branches or thresholds.shape[1] != n_classes:
        raise ValueError(f"thresholds: expected shape [{n_branches}, {n_classes}], got {list(thresholds.shape)}")
    hits = [exit_decision_reference(branch_logits[k], thresholds[k])[0] for k in range(n_branches)]
    hit = torch.zeros([0, batch], dtype=torch.bool, device=branch_logits.device)
    if n_branches > 0:
        hit = torch.stack(hits)
    exit_index = first_exit(hit)
    every = torch.cat([branch_logits, backbone_logits.to(branch_logits.dtype).unsqueeze(0)])  # [K + 1, B, C]
    logits = every.gather(0, (exit_index - 1).view(1, batch, 1).expand(1, batch, n_classes)).squeeze(0)
    return CascadeOutput(logits, exit_index)


def global_threshold_exit(scores: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The baselines' score rule: exit index of every sample under one global threshold (or several at once).

    A sample leaves at the first exit ``k`` with ``scores[k] >= threshold`` (exactly at the threshold
    exits; NaN never exits): :func:`exit_test` with every class's threshold set to ``threshold``. One that
    leaves nowhere gets ``K + 1`` (the backbone).

    Args:
        scores: [K, N] scores.
        threshold: a float, or [T] thresholds.

    Returns:
        [N] int64 exit indices in ``1 .. K + 1`` for a float threshold, [T, N] for T thresholds.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a 2-D tensor [K, N], got {got}")
    thr = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device)
    scalar = thr.dim() == 0
    if torch.isnan(thr).any():
        raise ValueError("threshold: expected numbers (use +inf for 'never exits'), got NaN")
    thr = thr.reshape(-1)
    out = first_exit(scores.float().unsqueeze(0) >= thr.view(-1, 1, 1))  # [T, K, N] -> [T, N]
    return out[0] if scalar else out
