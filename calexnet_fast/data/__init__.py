"""Datasets for training and evaluating early-exit branches (DESIGN.md §1, §5).

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
calibrates on the same images. Pixels are normalised with per-backbone statistics
(:func:`calexnet_fast.normalization.normalization_for`).

Modules: :mod:`.datasets` (:func:`load_dataset`), :mod:`.catalog` (dataset names and directories,
:func:`resolve_data_dir`), :mod:`.cifar` (the official pickles), :mod:`.folder` (ImageFolder trees),
:mod:`.synthetic`, :mod:`.images` (:class:`ImageDataset`, decoding), :mod:`.splits` (:class:`DataSplits`,
:func:`stratified_split`).
"""

from .catalog import DATASETS, resolve_data_dir
from .cifar import load_cifar10, load_cifar100
from .datasets import load_dataset
from .folder import load_imagefolder
from .images import IMAGE_EXTENSIONS, PRELOAD_MAX_SIDE, ImageDataset
from .splits import DataSplits, stratified_split
from .synthetic import synthetic_dataset

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "PRELOAD_MAX_SIDE",
    "DataSplits",
    "ImageDataset",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_imagefolder",
    "resolve_data_dir",
    "stratified_split",
    "synthetic_dataset",
]
