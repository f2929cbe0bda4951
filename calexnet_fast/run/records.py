"""What a run records, and how it is read back: the dataset record, the backbone by name, the feature-cache
options, the versions, and the directories ``calexnet train-backbone`` writes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import BackboneSpec, cifar_depth, find_pretrained_cifar_checkpoint
from ..data import DataSplits, load_dataset
from ..features import FeatureCache, build_feature_cache
from ..io import read_json, save_state_file
from ..normalization import Normalization

__all__ = [
    "CacheConfig",
    "RunError",
    "backbone_spec",
    "dataset_record",
    "load_splits",
    "save_trained_backbone",
    "spec_normalization",
    "trained_backbone",
    "versions",
]

log = logging.getLogger(__name__)

CACHE = "cache"
TRAINED_BACKBONE = "backbone.safetensors"


class RunError(ValueError):
    """A run directory that cannot be used as asked: a file is missing, unreadable, or changed since written."""


def versions() -> dict:
    """Versions of the package, torch and Python (recorded in every ``config.json``)."""
    from .._version import __version__

    return {"calexnet_fast": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def dataset_record(
    name: str,
    data_dir: str | None = None,
    *,
    val_size: float = 5000,
    split_seed: int = 0,
    image_size: int | None = None,
    synthetic_size: Sequence[int] = (512, 256, 256),
    synthetic_classes: int = 10,
) -> dict:
    """The ``dataset`` record of a run (what :func:`load_splits` reads) from the data options of the commands
    (``synthetic_size`` = train, val, test sizes and ``synthetic_classes`` apply to ``name="synthetic"``)."""
    synthetic = None
    if name == "synthetic":
        n_train, n_val, n_test = synthetic_size
        synthetic = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_classes": synthetic_classes}
        synthetic["seed"] = split_seed
    return {
        "name": name,
        "data_dir": data_dir,
        "val_size": int(val_size) if float(val_size) >= 1 else float(val_size),
        "split_seed": split_seed,
        "image_size": image_size,
        "synthetic": synthetic,
    }


def load_splits(dataset: dict, normalization: Normalization | None = None, data_dir: str | None = None) -> DataSplits:
    """The splits a run's ``dataset`` record describes (:func:`dataset_record`), with ``normalization``
    applied; ``data_dir`` overrides the recorded one. Sets the record's ``data_dir`` to where they were found.

    Raises:
        ValueError: the dataset cannot be found or read (the message says where it looked and how to get it).
    """
    val_size = dataset.get("val_size", 5000)
    splits = load_dataset(
        dataset["name"],
        data_dir or dataset.get("data_dir"),
        val_size=int(val_size) if float(val_size) >= 1 else float(val_size),
        split_seed=dataset.get("split_seed", 0),
        normalization=normalization,
        image_size=dataset.get("image_size"),
        synthetic=dataset.get("synthetic"),
    )
    dataset["data_dir"] = str(splits.root) if splits.root else None
    return splits


# --------------------------------------------------------------------------------------------------
# backbones by name and feature caches
# --------------------------------------------------------------------------------------------------


def backbone_spec(
    arch: str,
    n_classes: int,
    *,
    checkpoint: str | None = None,
    backbone_run: str | None = None,
    pretrained_dir: str | None = None,
    random_init: bool = False,
    stem: str = "cifar",
    branch_points: Sequence[str] | None = None,
    n_branches: int | None = None,
    input_size: int | None = None,
) -> BackboneSpec:
    """The :class:`BackboneSpec` the backbone options of the commands describe.

    Weights come from ``checkpoint``, else from ``backbone_run`` (a ``calexnet train-backbone`` directory,
    which also sets ``arch``, ``stem`` and the normalisation), else for CIFAR ResNets from the pretrained
    folder ``pretrained_dir`` (default ``$CALEXNET_PRETRAINED``, then ``$CALEXNET_DATA``); ``random_init``
    keeps a random initialisation (smoke tests).

    Raises:
        ValueError: no weights were given or found, or they do not fit ``n_classes``.
    """
    mean = std = None
    if backbone_run:
        trained = trained_backbone(backbone_run)
        arch, stem, checkpoint = trained["arch"], trained["stem"], trained["checkpoint"]
        mean, std = trained["mean"], trained["std"]
        if trained["n_classes"] != n_classes:
            raise RunError(
                f"the backbone in {backbone_run} has {trained['n_classes']} classes, the dataset has {n_classes}"
            )
    elif checkpoint is None and not random_init:
        depth = cifar_depth(arch)
        root = pretrained_dir or os.environ.get("CALEXNET_PRETRAINED") or os.environ.get("CALEXNET_DATA")
        if depth is None or root is None:
            raise RunError(
                f"no weights for --backbone {arch}: pass --checkpoint FILE, --backbone-run DIR (from "
                "`calexnet train-backbone`), --pretrained-dir DIR (CIFAR ResNets; or set "
                "CALEXNET_PRETRAINED / CALEXNET_DATA), or --random-init for a smoke test"
            )
        checkpoint = str(find_pretrained_cifar_checkpoint(depth, root))
    norm = {"mean": tuple(mean), "std": tuple(std)} if mean is not None else {}
    return BackboneSpec(
        arch=arch,
        n_classes=n_classes,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
        stem=stem,
        branch_points=list(branch_points) if branch_points else None,
        n_branches=n_branches,
        input_size=input_size,
        **norm,
    )


def spec_normalization(spec: BackboneSpec) -> Normalization:
    """The input normalisation of the backbone ``spec`` describes."""
    return Normalization(tuple(spec.mean), tuple(spec.std), "backbone")


@dataclass
class CacheConfig:
    """How a command caches branch features (the ``cache`` entry of ``config.json``).

    Attributes:
        storage: ``"memory"``, or ``"disk"``: ``<dir>/<split>.safetensors``, memory-mapped and reused by later
            commands and by other runs given the same ``dir``.
        dir: where disk caches live (default ``<run>/cache``).
        dtype: storage dtype of the features (``float16``, ``bfloat16``, ``float32``).
        batch_size: images per backbone forward.
        workers: DataLoader workers.
    """

    storage: str = "memory"
    dir: str | None = None
    dtype: str = "float16"
    batch_size: int = 256
    workers: int = 0

    def __post_init__(self) -> None:
        if self.dir is not None:
            self.dir = str(Path(self.dir).resolve())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> CacheConfig:
        return cls(**(d or {}))

    def build(
        self, backbone: nn.Module, dataset, split: str, work_dir: str | Path, *, device=None, progress: bool = False
    ) -> FeatureCache:
        """The feature cache of ``dataset`` (the ``split`` of a run or work directory ``work_dir``)."""
        path = Path(self.dir or Path(work_dir) / CACHE) / f"{split}.safetensors" if self.storage == "disk" else None
        log.info("features of the %s split (%d images)%s", split, len(dataset), f" -> {path}" if path else "")
        return build_feature_cache(
            backbone,
            dataset,
            batch_size=self.batch_size,
            dtype=getattr(torch, self.dtype),
            device=device,
            storage=self.storage,
            path=path,
            num_workers=self.workers,
            progress=progress,
            desc=f"features {split}",
        )


# --------------------------------------------------------------------------------------------------
# backbone runs (`calexnet train-backbone`)
# --------------------------------------------------------------------------------------------------


def save_trained_backbone(out: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write a trained (not staged) network's weights and ``meta`` (arch, stem, n_classes, normalization,
    ...) to ``out/backbone.safetensors`` (+ ``backbone.json``), what :func:`trained_backbone` reads."""
    path = Path(out) / TRAINED_BACKBONE
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_state_file(path, state, meta)
    return path


def trained_backbone(out: str | Path) -> dict:
    """What a ``calexnet train-backbone`` directory holds: ``arch``, ``stem``, ``n_classes``, ``mean``,
    ``std`` and the ``checkpoint`` file (absolute)."""
    out = Path(out)
    try:
        meta = read_json(out / "backbone.json", "backbone description")
    except ValueError as e:
        raise RunError(f"{e} (expected a directory written by `calexnet train-backbone`)") from e
    except RuntimeError as e:
        raise RunError(str(e)) from e
    return {
        "arch": meta["arch"],
        "stem": meta.get("stem", "cifar"),
        "n_classes": meta["n_classes"],
        "mean": tuple(meta["normalization"]["mean"]),
        "std": tuple(meta["normalization"]["std"]),
        "checkpoint": str((out / TRAINED_BACKBONE).resolve()),
    }
