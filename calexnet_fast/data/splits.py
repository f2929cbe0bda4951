"""Train / validation / test splits, the fixed, seeded, stratified validation split carved out of train, and
the defaults that scale with the data.

Small datasets: where no validation size is given, it is :func:`default_val_size` of the training split
(5,000 images, or 20 % of the training split when that has fewer than 25,000), and the calibration's minimum
exiting set per class is :func:`default_min_support` of the validation split (20 for 5,000 validation images
or more, proportionally fewer below, at least 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..normalization import NORMALIZATIONS, Normalization
from .images import ImageDataset

__all__ = [
    "DataSplits",
    "default_min_support",
    "default_val_size",
    "finish_splits",
    "stratified_split",
    "stratified_subset",
]

LARGE_VAL = 5000  # validation images carved out of a large training split (and what min_support 20 is made for)
SMALL_TRAIN = 25_000  # below this many training images, the validation split is a fraction of them
SMALL_VAL_FRACTION = 0.2
MAX_MIN_SUPPORT, MIN_MIN_SUPPORT = 20, 3


def default_val_size(n_train: int) -> int:
    """Validation images carved out of a training split of ``n_train`` images when none is asked for: 5,000,
    or 20 % of ``n_train`` when it is under 25,000 (so a 1,000-image dataset keeps 800 for training)."""
    return LARGE_VAL if n_train >= SMALL_TRAIN else max(1, round(SMALL_VAL_FRACTION * n_train))


def default_min_support(n_val: int) -> int:
    """The CPM ``min_support`` default for ``n_val`` validation images: 20 at 5,000 or more, scaled down in
    proportion below (``round(20 * n_val / 5000)``), never under 3."""
    return max(MIN_MIN_SUPPORT, min(MAX_MIN_SUPPORT, round(MAX_MIN_SUPPORT * n_val / LARGE_VAL)))


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset (validation: calibration only, never training)."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    root: str | None = None
    val_source: str = "official"  # or "train" when carved out of the training split
    info: dict = field(default_factory=dict)
    fine_classes: list[str] | None = None  # where the labels have finer classes (CIFAR-100): their names
    fine_to_coarse: list[int] | None = None  # ... and the label of each (each split's ``fine_labels``)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def with_options(self, normalization: Normalization | None = None, image_size: int | None = None) -> DataSplits:
        """The same images with another normalisation and/or output side."""
        kw = {"normalization": normalization, "image_size": image_size}
        return DataSplits(
            self.name,
            self.train.with_options(**kw),
            self.val.with_options(**kw),
            self.test.with_options(**kw),
            self.classes,
            self.root,
            self.val_source,
            dict(self.info),
            self.fine_classes,
            self.fine_to_coarse,
        )

    def with_normalization(self, normalization: Normalization) -> DataSplits:
        return self.with_options(normalization=normalization)

    def describe(self) -> dict:
        """JSON-able summary (sizes, classes, where it came from)."""
        return {
            "name": self.name,
            "root": self.root,
            "n_classes": self.n_classes,
            "classes": self.classes,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "val_source": self.val_source,
            "normalization": self.train.normalization.to_json(),
            **self.info,
        }


def stratified_split(labels: torch.Tensor, val_size: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val) keeping class proportions, deterministically from ``seed``.

    Each class contributes ``round(val_fraction · n_c)`` samples (largest remainders fix the total to
    exactly ``val_size`` when it is an int), chosen by a seeded permutation.

    Args:
        labels: [N] int class labels.
        val_size: number of validation samples (int) or fraction of N in (0, 1).
        seed: split seed (keep it fixed across training seeds).

    Returns:
        (train_idx, val_idx): sorted int64 index tensors, disjoint, covering 0..N-1.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n = labels.shape[0]
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size: expected a fraction in (0, 1) or a count, got {val_size}")
        total = int(round(val_size * n))
    else:
        total = int(val_size)
    if not 0 < total < n:
        raise ValueError(f"val_size: expected between 1 and {n - 1} samples (N = {n}), got {val_size}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * total / n
    take = exact.floor().long()
    # hand out the remaining samples to the largest remainders (ties: lower class first)
    rest = total - int(take.sum())
    if rest > 0:
        order = torch.argsort(-(exact - take.double()), stable=True)[:rest]
        take[order] += 1
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    val_parts = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = perm[labels[perm] == c]
        val_parts.append(members[:k])
    val_idx = torch.sort(torch.cat(val_parts)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    train_idx = torch.nonzero(mask).squeeze(1)
    return train_idx, val_idx


def stratified_subset(dataset: ImageDataset, size: int, seed: int = 0, *, name: str = "size") -> ImageDataset:
    """``size`` samples of ``dataset`` in its class proportions, chosen deterministically from ``seed`` (the
    ``val`` part of :func:`stratified_split`); ``name``: what the error message calls ``size``.

    Raises:
        ValueError: ``size`` is not between 1 and ``len(dataset) - 1``.
    """
    if not 0 < size < len(dataset):
        raise ValueError(f"{name}: expected 1..{len(dataset) - 1}, got {size}")
    _, idx = stratified_split(dataset.labels, size, seed=seed)
    return dataset.subset(idx)


def finish_splits(
    name,
    root,
    train,
    val,
    test,
    classes,
    val_size,
    split_seed,
    normalization,
    image_size,
    info,
    strata=None,
    fine: tuple[list[str], list[int]] | None = None,
) -> DataSplits:
    """The :class:`DataSplits` of a loaded dataset: carve ``val`` out of ``train`` when there is none
    (stratified on ``strata``, default the labels; ``val_size=None``: :func:`default_val_size`) and apply the
    normalisation and image size to all three. ``fine``: the fine class names and fine -> label map."""
    val_source = "official"
    if val is None:
        if val_size is None:
            val_size = default_val_size(len(train))
        tr_idx, va_idx = stratified_split(train.labels if strata is None else strata, val_size, split_seed)
        val = train.subset(va_idx)
        train = train.subset(tr_idx)
        val_source = "train"
        info = {**info, "val_size": len(val), "split_seed": split_seed}
    norm = normalization or NORMALIZATIONS["imagenet"]
    kw = {"normalization": norm, "image_size": image_size}
    return DataSplits(
        name,
        train.with_options(**kw),
        val.with_options(augment=False, **kw),
        test.with_options(augment=False, **kw),
        list(classes),
        root,
        val_source,
        info,
        *(fine or (None, None)),
    )
