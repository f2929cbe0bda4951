"""The CIFAR-10 ResNet-20/32/44/56 of He et al. (2016, option-A shortcuts) and its checkpoints.

:func:`cifar_resnet` builds the staged backbone, optionally loading the checkpoints of
``pretrained/akamaster_resnet_cifar10`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .checkpoints import check_state_dict_fits, load_state_dict_file
from .placement import split_units
from .staged import StagedBackbone, as_pair

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "CifarBasicBlock",
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
    sd = checkpoint if isinstance(checkpoint, dict) else load_state_dict_file(checkpoint, "checkpoint")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = OrderedDict((k[len("module.") :] if k.startswith("module.") else k, v) for k, v in sd.items())
    expected = model.state_dict()
    try:
        check_state_dict_fits(expected, sd, True, what=f"{where}")
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
        name=f"cifar_resnet{depth}",
    )
