"""Training recipes for early-exit branches on a frozen backbone (docs/design.md §1).

A :class:`Recipe` says how branch ``k`` is trained and calibrated;
:func:`calexnet_fast.branch_training.train_branches` runs it on cached branch features (``features``, trained
with ``training``), one branch after the other:

1. weights ``w_k`` for the training samples from the already trained branches ``1..k-1`` and their
   thresholds at the training margin ``m_train`` (:func:`survivor_weights`);
2. train head ``k`` with the recipe's loss (:func:`branch_loss`) weighted by ``w_k``;
3. calibrate ``τ_k`` at ``m_train`` on the validation split (aligned or not) for the next weights.

The three CalexNet fixes are independent switches, so every one of the 2³ combinations is a recipe:

* ``weighting``: ``"soft"`` survivor weights (fix 1), ``"hard"`` (indicator: the predecessor paper's
  boosted training) or ``"none"``;
* ``distill``: KD from the backbone at temperature ``kd_temperature`` (fix 3), optionally mixed with
  ``ce_weight`` × CE; without it, plain CE on ``ce_target`` (the backbone's argmax, or the labels);
* ``aligned``: cascade-aligned calibration (fix 2), for the ``m_train`` thresholds and ``calexnet calibrate``.

:func:`recipe` builds them by name: ``calexnet`` (all fixes), ``reference`` (none),
``reference+weights`` / ``reference+kd`` / ``reference+aligned`` (one fix) and ``calexnet-weights`` /
``calexnet-kd`` / ``calexnet-aligned`` (all but one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .exit_rule import exit_decision_reference
from .heads import DEFAULT_HEAD_DIMS, HEADS, make_branch_head
from .training import CachedBatch

__all__ = [
    "RECIPE_NAMES",
    "Recipe",
    "ablation",
    "branch_loss",
    "ce_loss",
    "kd_loss",
    "make_head",
    "recipe",
    "survivor_weights",
]

WEIGHTINGS = ("none", "hard", "soft")
CE_TARGETS = ("backbone", "labels")
FIXES = ("weights", "kd", "aligned")
# what shapes only the survivor weights (and so nothing a recipe without them trains)
_WEIGHT_ONLY_FIELDS = (
    "aligned",
    "m_train",
    "margin_mode",
    "min_support",
    "bar_from",
    "weight_temperature",
    "weight_floor",
)


@dataclass
class Recipe:
    """How branches are trained and calibrated (defaults: the full CalexNet recipe).

    Attributes:
        name: label used in run directories and results.
        weighting: ``"soft"`` (CalexNet), ``"hard"`` or ``"none"`` survivor weights.
        weight_temperature: t of the soft weights' sigmoid (0.05).
        weight_floor: weights are floored here before normalising to mean 1 (1e-3).
        distill: KD loss ``T² KL(softmax(z_b/T) ‖ softmax(z_k/T))`` (CalexNet) instead of plain CE.
        kd_temperature: T (4).
        ce_weight: α of an added ``α · CE(z_k, target)`` when distilling (0).
        ce_target: CE target: ``"backbone"`` (argmax of the backbone's logits) or ``"labels"``.
        aligned: cascade-aligned CPM calibration (CalexNet) or each branch on the whole validation set.
        m_train: margin of the thresholds that define the training weights (0: the bar is the backbone's own
            precision, near the margins of the operating points within a point or two of the backbone; the
            starting brief's 0.2 let ~90 % of the training samples exit at the earlier branches and hurt,
            docs/design.md §1).
        margin_mode, min_support, bar_from: CPM options (see ``calexnet_fast.calibration``).
        head: the branch head: ``"grid"`` (``GridPrototypeHead``, similarities pooled per cell of a 2 x 2 grid;
            the default) or ``"prototype"`` (``PrototypePoolingHead``, similarities pooled over the whole map).
        head_dim, n_prototypes: the head's D and K; ``head_dim=None`` (the default) takes the head's own
            default, 128 (``"prototype"``) or 32 (``"grid"``), and is resolved to it on construction
            (``dataclasses.replace(r, head=...)`` keeps ``r``'s resolved D: pass ``head_dim=None`` too).
    """

    name: str = "calexnet"
    weighting: str = "soft"
    weight_temperature: float = 0.05
    weight_floor: float = 1e-3
    distill: bool = True
    kd_temperature: float = 4.0
    ce_weight: float = 0.0
    ce_target: str = "backbone"
    aligned: bool = True
    m_train: float = 0.0
    margin_mode: str = "additive"
    min_support: int = 20
    bar_from: str = "subset"
    head: str = "grid"
    head_dim: int | None = None
    n_prototypes: int = 32

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.ce_target not in CE_TARGETS:
            raise ValueError(f"ce_target: expected one of {CE_TARGETS}, got {self.ce_target!r}")
        if not self.weight_temperature > 0:
            raise ValueError(f"weight_temperature: expected > 0, got {self.weight_temperature}")
        if not 0 <= self.weight_floor <= 1:
            raise ValueError(f"weight_floor: expected a value in [0, 1], got {self.weight_floor}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature: expected > 0, got {self.kd_temperature}")
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight: expected >= 0, got {self.ce_weight}")
        if self.head not in HEADS:
            raise ValueError(f"head: expected one of {tuple(HEADS)}, got {self.head!r}")
        if self.head_dim is None:
            self.head_dim = DEFAULT_HEAD_DIMS[self.head]

    @property
    def fixes(self) -> dict[str, bool]:
        """Which CalexNet fixes are on (``weights`` means soft weights)."""
        return {"weights": self.weighting == "soft", "kd": self.distill, "aligned": self.aligned}

    def to_json(self) -> dict:
        return asdict(self)

    def training_json(self) -> dict:
        """The fields that shape the trained heads (what resuming and head sharing compare; not the name):
        without survivor weights the training margin and its calibration options do not enter, without
        distillation neither do its temperature and CE mix."""
        d = self.to_json()
        d.pop("name")
        if self.weighting == "none":
            for k in _WEIGHT_ONLY_FIELDS:
                d.pop(k)
        if not self.distill:
            d.pop("kd_temperature")
            d.pop("ce_weight")
        return d

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"recipe: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _ablation_name(weights: bool, kd: bool, aligned: bool) -> str:
    on = [n for n, v in zip(FIXES, (weights, kd, aligned), strict=True) if v]
    if len(on) == 3:
        return "calexnet"
    if not on:
        return "reference"
    if len(on) == 1:
        return f"reference+{on[0]}"
    off = [n for n in FIXES if n not in on]
    return f"calexnet-{off[0]}"


def ablation(weights: bool, kd: bool, aligned: bool, **overrides) -> Recipe:
    """The recipe with the chosen CalexNet fixes on (soft weights, KD, aligned calibration), others as the
    reference (no weights, CE on the backbone's argmax, unaligned calibration)."""
    base = {
        "name": _ablation_name(weights, kd, aligned),
        "weighting": "soft" if weights else "none",
        "distill": kd,
        "aligned": aligned,
    }
    return Recipe(**{**base, **overrides})


RECIPE_NAMES: tuple[str, ...] = (
    "calexnet",
    "reference",
    "reference+weights",
    "reference+kd",
    "reference+aligned",
    "calexnet-weights",
    "calexnet-kd",
    "calexnet-aligned",
)


def recipe(name: str = "calexnet", **overrides) -> Recipe:
    """A named recipe (one of :data:`RECIPE_NAMES`) with optional field overrides."""
    for w in (True, False):
        for k in (True, False):
            for a in (True, False):
                if _ablation_name(w, k, a) == name:
                    return ablation(w, k, a, **overrides)
    raise ValueError(f"recipe: expected one of {list(RECIPE_NAMES)}, got {name!r}")


# --------------------------------------------------------------------------------------------------
# weights and losses
# --------------------------------------------------------------------------------------------------


def survivor_weights(
    prev_logits: Sequence[torch.Tensor],
    thresholds: torch.Tensor | Sequence[torch.Tensor],
    mode: str = "soft",
    temperature: float = 0.05,
    floor: float = 1e-3,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-sample training weights of the next branch: ``w = ∏_j (1 − e_j)``, floored, mean 1.

    ``e_j`` is the probability that branch j lets the sample out: ``sigmoid((conf_j − τ_j[ĉ_j]) / t)``
    (``mode="soft"``) or the exit rule's own decision ``conf_j ≥ τ_j[ĉ_j]`` (``"hard"``); ``e_j = 0``
    where ``τ = +inf`` or the confidence is NaN (never exits). Confidence and prediction come from
    ``exit_decision_reference``, the one definition of the exit rule.

    Args:
        prev_logits: logits [N, C] of branches ``1..k-1`` on the training samples (may be empty).
        thresholds: [k-1, C] (or k-1 tensors [C]) their thresholds.
        mode: ``"soft"``, ``"hard"`` or ``"none"`` (all ones).
        temperature: t of the sigmoid.
        floor: lower bound applied before normalising.
        normalize: divide by the mean (over these N samples) so the weights average 1.

    Returns:
        [N] float32 weights.
    """
    if mode not in WEIGHTINGS:
        raise ValueError(f"mode: expected one of {WEIGHTINGS}, got {mode!r}")
    prev_logits = list(prev_logits)
    thr = list(thresholds) if not isinstance(thresholds, torch.Tensor) else list(thresholds.unbind(0))
    if len(thr) != len(prev_logits):
        raise ValueError(f"thresholds: expected {len(prev_logits)} rows (one per previous branch), got {len(thr)}")
    if not prev_logits:
        raise ValueError("prev_logits: expected at least one previous branch (branch 1 trains with w = 1)")
    n = prev_logits[0].shape[0]
    w = torch.ones(n, dtype=torch.float64)
    if mode != "none":
        for z, t in zip(prev_logits, thr, strict=True):
            t = t.to(z.device)
            ex, pred, conf = exit_decision_reference(z, t)
            if mode == "hard":
                e = ex.double()
            else:
                e = torch.sigmoid((conf.double() - t.double()[pred]) / temperature)
                e = torch.where(torch.isnan(e), torch.zeros_like(e), e)  # NaN confidence never exits
            w = w * (1.0 - e.cpu())
    w = w.clamp(min=floor)
    if normalize:
        w = w / w.mean()
    return w.float()


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (weights * values).sum() / weights.sum()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ w T² KL(softmax(teacher/T) ‖ softmax(student/T)) / Σ w`` (per-sample KL summed over classes).

    Args:
        student_logits: [B, C] branch logits.
        teacher_logits: [B, C] backbone logits (no gradient flows into them).
        temperature: T.
        weights: optional [B] per-sample weights.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    return t * t * _weighted_mean(kl, weights)


def ce_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ w CE(logits, target) / Σ w``; logits [B, C], target [B] int64, weights [B] or ``None``."""
    return _weighted_mean(F.cross_entropy(logits.float(), target, reduction="none"), weights)


def branch_loss(logits: torch.Tensor, batch: CachedBatch, recipe: Recipe) -> torch.Tensor:
    """The recipe's loss for branch logits [B, C] on a cached batch (uses ``batch.weights`` if set)."""
    target = batch.backbone_logits.argmax(1) if recipe.ce_target == "backbone" else batch.labels
    if recipe.distill:
        loss = kd_loss(logits, batch.backbone_logits, recipe.kd_temperature, batch.weights)
        if recipe.ce_weight > 0:
            loss = loss + recipe.ce_weight * ce_loss(logits, target, batch.weights)
        return loss
    return ce_loss(logits, target, batch.weights)


# --------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------


def make_head(in_channels: int, n_classes: int, recipe: Recipe | None = None, seed: int | None = None) -> nn.Module:
    """The recipe's branch head (``Recipe.head``) with its D and K, initialised from ``seed`` if given
    (without touching the global RNG)."""
    r = recipe or Recipe()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return make_branch_head(r.head, in_channels, n_classes, dim=r.head_dim, n_prototypes=r.n_prototypes)
