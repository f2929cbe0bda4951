"""Loading a dataset by name with its train / validation / test splits."""

from __future__ import annotations

import os

from ..normalization import Normalization, normalization_for
from .catalog import DATASETS, resolve_data_dir
from .cifar import load_cifar10, load_cifar100
from .folder import load_imagefolder
from .splits import DataSplits
from .synthetic import synthetic_dataset

__all__ = ["load_dataset"]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float | None = None,
    split_seed: int = 0,
    normalization: Normalization | str | None = None,
    image_size: int | None = None,
    synthetic: dict | None = None,
) -> DataSplits:
    """Load dataset ``name`` (one of :data:`DATASETS`) with train/val/test splits.

    Args:
        name: ``cifar10``, ``cifar100`` (fine), ``cifar100-coarse`` (20 superclasses), ``cinic10``,
            ``imagefolder`` or ``synthetic``.
        data_dir: the dataset's directory; default from the environment (see :mod:`.catalog`).
        val_size: validation samples carved out of train where there is no official split (count or
            fraction); default :func:`~calexnet_fast.data.splits.default_val_size` (5,000, or 20 % of a
            training split under 25,000 images).
        split_seed: seed of that split; keep it fixed across training seeds.
        normalization: a :class:`~calexnet_fast.normalization.Normalization` or a key of
            :data:`~calexnet_fast.normalization.NORMALIZATIONS`; default ImageNet statistics (what every
            supported backbone uses, see :func:`~calexnet_fast.normalization.normalization_for`).
        image_size: output side; default the stored size (32 for CIFAR/CINIC).
        synthetic: keyword arguments of :func:`synthetic_dataset` when ``name == "synthetic"``.
    """
    norm = normalization_for(None, normalization) if not isinstance(normalization, Normalization) else normalization
    if name == "cifar10":
        return load_cifar10(
            data_dir, val_size=val_size, split_seed=split_seed, normalization=norm, image_size=image_size
        )
    if name in ("cifar100", "cifar100-coarse"):
        return load_cifar100(
            data_dir,
            coarse=name == "cifar100-coarse",
            val_size=val_size,
            split_seed=split_seed,
            normalization=norm,
            image_size=image_size,
        )
    if name in ("cinic10", "imagefolder"):
        root = resolve_data_dir(name, data_dir)
        return load_imagefolder(
            root,
            name=name,
            val_size=val_size,
            split_seed=split_seed,
            normalization=norm,
            image_size=image_size,
        )
    if name == "synthetic":
        kw = dict(synthetic or {})
        kw.setdefault("normalization", norm)
        if image_size is not None:
            kw.setdefault("image_size", image_size)
        return synthetic_dataset(**kw)
    raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
