"""Datasets for training and evaluating early-exit branches (docs/design.md §1, §5).

Everything is read from directories the user already has; nothing is downloaded. Supported:

* ``cifar10``: the official python pickles (``data_batch_1`` … ``data_batch_5``, ``test_batch``,
  ``batches.meta``) or an ImageFolder tree ``train/<class>/*`` + ``test/<class>/*`` (for example
  ``../shared/data/cifar10-jpeg``).
* ``cifar100`` (100 fine labels) and ``cifar100-coarse`` (the 20 superclasses, ``coarse_labels``): the
  official python pickles ``train``, ``test``, ``meta``.
* ``cinic10`` and ``imagefolder``: any ImageFolder tree with ``train/valid/test`` or ``train/test``.
* ``synthetic``: small class-conditional images generated from a seed, for tests and smoke runs.

Where a dataset has no validation split, a fixed, seeded, stratified one is carved out of ``train``
(:func:`stratified_split`); its seed is separate from the training seed so every run of a comparison
calibrates on the same images; its default size scales with small datasets (:func:`default_val_size`, and
:func:`default_min_support` for the calibration). Pixels are normalised with the statistics of the backbone
(its ``mean`` / ``std``, recorded in a run); :func:`pixel_statistics` measures a dataset's own, to compare
(:func:`calexnet_fast.normalization.statistics_mismatch`). CIFAR-100 exposes its fine labels and the
fine -> coarse map (``DataSplits.fine_to_coarse``).

Modules: :mod:`.datasets` (:func:`load_dataset`), :mod:`.catalog` (dataset names and directories,
:func:`resolve_data_dir`), :mod:`.cifar` (the official pickles), :mod:`.folder` (ImageFolder trees),
:mod:`.synthetic`, :mod:`.images` (:class:`ImageDataset`, decoding, :func:`decode_images`), :mod:`.splits`
(:class:`DataSplits`, :func:`stratified_split`, :func:`stratified_subset`).
"""

from .catalog import DATASETS, resolve_data_dir
from .cifar import load_cifar10, load_cifar100
from .datasets import load_dataset
from .folder import load_imagefolder
from .images import IMAGE_EXTENSIONS, PRELOAD_MAX_SIDE, ImageDataset, decode_images, pixel_statistics
from .splits import DataSplits, default_min_support, default_val_size, stratified_split, stratified_subset
from .synthetic import synthetic_dataset

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "PRELOAD_MAX_SIDE",
    "DataSplits",
    "ImageDataset",
    "default_min_support",
    "decode_images",
    "default_val_size",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_imagefolder",
    "pixel_statistics",
    "resolve_data_dir",
    "stratified_split",
    "stratified_subset",
    "synthetic_dataset",
]
