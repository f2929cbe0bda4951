"""Batch sources: what the training loop iterates.

:class:`CacheSource` serves batches of a :class:`~calexnet_fast.features.FeatureCache` (branch features,
backbone logits, labels, optional per-sample weights) as :class:`CachedBatch`; :class:`DatasetSource` serves
``(images, labels)`` of an image dataset through a DataLoader. Both split the epoch's sample order into
batches with :func:`split_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..features import FeatureCache

__all__ = ["BatchSource", "CacheSource", "CachedBatch", "DatasetSource", "split_batches"]


@dataclass
class CachedBatch:
    """One training batch from a :class:`FeatureCache` (tensors on the training device).

    Attributes:
        features: K entries, [B, C_k, H_k, W_k] float32 for the branches the source reads, else ``None``.
        backbone_logits: [B, n_classes] float32.
        labels: [B] int64 true labels.
        weights: [B] float32 per-sample weights, or ``None``.
        index: [B] int64 row positions in the cache.
    """

    features: list[torch.Tensor | None]
    backbone_logits: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class BatchSource:
    """What :func:`fit` iterates: ``len(source)`` samples, ``source.batches(order, batch_size, device)``."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Any]:  # pragma: no cover
        raise NotImplementedError


def split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` in batches of ``batch_size`` (a last batch of one sample joins the one before it)."""
    parts = list(order.split(batch_size))
    if len(parts) > 1 and parts[-1].numel() == 1:  # a batch of one breaks BatchNorm: fold it into the last
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


class CacheSource(BatchSource):
    """Batches of a :class:`FeatureCache`, optionally with per-sample weights and a subset of branches.

    Args:
        cache: the feature cache.
        weights: optional [N] per-sample weights (attached to each batch as ``batch.weights``).
        branches: 0-based branch indices whose features are read (default all).
        dtype: compute dtype of the features on the device (float32 default).
    """

    def __init__(
        self,
        cache: FeatureCache,
        weights: torch.Tensor | None = None,
        branches: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if weights is not None and weights.shape != (len(cache),):
            raise ValueError(
                f"weights: expected shape [{len(cache)}] (one per cached sample), got {list(weights.shape)}"
            )
        if branches is not None:
            for k in branches:
                if not 0 <= k < cache.n_branches:
                    raise ValueError(f"branches: expected indices in 0..{cache.n_branches - 1}, got {k}")
        self.cache, self.weights, self.branches, self.dtype = cache, weights, branches, dtype

    def __len__(self) -> int:
        return len(self.cache)

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[CachedBatch]:
        for idx in split_batches(order, batch_size):
            if self.cache.on_disk:
                idx = torch.sort(idx).values
            feats, z, y = self.cache.gather(idx, self.branches)
            nb = device.type == "cuda"
            yield CachedBatch(
                [f.to(device, self.dtype, non_blocking=nb) if f is not None else None for f in feats],
                z.to(device, non_blocking=nb),
                y.to(device, non_blocking=nb),
                self.weights[idx].to(device, torch.float32) if self.weights is not None else None,
                idx.to(device),
            )


class DatasetSource(BatchSource):
    """Batches ``(images [B, 3, H, W], labels [B])`` of an image dataset through a DataLoader."""

    def __init__(self, dataset, num_workers: int = 0) -> None:
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[tuple]:
        from torch.utils.data import DataLoader

        parts = split_batches(order, batch_size)
        loader = DataLoader(
            self.dataset,
            batch_sampler=[p.tolist() for p in parts],
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
