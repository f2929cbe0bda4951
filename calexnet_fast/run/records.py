"""What a run records, and how it is read back: the dataset record, the backbone by name, the data and frozen
backbone a training command starts from, the feature-cache options, the versions, and the directories
``calexnet train-backbone`` writes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..backbones import (
    BackboneSpec,
    StagedBackbone,
    build_backbone,
    cifar_depth,
    file_sha256,
    find_pretrained_cifar_checkpoint,
    is_model_source,
)
from ..backbones.sources import split_source
from ..data import DataSplits, load_dataset, pixel_statistics
from ..features import FeatureCache, build_feature_cache
from ..io import read_json, save_state_file
from ..normalization import Normalization, statistics_mismatch

__all__ = [
    "BACKBONE_OPTIONS",
    "DATA_OPTIONS",
    "CacheConfig",
    "RunError",
    "TrainingInputs",
    "backbone_input",
    "backbone_spec",
    "class_map_of",
    "data_and_backbone",
    "dataset_record",
    "dataset_record_of",
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
    val_size: float | None = None,
    split_seed: int = 0,
    image_size: int | None = None,
    synthetic_size: Sequence[int] = (512, 256, 256),
    synthetic_classes: int = 10,
) -> dict:
    """The ``dataset`` record of a run (what :func:`load_splits` reads) from the data options of the commands
    (``synthetic_size`` = train, val, test sizes and ``synthetic_classes`` apply to ``name="synthetic"``;
    ``val_size=None``: the data's default, :func:`calexnet_fast.data.default_val_size`)."""
    synthetic = None
    if name == "synthetic":
        n_train, n_val, n_test = synthetic_size
        synthetic = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_classes": synthetic_classes}
        synthetic["seed"] = split_seed
    return {
        "name": name,
        "data_dir": data_dir,
        "val_size": _count_or_fraction(val_size),
        "split_seed": split_seed,
        "image_size": image_size,
        "synthetic": synthetic,
    }


def _count_or_fraction(val_size: float | None) -> int | float | None:
    return None if val_size is None else int(val_size) if float(val_size) >= 1 else float(val_size)


def load_splits(dataset: dict, normalization: Normalization | None = None, data_dir: str | None = None) -> DataSplits:
    """The splits a run's ``dataset`` record describes (:func:`dataset_record`), with ``normalization``
    applied; ``data_dir`` overrides the recorded one. Sets the record's ``data_dir`` to where they were found.

    Raises:
        ValueError: the dataset cannot be found or read (the message says where it looked and how to get it).
    """
    splits = load_dataset(
        dataset["name"],
        data_dir or dataset.get("data_dir"),
        val_size=_count_or_fraction(dataset.get("val_size", 5000)),
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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_map: Sequence[int] | None = None,
) -> BackboneSpec:
    """The :class:`BackboneSpec` the backbone options of the commands describe.

    ``arch`` is a built-in name or a model by source (``torchvision:<name>``, ``timm:<name>``,
    ``path/to/file.py:factory``: recorded by absolute path and SHA-256). Weights come from ``checkpoint``
    (recorded with its SHA-256), else from ``backbone_run`` (a ``calexnet train-backbone`` directory, which also
    sets ``arch``, ``stem`` and the normalisation), else for CIFAR ResNets from the pretrained folder
    ``pretrained_dir`` (default ``$CALEXNET_PRETRAINED``, then ``$CALEXNET_DATA``); ``random_init`` keeps a
    random initialisation (smoke tests). ``n_classes`` is the dataset's; with a ``class_map`` (one label per
    model class) the model has ``len(class_map)`` classes. ``mean`` / ``std`` override the backbone's own
    statistics.

    Raises:
        ValueError: no weights were given or found, a model file that is not there, or classes that do not
            fit ``n_classes``.
    """
    if backbone_run:
        trained = trained_backbone(backbone_run)
        arch, stem, checkpoint = trained["arch"], trained["stem"], trained["checkpoint"]
        mean = trained["mean"] if mean is None else mean
        std = trained["std"] if std is None else std
        if trained["n_classes"] != n_classes:
            raise RunError(
                f"the backbone in {backbone_run} has {trained['n_classes']} classes, the dataset has {n_classes}"
            )
    elif checkpoint is None and not random_init:
        depth = cifar_depth(arch)
        root = pretrained_dir or os.environ.get("CALEXNET_PRETRAINED") or os.environ.get("CALEXNET_DATA")
        if depth is None or root is None:
            raise RunError(
                f"no weights for --backbone {arch}: pass --checkpoint FILE (a state dict: .safetensors, or a "
                "torch.save file), --backbone-run DIR (from `calexnet train-backbone`), --pretrained-dir DIR (the "
                "akamaster CIFAR ResNets; or set CALEXNET_PRETRAINED / CALEXNET_DATA), or --random-init for a "
                "smoke test"
            )
        checkpoint = str(find_pretrained_cifar_checkpoint(depth, root))
    file_sha = None
    if is_model_source(arch) and not arch.startswith(("torchvision:", "timm:")):
        _, where, factory = split_source(arch)
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise RunError(f"--backbone {arch}: the model file {str(path)!r} does not exist")
        arch, file_sha = f"{path}:{factory}", file_sha256(path)
    if class_map is not None:
        n_labels = max(class_map) + 1
        if n_labels != n_classes:
            raise RunError(f"class map: it maps to {n_labels} labels, the dataset has {n_classes} classes")
        n_classes = len(class_map)
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser().resolve())
        if not Path(checkpoint).is_file():
            raise RunError(f"--checkpoint: expected an existing weights file, got {checkpoint!r}")
    return BackboneSpec(
        arch=arch,
        n_classes=n_classes,
        checkpoint=checkpoint,
        stem=stem,
        branch_points=list(branch_points) if branch_points else None,
        n_branches=n_branches,
        input_size=input_size,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        file_sha256=file_sha,
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint is not None else None,
        class_map=list(class_map) if class_map is not None else None,
    )


def class_map_of(value, splits: DataSplits) -> list[int] | None:
    """The class map option: ``None``; ``"dataset"`` (the dataset's own fine -> label map, e.g. CIFAR-100's
    fine -> coarse); a JSON file holding a list (one label per backbone class) or ``{"class_map": [...]}``;
    or the list itself."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [int(v) for v in value]
    if value == "dataset":
        if splits.fine_to_coarse is None:
            raise RunError(
                f"--class-map dataset: dataset {splits.name} has no fine -> label map (cifar100-coarse has one); "
                "give a JSON file with one label per backbone class instead"
            )
        return list(splits.fine_to_coarse)
    try:
        obj = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"--class-map: expected 'dataset' or a readable JSON file, got {value!r} ({e})") from e
    obj = obj.get("class_map", obj.get("fine_to_coarse")) if isinstance(obj, dict) else obj
    if not isinstance(obj, list) or not all(isinstance(v, int) for v in obj):
        raise RunError(
            f"--class-map {value}: expected a JSON list of ints (one label per backbone class) or "
            '{"class_map": [...]}'
        )
    return obj


def spec_normalization(spec: BackboneSpec) -> Normalization:
    """The input normalisation of the backbone ``spec`` describes."""
    return Normalization(tuple(spec.mean), tuple(spec.std), "backbone")


# --------------------------------------------------------------------------------------------------
# the data and the frozen backbone of a training command (`calexnet train`, `calexnet compare`)
# --------------------------------------------------------------------------------------------------

# the keyword options of dataset_record / backbone_spec, named as the commands' options (and CompareConfig)
DATA_OPTIONS = ("data_dir", "val_size", "split_seed", "image_size", "synthetic_size", "synthetic_classes")
BACKBONE_OPTIONS = (
    "checkpoint",
    "backbone_run",
    "pretrained_dir",
    "random_init",
    "stem",
    "branch_points",
    "n_branches",
)


class TrainingInputs(NamedTuple):
    """What training branches on a frozen backbone starts from (:func:`data_and_backbone`)."""

    splits: DataSplits  # with the backbone's normalisation
    dataset: dict  # the run's dataset record (dataset_record; ``data_dir`` where the data was found)
    spec: BackboneSpec  # the backbone by name, its branch points fixed to the built backbone's
    backbone: StagedBackbone


def dataset_record_of(options) -> dict:
    """:func:`dataset_record` of the options ``dataset`` and :data:`DATA_OPTIONS`, read as attributes of
    ``options`` (a command's parsed arguments, a ``CompareConfig``)."""
    return dataset_record(options.dataset, **{k: getattr(options, k) for k in DATA_OPTIONS})


def data_and_backbone(options) -> TrainingInputs:
    """The dataset and the frozen backbone the options of ``calexnet train`` / ``calexnet compare`` describe:
    the dataset record and its splits, the :class:`BackboneSpec` (:func:`backbone_spec`) and the backbone it
    builds; the splits get the backbone's normalisation and input size (:func:`backbone_input`), the spec what
    the backbone settled (branch points, input size and statistics: ``BackboneSpec.resolved``).

    Args:
        options: attributes ``dataset``, :data:`DATA_OPTIONS`, ``backbone`` (the architecture) and
            :data:`BACKBONE_OPTIONS` (a command's parsed arguments, a ``CompareConfig``), and where present
            ``mean``, ``std`` (override the backbone's statistics) and ``class_map`` (:func:`class_map_of`).

    Raises:
        RunError: the backbone cannot be built, or its classes differ from the dataset's.
        ValueError: the dataset cannot be read, or no weights were given or found.
    """
    dataset = dataset_record_of(options)
    splits = load_splits(dataset)
    backbone_options = {k: getattr(options, k) for k in BACKBONE_OPTIONS}
    own = {k: getattr(options, k, None) for k in ("mean", "std")}  # optional: absent means the backbone's own
    class_map = class_map_of(getattr(options, "class_map", None), splits)
    spec = backbone_spec(
        options.backbone,
        splits.n_classes,
        input_size=options.image_size,
        class_map=class_map,
        **backbone_options,
        **own,
    )
    try:
        backbone = build_backbone(spec, default_input_size=splits.train.image_size)
    except (ValueError, RuntimeError) as e:
        raise RunError(f"backbone {spec.arch}: {e}") from e
    if backbone.n_classes != splits.n_classes:
        hint = ""
        if splits.fine_to_coarse is not None and backbone.n_classes == len(splits.fine_to_coarse):
            hint = "; its classes are the dataset's fine classes: add --class-map dataset"
        raise RunError(
            f"the backbone has {backbone.n_classes} classes, dataset {dataset['name']} has {splits.n_classes}{hint}"
        )
    spec = spec.resolved(backbone)
    splits, dataset = backbone_input(backbone, splits, dataset, options.image_size)
    return TrainingInputs(splits, dataset, spec, backbone)


def backbone_input(
    backbone: StagedBackbone, splits: DataSplits, dataset: dict, image_size: int | None = None
) -> tuple[DataSplits, dict]:
    """The splits as ``backbone`` takes them: its normalisation, and its input side when the data's differs
    and no ``image_size`` was asked for (then recorded in the ``dataset`` record); logs a warning when the
    images' own statistics look far from the backbone's normalisation."""
    h, w = backbone.input_size
    if image_size is None and h == w and h != splits.train.image_size:
        log.info("images resized from %d to %d pixels, the backbone's input size", splits.train.image_size, h)
        dataset = {**dataset, "image_size": h}
        splits = splits.with_options(image_size=h)
    norm = Normalization(tuple(backbone.mean), tuple(backbone.std), "backbone")
    splits = splits.with_options(normalization=norm)
    warning = statistics_mismatch(norm, *pixel_statistics(splits.train))
    if warning:
        log.warning("dataset %s: %s", dataset["name"], warning)
    return splits, dataset


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
        pool: branch maps stored average-pooled to at most ``pool`` x ``pool`` (``None``: full maps); see
            :func:`~calexnet_fast.features.build_feature_cache`.
    """

    storage: str = "memory"
    dir: str | None = None
    dtype: str = "float16"
    batch_size: int = 256
    workers: int = 0
    pool: int | None = None

    def __post_init__(self) -> None:
        if self.dir is not None:
            self.dir = str(Path(self.dir).resolve())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> CacheConfig:
        return cls(**(d or {}))

    @classmethod
    def of_options(cls, options) -> CacheConfig:
        """From the feature-cache options of the commands, read as attributes of ``options`` (``cache``,
        ``cache_dir``, ``cache_dtype``, ``feature_batch_size``, ``workers``, optional ``cache_pool``: parsed
        arguments, a ``CompareConfig``)."""
        o = options
        return cls(o.cache, o.cache_dir, o.cache_dtype, o.feature_batch_size, o.workers, getattr(o, "cache_pool", None))

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
            pool=self.pool,
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
