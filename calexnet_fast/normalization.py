"""Input normalisation ``(x - mean) / std``: the one definition the backbones and the datasets share.

The backbone owns its statistics: a staged backbone carries the ``mean`` / ``std`` it was trained with (what
the model declares, e.g. timm's ``pretrained_cfg``, or what is given), a run records them, and the data of a
run is normalised with them. The pretrained CIFAR ResNet-20…56 (akamaster) and torchvision's ImageNet models
use the ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), the default where nothing else is
known. :data:`NORMALIZATIONS` adds per-dataset statistics a backbone may have been trained with instead, and
:func:`statistics_mismatch` says when a dataset's own statistics look far from a backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "Normalization",
    "normalization_for",
    "statistics_mismatch",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x - mean) / std`` on pixels scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., C, H, W] float in [0, 1] (``C = len(mean)``)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def to_json(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> Normalization:
        return cls(tuple(d["mean"]), tuple(d["std"]), d.get("name", "custom"))


NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar10"),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar100"),
    "cinic10": Normalization((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835), "cinic10"),
    "none": Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none"),
}


def normalization_for(backbone: str | None = None, override: str | Normalization | None = None) -> Normalization:
    """The input normalisation a backbone was trained with.

    Every known backbone (the pretrained CIFAR ResNets, torchvision's ImageNet ResNets, and what
    ``calexnet train-backbone`` trains unless told otherwise) maps to ``imagenet``. A backbone trained with
    other statistics records them in its checkpoint config; pass them (or a name from
    :data:`NORMALIZATIONS`) as ``override``.

    Args:
        backbone: backbone name (e.g. ``"cifar_resnet56"``, ``"resnet18"``); ``None`` means the default.
        override: a :class:`Normalization` or a key of :data:`NORMALIZATIONS`, taking precedence.
    """
    if isinstance(override, Normalization):
        return override
    if override is not None:
        if override not in NORMALIZATIONS:
            raise ValueError(f"normalization: expected one of {sorted(NORMALIZATIONS)}, got {override!r}")
        return NORMALIZATIONS[override]
    return NORMALIZATIONS["imagenet"]


def statistics_mismatch(normalization: Normalization, mean: tuple[float, ...], std: tuple[float, ...]) -> str | None:
    """Whether images whose pixels (in [0, 1]) have per-channel ``mean`` and ``std`` look far from what a
    backbone normalising with ``normalization`` was trained on; ``None`` when they do not, else why.

    Normalised, such images have per-channel mean ``(mean - m) / s`` and std ``std / s``; training data
    normalised with its own statistics gives 0 and 1. They look far when some channel's normalised mean is
    beyond +-1 or its normalised std outside [0.5, 2].
    """
    far = []
    for c, (dm, ds, m, s) in enumerate(zip(mean, std, normalization.mean, normalization.std, strict=True)):
        nm, ns = (dm - m) / s, ds / s
        if abs(nm) > 1.0 or not 0.5 <= ns <= 2.0:
            far.append(f"channel {c}: mean {dm:.3f} vs {m:.3f}, std {ds:.3f} vs {s:.3f}")
    if not far:
        return None
    return (
        f"the images' statistics look far from the backbone's input normalisation ({'; '.join(far)}): after "
        "normalising, their mean should be near 0 and their std near 1. If the backbone was trained with other "
        "statistics, give them (--mean/--std, or mean=/std=)"
    )
