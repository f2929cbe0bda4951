"""CIFAR-10 and CIFAR-100 from the official python pickles.

The pickles are read with a restricted unpickler that only builds plain containers and numpy arrays, so a
data file can never run code. CIFAR-10 given as an ImageFolder tree is read by :func:`load_imagefolder`.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..normalization import Normalization
from .catalog import HOW_TO_GET, dataset_family, listing, resolve_data_dir
from .folder import load_imagefolder
from .images import ImageDataset
from .splits import DataSplits, finish_splits

__all__ = ["load_cifar10", "load_cifar100"]

_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR data file")
        if module == "numpy.core.multiarray":  # numpy >= 2 moved it; avoid the deprecated alias
            try:
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _str_keys(d):
    if isinstance(d, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    return d


def _load_pickle(path: Path, dataset: str, expected_keys: Sequence[str]) -> dict:
    if not path.is_file():
        raise ValueError(
            f"{dataset}: expected the file {path} (official python pickle). {HOW_TO_GET[dataset_family(dataset)]}"
        )
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not what we expect
        raise ValueError(f"{dataset}: {path} is not a readable CIFAR python pickle ({type(e).__name__}: {e})") from e
    d = _str_keys(d)
    if not isinstance(d, dict):
        raise ValueError(f"{dataset}: {path} should hold a dict, holds {type(d).__name__}")
    missing = [k for k in expected_keys if k not in d]
    if missing:
        raise ValueError(f"{dataset}: {path} lacks the keys {missing}; it has {sorted(d)}")
    return d


def _cifar_images(d: dict, path: Path, dataset: str) -> torch.Tensor:
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{dataset}: {path}: 'data' should be uint8 [N, 3072], is {data.dtype} {list(data.shape)}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _find_pickle_dir(root: Path, marker: str, subdir: str) -> Path | None:
    for cand in (root, root / subdir):
        if (cand / marker).is_file():
            return cand
    return None


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float | None = None,
    split_seed: int = 0,
    normalization: Normalization | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """CIFAR-10 from the official pickles or an ImageFolder ``train/test`` tree (format detected).

    Validation: ``val_size`` images carved out of train (stratified, ``split_seed``; default
    :func:`~calexnet_fast.data.splits.default_val_size`), unless an ImageFolder tree has its own ``valid/``
    split.
    """
    root = resolve_data_dir("cifar10", data_dir)
    pdir = _find_pickle_dir(root, "data_batch_1", "cifar-10-batches-py")
    if pdir is None:
        if (root / "train").is_dir():
            return load_imagefolder(
                root,
                name="cifar10",
                val_size=val_size,
                split_seed=split_seed,
                normalization=normalization,
                image_size=image_size,
            )
        raise ValueError(
            f"cifar10: {root} holds neither the official pickles (data_batch_1 …) nor a train/ folder; it "
            f"contains {listing(root)}. Expected {HOW_TO_GET['cifar10']}."
        )
    meta = _load_pickle(pdir / "batches.meta", "cifar10", ["label_names"])
    classes = _names(meta["label_names"])
    xs, ys = [], []
    for i in range(1, 6):
        p = pdir / f"data_batch_{i}"
        d = _load_pickle(p, "cifar10", ["data", "labels"])
        xs.append(_cifar_images(d, p, "cifar10"))
        ys.append(torch.as_tensor(list(d["labels"]), dtype=torch.int64))
    pt = pdir / "test_batch"
    dt = _load_pickle(pt, "cifar10", ["data", "labels"])
    train = ImageDataset(torch.cat(ys), classes, images=torch.cat(xs))
    test = ImageDataset(
        torch.as_tensor(list(dt["labels"]), dtype=torch.int64),
        classes,
        images=_cifar_images(dt, pt, "cifar10"),
    )
    return finish_splits(
        "cifar10",
        str(pdir),
        train,
        None,
        test,
        classes,
        val_size,
        split_seed,
        normalization,
        image_size,
        {"format": "pickle"},
    )


def load_cifar100(
    data_dir: str | os.PathLike | None = None,
    *,
    coarse: bool = True,
    val_size: int | float | None = None,
    split_seed: int = 0,
    normalization: Normalization | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """CIFAR-100 from the official pickles ``train``, ``test``, ``meta``.

    Both variants expose the fine classes: ``splits.fine_classes`` (100 names), ``splits.fine_to_coarse`` (the
    superclass of each fine class, read from the pickles; ``None`` if they lack a fine class) and each split's
    ``fine_labels``; a backbone trained
    on the fine classes serves the coarse labels through that map (``--class-map dataset``,
    :func:`calexnet_fast.backbones.with_class_map`).

    Args:
        coarse: use the 20 superclass labels (``coarse_labels``, ``coarse_label_names``); ``False`` for the
            100 fine labels.
    """
    root = resolve_data_dir("cifar100", data_dir)
    pdir = _find_pickle_dir(root, "train", "cifar-100-python")
    if pdir is None:
        raise ValueError(
            f"cifar100: {root} does not hold the official pickles (train, test, meta); it contains "
            f"{listing(root)}. Expected {HOW_TO_GET['cifar100']}."
        )
    label_key = "coarse_labels" if coarse else "fine_labels"
    name = "cifar100-coarse" if coarse else "cifar100"
    meta = _load_pickle(
        pdir / "meta", name, ["fine_label_names", "coarse_label_names"] if coarse else ["fine_label_names"]
    )
    fine_classes = _names(meta["fine_label_names"])
    classes = _names(meta["coarse_label_names"]) if coarse else fine_classes
    splits, pairs = {}, set()
    for split in ("train", "test"):
        p = pdir / split
        d = _load_pickle(p, name, ["data", "fine_labels", label_key])
        fine = torch.as_tensor(list(d["fine_labels"]), dtype=torch.int64)
        if "coarse_labels" in d:
            pairs |= set(zip(fine.tolist(), (int(c) for c in d["coarse_labels"])))
        labels = torch.as_tensor(list(d[label_key]), dtype=torch.int64)
        splits[split] = ImageDataset(labels, classes, images=_cifar_images(d, p, name), fine_labels=fine)
    fine_to_coarse = dict(sorted(pairs))
    if len(fine_to_coarse) != len(pairs):
        raise ValueError(f"{name}: {pdir}: a fine label comes with several coarse labels (not a fine -> coarse map)")
    complete = sorted(fine_to_coarse) == list(range(len(fine_classes)))
    # stratify on the fine labels (which stratifies the coarse ones too): the coarse and fine variants then
    # calibrate on the same validation images
    return finish_splits(
        name,
        str(pdir),
        splits["train"],
        None,
        splits["test"],
        classes,
        val_size,
        split_seed,
        normalization,
        image_size,
        {"format": "pickle", "labels": label_key},
        strata=splits["train"].fine_labels,
        fine=(fine_classes, [fine_to_coarse[i] for i in range(len(fine_classes))] if complete else None),
    )
