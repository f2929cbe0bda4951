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
(:func:`normalization_for`).

Data directories come from an argument, ``CALEXNET_<NAME>_DIR`` (``CALEXNET_CIFAR10_DIR``,
``CALEXNET_CIFAR100_DIR``, ``CALEXNET_CINIC10_DIR``, ``CALEXNET_IMAGEFOLDER_DIR``) or a base directory
``CALEXNET_DATA`` holding the usual folder names (``cifar-10-batches-py``, ``cifar10-jpeg``,
``cifar-100-python``, ``CINIC-10`` …).
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DataSplits",
    "ImageDataset",
    "Normalization",
    "NORMALIZATIONS",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_imagefolder",
    "normalization_for",
    "resolve_data_dir",
    "stratified_split",
    "synthetic_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")

# Images at most this large (both sides) are decoded once into one uint8 tensor; larger ones stay lazy.
PRELOAD_MAX_SIDE = 64


# --------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x - mean) / std`` on pixels scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = "custom"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., 3, H, W] float in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def to_json(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> Normalization:
        return cls(tuple(d["mean"]), tuple(d["std"]), d.get("name", "custom"))


NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet"),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar10"),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar100"),
    "cinic10": Normalization((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835), "cinic10"),
    "none": Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none"),
}


def normalization_for(backbone: str | None = None, override: str | Normalization | None = None) -> Normalization:
    """The input normalisation a backbone was trained with.

    The pretrained CIFAR ResNet-20…56 (akamaster) and torchvision's ImageNet ResNets both use the ImageNet
    mean/std, and ``calexnet train-backbone`` trains with it too unless told otherwise, so every known
    backbone maps to ``imagenet``. A backbone trained with other statistics records them in its checkpoint
    config; pass them (or a name from :data:`NORMALIZATIONS`) as ``override``.

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


# --------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Labelled images, either decoded in memory (uint8 [N, 3, H, W]) or read lazily from files.

    ``dataset[i]`` returns ``(image, label)``: image float32 [3, S, S] normalised, label an int. With
    ``augment=True`` small images get the standard CIFAR augmentation (random crop with 4 pixels of zero
    padding, horizontal flip); large lazy images get a random resized crop and a flip. Without it, small
    images are returned as they are and large ones are resized and centre-cropped to ``image_size``.
    Augmentation draws from torch's global generator (seeded per DataLoader worker), so it is
    reproducible under a fixed seed.

    Args:
        labels: [N] int64 class indices.
        classes: class names, ``len(classes)`` = number of classes.
        images: [N, 3, H, W] uint8 pixels, or ``None`` with ``paths``.
        paths: N image files, or ``None`` with ``images``.
        normalization: pixel normalisation.
        augment: training augmentation on/off.
        image_size: output side; default the stored side (in-memory) or 224 (lazy files).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        classes: Sequence[str],
        images: torch.Tensor | None = None,
        paths: Sequence[str] | None = None,
        normalization: Normalization | None = None,
        augment: bool = False,
        image_size: int | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset: expected exactly one of images= or paths=")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.dim() != 1:
            raise ValueError(f"labels: expected a 1-D tensor, got shape {list(labels.shape)}")
        n = images.shape[0] if images is not None else len(paths)
        if labels.shape[0] != n:
            raise ValueError(f"labels: expected {n} labels (one per image), got {labels.shape[0]}")
        if images is not None:
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images: expected uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(
                f"labels: expected values in [0, {len(classes) - 1}], got [{int(labels.min())}, {int(labels.max())}]"
            )
        self.labels = labels
        self.classes = list(classes)
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.normalization = normalization or NORMALIZATIONS["imagenet"]
        self.augment = augment
        if image_size is None:
            image_size = int(images.shape[-1]) if images is not None else 224
        self.image_size = int(image_size)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def with_options(
        self,
        augment: bool | None = None,
        normalization: Normalization | None = None,
        image_size: int | None = None,
    ) -> ImageDataset:
        """A view of the same images with other transform options (no copy of the pixels)."""
        return ImageDataset(
            self.labels,
            self.classes,
            images=self.images,
            paths=self.paths,
            normalization=normalization or self.normalization,
            augment=self.augment if augment is None else augment,
            image_size=image_size or self.image_size,
        )

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The samples at ``indices``, same options (in-memory pixels are gathered into a new tensor)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.labels[idx],
            self.classes,
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
            normalization=self.normalization,
            augment=self.augment,
            image_size=self.image_size,
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[i])
        if self.images is not None:
            x = self._small(self.images[i])
        else:
            x = self._large(self.paths[i])
        return self.normalization.apply(x), label

    def _small(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float().div_(255.0)
        if self.augment:
            pad = 4
            h, w = x.shape[-2:]
            x = F.pad(x, (pad, pad, pad, pad))
            top = int(torch.randint(0, 2 * pad + 1, (1,)))
            left = int(torch.randint(0, 2 * pad + 1, (1,)))
            x = x[:, top : top + h, left : left + w]
            if bool(torch.rand(()) < 0.5):
                x = x.flip(-1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            ).squeeze(0)
        return x

    def _large(self, path: str) -> torch.Tensor:
        from torchvision import transforms

        img = _open_rgb(path)
        if self.augment:
            tf = transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()])
        else:
            tf = transforms.Compose(
                [
                    transforms.Resize(int(round(self.image_size * 256 / 224))),
                    transforms.CenterCrop(self.image_size),
                ]
            )
        return transforms.functional.to_tensor(tf(img))


def _open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise RuntimeError(f"image file {path!r}: cannot be read as an image ({e})") from e


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


# --------------------------------------------------------------------------------------------------
# validation split
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------------

_BASE_SUBDIRS = {
    "cifar10": ("cifar-10-batches-py", "cifar10", "CIFAR10", "cifar-10", "cifar10-jpeg"),
    "cifar100": ("cifar-100-python", "cifar100", "CIFAR100", "cifar-100"),
    "cinic10": ("CINIC-10", "cinic-10", "cinic10", "CINIC10"),
    "imagefolder": (),
}

_HOW_TO_GET = {
    "cifar10": (
        "the official python version (data_batch_1..5, test_batch, batches.meta; "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it) or an ImageFolder tree "
        "train/<class>/*.png, test/<class>/*.png (e.g. ../shared/data/cifar10-jpeg)"
    ),
    "cifar100": (
        "the official python version (files train, test, meta; "
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it)"
    ),
    "cinic10": (
        "an ImageFolder tree train/<class>/*.png, valid/<class>/*.png, test/<class>/*.png "
        "(CINIC-10: https://datashare.ed.ac.uk/handle/10283/3192, extract CINIC-10.tar.gz)"
    ),
    "imagefolder": "an ImageFolder tree train/<class>/<images>, test/<class>/<images> and optionally valid/",
}


def _family(name: str) -> str:
    return "cifar100" if name.startswith("cifar100") else name


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Find the directory of dataset ``name``: argument, then ``CALEXNET_<NAME>_DIR``, then ``CALEXNET_DATA``.

    Raises:
        ValueError: nothing given or found, or the directory does not exist; the message says what is
            expected there and how to get it.
    """
    fam = _family(name)
    if fam not in _HOW_TO_GET:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}")
    env_name = f"CALEXNET_{fam.upper()}_DIR"
    how = _HOW_TO_GET[fam]
    if data_dir is not None:
        source = "the data_dir argument (--data-dir)"
        path = Path(data_dir).expanduser()
    elif os.environ.get(env_name):
        source = f"${env_name}"
        path = Path(os.environ[env_name]).expanduser()
    elif os.environ.get("CALEXNET_DATA"):
        base = Path(os.environ["CALEXNET_DATA"]).expanduser()
        for sub in _BASE_SUBDIRS[fam]:
            if (base / sub).is_dir():
                return base / sub
        raise ValueError(
            f"{name}: no data directory found under $CALEXNET_DATA={base} (looked for "
            f"{', '.join(_BASE_SUBDIRS[fam]) or 'nothing: imagefolder needs an explicit directory'}). "
            f"Pass --data-dir or set {env_name}. Expected {how}. Nothing is downloaded."
        )
    else:
        raise ValueError(
            f"{name}: no data directory given. Pass --data-dir (data_dir=...), or set {env_name} or "
            f"CALEXNET_DATA. Expected {how}. Nothing is downloaded."
        )
    if not path.is_dir():
        raise ValueError(f"{name}: data directory {path} from {source} does not exist. Expected {how}.")
    return path


# --------------------------------------------------------------------------------------------------
# CIFAR pickles (read with a restricted unpickler: only plain containers and numpy arrays)
# --------------------------------------------------------------------------------------------------

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
            f"{dataset}: expected the file {path} (official python pickle). {_HOW_TO_GET[_family(dataset)]}"
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
    val_size: int | float = 5000,
    split_seed: int = 0,
    normalization: Normalization | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """CIFAR-10 from the official pickles or an ImageFolder ``train/test`` tree (format detected).

    Validation: ``val_size`` images carved out of train (stratified, ``split_seed``), unless an
    ImageFolder tree has its own ``valid/`` split.
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
            f"contains {_listing(root)}. Expected {_HOW_TO_GET['cifar10']}."
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
    return _finish(
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
    val_size: int | float = 5000,
    split_seed: int = 0,
    normalization: Normalization | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """CIFAR-100 from the official pickles ``train``, ``test``, ``meta``.

    Args:
        coarse: use the 20 superclass labels (``coarse_labels``, ``coarse_label_names``); ``False`` for the
            100 fine labels.
    """
    root = resolve_data_dir("cifar100", data_dir)
    pdir = _find_pickle_dir(root, "train", "cifar-100-python")
    if pdir is None:
        raise ValueError(
            f"cifar100: {root} does not hold the official pickles (train, test, meta); it contains "
            f"{_listing(root)}. Expected {_HOW_TO_GET['cifar100']}."
        )
    label_key = "coarse_labels" if coarse else "fine_labels"
    name_key = "coarse_label_names" if coarse else "fine_label_names"
    name = "cifar100-coarse" if coarse else "cifar100"
    meta = _load_pickle(pdir / "meta", name, [name_key])
    classes = _names(meta[name_key])
    splits, strata = {}, None
    for split in ("train", "test"):
        p = pdir / split
        d = _load_pickle(p, name, ["data", label_key])
        splits[split] = ImageDataset(
            torch.as_tensor(list(d[label_key]), dtype=torch.int64), classes, images=_cifar_images(d, p, name)
        )
        if split == "train" and "fine_labels" in d:
            # stratify on the fine labels (which stratifies the coarse ones too): the coarse and fine
            # variants then calibrate on the same validation images
            strata = torch.as_tensor(list(d["fine_labels"]), dtype=torch.int64)
    return _finish(
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
        strata=strata,
    )


# --------------------------------------------------------------------------------------------------
# ImageFolder (CINIC-10, cifar10-jpeg, anything)
# --------------------------------------------------------------------------------------------------


def _listing(path: Path, limit: int = 8) -> str:
    try:
        items = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not items:
        return "nothing"
    more = f" … ({len(items)} entries)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _scan_split(split_dir: Path, name: str) -> tuple[list[str], list[str], list[int]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(
            f"{name}: {split_dir} should contain one folder per class (ImageFolder layout), contains "
            f"{_listing(split_dir)}"
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


def _decode_all(paths: list[str], desc: str, workers: int | None = None) -> torch.Tensor:
    from tqdm.auto import tqdm

    first = np.asarray(_open_rgb(paths[0]))
    h, w = first.shape[:2]
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)

    def load(i: int) -> None:
        a = np.asarray(_open_rgb(paths[i]))
        if a.shape != (h, w, 3):
            raise RuntimeError(
                f"image {paths[i]!r}: size {a.shape[1]}x{a.shape[0]} differs from {w}x{h} of {paths[0]!r}; "
                "images decoded into memory must share one size"
            )
        out[i] = a

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        for _ in tqdm(
            ex.map(load, range(len(paths))),
            total=len(paths),
            desc=desc,
            leave=False,
            disable=len(paths) < 2000,
        ):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_imagefolder(
    data_dir: str | os.PathLike | None = None,
    *,
    name: str = "imagefolder",
    val_size: int | float = 5000,
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
    fam = _family(name) if _family(name) in _HOW_TO_GET else "imagefolder"
    root = resolve_data_dir(fam, data_dir)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(
            f"{name}: {root} should contain train/ and test/ (and optionally valid/) folders with one "
            f"sub-folder per class; it contains {_listing(root)}. Expected {_HOW_TO_GET[fam]}."
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
            datasets[split] = ImageDataset(labels, classes, images=_decode_all(paths, f"decoding {name}/{split}"))
        else:
            datasets[split] = ImageDataset(labels, classes, paths=paths)
    return _finish(
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


def _finish(
    name, root, train, val, test, classes, val_size, split_seed, normalization, image_size, info, strata=None
) -> DataSplits:
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


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "cifar100-coarse", "cinic10", "imagefolder", "synthetic")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float = 5000,
    split_seed: int = 0,
    normalization: Normalization | str | None = None,
    image_size: int | None = None,
    synthetic: dict | None = None,
) -> DataSplits:
    """Load dataset ``name`` (one of :data:`DATASETS`) with train/val/test splits.

    Args:
        name: ``cifar10``, ``cifar100`` (fine), ``cifar100-coarse`` (20 superclasses), ``cinic10``,
            ``imagefolder`` or ``synthetic``.
        data_dir: the dataset's directory; default from the environment (see the module docstring).
        val_size: validation samples carved out of train where there is no official split (count or
            fraction).
        split_seed: seed of that split; keep it fixed across training seeds.
        normalization: a :class:`Normalization` or a key of :data:`NORMALIZATIONS`; default ImageNet
            statistics (what every supported backbone uses, see :func:`normalization_for`).
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
