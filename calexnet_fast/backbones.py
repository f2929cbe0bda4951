"""Frozen CNN backbones split into stages at branch points (DESIGN.md §1, §2).

A :class:`StagedBackbone` holds the stages ``S_0 .. S_K`` of a frozen network: branch ``k`` (1-based) reads
the feature map ``f_k`` produced by stage ``k-1``, and the last stage ``S_K`` ends with the backbone's own
pooling and classifier and returns logits. The cascades run the stages one by one on a shrinking batch.

Constructors:

* :func:`resnet18`, :func:`resnet50` and :func:`from_torchvision`: torchvision ResNets with the ImageNet stem
  or the usual CIFAR stem (3x3 stride-1 ``conv1``, no max-pool), split at stage (``"layer2"``) or block
  (``"layer2.1"``) granularity, or at ``placement="flops"``.
* :func:`cifar_resnet`: the CIFAR-10 ResNet-20/32/44/56 of He et al. (option-A shortcuts), loading the
  checkpoints of ``pretrained/akamaster_resnet_cifar10`` with ``torch.load(weights_only=True)``.
* :func:`from_stages`: any model given as a list of stages plus a final classifier.

Frozen means frozen: every stage is a :class:`FrozenStage`, whose parameters never require gradients, whose
BatchNorm layers stay in eval mode whatever ``.train()`` is called with, and whose forward runs without
autograd. Nothing here downloads weights.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .flops import count_flops

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR_RESNET_DEPTHS",
    "CifarResNet",
    "FrozenStage",
    "StagedBackbone",
    "cifar_resnet",
    "find_pretrained_cifar_checkpoint",
    "from_stages",
    "from_torchvision",
    "load_cifar_resnet_checkpoint",
    "resnet18",
    "resnet50",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR_RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56)


# --------------------------------------------------------------------------------------------------
# Frozen stages and the staged backbone.
# --------------------------------------------------------------------------------------------------


class FrozenStage(nn.Sequential):
    """A frozen segment of a backbone: an ``nn.Sequential`` that stays in eval mode without gradients.

    ``train(True)`` is accepted (so a parent module's ``.train()`` does not fail) but leaves the stage and
    all its children in eval mode; the parameters are created with ``requires_grad=False`` and the forward
    pass runs under ``torch.no_grad()``, so even a later ``requires_grad_(True)`` from a parent cannot make
    gradients flow into the backbone.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenStage:  # noqa: ARG002 - the mode is ignored on purpose
        """Keep eval mode whatever ``mode`` is (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: the stage input (an image batch or a feature map). Returns: the stage output."""
        with torch.no_grad():
            for module in self:
                x = module(x)
        return x


def _check_image_batch(x: torch.Tensor, in_channels: int, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: expected {in_channels} channels (dimension 1), got {x.shape[1]}")


class StagedBackbone(nn.Module):
    """A frozen backbone as ``K + 1`` stages with ``K`` branch points.

    Args:
        stages: ``K + 1`` modules; stage ``k < K`` maps its input to the branch feature map ``f_{k+1}``
            ``[B, C_k, H_k, W_k]``, stage ``K`` ends with the backbone's pooling and classifier and returns
            logits ``[B, n_classes]``. Modules that are not :class:`FrozenStage` are wrapped in one.
        branch_points: ``K`` names of the branch points (default ``"stage0"`` ... ``"stage{K-1}"``).
        in_channels: channels of the input images.
        input_size: ``(H, W)`` of the input the backbone is meant for; used to probe the branch shapes,
            the number of classes and the FLOPs.
        mean, std: per-channel input normalisation the backbone was trained with (inputs to ``forward`` are
            expected normalised already; :meth:`normalize` applies it).
        name: a human-readable name.
        source_keys: optional map from this module's state-dict keys to those of the model the stages came
            from (for :meth:`source_state_dict` / :meth:`load_source_state_dict`).

    Attributes:
        stages: ``nn.ModuleList`` of the ``K + 1`` frozen stages.
        n_branches: ``K``.
        branch_points: list of ``K`` names.
        branch_channels: list of ``K`` channel counts ``C_k`` of the branch feature maps.
        branch_shapes: list of ``K`` ``(C_k, H_k, W_k)`` at ``input_size``.
        n_classes, in_channels, input_size, mean, std, name.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        branch_points: Sequence[str] | None = None,
        *,
        in_channels: int,
        input_size: tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str = "backbone",
        source_keys: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        stages = list(stages)
        if len(stages) < 2:
            raise ValueError(f"stages: expected at least 2 stages (one branch point), got {len(stages)}")
        for i, s in enumerate(stages):
            if not isinstance(s, nn.Module):
                raise ValueError(f"stages[{i}]: expected an nn.Module, got {type(s).__name__}")
        n_branches = len(stages) - 1
        if branch_points is None:
            branch_points = [f"stage{i}" for i in range(n_branches)]
        branch_points = [str(b) for b in branch_points]
        if len(branch_points) != n_branches:
            raise ValueError(
                f"branch_points: expected {n_branches} names (one per stage but the last), "
                f"got {len(branch_points)}"
            )
        if int(in_channels) < 1:
            raise ValueError(f"in_channels: expected a positive int, got {in_channels}")
        input_size = _pair(input_size, "input_size")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean/std: expected {in_channels} values each (in_channels), got {len(mean)} and {len(std)}"
            )
        self.stages = nn.ModuleList([s if isinstance(s, FrozenStage) else FrozenStage(s) for s in stages])
        self.n_branches: int = n_branches
        self.branch_points: list[str] = branch_points
        self.in_channels: int = int(in_channels)
        self.input_size: tuple[int, int] = input_size
        self.mean: tuple[float, ...] = mean
        self.std: tuple[float, ...] = std
        self.name: str = name
        self._source_keys: dict[str, str] = dict(source_keys) if source_keys is not None else {}

        feats, logits = self.features(self.example_input(2))
        if logits.dim() != 2:
            raise ValueError(
                f"stages[{n_branches}]: expected the last stage to return logits [B, n_classes], "
                f"got shape {list(logits.shape)}"
            )
        for k, f in enumerate(feats):
            if f.dim() != 4:
                raise ValueError(
                    f"stages[{k}]: expected a 4-D feature map [B, C, H, W] at branch point "
                    f"{branch_points[k]!r}, got shape {list(f.shape)}"
                )
        self.n_classes: int = int(logits.shape[1])
        self.branch_shapes: list[tuple[int, int, int]] = [tuple(int(s) for s in f.shape[1:]) for f in feats]
        self.branch_channels: list[int] = [s[0] for s in self.branch_shapes]

    # -- frozen ------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> StagedBackbone:
        """Set ``self.training`` as asked; the stages stay in eval mode (see :class:`FrozenStage`)."""
        super().train(mode)
        return self

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: [B, in_channels, H, W] normalised images. Returns: logits [B, n_classes]."""
        _check_image_batch(x, self.in_channels)
        for stage in self.stages:
            x = stage(x)
        return x

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All branch feature maps and the backbone logits in one pass.

        Args:
            x: [B, in_channels, H, W] normalised images.

        Returns:
            feats: ``K`` tensors ``f_k`` [B, C_k, H_k, W_k] (``f_k`` is the input of branch ``k``).
            logits: [B, n_classes] the backbone's own logits.
        """
        _check_image_batch(x, self.in_channels)
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        logits = feats.pop()
        return feats, logits

    # -- helpers ----------------------------------------------------------------------------------

    def example_input(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zeros [batch_size, in_channels, *input_size] on the backbone's device (for probing and FLOPs)."""
        p = next(self.stages.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
        return torch.zeros(batch_size, self.in_channels, *self.input_size, device=device, dtype=dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel for images in ``[0, 1]``, x: [B, C, H, W] or [C, H, W]."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def normalization(self):
        """A ``torchvision.transforms.Normalize`` with this backbone's mean and std (for data pipelines)."""
        from torchvision.transforms import Normalize

        return Normalize(self.mean, self.std)

    def source_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under the key names of the model it was built from.

        For torchvision ResNets that is a plain ``torchvision.models.ResNet`` state dict (loadable with
        ``strict=True``); for CIFAR ResNets the keys of :class:`CifarResNet` (checkpoint keys without the
        ``module.`` prefix).
        """
        own = self.state_dict()
        if not self._source_keys:
            return own
        return OrderedDict((self._source_keys[k], v) for k, v in own.items() if k in self._source_keys)

    def load_source_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights given under the source model's key names (inverse of :meth:`source_state_dict`).

        Raises:
            RuntimeError: naming the missing, unexpected and mis-shaped keys when ``state_dict`` does not fit.
        """
        if not self._source_keys:
            self.load_state_dict(state_dict, strict=strict)
            return
        inverse = {v: k for k, v in self._source_keys.items()}
        _check_state_dict_fits(
            {v: t for k, t in self.state_dict().items() if (v := self._source_keys.get(k)) is not None},
            state_dict,
            strict,
            what=f"state_dict for {self.name}",
        )
        mapped = OrderedDict((inverse[k], v) for k, v in state_dict.items() if k in inverse)
        self.load_state_dict(mapped, strict=False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, branch_points={self.branch_points}, "
            f"branch_channels={self.branch_channels}, "
            f"n_classes={self.n_classes}, input_size={self.input_size}"
        )


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        h, w = (int(a) for a in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or a pair (H, W), got {v!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w


def _check_state_dict_fits(expected: dict, given: dict, strict: bool, what: str) -> None:
    """Raise RuntimeError on missing / unexpected / mis-shaped keys (``num_batches_tracked`` optional)."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [
        f"{k}: expected {list(expected[k].shape)}, got {list(given[k].shape)}"
        for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != expected[k].shape
    ]
    not_tensor = [f"{k}: got {type(v).__name__}" for k, v in given.items() if not isinstance(v, torch.Tensor)]
    problems = []
    if mis_shaped:
        problems.append(f"shape mismatches {_short(mis_shaped)}")
    if not_tensor:
        problems.append(f"non-tensor values {_short(not_tensor)}")
    if strict and missing:
        problems.append(f"missing keys {_short(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if problems:
        raise RuntimeError(f"{what} does not fit the architecture: " + "; ".join(problems))


def _short(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"[{shown}{more}] ({len(items)} in all)"


# --------------------------------------------------------------------------------------------------
# Splitting a network given as an ordered list of named units.
# --------------------------------------------------------------------------------------------------


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
    """``n_branches`` candidate boundaries nearest (in cumulative FLOPs) to ``j / (K + 1)`` of the total.

    Solved exactly by dynamic programming over increasing candidate choices, minimising the summed distance
    of each branch point's cumulative FLOPs to its target (nearest boundary, ties to the earlier one).
    """
    if n_branches < 1 or n_branches > len(candidates):
        raise ValueError(
            f"n_branches: expected 1..{len(candidates)} (the number of block boundaries), got {n_branches}"
        )
    per_unit = _unit_flops(units, example)
    total = sum(per_unit)
    position = {name: i for i, (name, _) in enumerate(units)}
    cum = []
    for c in candidates:
        cum.append(sum(per_unit[: position[c] + 1]))
    targets = [total * (j + 1) / (n_branches + 1) for j in range(n_branches)]
    m, inf = len(candidates), float("inf")
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
    return [candidates[i] for i in reversed(chosen)]


def _split_units(
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


# --------------------------------------------------------------------------------------------------
# torchvision ResNets.
# --------------------------------------------------------------------------------------------------


def from_torchvision(
    model: nn.Module,
    branch_points: Sequence[str] | None = None,
    *,
    placement: str | None = None,
    n_branches: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    name: str | None = None,
) -> StagedBackbone:
    """Split a ``torchvision.models.ResNet`` (any depth, either stem) into a frozen :class:`StagedBackbone`.

    The model's modules are shared, not copied (the model itself is frozen in place).

    Args:
        model: a torchvision ResNet (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``).
        branch_points: names after which a branch reads the features: a stage (``"layer2"``, i.e. its last
            block) or a block (``"layer2.1"``); the last block of ``layer4`` is not allowed (it feeds the
            classifier). Default ``["layer1", "layer2", "layer3"]``.
        placement: ``"flops"``: pick ``n_branches`` block boundaries nearest to equal FLOPs fractions.
        n_branches: number of branch points for ``placement="flops"``.
        input_size: ``(H, W)``; default 32x32 when ``conv1`` is the CIFAR stem (3x3 stride 1), else 224x224.
        mean, std: input normalisation (default ImageNet).
        name: default ``"resnet"`` plus the stem.
    """
    required = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    missing = [a for a in required if not hasattr(model, a)]
    if missing:
        raise ValueError(f"model: expected a torchvision ResNet with {list(required)}, missing {missing}")
    cifar_stem = tuple(model.conv1.stride) == (1, 1)
    if input_size is None:
        input_size = (32, 32) if cifar_stem else (224, 224)
    units: list[tuple[str, nn.Module]] = [
        ("conv1", model.conv1),
        ("bn1", model.bn1),
        ("relu", model.relu),
        ("maxpool", model.maxpool),
    ]
    aliases: dict[str, str] = {}
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        blocks = list(getattr(model, layer))
        for i, block in enumerate(blocks):
            units.append((f"{layer}.{i}", block))
        aliases[layer] = f"{layer}.{len(blocks) - 1}"
    last_block = units[-1][0]
    del aliases["layer4"]
    units += [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]
    candidates = [n for n, _ in units if n.startswith("layer") and n != last_block]
    model.requires_grad_(False)
    model.eval()
    return _split_units(
        units,
        candidates,
        aliases,
        branch_points,
        placement,
        n_branches,
        ["layer1", "layer2", "layer3"],
        in_channels=model.conv1.in_channels,
        input_size=_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=name or ("resnet (CIFAR stem)" if cifar_stem else "resnet"),
    )


def _torchvision_resnet(
    arch: str,
    n_classes: int,
    stem: str,
    weights: str | Path | dict | None,
    in_channels: int,
) -> nn.Module:
    import torchvision

    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=int(n_classes))
    if stem == "cifar" or in_channels != 3:
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=k, stride=s, padding=p, bias=False)
    if stem == "cifar":
        model.maxpool = nn.Identity()
    if weights is not None:
        sd = _load_state_dict_file(weights, "weights") if not isinstance(weights, dict) else weights
        _check_state_dict_fits(
            model.state_dict(), sd, True, what=f"weights for torchvision {arch} ({stem} stem)"
        )
        model.load_state_dict(sd, strict=True)
    return model


def _resnet(arch: str, n_classes, stem, weights, branch_points, placement, n_branches, input_size, mean, std):
    model = _torchvision_resnet(arch, n_classes, stem, weights, in_channels=len(mean))
    return from_torchvision(
        model,
        branch_points,
        placement=placement,
        n_branches=n_branches,
        input_size=input_size,
        mean=mean,
        std=std,
        name=f"{arch} ({stem} stem)",
    )


def resnet18(
    n_classes: int = 1000,
    *,
    stem: str = "imagenet",
    weights: str | Path | dict | None = None,
    branch_points: Sequence[str] | None = None,
    placement: str | None = None,
    n_branches: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> StagedBackbone:
    """A frozen, staged torchvision ResNet-18.

    Args:
        n_classes: classifier outputs.
        stem: ``"imagenet"`` (7x7 stride-2 conv + max-pool) or ``"cifar"`` (3x3 stride-1 conv, no max-pool).
        weights: a torchvision-format state dict, or a path to one (``.safetensors``, or a ``torch.save``
            file read with ``weights_only=True``). ``None`` keeps the random initialisation. Never downloads.
        branch_points, placement, n_branches, input_size, mean, std: see :func:`from_torchvision`.
    """
    return _resnet(
        "resnet18", n_classes, stem, weights, branch_points, placement, n_branches, input_size, mean, std
    )


def resnet50(
    n_classes: int = 1000,
    *,
    stem: str = "imagenet",
    weights: str | Path | dict | None = None,
    branch_points: Sequence[str] | None = None,
    placement: str | None = None,
    n_branches: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> StagedBackbone:
    """A frozen, staged torchvision ResNet-50 (arguments as :func:`resnet18`)."""
    return _resnet(
        "resnet50", n_classes, stem, weights, branch_points, placement, n_branches, input_size, mean, std
    )


def _load_state_dict_file(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: expected an existing file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that weights_only refuses
        text = " ".join(str(exc).split())
        reason = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
        raise RuntimeError(
            f"{name}: could not read {str(path)!r} with torch.load(weights_only=True) (the file is corrupt "
            f"or holds more than tensors, and this package never unpickles arbitrary objects): {reason[:300]}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RuntimeError(f"{name}: expected {str(path)!r} to hold a state dict, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet-20/32/44/56 (He et al. 2016, option-A shortcuts; the akamaster checkpoints).
# --------------------------------------------------------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padded channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the (option-A) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with 16-32-64 channels and option-A shortcuts (parameter names as akamaster's).

    Args:
        depth: 20, 32, 44, 56 (any ``6n + 2`` works).
        n_classes: classifier outputs.
        in_channels: input channels.
    """

    def __init__(self, depth: int = 56, n_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth: expected 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes_in = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(CifarBasicBlock(planes_in, planes, stride))
                planes_in = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def find_pretrained_cifar_checkpoint(depth: int, root: str | Path) -> Path:
    """The akamaster checkpoint ``resnet{depth}-*.th`` under ``root``.

    Args:
        depth: 20, 32, 44 or 56.
        root: the data directory (``<root>/pretrained/akamaster_resnet_cifar10``), its ``pretrained``
            folder, or the checkpoint folder itself.
    """
    root = Path(root)
    for folder in (root / "pretrained" / "akamaster_resnet_cifar10", root / "akamaster_resnet_cifar10", root):
        hits = sorted(folder.glob(f"resnet{int(depth)}-*.th"))
        if hits:
            return hits[0]
    raise ValueError(
        f"root: no checkpoint resnet{depth}-*.th found under {str(root)!r} "
        "(expected <root>/pretrained/akamaster_resnet_cifar10/resnet{depth}-<hash>.th)"
    )


def load_cifar_resnet_checkpoint(model: CifarResNet, checkpoint: str | Path | dict) -> CifarResNet:
    """Load an akamaster-format checkpoint into ``model`` strictly (``torch.load(weights_only=True)``).

    Accepts ``{'state_dict': ..., 'best_prec1': ...}`` or a bare state dict, with or without the ``module.``
    prefix (from ``nn.DataParallel``). ``num_batches_tracked`` buffers may be absent (old checkpoints).

    Raises:
        RuntimeError: the file cannot be read safely, or its keys/shapes do not fit ``model``; the message
            names the expected architecture and what the checkpoint looks like.
    """
    where = "checkpoint" if isinstance(checkpoint, dict) else f"checkpoint {str(checkpoint)!r}"
    sd = checkpoint if isinstance(checkpoint, dict) else _load_state_dict_file(checkpoint, "checkpoint")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = OrderedDict((k[len("module.") :] if k.startswith("module.") else k, v) for k, v in sd.items())
    expected = model.state_dict()
    try:
        _check_state_dict_fits(expected, sd, True, what=f"{where}")
    except RuntimeError as exc:
        blocks = {m.group(1) for k in sd if (m := re.match(r"layer1\.(\d+)\.", k))}
        looks = f"ResNet-{6 * len(blocks) + 2}" if blocks else "no CIFAR ResNet"
        lw = sd.get("linear.weight")
        classes = f", {lw.shape[0]} classes" if isinstance(lw, torch.Tensor) and lw.dim() == 2 else ""
        raise RuntimeError(
            f"{exc} -- expected CIFAR ResNet-{model.depth} ({(model.depth - 2) // 6} blocks per stage, "
            f"{model.linear.out_features} classes), the checkpoint looks like {looks}{classes}"
        ) from None
    model.load_state_dict(sd, strict=False)
    return model


def cifar_resnet(
    depth: int = 56,
    *,
    n_classes: int = 10,
    checkpoint: str | Path | dict | None = None,
    branch_points: Sequence[str] | None = None,
    placement: str | None = None,
    n_branches: int | None = None,
    input_size: int | tuple[int, int] = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> StagedBackbone:
    """A frozen, staged CIFAR ResNet-``depth`` (option-A shortcuts), optionally from a checkpoint.

    Args:
        depth: 20, 32, 44, 56 (any ``6n + 2``).
        n_classes: classifier outputs (10 for the akamaster checkpoints).
        checkpoint: path to (or dict of) an akamaster-format checkpoint, see
            :func:`load_cifar_resnet_checkpoint` and :func:`find_pretrained_cifar_checkpoint`; ``None`` keeps
            the random initialisation.
        branch_points: ``"layer1"``, ``"layer2"`` (stage ends) or blocks ``"layer2.3"``; the last block of
            ``layer3`` is not allowed. Default ``["layer1", "layer2"]``.
        placement, n_branches: ``placement="flops"`` picks ``n_branches`` block boundaries nearest to equal
            FLOPs fractions.
        input_size: default 32x32.
        mean, std: input normalisation; the akamaster checkpoints use the ImageNet statistics (default).
    """
    model = CifarResNet(depth, n_classes, in_channels=len(mean))
    if checkpoint is not None:
        load_cifar_resnet_checkpoint(model, checkpoint)
    model.requires_grad_(False)
    model.eval()
    units: list[tuple[str, nn.Module]] = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu)]
    aliases = {}
    for layer in ("layer1", "layer2", "layer3"):
        blocks = list(getattr(model, layer))
        for i, block in enumerate(blocks):
            units.append((f"{layer}.{i}", block))
        aliases[layer] = f"{layer}.{len(blocks) - 1}"
    last_block = units[-1][0]
    del aliases["layer3"]
    units += [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("linear", model.linear)]
    candidates = [n for n, _ in units if n.startswith("layer") and n != last_block]
    return _split_units(
        units,
        candidates,
        aliases,
        branch_points,
        placement,
        n_branches,
        ["layer1", "layer2"],
        in_channels=len(mean),
        input_size=_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=f"cifar_resnet{depth}",
    )


# --------------------------------------------------------------------------------------------------
# Any user model.
# --------------------------------------------------------------------------------------------------


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
    return _split_units(
        units,
        candidates,
        {},
        branch_points,
        placement,
        n_branches,
        candidates,
        in_channels=int(in_channels),
        input_size=_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=name,
    )
