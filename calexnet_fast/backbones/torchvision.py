"""torchvision ResNets (any depth) with the ImageNet stem or the usual CIFAR stem, as staged backbones.

The CIFAR stem is a 3x3 stride-1 ``conv1`` and no max-pool. Backbones are split at stage (``"layer2"``) or
block (``"layer2.1"``) granularity, or at ``placement="flops"``. Nothing here downloads weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .checkpoints import check_state_dict_fits, load_state_dict_file
from .placement import split_units, stage_units
from .staged import StagedBackbone, as_pair

__all__ = ["from_torchvision", "resnet18", "resnet50", "torchvision_resnet"]


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
    units, candidates, aliases = stage_units(
        model,
        [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu), ("maxpool", model.maxpool)],
        ("layer1", "layer2", "layer3", "layer4"),
        [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)],
    )
    model.requires_grad_(False)
    model.eval()
    return split_units(
        units,
        candidates,
        aliases,
        branch_points,
        placement,
        n_branches,
        ["layer1", "layer2", "layer3"],
        in_channels=model.conv1.in_channels,
        input_size=as_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=name or ("resnet (CIFAR stem)" if cifar_stem else "resnet"),
    )


def torchvision_resnet(
    arch: str,
    n_classes: int,
    stem: str,
    weights: str | Path | dict | None,
    in_channels: int,
) -> nn.Module:
    """A plain (not staged) torchvision ResNet ``arch`` with the given stem, optionally loading ``weights``.

    The constructor behind :func:`resnet18` / :func:`resnet50` and the trainable networks of
    :func:`~calexnet_fast.backbones.spec.trainable_backbone`, so their key names and stems match.
    """
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
        sd = load_state_dict_file(weights, "weights") if not isinstance(weights, dict) else weights
        check_state_dict_fits(model.state_dict(), sd, True, what=f"weights for torchvision {arch} ({stem} stem)")
        model.load_state_dict(sd, strict=True)
    return model


def _staged_resnet(arch: str, doc: str):
    """The public constructor of a frozen, staged torchvision ``arch`` (:func:`resnet18`, :func:`resnet50`)."""

    def staged(
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
        model = torchvision_resnet(arch, n_classes, stem, weights, in_channels=len(mean))
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

    staged.__name__ = staged.__qualname__ = arch
    staged.__doc__ = doc
    return staged


resnet18 = _staged_resnet(
    "resnet18",
    """A frozen, staged torchvision ResNet-18.

    Args:
        n_classes: classifier outputs.
        stem: ``"imagenet"`` (7x7 stride-2 conv + max-pool) or ``"cifar"`` (3x3 stride-1 conv, no max-pool).
        weights: a torchvision-format state dict, or a path to one (``.safetensors``, or a ``torch.save``
            file read with ``weights_only=True``). ``None`` keeps the random initialisation. Never downloads.
        branch_points, placement, n_branches, input_size, mean, std: see :func:`from_torchvision`.
    """,
)
resnet50 = _staged_resnet("resnet50", """A frozen, staged torchvision ResNet-50 (arguments as :func:`resnet18`).""")
