"""Simulated operating points: every exit of every sample computed once, then the exit rule per point.

A method has one operating parameter: the CPM margin ``m`` for CalexNet, the reference and the ablations
(thresholds calibrated on the **validation** split, :func:`sweep_cpm`), or one global threshold ``τ`` for
the baselines (:func:`sweep_global_threshold`; its grid is uniform on [0, 1] plus quantiles of the
validation scores, :func:`threshold_grid`). Each operating point is measured on the **test** split.

This is the one place a simulated operating point is evaluated: :func:`cpm_decisions` /
:func:`score_decisions` give each point's (prediction, exit index) per sample, :func:`point_metrics` its
accuracy, exit fractions and FLOPs reduction ``1 − E[cost] / cost(backbone)`` under
:mod:`calexnet_fast.flops`' cost model (failed heads are paid for). ``calexnet evaluate``
(:func:`evaluate_points`), ``calexnet compare`` (the sweeps) and ``calexnet measure`` (the check of the
real cascade) all use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..baselines import exit_outputs
from ..calibration import calibrate
from ..exit_rule import apply_exit_rule, global_threshold_exit
from ..flops import FlopsProfile, exit_histogram

__all__ = [
    "SweepResult",
    "baseline_decisions",
    "cpm_decisions",
    "evaluate_points",
    "parse_margins",
    "point_metrics",
    "score_decisions",
    "sweep_cpm",
    "sweep_global_threshold",
    "threshold_grid",
]

Decision = tuple[torch.Tensor, torch.Tensor]  # (pred [N] int64, exit_index [N] int64 in 1..K+1)


@dataclass
class SweepResult:
    """The operating points of one method and seed, measured on the test split.

    Attributes:
        method: method name.
        seed: training seed.
        param_name: ``"margin"`` (CPM) or ``"threshold"`` (global threshold).
        params: the operating parameter of each point.
        accuracy: test accuracy of each point (fraction).
        flops_reduction: ``1 − E[cost] / cost(backbone)`` of each point.
        exit_fractions: per point, the K + 1 fractions of test samples leaving at branch 1..K, backbone.
        info: extra facts (head FLOPs, training time, ...).
    """

    method: str
    seed: int
    param_name: str
    params: list[float]
    accuracy: list[float]
    flops_reduction: list[float]
    exit_fractions: list[list[float]]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["params"] = [v if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in self.params]
        return d

    @classmethod
    def from_json(cls, d: dict) -> SweepResult:
        d = dict(d)
        d["params"] = [float(v) for v in d["params"]]
        return cls(**d)

    def add(self, metrics: dict) -> None:
        """Append one point's :func:`point_metrics`."""
        self.accuracy.append(metrics["accuracy"])
        self.flops_reduction.append(metrics["flops_reduction"])
        self.exit_fractions.append(metrics["exit_fractions"])


def point_metrics(pred: torch.Tensor, exit_index: torch.Tensor, labels: torch.Tensor, profile: FlopsProfile) -> dict:
    """Accuracy, FLOPs reduction and exit fractions of one operating point.

    Args:
        pred: [N] predicted classes; exit_index: [N] in ``1 .. K + 1``; labels: [N].
        profile: the cascade's FLOPs (backbone segments and heads).

    Returns:
        ``{"accuracy", "flops_reduction", "exit_fractions"}`` (the K + 1 fractions leaving at branch 1..K,
        backbone).
    """
    counts = exit_histogram(exit_index.cpu(), profile.n_branches).double()
    return {
        "accuracy": float((pred.cpu() == labels.cpu()).double().mean()),
        "flops_reduction": profile.flops_reduction(counts),
        "exit_fractions": (counts / counts.sum()).tolist(),
    }


def cpm_decisions(
    branch_logits: torch.Tensor, backbone_logits: torch.Tensor, thresholds: Sequence[torch.Tensor] | torch.Tensor
) -> list[Decision]:
    """(pred, exit_index) of every sample at each CPM point (the exit rule on simulated logits).

    Args:
        branch_logits: [K, N, C]; backbone_logits: [N, C].
        thresholds: one [K, C] threshold matrix per point (or [M, K, C]).
    """
    z, zb = branch_logits.float(), backbone_logits.float()
    out = []
    for thr in thresholds:
        o = apply_exit_rule(z, zb, thr)
        out.append((o.logits.argmax(1), o.exit_index))
    return out


def score_decisions(
    scores: torch.Tensor,
    preds: torch.Tensor,
    backbone_logits: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor,
) -> list[Decision]:
    """(pred, exit_index) of every sample at each global threshold (the baselines' score rule).

    A sample leaves at the first exit ``k`` with ``scores[k] >= τ`` and takes ``preds[k]``; one that leaves
    nowhere takes the backbone's argmax (:func:`calexnet_fast.exit_rule.global_threshold_exit`).

    Args:
        scores: [K, N]; preds: [K, N] int64; backbone_logits: [N, C]; thresholds: T thresholds.
    """
    taus = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    all_preds = torch.cat([preds.long().cpu(), backbone_logits.argmax(1).cpu().unsqueeze(0)])  # [K + 1, N]
    exits = global_threshold_exit(scores.float().cpu(), taus.float())  # [T, N]
    cols = torch.arange(all_preds.shape[1])
    return [(all_preds[e - 1, cols], e) for e in exits]


def baseline_decisions(model: torch.nn.Module, cache, taus: Sequence[float], device=None) -> list[Decision]:
    """:func:`score_decisions` of a trained baseline on a feature cache (its exit outputs computed once)."""
    eo = exit_outputs(model, cache, device=device)
    return score_decisions(eo.scores, eo.preds, cache.logits_tensor(), list(taus))


def evaluate_points(
    branch_logits: torch.Tensor,
    backbone_logits: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    margins: Sequence[float] | torch.Tensor,
    profile: FlopsProfile,
) -> list[dict]:
    """Accuracy, FLOPs reduction and exit fractions of the cascade for each margin's thresholds.

    Args:
        branch_logits: [K, N, C]; backbone_logits: [N, C]; labels: [N].
        thresholds: [M, K, C]; margins: [M]; profile: the cascade's :class:`~calexnet_fast.flops.FlopsProfile`.

    Returns:
        One ``{"margin", "accuracy", "flops_reduction", "exit_fractions"}`` per margin.
    """
    decisions = cpm_decisions(branch_logits, backbone_logits, thresholds)
    return [
        {"margin": float(m), **point_metrics(pred, ex, labels, profile)}
        for m, (pred, ex) in zip(margins, decisions, strict=True)
    ]


def parse_margins(text: str) -> torch.Tensor:
    """Margins written ``START:STOP:COUNT`` (``COUNT`` evenly spaced, both ends included) or as a comma list.

    Returns:
        [M] float64 margins.

    Raises:
        ValueError: ``text`` is neither (the message starts with ``margins:``).
    """
    parts = text.split(":")
    try:
        if len(parts) == 3:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise ValueError
            return torch.linspace(start, stop, num, dtype=torch.float64)
        return torch.tensor([float(v) for v in text.split(",")], dtype=torch.float64)
    except ValueError:
        raise ValueError(
            f"margins: expected START:STOP:COUNT (e.g. 0:0.5:51) or a comma list (0,0.1,0.2), got {text!r}"
        ) from None


def _check_labels(labels: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name}: expected a 1-D tensor of {n} labels, got {got}")
    return labels.long().cpu()


def sweep_cpm(
    val_branch_logits: torch.Tensor,
    val_backbone_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_branch_logits: torch.Tensor,
    test_backbone_logits: torch.Tensor,
    test_labels: torch.Tensor,
    profile: FlopsProfile,
    margins: Sequence[float] | torch.Tensor,
    *,
    aligned: bool,
    margin_mode: str = "additive",
    min_support: int = 20,
    bar_from: str = "subset",
    method: str = "cpm",
    seed: int = 0,
) -> SweepResult:
    """CPM thresholds calibrated on validation for every margin, applied to the test split.

    Args:
        val_branch_logits: [K, Nv, C] branch logits on the validation split.
        val_backbone_logits: [Nv, C]; val_labels: [Nv].
        test_branch_logits: [K, Nt, C]; test_backbone_logits: [Nt, C]; test_labels: [Nt].
        profile: the cascade's FLOPs (backbone segments and these heads).
        margins: M margins.
        aligned, margin_mode, min_support, bar_from: CPM options (:func:`calexnet_fast.calibration.calibrate`).
        method, seed: labels of the result.

    Returns:
        :class:`SweepResult` with one point per margin (``param_name="margin"``).
    """
    if test_branch_logits.dim() != 3 or test_branch_logits.shape[0] != profile.n_branches:
        raise ValueError(
            f"test_branch_logits: expected [K={profile.n_branches}, N, C], got {list(test_branch_logits.shape)}"
        )
    y = _check_labels(test_labels, test_branch_logits.shape[1], "test_labels")
    m = torch.as_tensor(margins, dtype=torch.float64).reshape(-1)
    thr = calibrate(
        val_branch_logits,
        val_backbone_logits,
        val_labels,
        m,
        aligned=aligned,
        margin_mode=margin_mode,
        min_support=min_support,
        bar_from=bar_from,
    )
    res = SweepResult(method, seed, "margin", m.tolist(), [], [], [])
    for pred, ex in cpm_decisions(test_branch_logits.cpu(), test_backbone_logits.cpu(), thr):
        res.add(point_metrics(pred, ex, y, profile))
    return res


def threshold_grid(
    val_scores: torch.Tensor | None = None, n_uniform: int = 101, n_quantiles: int = 199
) -> torch.Tensor:
    """Global thresholds to sweep: ``n_uniform`` points on [0, 1], quantiles of the validation scores (so
    the grid is dense where the scores are, e.g. near 1 for max-probabilities), and ``+inf`` (no exit).

    Args:
        val_scores: [K, N] (or any shape) validation scores; only the validation split places the grid.
        n_uniform, n_quantiles: grid sizes.

    Returns:
        Sorted unique float64 thresholds.
    """
    parts = [torch.linspace(0.0, 1.0, n_uniform, dtype=torch.float64)]
    if val_scores is not None and n_quantiles > 0:
        s = val_scores.detach().double().flatten().cpu()
        s = s[torch.isfinite(s)]
        if s.numel():
            q = torch.linspace(0.0, 1.0, n_quantiles + 2, dtype=torch.float64)[1:-1]
            parts.append(torch.quantile(s, q))
    parts.append(torch.tensor([float("inf")], dtype=torch.float64))
    return torch.unique(torch.cat(parts))


def sweep_global_threshold(
    test_scores: torch.Tensor,
    test_preds: torch.Tensor,
    test_backbone_logits: torch.Tensor,
    test_labels: torch.Tensor,
    profile: FlopsProfile,
    thresholds: Sequence[float] | torch.Tensor,
    *,
    method: str = "baseline",
    seed: int = 0,
) -> SweepResult:
    """A global-threshold exit rule on the test split, for every threshold (:func:`score_decisions`).

    Args:
        test_scores: [K, N]; test_preds: [K, N] int64; test_backbone_logits: [N, C]; test_labels: [N].
        profile: the cascade's FLOPs.
        thresholds: T thresholds (e.g. :func:`threshold_grid` of the validation scores).

    Returns:
        :class:`SweepResult` with one point per threshold (``param_name="threshold"``).
    """
    if test_scores.dim() != 2 or test_scores.shape[0] != profile.n_branches:
        raise ValueError(f"test_scores: expected [K={profile.n_branches}, N], got {list(test_scores.shape)}")
    if test_preds.shape != test_scores.shape:
        raise ValueError(f"test_preds: expected shape {list(test_scores.shape)}, got {list(test_preds.shape)}")
    y = _check_labels(test_labels, test_scores.shape[1], "test_labels")
    taus = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    res = SweepResult(method, seed, "threshold", taus.tolist(), [], [], [])
    for pred, ex in score_decisions(test_scores, test_preds, test_backbone_logits, taus):
        res.add(point_metrics(pred, ex, y, profile))
    return res
