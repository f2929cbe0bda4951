"""CPM (Class Precision Margin) calibration of per-class exit thresholds (docs/design.md §1).

For branch k and class c: Pr_c is the backbone's precision on class c (P(y = c | backbone predicts c))
over the branch's calibration set; the bar is ``Pr_c - m`` (``margin_mode="additive"``) or
``(1 - m) * Pr_c`` (``"relative"``). Among the calibration samples the branch predicts as c, τ_k[c] is the
lowest confidence such that the set {conf ≥ τ} has precision ≥ bar and at least ``min_support`` members;
``+inf`` when no confidence qualifies (the class never exits at that branch).

* ``aligned=True`` (CalexNet fix 2): branch k's calibration set is the validation samples that survive
  branches 1..k-1 under their already calibrated thresholds; branches are calibrated in order.
* ``aligned=False`` (reference): every branch is calibrated on the whole validation set.
* ``bar_from="subset"`` (default) measures Pr_c on the branch's calibration set, ``"full_validation"`` on
  the whole validation set.

Choices this module fixes where the method leaves room (documented, tested):

* τ is always one of the confidences of the calibration set, taken at the end of a run of tied
  confidences (the set {conf ≥ τ} contains every tie), so the precision guarantee holds for exactly the
  samples that the exit rule ``conf >= τ`` lets out.
* If the backbone never predicts class c on the calibration set, Pr_c is undefined; the bar then uses the
  backbone's overall accuracy on that set instead.
* Samples with NaN confidence never exit (the exit rule), so they never count towards a set.

Everything is vectorised over margins and samples: one sort per branch, then cumulative sums over tie
groups. Survivor masks come from :func:`calexnet_fast.exit_rule.exit_decision_reference`, the single
definition of the exit rule shared with the cascades and the training weights.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .exit_rule import exit_decision_reference
from .io import load_state_file, save_state_file

__all__ = [
    "CalibrationSweep",
    "backbone_precision",
    "bars_from_precision",
    "calibrate",
    "calibrate_sweep",
    "cpm_thresholds",
    "margin_grid",
]

MARGIN_MODES = ("additive", "relative")
BAR_SOURCES = ("subset", "full_validation")

# Precision comparisons are made on float64 ratios; this absorbs the rounding of ``Pr_c - m``.
_PREC_EPS = 1e-12


def _check_data(t: torch.Tensor, name: str, what: str = "a tensor") -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor with data (not on the meta device)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected {what}, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected {what} with data (on cpu or cuda), got a meta tensor")


def _check_min_support(min_support: int) -> None:
    if isinstance(min_support, bool) or not isinstance(min_support, numbers.Integral) or min_support < 1:
        raise ValueError(f"min_support: expected a positive integer, got {min_support!r}")


def _check_classes(t: torch.Tensor, name: str, n_classes: int | None = None) -> None:
    """Raise ``ValueError`` unless ``t`` holds integer class indices (in ``[0, n_classes)`` when given)."""
    _check_data(t, name, "an integer tensor of class indices")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of class indices, got dtype {t.dtype}")
    if n_classes is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(f"{name}: expected values in [0, {n_classes - 1}], got [{int(t.min())}, {int(t.max())}]")


def _check_mask(mask: torch.Tensor, n: int, rows: int | None = None) -> torch.Tensor:
    """``mask`` as a [1 or M, N] bool CPU tensor; [N] is one subset. ``rows``: the allowed M besides 1."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor (True = in the subset), got {got}")
    _check_data(mask, "mask", "a bool tensor")
    if mask.dim() == 1 and mask.shape[0] == n:
        return mask.cpu().unsqueeze(0)
    if mask.dim() == 2 and mask.shape[1] == n and (rows is None or mask.shape[0] in (1, rows)):
        return mask.cpu()
    expected = f"[{n}] or [M, {n}]" if rows is None else f"[{n}] or [{rows}, {n}]"
    raise ValueError(f"mask: expected shape {expected} (one row per subset), got {list(mask.shape)}")


def _check_margins(margins: float | Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``margins`` as a float64 [M] CPU tensor, and whether a single number was given."""
    expected = "margins: expected a float or a 1-D sequence of floats"
    if margins is None or isinstance(margins, (str, bytes)):
        raise ValueError(f"{expected}, got {type(margins).__name__}")
    try:
        m = torch.as_tensor(margins, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected}, got {type(margins).__name__}") from None
    if m.dim() > 1:
        raise ValueError(f"{expected}, got shape {list(m.shape)}")
    if torch.isnan(m).any():
        raise ValueError("margins: expected finite numbers, got NaN")
    return m.reshape(-1), m.dim() == 0


def margin_grid(start: float = 0.0, stop: float = 0.5, num: int = 51) -> torch.Tensor:
    """Evenly spaced margins ``start..stop`` inclusive, float64 [num]."""
    if num < 1:
        raise ValueError(f"num: expected at least 1 margin, got {num}")
    return torch.linspace(start, stop, num, dtype=torch.float64)


def backbone_precision(
    backbone_pred: torch.Tensor, labels: torch.Tensor, n_classes: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class precision of the backbone and its accuracy, on all samples or on masked subsets.

    Args:
        backbone_pred: [N] int64 backbone predictions.
        labels: [N] int64 true labels.
        n_classes: C.
        mask: optional [M, N] bool, one subset per row (e.g. the survivors under M margins); [N]: one subset.

    Returns:
        precision: [M, C] float64 (M = 1 without a mask); NaN where the backbone predicts c on no sample.
        accuracy: [M] float64; NaN for an empty subset.
    """
    _check_classes(backbone_pred, "backbone_pred", n_classes)
    _check_classes(labels, "labels")
    if backbone_pred.dim() != 1 or labels.shape != backbone_pred.shape:
        raise ValueError(
            f"backbone_pred, labels: expected two [N] tensors, got {list(backbone_pred.shape)}, {list(labels.shape)}"
        )
    n = backbone_pred.shape[0]
    w = torch.ones(1, n, dtype=torch.float64) if mask is None else _check_mask(mask, n).to(torch.float64)
    correct = (backbone_pred == labels).to(torch.float64)
    den = torch.zeros(w.shape[0], n_classes, dtype=torch.float64).index_add_(1, backbone_pred, w)
    num = torch.zeros(w.shape[0], n_classes, dtype=torch.float64).index_add_(1, backbone_pred, w * correct)
    precision = num / den  # 0/0 -> NaN: undefined precision
    accuracy = (w * correct).sum(1) / w.sum(1)
    return precision, accuracy


def bars_from_precision(
    precision: torch.Tensor,
    accuracy: torch.Tensor,
    margins: torch.Tensor,
    margin_mode: str = "additive",
) -> torch.Tensor:
    """Precision bars ``Pr_c - m`` or ``(1 - m) Pr_c``; undefined Pr_c falls back to the accuracy.

    Args:
        precision: [M, C] or [1, C] float64 backbone precision (NaN = undefined).
        accuracy: [M] or [1] float64 backbone accuracy on the same subsets.
        margins: [M] margins (a float is one margin).
        margin_mode: ``"additive"`` or ``"relative"``.

    Returns:
        [M, C] float64 bars.
    """
    if margin_mode not in MARGIN_MODES:
        raise ValueError(f"margin_mode: expected one of {MARGIN_MODES}, got {margin_mode!r}")
    pr = torch.where(torch.isnan(precision), accuracy.unsqueeze(1), precision)
    m = _check_margins(margins)[0].unsqueeze(1)
    pr = pr.expand(m.shape[0], -1)
    return pr - m if margin_mode == "additive" else (1.0 - m) * pr


def cpm_thresholds(
    conf: torch.Tensor,
    pred: torch.Tensor,
    labels: torch.Tensor,
    bars: torch.Tensor,
    *,
    min_support: int = 20,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPM threshold of every class of one branch, for M bars (and M calibration subsets) at once.

    Args:
        conf: [N] branch confidence (max softmax probability).
        pred: [N] int64 branch prediction, in ``[0, C)``.
        labels: [N] int64 true labels.
        bars: [C] or [M, C] precision bars.
        min_support: minimum number of calibration samples in {conf ≥ τ} (predicted as c).
        mask: optional [N] or [M, N] bool: which samples belong to each calibration set.

    Returns:
        [C] or [M, C] float32 thresholds (``+inf``: the class cannot reach its bar; all ``+inf`` for N = 0).
    """
    _check_min_support(min_support)
    _check_data(conf, "conf", "a floating tensor (confidences)")
    _check_data(pred, "pred", "an integer tensor of class indices")
    _check_data(labels, "labels", "an integer tensor of class indices")
    if conf.dim() != 1 or pred.shape != conf.shape or labels.shape != conf.shape:
        raise ValueError(
            f"conf, pred, labels: expected three [N] tensors, got {list(conf.shape)}, {list(pred.shape)}, "
            f"{list(labels.shape)}"
        )
    if not conf.is_floating_point():
        raise ValueError(f"conf: expected a floating tensor (confidences), got dtype {conf.dtype}")
    if not isinstance(bars, torch.Tensor) or bars.dim() not in (1, 2) or not bars.is_floating_point():
        got = f"{list(bars.shape)} {bars.dtype}" if isinstance(bars, torch.Tensor) else type(bars).__name__
        raise ValueError(f"bars: expected a floating tensor [C] or [M, C], got {got}")
    _check_data(bars, "bars", "a floating tensor [C] or [M, C]")
    squeeze = bars.dim() == 1
    bars2 = bars.to(torch.float64).reshape(-1, bars.shape[-1])
    m_count, n_classes = bars2.shape
    _check_classes(pred, "pred", n_classes)
    _check_classes(labels, "labels")
    n = conf.shape[0]
    alive = torch.ones(1, n, dtype=torch.bool) if mask is None else _check_mask(mask, n, m_count)
    alive = alive.expand(m_count, n)
    out = torch.full((m_count, n_classes), float("inf"), dtype=torch.float32)
    if n == 0:
        return out[0] if squeeze else out
    conf = conf.detach().float().cpu()
    pred = pred.detach().long().cpu()
    labels = labels.detach().long().cpu()
    alive = alive & ~torch.isnan(conf)  # NaN confidence never exits

    # sort by class, then confidence descending (two stable sorts)
    order = torch.argsort(conf, descending=True, stable=True)
    order = order[torch.argsort(pred[order], stable=True)]
    conf_s, pred_s = conf[order], pred[order]
    correct_s = (pred_s == labels[order]).to(torch.float64)
    alive_s = alive[:, order].to(torch.float64)

    # tie groups: maximal runs of equal (class, confidence)
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = (pred_s[1:] != pred_s[:-1]) | (conf_s[1:] != conf_s[:-1])
    gid = torch.cumsum(new.long(), 0) - 1
    first = torch.nonzero(new).squeeze(1)
    n_groups = first.shape[0]
    cls_g, conf_g = pred_s[first], conf_s[first]
    n_g = torch.zeros(m_count, n_groups, dtype=torch.float64).index_add_(1, gid, alive_s)
    c_g = torch.zeros(m_count, n_groups, dtype=torch.float64).index_add_(1, gid, alive_s * correct_s)
    cum_n, cum_c = torch.cumsum(n_g, 1), torch.cumsum(c_g, 1)
    # restart the cumulative sums at each class: subtract the exclusive sum at the class's first group
    class_start = torch.ones(n_groups, dtype=torch.bool)
    class_start[1:] = cls_g[1:] != cls_g[:-1]
    start = torch.cummax(torch.where(class_start, torch.arange(n_groups), 0), 0).values
    count = cum_n - (cum_n - n_g)[:, start]
    hits = cum_c - (cum_c - c_g)[:, start]
    precision = hits / count.clamp(min=1)
    ok = (n_g > 0) & (count >= min_support) & (precision >= bars2[:, cls_g] - _PREC_EPS)
    cand = torch.where(ok, torch.arange(n_groups).expand(m_count, -1), -1)
    best = torch.full((m_count, n_classes), -1, dtype=torch.long)
    best.scatter_reduce_(1, cls_g.expand(m_count, -1), cand, reduce="amax", include_self=True)
    out = torch.where(best >= 0, conf_g[best.clamp(min=0)], out)
    return out[0] if squeeze else out


def _check_inputs(branch_logits, backbone_logits, labels) -> tuple[list[torch.Tensor], int, int]:
    if not isinstance(branch_logits, (torch.Tensor, Sequence)) or isinstance(branch_logits, (str, bytes)):
        raise ValueError(
            f"branch_logits: expected K tensors [N, C] or one [K, N, C], got {type(branch_logits).__name__}"
        )
    if isinstance(branch_logits, torch.Tensor):
        if branch_logits.dim() != 3:
            raise ValueError(
                f"branch_logits: expected K tensors [N, C] or one [K, N, C], got {list(branch_logits.shape)}"
            )
        branch_logits = list(branch_logits.unbind(0))
    branch_logits = list(branch_logits)
    if not branch_logits:
        raise ValueError("branch_logits: expected at least one branch, got none")
    _check_data(backbone_logits, "backbone_logits", "a tensor [N, C]")
    if backbone_logits.dim() != 2 or backbone_logits.shape[1] < 1:
        raise ValueError(f"backbone_logits: expected [N, C] with C >= 1 classes, got {list(backbone_logits.shape)}")
    n, c = backbone_logits.shape
    for k, z in enumerate(branch_logits):
        _check_data(z, f"branch_logits[{k}]", f"a tensor [{n}, {c}]")
        if z.shape != (n, c):
            raise ValueError(f"branch_logits[{k}]: expected [{n}, {c}] like backbone_logits, got {list(z.shape)}")
    _check_classes(labels, "labels", c)
    if labels.shape != (n,):
        raise ValueError(f"labels: expected [{n}], got {list(labels.shape)}")
    return branch_logits, n, c


def calibrate(
    branch_logits: Sequence[torch.Tensor] | torch.Tensor,
    backbone_logits: torch.Tensor,
    labels: torch.Tensor,
    margins: float | Sequence[float] | torch.Tensor,
    *,
    aligned: bool = True,
    margin_mode: str = "additive",
    min_support: int = 20,
    bar_from: str = "subset",
) -> torch.Tensor:
    """CPM thresholds for every branch, for one margin or a sweep of margins.

    Args:
        branch_logits: K tensors [N, C] (or one [K, N, C]): every branch's logits on the validation set.
        backbone_logits: [N, C] the backbone's logits on the same samples.
        labels: [N] integer true labels in ``[0, C)``.
        margins: one margin (float) or M margins.
        aligned: calibrate branch k on the survivors of branches 1..k-1 (CalexNet) or on all samples.
        margin_mode: ``"additive"`` (bar ``Pr_c - m``) or ``"relative"`` (bar ``(1 - m) Pr_c``).
        min_support: minimum size of the exiting set per class.
        bar_from: ``"subset"`` (Pr_c on the branch's calibration set) or ``"full_validation"``.

    Returns:
        [K, C] float32 thresholds for a float margin, [M, K, C] for a sequence (on CPU); all ``+inf`` when
        there are no samples (N = 0).
    """
    if bar_from not in BAR_SOURCES:
        raise ValueError(f"bar_from: expected one of {BAR_SOURCES}, got {bar_from!r}")
    if margin_mode not in MARGIN_MODES:
        raise ValueError(f"margin_mode: expected one of {MARGIN_MODES}, got {margin_mode!r}")
    _check_min_support(min_support)
    branch_logits, n, c = _check_inputs(branch_logits, backbone_logits, labels)
    m, scalar = _check_margins(margins)
    labels = labels.detach().long().cpu()
    bb_pred = torch.argmax(backbone_logits.detach().float().cpu(), dim=1)

    n_m = m.shape[0]
    alive = torch.ones(n_m, n, dtype=torch.bool)
    full_prec, full_acc = backbone_precision(bb_pred, labels, c)
    thresholds = torch.empty(n_m, len(branch_logits), c, dtype=torch.float32)
    never = torch.full((c,), float("inf"))
    for k, z in enumerate(branch_logits):
        z = z.detach().float().cpu()
        _, pred, conf = exit_decision_reference(z, never)
        if aligned and bar_from == "subset":
            prec, acc = backbone_precision(bb_pred, labels, c, alive)
        else:
            prec, acc = full_prec, full_acc
        bars = bars_from_precision(prec, acc, m, margin_mode)
        thr = cpm_thresholds(conf, pred, labels, bars, min_support=min_support, mask=alive if aligned else None)
        thresholds[:, k] = thr
        if aligned and k + 1 < len(branch_logits):
            for i in range(n_m):
                exit_, _, _ = exit_decision_reference(z, thr[i])
                alive[i] &= ~exit_
    return thresholds[0] if scalar else thresholds


@dataclass
class CalibrationSweep:
    """Thresholds for a sweep of margins, with the settings that produced them.

    Attributes:
        margins: [M] float64.
        thresholds: [M, K, C] float32.
        config: the calibration options (aligned, margin_mode, min_support, bar_from, …).
    """

    margins: torch.Tensor
    thresholds: torch.Tensor
    config: dict = field(default_factory=dict)

    def at(self, i: int) -> torch.Tensor:
        """[K, C] thresholds of the i-th margin."""
        return self.thresholds[i]

    def save(self, path: str | os.PathLike) -> str:
        """Write ``path`` (.safetensors) and the config next to it (.json); returns the file's SHA-256."""
        return save_state_file(
            path,
            {"margins": self.margins, "thresholds": self.thresholds},
            self.config,
            twin={"margins": self.margins.tolist(), **self.config},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationSweep:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"thresholds file {path} does not exist (run `calexnet calibrate` first)")
        try:
            tensors, config = load_state_file(path)
            margins, thresholds = tensors["margins"], tensors["thresholds"]
        except (RuntimeError, KeyError) as e:
            raise RuntimeError(
                f"thresholds file {path}: not a readable safetensors file with margins/thresholds ({e})"
            ) from e
        if thresholds.dim() != 3 or margins.shape != (thresholds.shape[0],):
            raise RuntimeError(
                f"thresholds file {path}: expected margins [M] and thresholds [M, K, C], got "
                f"{list(margins.shape)} and {list(thresholds.shape)}"
            )
        return cls(margins, thresholds, config)


def calibrate_sweep(
    branch_logits: Sequence[torch.Tensor] | torch.Tensor,
    backbone_logits: torch.Tensor,
    labels: torch.Tensor,
    margins: Sequence[float] | torch.Tensor | None = None,
    *,
    aligned: bool = True,
    margin_mode: str = "additive",
    min_support: int = 20,
    bar_from: str = "subset",
) -> CalibrationSweep:
    """:func:`calibrate` over a grid of margins (default :func:`margin_grid`), packaged with its settings."""
    m = margin_grid() if margins is None else _check_margins(margins)[0]
    thr = calibrate(
        branch_logits,
        backbone_logits,
        labels,
        m,
        aligned=aligned,
        margin_mode=margin_mode,
        min_support=min_support,
        bar_from=bar_from,
    )
    config = {
        "aligned": aligned,
        "margin_mode": margin_mode,
        "min_support": min_support,
        "bar_from": bar_from,
    }
    return CalibrationSweep(m, thr, config)
