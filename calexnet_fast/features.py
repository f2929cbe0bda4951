"""The feature cache: a frozen backbone's branch-point features, logits and labels, computed once.

Branch heads sit on a **frozen** backbone, so the backbone's branch-point features and logits never change:
:func:`build_feature_cache` computes them once per split (in memory, or in a safetensors file on disk that
later runs reuse, fp16 by default) and every head, recipe and baseline then trains from the
:class:`FeatureCache` instead of re-running the backbone each epoch. A disk cache is reused only when its
fingerprints (:func:`model_fingerprint`, :func:`dataset_fingerprint`, dtype) match and its data matches the
SHA-256 per tensor recorded when it was written; a damaged one is rebuilt.

:func:`backbone_features` is the same computation on an already decoded image tensor
(:func:`calexnet_fast.data.decode_images`), in the backbone's own dtype, on the very batches the real cascade
reads when it is timed.
:func:`predict` applies a function to every cached row, :func:`branch_logits` the trained heads.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .distributed import barrier, default_device, dist_info
from .io import ST_DTYPES, Bf16, SafetensorsWriter, memmap_safetensors, read_safetensors_header, verify_safetensors
from .reference import working_map

__all__ = [
    "FeatureCache",
    "backbone_features",
    "branch_logits",
    "build_feature_cache",
    "dataset_fingerprint",
    "head_logits",
    "model_fingerprint",
    "predict",
]

STORAGES = ("memory", "disk")


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
# the cache
# --------------------------------------------------------------------------------------------------


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise ValueError(f"storage: expected 'memory' or 'disk', got {storage!r}")


def _specs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype], n: int, n_classes: int) -> dict:
    specs = {f"features.{k}": (dt, (n, *s)) for k, (s, dt) in enumerate(zip(shapes, dtypes, strict=True))}
    specs["backbone_logits"] = (torch.float32, (n, n_classes))
    specs["labels"] = (torch.int64, (n,))
    return specs


class FeatureCache:
    """Branch-point features, backbone logits and labels of one split, computed once.

    Args:
        features: K arrays [N, C_k, H_k, W_k] (torch tensors in memory, or memory-mapped arrays on disk).
        backbone_logits: [N, n_classes] float32.
        labels: [N] int64.
        meta: what produced it (backbone and dataset fingerprints, dtype, split, …).

    ``gather(idx)`` returns CPU tensors for the rows ``idx`` in the storage dtype; a training source moves
    them to the training device as float32.
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

    def subset(self, idx: torch.Tensor) -> FeatureCache:
        """An in-memory cache of the rows ``idx`` (int64), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        feats = [self._take(f, idx) for f in self.features]
        return FeatureCache(
            feats, self._take(self.backbone_logits, idx).float(), self._take(self.labels, idx).long(), self.meta
        )

    def to_memory(self) -> FeatureCache:
        """A copy with every array read into memory."""
        return self.subset(torch.arange(len(self)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (``features.{k}``, ``backbone_logits``, ``labels``)."""
        specs = _specs(self.branch_shapes, [self._dtype(f) for f in self.features], len(self), self.n_classes)
        with SafetensorsWriter(path, specs, {"meta": json.dumps(self.meta)}) as w:
            step = 4096
            for s in range(0, len(self), step):
                feats, z, y = self.gather(torch.arange(s, min(s + step, len(self))))
                for k, f in enumerate(feats):
                    w.write(f"features.{k}", s, f)
                w.write("backbone_logits", s, z)
                w.write("labels", s, y)
            w.close()

    @staticmethod
    def _dtype(a) -> torch.dtype:
        if isinstance(a, torch.Tensor):
            return a.dtype
        if isinstance(a, Bf16):
            return torch.bfloat16
        return {v[1]: k for k, v in ST_DTYPES.items() if k != torch.bfloat16}[np.dtype(a.dtype).type]

    @classmethod
    def load(cls, path: str | os.PathLike, storage: str = "memory", verify: bool = True) -> FeatureCache:
        """Open a cache file; ``storage="disk"`` keeps it memory-mapped, ``"memory"`` reads it in.

        Args:
            verify: check every tensor against the SHA-256 recorded when the file was written (one read
                of the file); a truncated file is always detected.

        Raises:
            ValueError: no file there.  RuntimeError: the file is damaged or is not a feature cache (the
            message says so; delete it to rebuild).
        """
        path = Path(path)
        _check_storage(storage)
        if not path.is_file():
            raise ValueError(f"feature cache {path} does not exist")
        try:
            if verify:
                verify_safetensors(path)
            arrays, meta = memmap_safetensors(path)
        except RuntimeError as e:
            raise RuntimeError(f"feature cache {e}; delete it to rebuild") from e
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


# --------------------------------------------------------------------------------------------------
# building it
# --------------------------------------------------------------------------------------------------


def _peek_cache_meta(path: Path) -> dict | None:
    try:
        header, _ = read_safetensors_header(path, check_size=False)
        return json.loads((header.get("__metadata__") or {}).get("meta", "{}"))
    except (RuntimeError, ValueError):
        return None


def _run_backbone(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, object]],
    n: int,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    pool: int | None = None,
    keep: bool,
    path: Path | None,
    meta: dict,
    progress: bool,
    desc: str,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """The one backbone pass behind every cache: ``n`` rows from ``batches`` of ``(images, labels)``,
    features in ``dtype`` (``None``: the backbone's), average-pooled to at most ``pool`` x ``pool`` when given
    (:func:`~calexnet_fast.reference.working_map`), kept in memory (``keep``) and/or streamed to ``path``."""
    from tqdm.auto import tqdm

    if n == 0:
        raise RuntimeError("dataset: expected at least one sample, got an empty dataset")
    out: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
    writer: SafetensorsWriter | None = None
    start = 0
    bar = tqdm(total=n, desc=desc, disable=not progress or not dist_info().is_main, unit="img", leave=False)
    try:
        with torch.inference_mode():
            for x, y in batches:
                feats, logits = backbone.features(x.to(device, non_blocking=True))
                if pool is not None:
                    feats = [working_map(f, pool) for f in feats]
                feats = [f.to(dtype) if dtype is not None else f for f in feats]
                z = logits.float().cpu()
                yy = torch.as_tensor(y, dtype=torch.int64)
                b = x.shape[0]
                if start + b > n:
                    raise RuntimeError(f"dataset: expected {n} samples from its DataLoader, got more")
                if start == 0:
                    shapes = [tuple(f.shape[1:]) for f in feats]
                    if path is not None:
                        specs = _specs(shapes, [f.dtype for f in feats], n, z.shape[1])
                        writer = SafetensorsWriter(path, specs, {"meta": json.dumps(meta)})
                    if keep:
                        out = (
                            [torch.empty((n, *s), dtype=f.dtype) for s, f in zip(shapes, feats, strict=True)],
                            torch.empty((n, z.shape[1]), dtype=torch.float32),
                            torch.empty(n, dtype=torch.int64),
                        )
                for k, f in enumerate(feats):
                    if out is not None:
                        out[0][k][start : start + b] = f.cpu()
                    if writer is not None:
                        writer.write(f"features.{k}", start, f)
                if out is not None:
                    out[1][start : start + b] = z
                    out[2][start : start + b] = yy
                if writer is not None:
                    writer.write("backbone_logits", start, z)
                    writer.write("labels", start, yy)
                start += b
                bar.update(b)
        if start != n:
            raise RuntimeError(f"dataset: expected {n} samples from its DataLoader, got {start}")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return out


def build_feature_cache(
    backbone: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float16,
    pool: int | None = None,
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
        pool: store each branch map average-pooled to at most ``pool`` x ``pool``
            (:func:`~calexnet_fast.reference.working_map`): the cache then holds exactly what heads that
            start with that pooling read (the grid head, and SDN / PTEEnet heads given ``max_size``), at a
            fraction of the size. ``None``: the full maps.
        device: where the backbone runs (default: GPU if any).
        storage: ``"memory"`` or ``"disk"`` (memory-mapped file; needs ``path``).
        path: a ``.safetensors`` file: reused when it exists, was built from the same backbone weights,
            dataset and dtype and its data is intact; otherwise (re)built there (a damaged file is rebuilt
            with a warning). Under ``torchrun`` rank 0 builds it and the others wait and open it.
        num_workers: DataLoader workers.
        progress: show a tqdm bar.
        meta: extra JSON-able facts to record in the cache.

    Returns:
        A :class:`FeatureCache` of ``len(dataset)`` rows, in dataset order.

    Raises:
        OSError: the cache file cannot be written (e.g. the disk is full); no partial file is left.
    """
    from torch.utils.data import DataLoader

    _check_storage(storage)
    if storage == "disk" and path is None:
        raise ValueError("path: expected a file path with storage='disk', got None")
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float16, torch.float32 or torch.bfloat16, got {dtype}")
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ValueError(f"pool: expected None or a positive int (pooled map side), got {pool!r}")
    if getattr(dataset, "augment", False) and hasattr(dataset, "with_options"):
        dataset = dataset.with_options(augment=False)
    fingerprint = {
        "backbone": model_fingerprint(backbone),
        "backbone_name": getattr(backbone, "name", type(backbone).__name__),
        "branch_points": list(getattr(backbone, "branch_points", [])),
        "dataset": dataset_fingerprint(dataset),
        "n": len(dataset),
        "dtype": str(dtype).replace("torch.", ""),
        "pool": pool,
    }
    full_meta = {**(meta or {}), **fingerprint}
    info = dist_info()
    if path is not None:
        path = Path(path)
        if path.is_file():
            old = _peek_cache_meta(path)
            if old is not None and all(old.get(k) == v for k, v in fingerprint.items()):
                try:
                    return FeatureCache.load(path, storage)
                except RuntimeError as e:
                    warnings.warn(f"rebuilding the feature cache: {e.__cause__ or e}", stacklevel=2)
        if info.distributed and not info.is_main:
            barrier()  # wait for rank 0 to write (and check) it
            return FeatureCache.load(path, storage, verify=False)
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
    try:
        out = _run_backbone(
            backbone,
            loader,
            len(dataset),
            device=device,
            dtype=dtype,
            pool=pool,
            keep=storage == "memory",
            path=path,
            meta=full_meta,
            progress=progress,
            desc=desc,
        )
    finally:
        backbone.train(was_training)
    if path is not None and info.distributed:
        barrier()  # release the other ranks
    if storage == "disk":
        return FeatureCache.load(path, "disk", verify=False)
    cache = FeatureCache(*out, full_meta)
    cache.path = path
    return cache


# --------------------------------------------------------------------------------------------------
# functions and heads over cached features
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(fn: Callable, cache: FeatureCache, *, branches=None, batch_size: int = 1024, device=None) -> torch.Tensor:
    """Apply ``fn(features) -> [B, ...]`` to every cached row in order (eval work, no grad); CPU result.
    ``features`` is the list of K float32 branch maps on ``device`` (``None`` for branches not in ``branches``).
    """
    device = torch.device(device) if device is not None else default_device()
    outs = []
    for s in range(0, len(cache), batch_size):
        feats, _, _ = cache.gather(torch.arange(s, min(s + batch_size, len(cache))), branches)
        outs.append(fn([f.to(device, torch.float32) if f is not None else None for f in feats]).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def head_logits(head: nn.Module, cache: FeatureCache, branch: int, *, batch_size: int = 1024, device=None):
    """Logits [N, C] (CPU) of ``head`` (eval mode; moved to ``device`` if given) on branch ``branch``
    (0-based) of every cached sample."""
    was = head.training
    head.eval()
    try:
        if device is not None:
            head.to(device)
        dev = next(head.parameters()).device
        return predict(lambda f: head(f[branch]), cache, branches=[branch], batch_size=batch_size, device=dev)
    finally:
        head.train(was)


def branch_logits(heads: Sequence[nn.Module], cache: FeatureCache, *, device=None) -> torch.Tensor:
    """Logits [K, N, C] (CPU) of the K branch heads, head ``k`` on branch ``k`` of every cached sample."""
    return torch.stack([head_logits(h, cache, k, device=device) for k, h in enumerate(heads)])


def backbone_features(backbone, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> FeatureCache:
    """An in-memory :class:`FeatureCache` of the backbone on ``images`` (kept in the dtype the backbone
    computes in; labels 0), computed on the very tensor and batches the real cascade reads.

    Args:
        backbone: a ``StagedBackbone`` on the images' device.
        images: [N, C, H, W] (already on the device, in the memory format used for timing).
    """
    n = images.shape[0]
    no_labels = torch.zeros(n, dtype=torch.int64)
    batches = ((images[s : s + batch_size], no_labels[s : s + batch_size]) for s in range(0, n, batch_size))
    out = _run_backbone(
        backbone,
        batches,
        n,
        device=images.device,
        dtype=None,
        keep=True,
        path=None,
        meta={},
        progress=progress,
        desc="backbone features",
    )
    return FeatureCache(*out, {"source": "measure"})
