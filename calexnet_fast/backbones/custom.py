"""Any user model given as a list of feature stages plus a final classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .placement import split_units
from .staged import StagedBackbone, as_pair

__all__ = ["from_stages"]


def from_stages(
    stages: Sequence[nn.Module],
    classifier: nn.Module,
    *,
    in_channels: int,
    input_size: int | tuple[int, int],
    branch_points: Sequence[str] | None = None,
    placement: str | None = None,
    n_branches: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "custom",
) -> StagedBackbone:
    """Any model given as a list of feature stages plus a final classifier.

    The network is ``classifier(stages[-1](... stages[0](x)))``; the classifier must include its own
    pooling/flattening and return ``[B, n_classes]``. The units are named ``"stage0"``, ``"stage1"``, ...;
    a branch may follow any stage but the last.

    Args:
        stages: feature modules in forward order, each returning a 4-D feature map.
        classifier: module mapping the last stage's output to logits.
        in_channels, input_size: the input the model expects (used to probe shapes and FLOPs).
        branch_points: stage names; default: after every stage but the last.
        placement, n_branches: ``placement="flops"`` picks ``n_branches`` stage boundaries by FLOPs.
        mean, std: input normalisation; default 0 and 1 (identity) for every channel.
        name: a human-readable name.
    """
    stages = list(stages)
    if len(stages) < 2:
        raise ValueError(
            f"stages: expected at least 2 feature stages (a branch needs a later stage), got {len(stages)}"
        )
    for i, s in enumerate(stages):
        if not isinstance(s, nn.Module):
            raise ValueError(f"stages[{i}]: expected an nn.Module, got {type(s).__name__}")
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier: expected an nn.Module, got {type(classifier).__name__}")
    units = [(f"stage{i}", s) for i, s in enumerate(stages)] + [("classifier", classifier)]
    candidates = [f"stage{i}" for i in range(len(stages) - 1)]
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    return split_units(
        units,
        candidates,
        {},
        branch_points,
        placement,
        n_branches,
        candidates,
        in_channels=int(in_channels),
        input_size=as_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=name,
    )
