"""FLOPs accounting for early-exit cascades (docs/design.md §1).

Every count comes from ``torch.utils.flop_counter.FlopCounterMode`` (no hand-written counter), so it covers
what that counter covers: convolutions, matrix products and attention, at 2 FLOPs per multiply-add;
element-wise ops, BatchNorm, pooling and softmax count as zero. Counts are per sample (a batch of 2 is
counted and divided by 2, which is exact because every counted op is linear in the batch size).

Cost model: a sample that exits at branch ``k`` (1-based) pays backbone segments ``S_0 .. S_{k-1}`` and
heads ``1 .. k`` (a head that did not let it exit is still paid for); a sample that exits nowhere pays every
segment and all ``K`` heads. FLOPs reduction = ``1 - E[cost] / cost(backbone alone)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:  # the backbones import this module; no runtime import the other way
    from .backbones import StagedBackbone

__all__ = [
    "FlopsProfile",
    "count_flops",
    "exit_histogram",
    "expected_cost",
    "flops_reduction",
    "head_flops",
    "profile_flops",
    "segment_flops",
]

_PROBE_BATCH = 2


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` (without autograd).

    Returns:
        flops: total FLOPs of the call (for the whole batch in ``args``).
        output: what ``fn`` returned.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


class _EvalMode:
    """Put modules in eval mode for a probe and restore each one's previous mode afterwards."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)

    def __enter__(self) -> None:
        self.saved = [[(m, m.training) for m in mod.modules()] for mod in self.modules]
        for mod in self.modules:
            mod.eval()

    def __exit__(self, *exc) -> None:
        for saved in self.saved:
            for m, mode in saved:
                m.training = mode


def _example(backbone: StagedBackbone, input_size: int | tuple[int, int] | None) -> torch.Tensor:
    x = backbone.example_input(_PROBE_BATCH)
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        x = x.new_zeros(_PROBE_BATCH, backbone.in_channels, *size)
    return x


def segment_flops(backbone: StagedBackbone, input_size: int | tuple[int, int] | None = None) -> list[float]:
    """Per-sample FLOPs of each of the ``K + 1`` backbone segments (stages).

    Args:
        backbone: a :class:`~calexnet_fast.backbones.StagedBackbone`.
        input_size: ``(H, W)``; default ``backbone.input_size``.

    Returns:
        ``K + 1`` floats; their sum is the FLOPs of the whole backbone forward.
    """
    x = _example(backbone, input_size)
    out = []
    for stage in backbone.stages:
        f, x = count_flops(stage, x)
        out.append(f / _PROBE_BATCH)
    return out


def head_flops(
    heads: Sequence[torch.nn.Module],
    backbone: StagedBackbone,
    input_size: int | tuple[int, int] | None = None,
) -> list[float]:
    """Per-sample FLOPs of each head on its branch's feature map (heads probed in eval mode).

    Args:
        heads: ``K`` modules, head ``k`` reading ``f_k``.
        backbone: the backbone whose features the heads read.
        input_size: ``(H, W)``; default ``backbone.input_size``.

    Returns:
        ``K`` floats.
    """
    heads = list(heads)
    if len(heads) != backbone.n_branches:
        raise ValueError(
            f"heads: expected {backbone.n_branches} heads (one per branch point {backbone.branch_points}), "
            f"got {len(heads)}"
        )
    with torch.no_grad():
        feats, _ = backbone.features(_example(backbone, input_size))
    out = []
    with _EvalMode(heads):
        for head, f in zip(heads, feats, strict=True):
            flops, _ = count_flops(head, f)
            out.append(flops / _PROBE_BATCH)
    return out


@dataclass(frozen=True)
class FlopsProfile:
    """Per-sample FLOPs of a cascade's pieces and the cost model of docs/design.md §1.

    Attributes:
        segment_flops: ``K + 1`` per-sample FLOPs of the backbone stages ``S_0 .. S_K``.
        head_flops: ``K`` per-sample FLOPs of heads ``1 .. K``.
    """

    segment_flops: tuple[float, ...]
    head_flops: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.segment_flops) != len(self.head_flops) + 1:
            raise ValueError(
                f"segment_flops: expected K + 1 = {len(self.head_flops) + 1} values (head_flops has K = "
                f"{len(self.head_flops)}), got {len(self.segment_flops)}"
            )
        object.__setattr__(self, "segment_flops", tuple(float(v) for v in self.segment_flops))
        object.__setattr__(self, "head_flops", tuple(float(v) for v in self.head_flops))

    @property
    def n_branches(self) -> int:
        """``K``."""
        return len(self.head_flops)

    @property
    def backbone_flops(self) -> float:
        """Per-sample FLOPs of the backbone alone (sum of the segments)."""
        return float(sum(self.segment_flops))

    def exit_costs(self) -> list[float]:
        """``K + 1`` per-sample costs: of exiting at branch ``1 .. K``, then of exiting nowhere."""
        costs = []
        for k in range(1, self.n_branches + 1):
            costs.append(sum(self.segment_flops[:k]) + sum(self.head_flops[:k]))
        costs.append(self.backbone_flops + sum(self.head_flops))
        return costs

    def expected_cost(self, exit_counts: Sequence[float] | torch.Tensor) -> float:
        """Mean per-sample FLOPs for an exit histogram (see :func:`expected_cost`)."""
        return expected_cost(self, exit_counts)

    def flops_reduction(self, exit_counts: Sequence[float] | torch.Tensor) -> float:
        """``1 - expected_cost / backbone_flops`` (see :func:`flops_reduction`)."""
        return flops_reduction(self, exit_counts)

    def to_json(self) -> str:
        """JSON text of the profile (for results files)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FlopsProfile:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(tuple(d["segment_flops"]), tuple(d["head_flops"]))


def profile_flops(
    backbone: StagedBackbone,
    heads: Sequence[torch.nn.Module],
    input_size: int | tuple[int, int] | None = None,
) -> FlopsProfile:
    """Count every segment and head of a cascade (per sample) at ``input_size`` (default the backbone's)."""
    return FlopsProfile(tuple(segment_flops(backbone, input_size)), tuple(head_flops(heads, backbone, input_size)))


def exit_histogram(exit_index: torch.Tensor, n_branches: int) -> torch.Tensor:
    """Counts of samples per exit from a cascade's ``exit_index``.

    Args:
        exit_index: [N] int64, ``k`` in ``1 .. K`` for branch ``k``, ``K + 1`` for the backbone.
        n_branches: ``K``.

    Returns:
        [K + 1] int64 counts (index 0 is branch 1, index K the backbone).
    """
    if not isinstance(exit_index, torch.Tensor) or exit_index.dim() != 1 or exit_index.is_floating_point():
        got = list(exit_index.shape) if isinstance(exit_index, torch.Tensor) else type(exit_index).__name__
        raise ValueError(f"exit_index: expected a 1-D integer tensor, got {got}")
    if exit_index.numel() and (int(exit_index.min()) < 1 or int(exit_index.max()) > n_branches + 1):
        raise ValueError(
            f"exit_index: expected values in 1..{n_branches + 1}, got min {int(exit_index.min())} "
            f"and max {int(exit_index.max())}"
        )
    return torch.bincount(exit_index.long().cpu() - 1, minlength=n_branches + 1)


def _fractions(exit_counts: Sequence[float] | torch.Tensor, n_branches: int) -> list[float]:
    counts = torch.as_tensor(exit_counts, dtype=torch.float64).flatten()
    if counts.numel() != n_branches + 1:
        raise ValueError(
            f"exit_counts: expected K + 1 = {n_branches + 1} values (branches 1..K, then the backbone), "
            f"got {counts.numel()}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"exit_counts: expected finite non-negative counts, got {counts.tolist()}")
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("exit_counts: expected a positive total (at least one sample), got 0")
    return [float(c) / total for c in counts]


def expected_cost(profile: FlopsProfile, exit_counts: Sequence[float] | torch.Tensor) -> float:
    """Mean per-sample FLOPs of the cascade for an exit histogram.

    Args:
        profile: the cascade's :class:`FlopsProfile`.
        exit_counts: ``K + 1`` counts or fractions (branch 1 .. K, then the backbone), e.g. from
            :func:`exit_histogram`.
    """
    fr = _fractions(exit_counts, profile.n_branches)
    return float(sum(p * c for p, c in zip(fr, profile.exit_costs(), strict=True)))


def flops_reduction(profile: FlopsProfile, exit_counts: Sequence[float] | torch.Tensor) -> float:
    """``1 - expected_cost / backbone_flops``: the fraction of the backbone's FLOPs saved (may be < 0)."""
    return 1.0 - expected_cost(profile, exit_counts) / profile.backbone_flops
