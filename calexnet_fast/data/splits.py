"""Train / validation / test splits, and the fixed, seeded, stratified validation split carved out of train."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..normalization import NORMALIZATIONS, Normalization
from .images import ImageDataset

__all__ = ["DataSplits", "finish_splits", "stratified_split"]


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

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def with_normalization(self, normalization: Normalization) -> DataSplits:
        return DataSplits(
            self.name,
            self.train.with_options(normalization=normalization),
            self.val.with_options(normalization=normalization),
            self.test.with_options(normalization=normalization),
            self.classes,
            self.root,
            self.val_source,
            dict(self.info),
        )

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


def finish_splits(
    name, root, train, val, test, classes, val_size, split_seed, normalization, image_size, info, strata=None
) -> DataSplits:
    """The :class:`DataSplits` of a loaded dataset: carve ``val`` out of ``train`` when there is none
    (stratified on ``strata``, default the labels) and apply the normalisation and image size to all three."""
    val_source = "official"
    if val is None:
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
    )
