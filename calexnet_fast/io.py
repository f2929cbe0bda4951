"""File I/O: the one writer and reader of every kind of file the package writes.

Every write is atomic: the bytes go to ``<name>.tmp`` in the target's folder, are flushed to the disk
(``fsync``) and only then renamed over the target (``os.replace``), so a crash, a kill or a full disk leaves
either the old file or the new one, never a half-written file that a rerun would trust; on failure the
``.tmp`` is removed and the error names the file.

* JSON: :func:`write_json` (NaN and infinities become ``null``) and :func:`read_json` (a clear error naming
  the file when it is missing, not JSON, or not an object).
* Text (Markdown tables): :func:`write_text`.
* Safetensors state files (checkpoints, heads, thresholds): :func:`save_state_file` writes the tensors with a
  config in the metadata (and a JSON twin for people) and returns the file's SHA-256, which a caller can
  record and pass back to :func:`load_state_file` to have the file checked on load.
* Large safetensors files whose rows arrive in blocks (the feature cache): :class:`SafetensorsWriter`
  (space reserved up front, plain writes, no memory map; a SHA-256 per tensor recorded in the metadata),
  read back memory-mapped by :func:`memmap_safetensors` and checked by :func:`verify_safetensors`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "ST_DTYPES",
    "Bf16",
    "SafetensorsWriter",
    "atomic_write",
    "file_sha256",
    "json_safe",
    "load_state_file",
    "memmap_safetensors",
    "read_json",
    "read_safetensors_header",
    "save_state_file",
    "tmp_path",
    "verify_safetensors",
    "write_json",
    "write_text",
]

ST_DTYPES = {
    torch.float16: ("F16", np.float16),
    torch.float32: ("F32", np.float32),
    torch.float64: ("F64", np.float64),
    torch.bfloat16: ("BF16", np.uint16),
    torch.int64: ("I64", np.int64),
    torch.int32: ("I32", np.int32),
    torch.uint8: ("U8", np.uint8),
}
_ST_FROM = {v[0]: (k, v[1]) for k, v in ST_DTYPES.items()}
_CHUNK = 16 << 20


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def tmp_path(path: Path) -> Path:
    """Where a write to ``path`` goes before it is renamed over it."""
    return path.with_name(path.name + ".tmp")


def _write_error(path: Path, e: OSError) -> OSError:
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        why += " (the disk is full)"
    return OSError(e.errno, f"cannot write {path}: {why}; nothing was written there")


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. its folder is a file: there is nothing to remove
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform or file system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file that then replaces it.

    Raises:
        OSError: naming ``path`` (e.g. the disk is full, the folder is read-only or is a file); the
            temporary file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` and NumPy scalars by Python numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (NaN/inf become ``null``; other objects are written as strings)."""
    write_text(path, json.dumps(json_safe(obj), indent=indent, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON object from ``path``.

    Args:
        what: how the error messages name the file (e.g. ``"run config"``).

    Raises:
        ValueError: the file does not exist.  RuntimeError: it is not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{what} {path} is not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise RuntimeError(f"{what} {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# safetensors state files
# --------------------------------------------------------------------------------------------------


def save_state_file(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict | None = None, twin: dict | None = None
) -> str:
    """Write ``tensors`` to ``path`` (safetensors, atomically) and ``config`` to the JSON twin next to it.

    The config is also stored inside the safetensors metadata (key ``config``), so the one file is
    self-describing; the ``.json`` file is for people and tools (``twin``: what it holds instead of the config).

    Returns:
        The SHA-256 (hex) of the safetensors file, for :func:`load_state_file`'s ``sha256``.
    """
    from safetensors.torch import save

    path = Path(path)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"config": json.dumps(config or {})})
    atomic_write(path, lambda f: f.write(data))
    if twin is not None or config is not None:
        write_json(path.with_suffix(".json"), twin if twin is not None else config)
    return hashlib.sha256(data).hexdigest()


def load_state_file(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_state_file`: (tensors, config).

    Args:
        sha256: the digest :func:`save_state_file` returned; when given, the file must match it.

    Raises:
        ValueError: the file does not exist.  RuntimeError: it is not a readable safetensors file, or its
        SHA-256 differs from ``sha256`` (the file was damaged or replaced).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file does not exist")
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise RuntimeError(
                f"{path}: damaged or replaced: its SHA-256 is {got}, the one recorded when it was written is {sha256}"
            )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("config", "{}"))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a readable safetensors state file ({type(e).__name__}: {e})") from e
    return tensors, config


# --------------------------------------------------------------------------------------------------
# large safetensors files: streaming writer, memory-mapped reader, integrity check
# --------------------------------------------------------------------------------------------------


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    rows = rows.detach().to("cpu").contiguous()
    if rows.dtype == torch.bfloat16:
        rows = rows.view(torch.int16)
    return rows.numpy()


class SafetensorsWriter:
    """Write a safetensors file whose tensors arrive in row blocks (the file never has to fit in memory).

    The rows of each tensor must arrive in order (``start`` = the rows written so far). The file is built as
    ``<path>.tmp``: its full size is reserved on the disk first (a full disk fails here, before any work is
    spent), the rows are written with plain writes (a write error is an ``OSError``, never a ``SIGBUS``), and
    :meth:`close` records a SHA-256 per tensor in the metadata (key ``sha256``), flushes the file to disk
    and renames it to ``path``. Use as a context manager: an exception removes the ``.tmp``.

    Args:
        path: the final file.
        specs: name -> (dtype, shape) of every tensor, in file order.
        metadata: string -> string metadata (the ``sha256`` key is reserved).
    """

    def __init__(
        self, path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.specs = dict(specs)
        self.offsets: dict[str, int] = {}
        self.rows_done = dict.fromkeys(self.specs, 0)
        self.hashes = {name: hashlib.sha256() for name in self.specs}
        self._meta = dict(metadata)
        header: dict[str, Any] = {}
        offset = 0
        for name, (dtype, shape) in self.specs.items():
            if dtype not in ST_DTYPES:
                raise ValueError(f"dtype: expected one of {list(ST_DTYPES)}, got {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": ST_DTYPES[dtype][0],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.offsets[name] = offset
            offset += nbytes
        self._tensors = header
        hb = self._header({name: "0" * 64 for name in self.specs})
        self.data_start = 8 + len(hb)
        self.size = self.data_start + offset
        self.fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if hasattr(os, "posix_fallocate") and self.size > 0:
                try:
                    os.posix_fallocate(self.fd, 0, self.size)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise  # ENOSPC and friends; a file system without the call gets plain writes
            self._pwrite(struct.pack("<Q", len(hb)) + hb, 0)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise _write_error(self.path, e) from e
            raise

    def _header(self, digests: dict[str, str]) -> bytes:
        header = {"__metadata__": {**self._meta, "sha256": json.dumps(digests, separators=(",", ":"))}}
        header.update(self._tensors)
        hb = json.dumps(header, separators=(",", ":")).encode()
        return hb + b" " * (-len(hb) % 8)  # align the data to 8 bytes, as the reference implementation does

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "write returned no progress")
            view, offset = view[n:], offset + n

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``start ..`` of tensor ``name`` (the next rows in order)."""
        if start != self.rows_done[name]:
            raise ValueError(
                f"start: expected row {self.rows_done[name]} of {name!r} (rows arrive in order), got {start}"
            )
        a = _as_numpy(rows)
        shape = self.specs[name][1]
        if tuple(a.shape[1:]) != tuple(shape[1:]) or start + a.shape[0] > shape[0]:
            raise ValueError(
                f"rows: expected [<= {shape[0] - start}, {', '.join(map(str, shape[1:]))}], got {list(a.shape)}"
            )
        row_bytes = a.nbytes // max(a.shape[0], 1)
        if a.nbytes:
            try:
                self._pwrite(a, self.data_start + self.offsets[name] + start * row_bytes)
            except OSError as e:
                self.abort()
                raise _write_error(self.path, e) from e
            self.hashes[name].update(memoryview(a).cast("B"))
        self.rows_done[name] = start + a.shape[0]

    def close(self) -> dict[str, str]:
        """Record the digests, flush and rename to ``path``; returns the SHA-256 of each tensor's data."""
        missing = {n: (self.rows_done[n], s[0]) for n, (_, s) in self.specs.items() if self.rows_done[n] != s[0]}
        if missing:
            self.abort()
            raise RuntimeError(f"{self.path}: rows written / expected: {missing}; the file was not kept")
        digests = {name: h.hexdigest() for name, h in self.hashes.items()}
        try:
            self._pwrite(self._header(digests), 8)  # the same length as the placeholder header
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise _write_error(self.path, e) from e
        _fsync_dir(self.path.parent)
        return digests

    def abort(self) -> None:
        """Drop the partial file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        _remove(self.tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_safetensors_header(path: str | os.PathLike, check_size: bool = True) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts) of a safetensors file.

    Raises:
        RuntimeError: the header cannot be read, or (``check_size``) the file's size is not what the header
        says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"header is a {type(header).__name__}, not an object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    if check_size and size != 8 + n + end:
        raise RuntimeError(f"{path}: damaged: {size} bytes, its header describes {8 + n + end}")
    return header, 8 + n


class Bf16:
    """A uint16 memmap that yields bfloat16 tensors when indexed."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.shape = a.shape

    def __getitem__(self, idx):
        return torch.from_numpy(np.ascontiguousarray(self.a[idx])).view(torch.bfloat16)


def memmap_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray | Bf16], dict[str, str]]:
    """Every tensor of a safetensors file as a read-only memory map (bfloat16 ones as :class:`Bf16`), and
    the file's metadata."""
    header, start = read_safetensors_header(path)
    meta = header.pop("__metadata__", {}) or {}
    out: dict[str, np.ndarray | Bf16] = {}
    for name, info in header.items():
        dtype, npd = _ST_FROM[info["dtype"]]
        shape = tuple(info["shape"])
        b, _ = info["data_offsets"]
        a = np.empty(shape, dtype=npd) if int(np.prod(shape)) == 0 else np.memmap(path, npd, "r", start + b, shape)
        out[name] = Bf16(a) if dtype == torch.bfloat16 else a
    return out, meta


def verify_safetensors(path: str | os.PathLike) -> bool:
    """Check a file written by :class:`SafetensorsWriter` against the SHA-256 per tensor it records.

    Returns:
        True when every tensor matched; False when the file records no digests (written by another tool or
        an older version: only its size could be checked).

    Raises:
        RuntimeError: the file is unreadable, its size is not what its header says, or a tensor's data does
        not match its digest.
    """
    header, start = read_safetensors_header(path)
    recorded = (header.get("__metadata__") or {}).get("sha256")
    if recorded is None:
        return False
    try:
        digests = json.loads(recorded)
    except json.JSONDecodeError:
        digests = None
    if not isinstance(digests, dict):
        raise RuntimeError(f"{path}: damaged: its recorded SHA-256 digests are not readable")
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            f.seek(start + b)
            h, left = hashlib.sha256(), e - b
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            if h.hexdigest() != digests.get(name):
                raise RuntimeError(f"{path}: damaged: the data of {name!r} does not match its recorded SHA-256")
    return True
