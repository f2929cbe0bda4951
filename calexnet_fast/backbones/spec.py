"""Backbones by name: what the command line and run directories store, and how to rebuild it.

A :class:`BackboneSpec` (stored in a run's ``config.json``) names the architecture, its weights, branch points,
input statistics and size, and class map; :func:`build_backbone` rebuilds the same frozen, staged backbone
from it, and :func:`trainable_backbone` gives the plain network whose trained state dict it loads.
Architectures: ``cifar_resnet<depth>`` (option-A shortcuts, the akamaster checkpoints),
``cifar_resnet<depth>_b`` (option B), ``resnet18`` / ``resnet50`` (either stem), and any model by source
(:mod:`.sources`): ``torchvision:<name>``, ``timm:<name>``, ``path/to/file.py:factory``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .checkpoints import load_weights
from .cifar import CifarResNet, cifar_resnet
from .classmap import check_class_map, with_class_map
from .generic import declared_input, from_model
from .sources import build_model, file_sha256, is_model_source, split_source
from .staged import StagedBackbone
from .torchvision import resnet18, resnet50, torchvision_resnet

__all__ = [
    "TORCHVISION_ARCHS",
    "BackboneSpec",
    "build_backbone",
    "cifar_depth",
    "cifar_variant",
    "trainable_backbone",
]

_TORCHVISION_CONSTRUCTORS = {"resnet18": resnet18, "resnet50": resnet50}
TORCHVISION_ARCHS = tuple(_TORCHVISION_CONSTRUCTORS)
_CIFAR = re.compile(r"^cifar_resnet(\d+)(_b)?$")


def cifar_variant(arch: str) -> tuple[int, str] | None:
    """``(depth, shortcut)`` of ``cifar_resnet<depth>`` (``"A"``) or ``cifar_resnet<depth>_b`` (``"B"``), else
    ``None``."""
    m = _CIFAR.match(arch)
    return (int(m.group(1)), "B" if m.group(2) else "A") if m else None


def cifar_depth(arch: str) -> int | None:
    """The depth of a ``cifar_resnet<depth>`` name (option A, the akamaster checkpoints), ``None`` otherwise."""
    v = cifar_variant(arch)
    return v[0] if v is not None and v[1] == "A" else None


def _check_arch(arch: str) -> None:
    if arch in TORCHVISION_ARCHS or cifar_variant(arch) is not None:
        return
    if ":" in arch:
        split_source(arch)  # a precise message for a malformed source
        return
    raise ValueError(
        f"arch: expected one of {list(TORCHVISION_ARCHS)}, cifar_resnet<depth> (depth 6n+2: 20, 32, 44, 56, ...; "
        f"cifar_resnet<depth>_b for option-B shortcuts), torchvision:<name>, timm:<name> or "
        f"path/to/file.py:factory, got {arch!r}"
    )


@dataclass
class BackboneSpec:
    """Everything needed to rebuild the same frozen, staged backbone (stored in a run's ``config.json``).

    Attributes:
        arch: see the module docstring.
        n_classes: outputs of the model itself (with a ``class_map``: its fine classes).
        checkpoint: weights file (``.safetensors`` or a ``torch.save`` state dict); ``None`` keeps a random
            initialisation (tests and smoke runs only).
        stem: ``resnet18`` / ``resnet50``: ``"cifar"`` (3x3 stride-1 conv, no max-pool) or ``"imagenet"``.
        branch_points: names of the branch points (default: the backbone's own default).
        n_branches: pick this many branch points by FLOPs instead (``placement="flops"``).
        input_size: input side or ``[H, W]`` (default: what the model declares, else the data's, else 32 for
            the CIFAR ResNets and the CIFAR stem, 224 for the ImageNet stem).
        mean, std: input normalisation; ``None``: the model's own (ImageNet for the built-in architectures).
        file_sha256: SHA-256 of a ``file.py:factory`` source (checked when rebuilding).
        checkpoint_sha256: SHA-256 of ``checkpoint`` (checked when rebuilding, if recorded).
        class_map: one label per model class when the labels are coarser (:mod:`.classmap`).
    """

    arch: str = "cifar_resnet56"
    n_classes: int = 10
    checkpoint: str | None = None
    stem: str = "cifar"
    branch_points: list[str] | None = None
    n_branches: int | None = None
    input_size: int | list[int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    file_sha256: str | None = None
    checkpoint_sha256: str | None = None
    class_map: list[int] | None = None

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        if self.branch_points is not None and self.n_branches is not None:
            raise ValueError("branch_points, n_branches: give one or the other, not both")
        if not is_model_source(self.arch):
            self.mean = tuple(self.mean) if self.mean is not None else IMAGENET_MEAN
            self.std = tuple(self.std) if self.std is not None else IMAGENET_STD
        if self.class_map is not None:
            self.class_map = check_class_map(self.class_map, self.n_classes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BackboneSpec:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def resolved(self, backbone: StagedBackbone) -> BackboneSpec:
        """This spec with what ``backbone`` (built from it) settled: branch points, input size and statistics,
        so that rebuilding it gives the same backbone whatever the defaults become."""
        h, w = backbone.input_size
        return replace(
            self,
            branch_points=list(backbone.branch_points),
            n_branches=None,
            input_size=h if h == w else [h, w],
            mean=tuple(backbone.mean),
            std=tuple(backbone.std),
        )


def _check_checkpoint(spec: BackboneSpec) -> None:
    if spec.checkpoint is None or spec.checkpoint_sha256 is None or not Path(spec.checkpoint).is_file():
        return  # a missing file is reported by the loader
    sha = file_sha256(spec.checkpoint)
    if sha != spec.checkpoint_sha256:
        raise ValueError(
            f"checkpoint: {spec.checkpoint!r} changed since the run was made: its SHA-256 is {sha}, the run "
            f"recorded {spec.checkpoint_sha256}; restore that file, or train a new run on the new weights"
        )


def build_backbone(spec: BackboneSpec, default_input_size: int | None = None) -> StagedBackbone:
    """The frozen :class:`StagedBackbone` a :class:`BackboneSpec` describes (nothing is downloaded).

    Args:
        spec: the description.
        default_input_size: the input side when neither the spec nor the model says (the data's image side).
    """
    _check_checkpoint(spec)
    placement = "flops" if spec.n_branches is not None else None
    common = {"branch_points": spec.branch_points, "placement": placement, "n_branches": spec.n_branches}
    variant = cifar_variant(spec.arch)
    if is_model_source(spec.arch):
        model = build_model(spec.arch, spec.n_classes, spec.file_sha256)
        size = spec.input_size or declared_input(model).get("input_size") or default_input_size
        bb = from_model(model, **common, input_size=size, mean=spec.mean, std=spec.std, name=spec.arch)
        if spec.checkpoint is not None:  # the stages share the model's modules; what they use must be there
            used = set(bb.source_state_dict())
            load_weights(model, spec.checkpoint, name="checkpoint", arch=spec.arch, required=used)
    elif variant is not None:
        bb = cifar_resnet(
            variant[0],
            n_classes=spec.n_classes,
            checkpoint=spec.checkpoint,
            input_size=spec.input_size or default_input_size or 32,
            mean=spec.mean,
            std=spec.std,
            shortcut=variant[1],
            **common,
        )
    else:
        fn = _TORCHVISION_CONSTRUCTORS[spec.arch]
        size = spec.input_size or default_input_size
        bb = fn(
            spec.n_classes,
            stem=spec.stem,
            weights=spec.checkpoint,
            input_size=size,
            mean=spec.mean,
            std=spec.std,
            **common,
        )
    return with_class_map(bb, spec.class_map) if spec.class_map else bb


def trainable_backbone(arch: str, n_classes: int, stem: str = "cifar") -> nn.Module:
    """A fresh, trainable (not staged, not frozen) network of ``arch`` whose state dict
    :func:`build_backbone` loads as ``checkpoint``."""
    _check_arch(arch)
    variant = cifar_variant(arch)
    if variant is not None:
        return CifarResNet(variant[0], n_classes, shortcut=variant[1])
    if is_model_source(arch):
        return build_model(arch, n_classes)
    # the same constructor resnet18/50 use, so the key names and the stem match exactly
    return torchvision_resnet(arch, n_classes, stem, None, 3)
