"""ImageFolder trees ``train/<class>/…``, ``test/<class>/…`` and optionally ``valid/`` (CINIC-10, cifar10-jpeg…)."""

from __future__ import annotations

import os
from pathlib import Path

from ..normalization import Normalization
from .catalog import HOW_TO_GET, dataset_family, listing, resolve_data_dir
from .images import IMAGE_EXTENSIONS, PRELOAD_MAX_SIDE, ImageDataset, decode_all
from .splits import DataSplits, finish_splits

__all__ = ["load_imagefolder"]


def _scan_split(split_dir: Path, name: str) -> tuple[list[str], list[str], list[int]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(
            f"{name}: {split_dir} should contain one folder per class (ImageFolder layout), contains "
            f"{listing(split_dir)}"
        )
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(
            str(p) for p in (split_dir / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"{name}: class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [ci] * len(files)
    return classes, paths, labels


def load_imagefolder(
    data_dir: str | os.PathLike | None = None,
    *,
    name: str = "imagefolder",
    val_size: int | float | None = None,
    split_seed: int = 0,
    normalization: Normalization | None = None,
    image_size: int | None = None,
    preload: bool | None = None,
) -> DataSplits:
    """An ImageFolder tree ``train/<class>/…`` and ``test/<class>/…``, with ``valid/`` used if present.

    Args:
        name: dataset name recorded in the splits (``"cinic10"``, ``"cifar10"`` …); also picks the env var.
        preload: decode every image once into memory (uint8). Default: yes when the images are at most
            64×64 (CIFAR/CINIC size), so epochs do not re-decode files.
    """
    fam = dataset_family(name) if dataset_family(name) in HOW_TO_GET else "imagefolder"
    root = resolve_data_dir(fam, data_dir)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(
            f"{name}: {root} should contain train/ and test/ (and optionally valid/) folders with one "
            f"sub-folder per class; it contains {listing(root)}. Expected {HOW_TO_GET[fam]}."
        )
    found = {}
    for split in ("train", "valid", "test"):
        if (root / split).is_dir():
            found[split] = _scan_split(root / split, name)
    classes = found["train"][0]
    for split, (cls, _, _) in found.items():
        if cls != classes:
            raise ValueError(f"{name}: class folders of {split}/ {cls} differ from those of train/ {classes}")
    if preload is None:
        from PIL import Image

        with Image.open(found["train"][1][0]) as im:
            preload = max(im.size) <= PRELOAD_MAX_SIDE
    datasets = {}
    for split, (_, paths, labels) in found.items():
        if preload:
            datasets[split] = ImageDataset(labels, classes, images=decode_all(paths, f"decoding {name}/{split}"))
        else:
            datasets[split] = ImageDataset(labels, classes, paths=paths)
    return finish_splits(
        name,
        str(root),
        datasets["train"],
        datasets.get("valid"),
        datasets["test"],
        classes,
        val_size,
        split_seed,
        normalization,
        image_size,
        {"format": "imagefolder"},
    )
