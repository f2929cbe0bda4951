"""The training engine: feature cache, a generic training loop, checkpoints, resume, DDP, backbone training.

Branch heads sit on a **frozen** backbone, so the backbone's branch-point features and logits never change:
:func:`build_feature_cache` computes them once per split (in memory, or in a safetensors file on disk that
later runs reuse, fp16 by default) and every head, recipe and baseline then trains from the cache
(:class:`CacheSource`) instead of re-running the backbone each epoch.

:func:`fit` is head-agnostic: it runs epochs over any :class:`BatchSource` with a pluggable
``loss_fn(model, batch) -> scalar``, where ``model`` is the (possibly DistributedDataParallel-wrapped)
module. ``loss_fn`` must call ``model(...)`` exactly once per step for its forward (that is what keeps
DDP's gradient synchronisation correct); everything else (which branch features it reads, what target,
what weights) is up to the loss. The loop provides: seeded shuffling that does not depend on global RNG
state, AdamW/Adam/SGD with a per-step cosine schedule and warm-up, tqdm progress, a checkpoint after every
epoch (one safetensors file written atomically, with a JSON twin for people), resume from it losing at
most the interrupted epoch, and ``torchrun``/DDP (gloo on CPU, NCCL on GPU) with rank-sharded batches.

:func:`train_backbone` trains a torchvision ResNet on images (SGD + Nesterov, cosine schedule, standard
augmentation) with the same loop, checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "BackboneSpec",
    "BackboneTrainConfig",
    "BatchSource",
    "CacheSource",
    "CachedBatch",
    "DatasetSource",
    "DistInfo",
    "FeatureCache",
    "FitConfig",
    "FitResult",
    "build_backbone",
    "build_feature_cache",
    "trainable_backbone",
    "dataset_fingerprint",
    "default_device",
    "dist_info",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "load_state_file",
    "model_fingerprint",
    "predict",
    "save_state_file",
    "seed_everything",
    "train_backbone",
]

CHECKPOINT_NAME = "checkpoint.safetensors"


# --------------------------------------------------------------------------------------------------
# seeds, devices, distributed
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (world_size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's rank and size (no group: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if this process was started by one (``WORLD_SIZE`` > 1).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when a GPU is visible, else gloo.

    Returns:
        The :class:`DistInfo`; a no-op returning rank 0 of 1 outside ``torchrun``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist_info()


def _barrier() -> None:
    if dist_info().distributed:
        dist.barrier()


def _all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    if not dist_info().distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------------
# safetensors files: streaming writer, memory-mapped reader, state files
# --------------------------------------------------------------------------------------------------

_ST_DTYPE = {
    torch.float16: ("F16", np.float16),
    torch.float32: ("F32", np.float32),
    torch.float64: ("F64", np.float64),
    torch.bfloat16: ("BF16", np.uint16),
    torch.int64: ("I64", np.int64),
    torch.int32: ("I32", np.int32),
    torch.uint8: ("U8", np.uint8),
}
_ST_FROM = {v[0]: (k, v[1]) for k, v in _ST_DTYPE.items()}


class _SafetensorsWriter:
    """Write a safetensors file whose tensors arrive in row blocks (the file never has to fit in memory)."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.specs = specs
        self.offsets = {}
        for name, (dtype, shape) in specs.items():
            if dtype not in _ST_DTYPE:
                raise ValueError(f"dtype: expected one of {list(_ST_DTYPE)}, got {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPE[dtype][0],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.offsets[name] = offset
            offset += nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # align the data to 8 bytes, as the reference implementation does
        self.data_start = 8 + len(hb)
        self.path = path
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            f.truncate(self.data_start + offset)
        self.maps = {
            name: np.memmap(
                path,
                dtype=_ST_DTYPE[dt][1],
                mode="r+",
                offset=self.data_start + self.offsets[name],
                shape=tuple(shape),
            )
            for name, (dt, shape) in specs.items()
            if int(np.prod(shape)) > 0
        }

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu").contiguous()
        if rows.dtype == torch.bfloat16:
            rows = rows.view(torch.uint16) if hasattr(torch, "uint16") else rows.view(torch.int16)
        self.maps[name][start : start + rows.shape[0]] = rows.numpy()

    def close(self) -> None:
        for m in self.maps.values():
            m.flush()
        self.maps.clear()


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return header, 8 + n


def _memmap_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    header, start = _read_safetensors_header(path)
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        dtype, npd = _ST_FROM[info["dtype"]]
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        if int(np.prod(shape)) == 0:
            out[name] = np.empty(shape, dtype=npd)
        else:
            out[name] = np.memmap(path, dtype=npd, mode="r", offset=start + b, shape=shape)
        if dtype == torch.bfloat16:
            out[name] = _Bf16(out[name])
    return out, meta


class _Bf16:
    """A uint16 memmap that yields bfloat16 tensors when indexed."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.shape = a.shape

    def __getitem__(self, idx):
        return torch.from_numpy(np.ascontiguousarray(self.a[idx])).view(torch.bfloat16)


def save_state_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` (safetensors, atomically) and ``config`` to the JSON twin next to it.

    The config is also stored inside the safetensors metadata (key ``config``), so the one file is
    self-describing; the ``.json`` file is for people and tools.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"config": json.dumps(config or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), meta)
    os.replace(tmp, path)
    if config is not None:
        jtmp = path.with_suffix(".json.tmp")
        jtmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
        os.replace(jtmp, path.with_suffix(".json"))


def load_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_state_file`: (tensors, config).

    Raises:
        ValueError: the file does not exist.  RuntimeError: it is not a readable safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("config", "{}"))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a readable safetensors state file ({type(e).__name__}: {e})") from e
    return tensors, config


# --------------------------------------------------------------------------------------------------
# fingerprints (to reuse a disk cache only when it matches)
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's state dict: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset) -> str:
    """SHA-256 (16 hex digits) of a dataset: labels, pixels or file names, and transform options."""
    h = hashlib.sha256()
    h.update(type(dataset).__name__.encode())
    h.update(str(len(dataset)).encode())
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        h.update(labels.cpu().numpy().tobytes())
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        h.update(images.contiguous().numpy().tobytes())
    paths = getattr(dataset, "paths", None)
    if paths:
        h.update("\n".join(paths).encode())
    norm = getattr(dataset, "normalization", None)
    if norm is not None:
        h.update(repr((norm.mean, norm.std)).encode())
    h.update(repr((getattr(dataset, "image_size", None), getattr(dataset, "augment", None))).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the feature cache
# --------------------------------------------------------------------------------------------------


class FeatureCache:
    """Branch-point features, backbone logits and labels of one split, computed once.

    Args:
        features: K arrays [N, C_k, H_k, W_k] (torch tensors in memory, or memory-mapped arrays on disk).
        backbone_logits: [N, n_classes] float32.
        labels: [N] int64.
        meta: what produced it (backbone and dataset fingerprints, dtype, split, …).

    ``gather(idx)`` returns CPU tensors for the rows ``idx`` in the storage dtype; :class:`CacheSource`
    moves them to the training device as float32.
    """

    def __init__(self, features: Sequence, backbone_logits, labels, meta: dict | None = None) -> None:
        self.features = list(features)
        self.backbone_logits = backbone_logits
        self.labels = labels
        self.meta = dict(meta or {})
        n = self.labels.shape[0]
        for k, f in enumerate(self.features):
            if f.shape[0] != n:
                raise ValueError(f"features[{k}]: expected {n} rows (one per label), got {f.shape[0]}")
        if self.backbone_logits.shape[0] != n:
            raise ValueError(f"backbone_logits: expected {n} rows, got {self.backbone_logits.shape[0]}")
        self.path: Path | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_branches(self) -> int:
        return len(self.features)

    @property
    def n_classes(self) -> int:
        return int(self.backbone_logits.shape[1])

    @property
    def branch_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(s) for s in f.shape[1:]) for f in self.features]

    @property
    def on_disk(self) -> bool:
        return not isinstance(self.labels, torch.Tensor)

    def _take(self, a, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.index_select(0, idx)
        rows = a[idx.numpy()]  # memory-mapped: fancy indexing reads just these rows
        return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))

    def gather(
        self, idx: torch.Tensor, branches: Sequence[int] | None = None
    ) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (int64 CPU): (features per branch, ``None`` where not asked for), logits, labels."""
        if self.on_disk:
            idx = torch.sort(idx).values  # sequential reads; the batch is a set, its order does not matter
        ks = range(self.n_branches) if branches is None else set(branches)
        feats = [self._take(f, idx) if k in ks else None for k, f in enumerate(self.features)]
        return feats, self._take(self.backbone_logits, idx).float(), self._take(self.labels, idx).long()

    def labels_tensor(self) -> torch.Tensor:
        return self.labels if isinstance(self.labels, torch.Tensor) else torch.from_numpy(np.array(self.labels))

    def logits_tensor(self) -> torch.Tensor:
        z = self.backbone_logits
        return z.float() if isinstance(z, torch.Tensor) else torch.from_numpy(np.array(z)).float()

    def to_memory(self) -> FeatureCache:
        """A copy with every array read into memory."""
        idx = torch.arange(len(self))
        feats, z, y = self.gather(idx)
        return FeatureCache(feats, z, y, self.meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (``features.{k}``, ``backbone_logits``, ``labels``)."""
        path = Path(path)
        specs = {f"features.{k}": (self._dtype(f), tuple(f.shape)) for k, f in enumerate(self.features)}
        specs["backbone_logits"] = (torch.float32, tuple(self.backbone_logits.shape))
        specs["labels"] = (torch.int64, tuple(self.labels.shape))
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        w = _SafetensorsWriter(tmp, specs, {"meta": json.dumps(self.meta)})
        step = 4096
        for s in range(0, len(self), step):
            idx = torch.arange(s, min(s + step, len(self)))
            feats, z, y = self.gather(idx)
            for k, f in enumerate(feats):
                w.write(f"features.{k}", s, f)
            w.write("backbone_logits", s, z)
            w.write("labels", s, y)
        w.close()
        os.replace(tmp, path)

    @staticmethod
    def _dtype(a) -> torch.dtype:
        if isinstance(a, torch.Tensor):
            return a.dtype
        if isinstance(a, _Bf16):
            return torch.bfloat16
        return {v[1]: k for k, v in _ST_DTYPE.items() if k != torch.bfloat16}[np.dtype(a.dtype).type]

    @classmethod
    def load(cls, path: str | os.PathLike, storage: str = "memory") -> FeatureCache:
        """Open a cache file; ``storage="disk"`` keeps it memory-mapped, ``"memory"`` reads it in."""
        path = Path(path)
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage: expected 'memory' or 'disk', got {storage!r}")
        if not path.is_file():
            raise ValueError(f"feature cache {path} does not exist")
        arrays, meta = _memmap_safetensors(path)
        k_count = sum(1 for k in arrays if k.startswith("features."))
        missing = [
            n for n in ["backbone_logits", "labels"] + [f"features.{k}" for k in range(k_count)] if n not in arrays
        ]
        if missing or k_count == 0:
            raise RuntimeError(f"feature cache {path}: missing {missing or ['features.0']}; delete it to rebuild")
        cache = cls(
            [arrays[f"features.{k}"] for k in range(k_count)],
            arrays["backbone_logits"],
            arrays["labels"],
            json.loads(meta.get("meta", "{}")),
        )
        if storage == "memory":
            cache = cache.to_memory()
        cache.path = path
        return cache


def _peek_cache_meta(path: Path) -> dict | None:
    try:
        header, _ = _read_safetensors_header(path)
        return json.loads((header.get("__metadata__") or {}).get("meta", "{}"))
    except (RuntimeError, ValueError):
        return None


def build_feature_cache(
    backbone: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    storage: str = "memory",
    path: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
    meta: dict | None = None,
) -> FeatureCache:
    """Run the frozen backbone once over ``dataset`` and keep every branch feature map and its logits.

    Args:
        backbone: a ``StagedBackbone`` (anything with ``features(x) -> ([B, C_k, H_k, W_k] list, [B, C])``).
        dataset: yields ``(image [3, H, W], label)``; an ``ImageDataset`` is switched to its
            un-augmented view (features of augmented images would be a different, random cache).
        batch_size: images per backbone forward.
        dtype: storage dtype of the features (float16 default; float32 or bfloat16 also allowed). The
            backbone logits are always stored in float32.
        device: where the backbone runs (default: GPU if any).
        storage: ``"memory"`` or ``"disk"`` (memory-mapped file; needs ``path``).
        path: a ``.safetensors`` file: reused when it exists and was built from the same backbone weights,
            dataset and dtype; otherwise (re)built there. Under ``torchrun`` rank 0 builds it and the
            others wait and open it.
        num_workers: DataLoader workers.
        progress: show a tqdm bar.
        meta: extra JSON-able facts to record in the cache.

    Returns:
        A :class:`FeatureCache` of ``len(dataset)`` rows, in dataset order.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if storage not in ("memory", "disk"):
        raise ValueError(f"storage: expected 'memory' or 'disk', got {storage!r}")
    if storage == "disk" and path is None:
        raise ValueError("path: expected a file path with storage='disk', got None")
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float16, torch.float32 or torch.bfloat16, got {dtype}")
    if getattr(dataset, "augment", False) and hasattr(dataset, "with_options"):
        dataset = dataset.with_options(augment=False)
    fingerprint = {
        "backbone": model_fingerprint(backbone),
        "backbone_name": getattr(backbone, "name", type(backbone).__name__),
        "branch_points": list(getattr(backbone, "branch_points", [])),
        "dataset": dataset_fingerprint(dataset),
        "n": len(dataset),
        "dtype": str(dtype).replace("torch.", ""),
    }
    full_meta = {**(meta or {}), **fingerprint}
    if path is not None:
        path = Path(path)
        info = dist_info()
        if path.is_file():
            old = _peek_cache_meta(path)
            if old is not None and all(old.get(k) == v for k, v in fingerprint.items()):
                return FeatureCache.load(path, storage)
        if info.distributed and not info.is_main:
            _barrier()  # wait for rank 0 to write it
            return FeatureCache.load(path, storage)
    device = torch.device(device) if device is not None else default_device()
    was_training = backbone.training
    backbone.to(device).eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    n = len(dataset)
    feats_out: list[torch.Tensor] | None = None
    writer = None
    start = 0
    bar = tqdm(total=n, desc=desc, disable=not progress or not dist_info().is_main, unit="img", leave=False)
    try:
        with torch.inference_mode():
            for x, y in loader:
                feats, logits = backbone.features(x.to(device, non_blocking=True))
                b = x.shape[0]
                if feats_out is None:
                    shapes = [tuple(f.shape[1:]) for f in feats]
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        specs = {f"features.{k}": (dtype, (n, *s)) for k, s in enumerate(shapes)}
                        specs["backbone_logits"] = (torch.float32, (n, logits.shape[1]))
                        specs["labels"] = (torch.int64, (n,))
                        writer = _SafetensorsWriter(
                            path.with_name(path.name + ".tmp"), specs, {"meta": json.dumps(full_meta)}
                        )
                    if storage == "memory":
                        feats_out = [torch.empty((n, *s), dtype=dtype) for s in shapes]
                        logits_out = torch.empty((n, logits.shape[1]), dtype=torch.float32)
                        labels_out = torch.empty(n, dtype=torch.int64)
                    else:
                        feats_out = []
                for k, f in enumerate(feats):
                    f = f.to(dtype)
                    if storage == "memory":
                        feats_out[k][start : start + b] = f.cpu()
                    if writer is not None:
                        writer.write(f"features.{k}", start, f)
                z = logits.float().cpu()
                yy = torch.as_tensor(y, dtype=torch.int64)
                if storage == "memory":
                    logits_out[start : start + b] = z
                    labels_out[start : start + b] = yy
                if writer is not None:
                    writer.write("backbone_logits", start, z)
                    writer.write("labels", start, yy)
                start += b
                bar.update(b)
    finally:
        bar.close()
        backbone.train(was_training)
        if writer is not None:
            writer.close()
    if start != n or feats_out is None:
        raise RuntimeError(f"dataset: expected {n} samples from its DataLoader, got {start}")
    if writer is not None:
        os.replace(writer.path, path)
    if path is not None and dist_info().distributed:
        _barrier()  # release the other ranks
    if storage == "disk":
        return FeatureCache.load(path, "disk")
    cache = FeatureCache(feats_out, logits_out, labels_out, full_meta)
    cache.path = path
    return cache


# --------------------------------------------------------------------------------------------------
# batch sources
# --------------------------------------------------------------------------------------------------


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


def _split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
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
        for idx in _split_batches(order, batch_size):
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

        parts = _split_batches(order, batch_size)
        loader = DataLoader(
            self.dataset,
            batch_sampler=[p.tolist() for p in parts],
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """Optimisation settings of one :func:`fit` run (all recorded in its checkpoint).

    Attributes:
        epochs: passes over the data.
        batch_size: samples per step per process.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum, Nesterov).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD).
        momentum: SGD momentum.
        schedule: ``"cosine"`` (per step, to 0) or ``"constant"``.
        warmup_epochs: linear warm-up length (fractional allowed).
        grad_clip: max gradient norm, or ``None``.
        seed: shuffling seed (epoch ``e`` uses permutation ``seed, e``; independent of global RNG state).
    """

    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs: expected >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch history (loss, lr, seconds, extra metrics) and where it resumed."""

    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    epochs_run: int = 0


def _make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    )


def _lr_at(cfg: FitConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant" or total <= warm:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g)


def _rank_share(order: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Interleaved shard: rank r takes order[r::W] (padded by wrapping so every rank steps equally often).

    With batch B per rank, step i of all ranks together covers order[i*B*W:(i+1)*B*W]: the same samples
    as one process with batch B*W.
    """
    if not info.distributed:
        return order
    w = info.world_size
    pad = (-order.numel()) % w
    if pad:
        order = torch.cat([order, order[:pad]])
    return order[info.rank :: w]


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    py = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    return tensors, {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    if "numpy" in info:
        a = info["numpy"]
        np.random.set_state((a[0], np.array(a[1], dtype=np.uint32), a[2], a[3], a[4]))
    if "python" in info:
        p = info["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last epoch checkpoint in ``checkpoint_dir`` as (tensors, info), or ``None`` if there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return load_state_file(path)


def _comparable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def fit(
    model: nn.Module,
    source: BatchSource,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    config: FitConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "train",
    params: Sequence[nn.Parameter] | None = None,
    run_config: dict | None = None,
    on_epoch_end: Callable[[int, dict], dict | None] | None = None,
    find_unused_parameters: bool = False,
    amp_dtype: torch.dtype | None = None,
    compile_model: bool = False,
) -> FitResult:
    """Train ``model`` over ``source`` with ``loss_fn``; checkpoint every epoch; resume if asked.

    Args:
        model: the module to train (moved to ``device``; wrapped in DDP under ``torchrun``).
        source: a :class:`BatchSource` (e.g. :class:`CacheSource`, :class:`DatasetSource`).
        loss_fn: ``loss_fn(wrapped_model, batch) -> scalar``; must call ``wrapped_model(...)`` once.
        config: :class:`FitConfig`.
        checkpoint_dir: where ``checkpoint.safetensors`` (+ ``.json``) is written after every epoch.
        resume: continue from the checkpoint there if one exists (it must come from the same config).
        device: default GPU if any, else CPU.
        progress: tqdm bar per epoch (rank 0 only).
        desc: bar label.
        params: the parameters to optimise (default: all of ``model``'s that require grad).
        run_config: extra JSON-able facts stored with the checkpoint (and compared on resume).
        on_epoch_end: ``f(epoch, record) -> dict | None`` after each epoch (1-based) and its checkpoint;
            a returned dict is merged into the history record (e.g. validation metrics).
        find_unused_parameters: passed to DDP.
        amp_dtype: autocast dtype on CUDA (e.g. ``torch.bfloat16``); ignored on CPU.
        compile_model: run the forward through ``torch.compile`` (fuses the element-wise work of heads;
            pays a one-off compile of tens of seconds, so it helps long runs). Checkpoints still hold the
            plain module's state dict.

    Returns:
        :class:`FitResult`. The model holds the final weights.

    Raises:
        RuntimeError: the checkpoint in ``checkpoint_dir`` was written by a different configuration, or
            the loss became non-finite.
    """
    from tqdm.auto import tqdm

    info = dist_info()
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameter that requires grad (nothing to train)")
    optimizer = _make_optimizer(params, config)
    ckpt_config = {"fit": asdict(config), "run": run_config or {}}
    result = FitResult()
    start_epoch = 0
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None and resume:
        found = load_checkpoint(ckdir)
        if found is not None:
            tensors, saved = found
            if _comparable(saved.get("config", {})) != _comparable(ckpt_config):
                diff = _config_diff(saved.get("config", {}), ckpt_config)
                raise RuntimeError(
                    f"checkpoint {ckdir / CHECKPOINT_NAME} was written with a different configuration "
                    f"({diff}); use a new output directory or turn resuming off (--no-resume) to start over"
                )
            model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
            _restore_optimizer(optimizer, tensors, saved["optimizer"])
            _restore_rng(tensors, saved.get("rng", {}))
            start_epoch = int(saved["epoch"])
            result.history = list(saved.get("history", []))
            result.resumed_from_epoch = start_epoch
    wrapped: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if compile_model:
        wrapped = torch.compile(wrapped)
    n = len(source)
    if n == 0:
        raise ValueError("source: expected at least one training sample, got 0")
    steps_per_epoch = len(_split_batches(_rank_share(torch.arange(n), info), config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        order = _rank_share(epoch_order(n, config.seed, epoch), info)
        loss_sum, count = 0.0, 0
        step = epoch * steps_per_epoch
        bar = tqdm(
            total=order.numel(),
            desc=f"{desc} {epoch + 1}/{config.epochs}",
            unit="sample",
            leave=False,
            disable=not progress or not info.is_main,
        )
        for batch in source.batches(order, config.batch_size, device):
            lr = _lr_at(config, step, total_steps, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            if amp_dtype is not None and device.type == "cuda":
                with torch.autocast("cuda", dtype=amp_dtype):
                    loss = loss_fn(wrapped, batch)
            else:
                loss = loss_fn(wrapped, batch)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} ({desc}); lower the "
                    "learning rate or check the inputs"
                )
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            b = _batch_len(batch)
            loss_sum += float(loss.detach()) * b
            count += b
            step += 1
            bar.update(b)
            bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}")
        bar.close()
        loss_sum, count = _all_reduce_sum([loss_sum, count], device)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(count, 1),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(record)
        result.epochs_run += 1
        if ckdir is not None and info.is_main:
            _save_checkpoint(ckdir, model, optimizer, epoch + 1, result.history, ckpt_config)
        _barrier()
        if on_epoch_end is not None:
            # hooks (validation, logging) must not shift the training RNG stream, or a resumed run would
            # differ from an uninterrupted one: restore the state the checkpoint recorded
            rng_tensors, rng_info = _rng_state()
            extra = on_epoch_end(epoch + 1, record)
            _restore_rng(rng_tensors, rng_info)
            if extra:
                record.update(extra)
                if ckdir is not None and info.is_main:  # keep the metrics in the saved history too
                    _save_checkpoint(ckdir, model, optimizer, epoch + 1, result.history, ckpt_config)
    return result


def _batch_len(batch) -> int:
    if isinstance(batch, (tuple, list)):
        for t in batch:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return int(t.shape[0])
        return 1
    return len(batch)


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _config_diff(va, vb, f"{prefix}{k}.")
            if d:
                diffs.append(d)
        elif _comparable({"v": va}) != _comparable({"v": vb}):
            diffs.append(f"{prefix}{k}: saved {va!r}, now {vb!r}")
    return "; ".join(diffs)


def _save_checkpoint(ckdir: Path, model: nn.Module, optimizer, epoch: int, history: list, config: dict) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    ot, oinfo = _optimizer_state_tensors(optimizer)
    rt, rinfo = _rng_state()
    tensors.update(ot)
    tensors.update(rt)
    save_state_file(
        ckdir / CHECKPOINT_NAME,
        tensors,
        {"epoch": epoch, "config": config, "history": history, "optimizer": oinfo, "rng": rinfo},
    )


@torch.no_grad()
def predict(
    fn: Callable[[list[torch.Tensor | None]], torch.Tensor],
    cache: FeatureCache,
    *,
    branches: Sequence[int] | None = None,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Apply ``fn(features) -> [B, ...]`` to every cached row in order (eval work, no grad); CPU result.

    ``features`` is the list of K float32 branch maps (``None`` for branches not in ``branches``).
    """
    device = torch.device(device) if device is not None else default_device()
    outs = []
    for s in range(0, len(cache), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(cache)))
        feats, _, _ = cache.gather(idx, branches)
        outs.append(fn([f.to(device, torch.float32) if f is not None else None for f in feats]).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


# --------------------------------------------------------------------------------------------------
# backbone training
# --------------------------------------------------------------------------------------------------


@dataclass
class BackboneTrainConfig:
    """Backbone training recipe (the usual CIFAR ResNet schedule by default).

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay, warmup_epochs: SGD (Nesterov) with a per-step
            cosine schedule.
        label_smoothing: cross-entropy label smoothing.
        seed: shuffling / initialisation seed.
        num_workers: DataLoader workers.
        amp: bfloat16 autocast on CUDA.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 2
    amp: bool = True

    def fit_config(self) -> FitConfig:
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            schedule="cosine",
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
        )


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset, *, batch_size: int = 256, device=None, num_workers: int = 0
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode)."""
    from torch.utils.data import DataLoader

    device = torch.device(device) if device is not None else default_device()
    was = model.training
    model.eval().to(device)
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == torch.as_tensor(y)).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def train_backbone(
    model: nn.Module,
    train_set,
    val_set=None,
    config: BackboneTrainConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    run_config: dict | None = None,
) -> FitResult:
    """Train a classifier (e.g. a torchvision ResNet) on images with SGD, cosine schedule and augmentation.

    Args:
        model: an ``nn.Module`` mapping [B, 3, H, W] to logits (trained in place).
        train_set: training images; an ``ImageDataset`` is switched to its augmented view.
        val_set: optional images for a per-epoch validation accuracy (recorded in the history).
        config: :class:`BackboneTrainConfig`.
        out_dir: checkpoints go to ``out_dir/checkpoint.safetensors`` every epoch (resume from there).
        resume, device, progress, run_config: as in :func:`fit`.

    Returns:
        The :class:`FitResult` (history with ``loss`` and ``val_accuracy`` per epoch).
    """
    config = config or BackboneTrainConfig()
    if hasattr(train_set, "with_options"):
        train_set = train_set.with_options(augment=True)
    info = dist_info()
    device = torch.device(device) if device is not None else default_device()
    if info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ls = config.label_smoothing

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(m(x), y, label_smoothing=ls)

    def on_epoch_end(epoch: int, record: dict) -> dict | None:
        if val_set is None or not info.is_main:
            return None
        return {"val_accuracy": evaluate_classifier(model, val_set, device=device, num_workers=config.num_workers)}

    return fit(
        model,
        DatasetSource(train_set, num_workers=config.num_workers),
        loss_fn,
        config.fit_config(),
        checkpoint_dir=out_dir,
        resume=resume,
        device=device,
        progress=progress,
        desc="backbone",
        run_config={
            "backbone_train": {k: v for k, v in asdict(config).items() if k != "num_workers"},
            **(run_config or {}),
        },
        on_epoch_end=on_epoch_end,
        amp_dtype=torch.bfloat16 if config.amp else None,
    )


def replace_config(cfg, **changes):
    """``dataclasses.replace`` that ignores ``None`` values (for CLI overrides)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


# --------------------------------------------------------------------------------------------------
# backbones by name (what the command line and run directories store)
# --------------------------------------------------------------------------------------------------

TORCHVISION_ARCHS = ("resnet18", "resnet50")


def _cifar_depth(arch: str) -> int | None:
    if arch.startswith("cifar_resnet") and arch[len("cifar_resnet") :].isdigit():
        return int(arch[len("cifar_resnet") :])
    return None


def _check_arch(arch: str) -> None:
    if arch not in TORCHVISION_ARCHS and _cifar_depth(arch) is None:
        raise ValueError(
            f"arch: expected one of {list(TORCHVISION_ARCHS)} or cifar_resnet<depth> "
            f"(depth 6n+2: 20, 32, 44, 56, ...), got {arch!r}"
        )


@dataclass
class BackboneSpec:
    """Everything needed to rebuild the same frozen, staged backbone (stored in a run's ``config.json``).

    Attributes:
        arch: ``cifar_resnet<depth>`` (e.g. ``cifar_resnet56``), ``resnet18`` or ``resnet50``.
        n_classes: classifier outputs.
        checkpoint: weights file (akamaster ``.th``, or ``.safetensors`` from ``calexnet train-backbone``);
            ``None`` keeps a random initialisation (tests and smoke runs only).
        stem: torchvision ResNets: ``"cifar"`` (3x3 stride-1 conv, no max-pool) or ``"imagenet"``.
        branch_points: names of the branch points (default: the backbone's own default).
        n_branches: pick this many branch points by FLOPs instead (``placement="flops"``).
        input_size: input side (default 32 for the CIFAR stem / CIFAR ResNets, else 224).
        mean, std: input normalisation (default ImageNet statistics).
    """

    arch: str = "cifar_resnet56"
    n_classes: int = 10
    checkpoint: str | None = None
    stem: str = "cifar"
    branch_points: list[str] | None = None
    n_branches: int | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        if self.branch_points is not None and self.n_branches is not None:
            raise ValueError("branch_points, n_branches: give one or the other, not both")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BackboneSpec:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """The frozen ``StagedBackbone`` a :class:`BackboneSpec` describes (nothing is downloaded)."""
    from . import backbones

    placement = "flops" if spec.n_branches is not None else None
    common = {
        "branch_points": spec.branch_points,
        "placement": placement,
        "n_branches": spec.n_branches,
        "mean": spec.mean,
        "std": spec.std,
    }
    depth = _cifar_depth(spec.arch)
    if depth is not None:
        return backbones.cifar_resnet(
            depth,
            n_classes=spec.n_classes,
            checkpoint=spec.checkpoint,
            input_size=spec.input_size or 32,
            **common,
        )
    fn = getattr(backbones, spec.arch)
    return fn(spec.n_classes, stem=spec.stem, weights=spec.checkpoint, input_size=spec.input_size, **common)


def trainable_backbone(arch: str, n_classes: int, stem: str = "cifar") -> nn.Module:
    """A fresh, trainable (not staged, not frozen) network of ``arch`` whose state dict
    :func:`build_backbone` loads as ``checkpoint``."""
    _check_arch(arch)
    from . import backbones

    depth = _cifar_depth(arch)
    if depth is not None:
        return backbones.CifarResNet(depth, n_classes)
    # the same constructor backbones.resnet18/50 use, so the key names and the stem match exactly
    return backbones._torchvision_resnet(arch, n_classes, stem, None, 3)
