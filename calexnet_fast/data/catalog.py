"""The datasets this package reads, where their directories are found, and what is expected there.

Data directories come from an argument, ``CALEXNET_<NAME>_DIR`` (``CALEXNET_CIFAR10_DIR``,
``CALEXNET_CIFAR100_DIR``, ``CALEXNET_CINIC10_DIR``, ``CALEXNET_IMAGEFOLDER_DIR``) or a base directory
``CALEXNET_DATA`` holding the usual folder names (``cifar-10-batches-py``, ``cifar10-jpeg``,
``cifar-100-python``, ``CINIC-10`` …).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATASETS", "HOW_TO_GET", "dataset_family", "listing", "resolve_data_dir"]

DATASETS = ("cifar10", "cifar100", "cifar100-coarse", "cinic10", "imagefolder", "synthetic")

_BASE_SUBDIRS = {
    "cifar10": ("cifar-10-batches-py", "cifar10", "CIFAR10", "cifar-10", "cifar10-jpeg"),
    "cifar100": ("cifar-100-python", "cifar100", "CIFAR100", "cifar-100"),
    "cinic10": ("CINIC-10", "cinic-10", "cinic10", "CINIC10"),
    "imagefolder": (),
}

HOW_TO_GET = {
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


def dataset_family(name: str) -> str:
    """The directory family of dataset ``name`` (``cifar100-coarse`` reads the ``cifar100`` files)."""
    return "cifar100" if name.startswith("cifar100") else name


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Find the directory of dataset ``name``: argument, then ``CALEXNET_<NAME>_DIR``, then ``CALEXNET_DATA``.

    Raises:
        ValueError: nothing given or found, or the directory does not exist; the message says what is
            expected there and how to get it.
    """
    fam = dataset_family(name)
    if fam not in HOW_TO_GET:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}")
    env_name = f"CALEXNET_{fam.upper()}_DIR"
    how = HOW_TO_GET[fam]
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


def listing(path: Path, limit: int = 8) -> str:
    """What ``path`` holds, for error messages (the first ``limit`` names)."""
    try:
        items = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not items:
        return "nothing"
    more = f" … ({len(items)} entries)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
