"""Splitting a network given as an ordered list of named units into a :class:`StagedBackbone`.

Branch points are named by the constructor (``"layer2"``, ``"layer2.1"``, ``"stage0"`` ...) or picked by
``placement="flops"``: the unit boundaries nearest (in cumulative FLOPs) to equal fractions of the total.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..flops import count_flops
from .staged import FrozenStage, StagedBackbone

__all__ = [
    "DEFAULT_N_BRANCHES",
    "check_n_branches",
    "is_conv",
    "pick_by_flops",
    "placement_candidates",
    "split_units",
    "stage_units",
]

DEFAULT_N_BRANCHES = 3  # placement="flops" without n_branches (fewer when the model has fewer blocks)


def _unit_flops(units: list[tuple[str, nn.Module]], example: torch.Tensor) -> list[float]:
    """Per-sample FLOPs of each unit, run in sequence on ``example`` (FlopCounterMode)."""
    flops = []
    x = example
    with torch.no_grad():
        for _, module in units:
            f, x = count_flops(module, x)
            flops.append(f / example.shape[0])
    return flops


def _flops_placement(
    units: list[tuple[str, nn.Module]], candidates: list[str], n_branches: int, example: torch.Tensor
) -> list[str]:
    """``n_branches`` candidate boundaries nearest (in cumulative FLOPs) to ``j / (K + 1)`` of the total."""
    check_n_branches(n_branches, len(candidates))
    per_unit = _unit_flops(units, example)
    position = {name: i for i, (name, _) in enumerate(units)}
    cum = [sum(per_unit[: position[c] + 1]) for c in candidates]
    return [candidates[i] for i in pick_by_flops(cum, sum(per_unit), n_branches)]


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def placement_candidates(units: Sequence[tuple[str, nn.Module]], dims: Sequence[int]) -> list[int]:
    """Indices of the unit boundaries ``placement="flops"`` chooses from, given the units in forward order and
    the dimensionality of each one's output: after every block (a unit with children; in a stack of plain
    layers, every unit followed by a convolution) with a 4-D output, except the last such block (it feeds the
    classifier)."""
    n = len(units)
    blocks = [i for i in range(n - 1) if dims[i] == 4 and next(units[i][1].children(), None) is not None]
    if not blocks:  # a stack of plain layers (VGG): the boundaries before a convolution
        blocks = [i for i in range(n - 1) if dims[i] == 4 and is_conv(units[i + 1][1])]
    return blocks[:-1] if len(blocks) > 1 else blocks


def check_n_branches(n_branches: int, n_candidates: int) -> None:
    if n_candidates == 0:
        raise ValueError(
            "n_branches: the model has no block boundary with a 4-D feature map where placement='flops' could "
            "put a branch; name branch_points instead"
        )
    if n_branches < 1 or n_branches > n_candidates:
        raise ValueError(f"n_branches: expected 1..{n_candidates} (the number of block boundaries), got {n_branches}")


def pick_by_flops(cum: Sequence[float], total: float, n_branches: int) -> list[int]:
    """Indices of ``n_branches`` increasing candidates whose cumulative FLOPs ``cum`` are nearest to
    ``j / (K + 1)`` of ``total``.

    Solved exactly by dynamic programming over increasing candidate choices, minimising the summed distance
    of each branch point's cumulative FLOPs to its target (nearest boundary, ties to the earlier one).
    """
    check_n_branches(n_branches, len(cum))
    targets = [total * (j + 1) / (n_branches + 1) for j in range(n_branches)]
    m, inf = len(cum), float("inf")
    # cost[j][i]: best total distance for branches 0..j with branch j at candidate i.
    cost = [[inf] * m for _ in range(n_branches)]
    back = [[-1] * m for _ in range(n_branches)]
    for i in range(m):
        cost[0][i] = abs(cum[i] - targets[0])
    for j in range(1, n_branches):
        best, arg = inf, -1
        for i in range(m):
            if i - 1 >= 0 and cost[j - 1][i - 1] < best:
                best, arg = cost[j - 1][i - 1], i - 1
            if best < inf:
                cost[j][i] = best + abs(cum[i] - targets[j])
                back[j][i] = arg
    i = min(range(m), key=lambda t: (cost[-1][t], t))
    chosen = [i]
    for j in range(n_branches - 1, 0, -1):
        i = back[j][i]
        chosen.append(i)
    return list(reversed(chosen))


def stage_units(
    model: nn.Module,
    stem: list[tuple[str, nn.Module]],
    stages: Sequence[str],
    head: list[tuple[str, nn.Module]],
) -> tuple[list[tuple[str, nn.Module]], list[str], dict[str, str]]:
    """The units of a ResNet-like ``model`` for :func:`split_units`: ``stem``, every block of each stage
    (``"layer2.1"``: block 1 of ``model.layer2``), then ``head``.

    Returns:
        ``(units, candidates, aliases)``: the branch-point candidates are every block but the very last (it
        feeds the head); each stage but the last is an alias of its last block.
    """
    blocks = [(f"{stage}.{i}", block) for stage in stages for i, block in enumerate(getattr(model, stage))]
    aliases = {stage: f"{stage}.{len(getattr(model, stage)) - 1}" for stage in stages[:-1]}
    return [*stem, *blocks, *head], [n for n, _ in blocks[:-1]], aliases


def split_units(
    units: list[tuple[str, nn.Module]],
    candidates: list[str],
    aliases: dict[str, str],
    branch_points: Sequence[str] | None,
    placement: str | None,
    n_branches: int | None,
    default_points: list[str],
    *,
    in_channels: int,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    name: str,
) -> StagedBackbone:
    """Cut the unit list after each branch point and build the :class:`StagedBackbone`."""
    if placement is not None and placement != "flops":
        raise ValueError(f"placement: expected None or 'flops', got {placement!r}")
    if placement == "flops":
        if branch_points is not None:
            raise ValueError("branch_points: expected None with placement='flops' (the placement picks them)")
        if n_branches is None:
            raise ValueError("n_branches: expected an int with placement='flops', got None")
        example = torch.zeros(1, in_channels, *input_size)
        points = _flops_placement(units, candidates, int(n_branches), example)
    else:
        if n_branches is not None and branch_points is None:
            raise ValueError("n_branches: only used with placement='flops'; give branch_points names instead")
        if isinstance(branch_points, str):
            raise ValueError(f"branch_points: expected a sequence of names, got the string {branch_points!r}")
        points = list(default_points if branch_points is None else branch_points)
    valid = list(aliases) + candidates
    resolved = []
    for p in points:
        unit = aliases.get(p, p)
        if unit not in candidates:
            raise ValueError(f"branch_points: {p!r} is not a branch point of {name}; valid names: {valid}")
        resolved.append(unit)
    position = {n: i for i, (n, _) in enumerate(units)}
    cuts = [position[u] for u in resolved]
    if len(cuts) == 0:
        raise ValueError("branch_points: expected at least one branch point, got none")
    if any(b <= a for a, b in zip(cuts[:-1], cuts[1:], strict=True)):
        raise ValueError(f"branch_points: expected distinct names in forward order, got {list(points)}")
    stages, source_keys = [], {}
    start = 0
    for s, end in enumerate([*cuts, len(units) - 1]):
        chunk = units[start : end + 1]
        start = end + 1
        stage = FrozenStage(OrderedDict((n.replace(".", "_"), m) for n, m in chunk))
        for n, m in chunk:
            for key in m.state_dict():
                source_keys[f"stages.{s}.{n.replace('.', '_')}.{key}"] = f"{n}.{key}"
        stages.append(stage)
    return StagedBackbone(
        stages,
        [str(p) for p in points],
        in_channels=in_channels,
        input_size=input_size,
        mean=mean,
        std=std,
        name=name,
        source_keys=source_keys,
    )
