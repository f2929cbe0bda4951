"""Small class-conditional images generated from a seed, for tests and smoke runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..normalization import NORMALIZATIONS, Normalization
from .images import ImageDataset
from .splits import DataSplits

__all__ = ["synthetic_dataset"]


def synthetic_dataset(
    n_train: int = 512,
    n_val: int = 256,
    n_test: int = 256,
    n_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    noise: float = 0.35,
    normalization: Normalization | None = None,
) -> DataSplits:
    """Class-conditional images for tests: a smooth random template per class plus noise and a shift.

    Classes are learnable but not trivially so (``noise`` sets the difficulty). Deterministic in
    ``seed``; labels are balanced (sample i has class ``i mod n_classes`` before shuffling).

    Returns:
        DataSplits with in-memory uint8 images [N, 3, image_size, image_size].
    """
    for arg, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < n_classes:
            raise ValueError(f"{arg}: expected at least n_classes={n_classes} samples, got {v}")
    if n_classes < 2:
        raise ValueError(f"n_classes: expected at least 2, got {n_classes}")
    g = torch.Generator().manual_seed(int(seed))
    low = torch.rand(n_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(low, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    classes = [f"class_{i}" for i in range(n_classes)]

    def make(n: int) -> ImageDataset:
        labels = torch.arange(n) % n_classes
        labels = labels[torch.randperm(n, generator=g)]
        x = templates[labels]
        shift = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([torch.roll(x[i], (int(shift[i, 0]), int(shift[i, 1])), dims=(1, 2)) for i in range(n)])
        x = x + noise * torch.randn(x.shape, generator=g)
        img = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return ImageDataset(labels, classes, images=img, normalization=normalization)

    return DataSplits(
        "synthetic",
        make(n_train),
        make(n_val),
        make(n_test),
        classes,
        None,
        "official",
        {"seed": seed, "noise": noise},
    ).with_normalization(normalization or NORMALIZATIONS["imagenet"])
