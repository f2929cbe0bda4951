"""The CIFAR ResNet-20/32/44/56/110 of He et al. (2016) and its checkpoints.

Two shortcut variants: option A (stride-2 subsampling, zero-padded channels, no parameters; the akamaster
checkpoints of ``pretrained/akamaster_resnet_cifar10``, classifier ``linear``) and option B (a 1x1 conv + BN
projection ``downsample`` where the shape changes, classifier ``fc``; the layout of the widely shared
CIFAR-10/100 ``resnet20..56`` checkpoints of pytorch-cifar-models). :func:`cifar_resnet` builds the staged
backbone, optionally loading a checkpoint with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .checkpoints import load_state_dict_file, load_weights, unwrap_state_dict
from .placement import split_units, stage_units
from .staged import StagedBackbone, as_pair

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "CifarBasicBlock",
    "CifarBasicBlockB",
    "CifarResNet",
    "cifar_resnet",
    "find_pretrained_cifar_checkpoint",
    "load_cifar_resnet_checkpoint",
]

CIFAR_RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56)


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padded channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _CifarBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the subclass's shortcut (:meth:`skip`; the subclass registers it after
    the convolutions, under the name its checkpoints use), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CifarBasicBlock(_CifarBlock):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the (option-A) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


class CifarBasicBlockB(_CifarBlock):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the option-B shortcut (``downsample``: 1x1 conv + BN where the shape
    changes, identity elsewhere), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        if stride != 1 or in_planes != planes:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.downsample = nn.Identity()

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with 16-32-64 channels.

    Parameter names: option A as akamaster's (``layer1.0.conv1.weight``, ``linear.weight``); option B as
    pytorch-cifar-models' (``layer2.0.downsample.0.weight``, ``fc.weight``).

    Args:
        depth: 20, 32, 44, 56, 110 (any ``6n + 2`` works).
        n_classes: classifier outputs.
        in_channels: input channels.
        shortcut: ``"A"`` (parameter-free) or ``"B"`` (1x1 conv + BN projection).
    """

    def __init__(self, depth: int = 56, n_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth: expected 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut: expected 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut = shortcut
        block = CifarBasicBlock if shortcut == "A" else CifarBasicBlockB
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes_in = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(block(planes_in, planes, stride))
                planes_in = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        setattr(self, self.classifier_name, nn.Linear(64, n_classes))

    @property
    def classifier_name(self) -> str:
        """``"linear"`` (option A, akamaster) or ``"fc"`` (option B)."""
        return "linear" if self.shortcut == "A" else "fc"

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self, self.classifier_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


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
    """Load a CIFAR ResNet checkpoint into ``model`` strictly (``torch.load(weights_only=True)`` or safetensors).

    Accepts ``{'state_dict': ..., 'best_prec1': ...}`` or a bare state dict, with or without the ``module.``
    prefix (from ``nn.DataParallel``); the classifier may be called ``linear`` or ``fc`` and an option-B
    projection ``downsample`` or ``shortcut``. ``num_batches_tracked`` buffers may be absent (old checkpoints).

    Raises:
        RuntimeError: the file cannot be read safely, or its keys/shapes do not fit ``model``; the message
            lists the missing, unexpected and mis-shaped keys by layer and the architecture the file fits.
    """
    sd = (
        unwrap_state_dict(checkpoint)
        if isinstance(checkpoint, dict)
        else load_state_dict_file(checkpoint, "checkpoint")
    )
    where = "checkpoint" if isinstance(checkpoint, dict) else f"checkpoint {str(checkpoint)!r}"
    own = "linear." if model.shortcut == "A" else "fc."
    aliases = {"linear.": own, "fc.": own, "shortcut.": "downsample."}
    variant = "option-A shortcuts" if model.shortcut == "A" else "option-B 1x1 conv + BN shortcuts"
    arch = (
        f"cifar_resnet{model.depth}{'' if model.shortcut == 'A' else '_b'} ({(model.depth - 2) // 6} blocks per "
        f"stage, {variant}, {model.classifier.out_features} classes)"
    )
    load_weights(model, sd, name=where, arch=arch, aliases=aliases)
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
    shortcut: str = "A",
) -> StagedBackbone:
    """A frozen, staged CIFAR ResNet-``depth``, optionally from a checkpoint.

    Args:
        depth: 20, 32, 44, 56 (any ``6n + 2``).
        n_classes: classifier outputs (10 for the akamaster checkpoints).
        checkpoint: path to (or dict of) a checkpoint, see :func:`load_cifar_resnet_checkpoint` and
            :func:`find_pretrained_cifar_checkpoint`; ``None`` keeps the random initialisation.
        branch_points: ``"layer1"``, ``"layer2"`` (stage ends) or blocks ``"layer2.3"``; the last block of
            ``layer3`` is not allowed. Default ``["layer1", "layer2"]``.
        placement, n_branches: ``placement="flops"`` picks ``n_branches`` block boundaries nearest to equal
            FLOPs fractions.
        input_size: default 32x32.
        mean, std: input normalisation; the akamaster checkpoints use the ImageNet statistics (default).
        shortcut: ``"A"`` (akamaster) or ``"B"`` (1x1 conv + BN projections, classifier ``fc``).
    """
    model = CifarResNet(depth, n_classes, in_channels=len(mean), shortcut=shortcut)
    if checkpoint is not None:
        load_cifar_resnet_checkpoint(model, checkpoint)
    model.requires_grad_(False)
    model.eval()
    units, candidates, aliases = stage_units(
        model,
        [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu)],
        ("layer1", "layer2", "layer3"),
        [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), (model.classifier_name, model.classifier)],
    )
    return split_units(
        units,
        candidates,
        aliases,
        branch_points,
        placement,
        n_branches,
        ["layer1", "layer2"],
        in_channels=len(mean),
        input_size=as_pair(input_size, "input_size"),
        mean=mean,
        std=std,
        name=f"cifar_resnet{depth}" + ("" if shortcut == "A" else "_b"),
    )
