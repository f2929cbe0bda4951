"""Backbones by name: what the command line and run directories store, and how to rebuild it.

A :class:`BackboneSpec` (stored in a run's ``config.json``) names the architecture (``cifar_resnet<depth>``,
``resnet18``, ``resnet50``), its weights, branch points and normalisation; :func:`build_backbone` rebuilds
the same frozen, staged backbone from it, and :func:`trainable_backbone` gives the plain network whose
trained state dict it loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .cifar import CifarResNet, cifar_resnet
from .staged import StagedBackbone
from .torchvision import resnet18, resnet50, torchvision_resnet

__all__ = ["TORCHVISION_ARCHS", "BackboneSpec", "build_backbone", "cifar_depth", "trainable_backbone"]

_TORCHVISION_CONSTRUCTORS = {"resnet18": resnet18, "resnet50": resnet50}
TORCHVISION_ARCHS = tuple(_TORCHVISION_CONSTRUCTORS)


def cifar_depth(arch: str) -> int | None:
    """The depth of a ``cifar_resnet<depth>`` name, ``None`` for any other name."""
    if arch.startswith("cifar_resnet") and arch[len("cifar_resnet") :].isdigit():
        return int(arch[len("cifar_resnet") :])
    return None


def _check_arch(arch: str) -> None:
    if arch not in TORCHVISION_ARCHS and cifar_depth(arch) is None:
        raise ValueError(
            f"arch: expected one of {list(TORCHVISION_ARCHS)} or cifar_resnet<depth> "
            f"(depth 6n+2: 20, 32, 44, 56, ...), got {arch!r}"
        )


@dataclass
class BackboneSpec:
    """Everything needed to rebuild the same frozen, staged backbone (stored in a run's ``config.json``).

    Attributes:
        arch: ``cifar_resnet<depth>`` (e.g. ``cifar_resnet56``), ``resnet18`` or ``resnet50``.
        n_classes: classifier outputs.
        checkpoint: weights file (akamaster ``.th``, or ``.safetensors`` from ``calexnet train-backbone``);
            ``None`` keeps a random initialisation (tests and smoke runs only).
        stem: torchvision ResNets: ``"cifar"`` (3x3 stride-1 conv, no max-pool) or ``"imagenet"``.
        branch_points: names of the branch points (default: the backbone's own default).
        n_branches: pick this many branch points by FLOPs instead (``placement="flops"``).
        input_size: input side (default 32 for the CIFAR stem / CIFAR ResNets, else 224).
        mean, std: input normalisation (default ImageNet statistics).
    """

    arch: str = "cifar_resnet56"
    n_classes: int = 10
    checkpoint: str | None = None
    stem: str = "cifar"
    branch_points: list[str] | None = None
    n_branches: int | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        if self.branch_points is not None and self.n_branches is not None:
            raise ValueError("branch_points, n_branches: give one or the other, not both")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BackboneSpec:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def build_backbone(spec: BackboneSpec) -> StagedBackbone:
    """The frozen :class:`StagedBackbone` a :class:`BackboneSpec` describes (nothing is downloaded)."""
    placement = "flops" if spec.n_branches is not None else None
    common = {
        "branch_points": spec.branch_points,
        "placement": placement,
        "n_branches": spec.n_branches,
        "mean": spec.mean,
        "std": spec.std,
    }
    depth = cifar_depth(spec.arch)
    if depth is not None:
        return cifar_resnet(
            depth,
            n_classes=spec.n_classes,
            checkpoint=spec.checkpoint,
            input_size=spec.input_size or 32,
            **common,
        )
    fn = _TORCHVISION_CONSTRUCTORS[spec.arch]
    return fn(spec.n_classes, stem=spec.stem, weights=spec.checkpoint, input_size=spec.input_size, **common)


def trainable_backbone(arch: str, n_classes: int, stem: str = "cifar") -> nn.Module:
    """A fresh, trainable (not staged, not frozen) network of ``arch`` whose state dict
    :func:`build_backbone` loads as ``checkpoint``."""
    _check_arch(arch)
    depth = cifar_depth(arch)
    if depth is not None:
        return CifarResNet(depth, n_classes)
    # the same constructor resnet18/50 use, so the key names and the stem match exactly
    return torchvision_resnet(arch, n_classes, stem, None, 3)
