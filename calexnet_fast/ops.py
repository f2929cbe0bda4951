"""Batch-compaction ops: ``compact`` and ``scatter_rows`` (C++/CUDA), their reference twins, registration.

The C++ libraries in ``calexnet_fast/_lib`` define ``torch.ops.calexnet_fast.compact``,
``scatter_rows_`` and ``scatter_rows`` (CPU always, CUDA when built and torch has CUDA). This module loads
them once at import, registers the fake kernels (``torch.compile``, ``torch.export``) and autograd, and, for
any piece that could not be loaded, registers the plain-PyTorch reference twins under the same op names
with one warning, so the ops always exist and never silently change meaning.

Semantics (both devices, and the twins below):
    compact(x, mask) -> (rows, index): ``rows = x[mask]`` as a new tensor (rows keep a contiguous or
        channels_last per-row layout; other layouts come out contiguous) and ``index`` the int64 positions of
        the true entries, increasing.
    scatter_rows_(out, src, index): ``out[index[j]] = src[j]`` in place; every index must lie in
        ``[0, out.size(0))`` or the op raises before writing anything; with duplicate indices the last
        occurrence wins. ``scatter_rows`` does the same on a copy of ``out``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "compact",
    "compact_reference",
    "scatter_rows",
    "scatter_rows_",
    "scatter_rows_reference",
    "scatter_rows__reference",
    "library_status",
]

_LIB_DIR = Path(__file__).resolve().parent / "_lib"


@dataclass
class LibraryStatus:
    """What was loaded at import time, for ``python -m calexnet_fast.info``."""

    cpu_path: str | None = None
    cpu_error: str | None = None
    cuda_path: str | None = None
    cuda_error: str | None = None
    build_info: dict = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


_STATUS = LibraryStatus()


def library_status() -> LibraryStatus:
    """The load status of the C++ op libraries (paths, errors, build info, reference fallbacks)."""
    return _STATUS


# --------------------------------------------------------------------------------------------------
# Reference twins (plain PyTorch): the semantics every fast path is tested against.
# --------------------------------------------------------------------------------------------------


def _check_compact_args(x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError("compact: x: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor")
    if mask.dtype != torch.bool:
        raise ValueError(f"compact: mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1:
        raise ValueError(f"compact: mask: expected a 1-D tensor of shape [{x.shape[0]}], got shape {list(mask.shape)}")
    if mask.shape[0] != x.shape[0]:
        raise ValueError(f"compact: mask: expected length {x.shape[0]} (x.size(0)), got {mask.shape[0]}")
    if mask.device != x.device:
        raise ValueError(f"compact: mask: expected device {x.device} (that of x), got {mask.device}")


def _check_scatter_args(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    if out.dim() < 1:
        raise ValueError("scatter_rows: out: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor")
    if src.device != out.device:
        raise ValueError(f"scatter_rows: src: expected device {out.device} (that of out), got {src.device}")
    if index.device != out.device:
        raise ValueError(f"scatter_rows: index: expected device {out.device} (that of out), got {index.device}")
    if index.dtype != torch.int64:
        raise ValueError(f"scatter_rows: index: expected dtype torch.int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"scatter_rows: index: expected a 1-D tensor, got shape {list(index.shape)}")
    if src.dtype != out.dtype:
        raise ValueError(f"scatter_rows: src: expected dtype {out.dtype} (that of out), got {src.dtype}")
    if src.dim() != out.dim() or src.shape[1:] != out.shape[1:]:
        raise ValueError(
            f"scatter_rows: out: expected trailing shape matching src {list(src.shape)} (all but the first "
            f"dimension), got out of shape {list(out.shape)}"
        )
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"scatter_rows: index: expected length {src.shape[0]} (src.size(0)), got {index.shape[0]}")


def _row_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t[:1].is_contiguous() and t[:1].is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def compact_reference(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of ``compact``: boolean indexing.

    Args:
        x: [B, ...] any dtype, any layout.
        mask: [B] bool, same device.

    Returns:
        rows: [n, ...] the rows where ``mask`` is true, in order (a new tensor).
        index: [n] int64 positions of those rows in ``x``.
    """
    _check_compact_args(x, mask)
    index = mask.nonzero().view(-1)
    rows = x[mask].contiguous(memory_format=_row_format(x))
    return rows, index


def _validate_index(index: torch.Tensor, rows: int) -> None:
    bad = (index < 0) | (index >= rows)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"scatter_rows: index: expected every value in [0, {rows}) (out.size(0)), got index[{j}] = {int(index[j])}"
        )


def scatter_rows__reference(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``scatter_rows_``: ``out[index] = src`` in place, last duplicate wins.

    Args:
        out: [N, ...] written in place.
        src: [n, ...] same trailing shape and dtype as ``out``.
        index: [n] int64 in ``[0, N)``.

    Returns:
        ``out``.
    """
    _check_scatter_args(out, src, index)
    _validate_index(index, out.shape[0])
    if index.numel() == 0:
        return out
    # index_copy_ leaves duplicates unspecified; keep only the last occurrence of each target row.
    positions = torch.arange(index.shape[0], device=index.device)
    last = torch.full((out.shape[0],), -1, dtype=torch.int64, device=index.device)
    last.scatter_reduce_(0, index, positions, reduce="amax")
    keep = last[index] == positions
    out.index_copy_(0, index[keep], src[keep])
    return out


def _scatter_rows__noreturn(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    scatter_rows__reference(out, src, index)  # the op's schema returns nothing (functionalization)


def scatter_rows_reference(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``scatter_rows``: like ``scatter_rows__reference`` on a copy of ``out``."""
    _check_scatter_args(out, src, index)
    return scatter_rows__reference(out.clone(), src, index)


# --------------------------------------------------------------------------------------------------
# Loading and registration.
# --------------------------------------------------------------------------------------------------


def _load(name: str) -> tuple[str | None, str | None]:
    path = _LIB_DIR / f"lib{name}.so"
    if not path.exists():
        if (_LIB_DIR.parent.parent / "CMakeLists.txt").exists():
            return None, (
                f"{path} is not there: this is the source tree ({_LIB_DIR.parent}), imported because Python puts "
                "the current directory first on sys.path; run from another directory to use the installed package"
            )
        return None, f"{path} is not there (the package was installed without its compiled ops)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return None, f"loading {path} failed: {exc}"
    return str(path), None


def _define_python_schema() -> None:
    lib = torch.library.Library("calexnet_fast", "DEF")  # noqa: TOR901
    lib.define("compact(Tensor x, Tensor mask) -> (Tensor rows, Tensor index)")
    lib.define("scatter_rows_(Tensor(a!) out, Tensor src, Tensor index) -> ()")
    lib.define("scatter_rows(Tensor out, Tensor src, Tensor index) -> Tensor")
    _KEEP_ALIVE.append(lib)


def _register_reference(device: str) -> None:
    lib = torch.library.Library("calexnet_fast", "IMPL")  # noqa: TOR901
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    lib.impl("compact", compact_reference, dispatch_key)
    lib.impl("scatter_rows_", _scatter_rows__noreturn, dispatch_key)
    lib.impl("scatter_rows", scatter_rows_reference, dispatch_key)
    _KEEP_ALIVE.append(lib)
    _STATUS.fallbacks.append(device)


_KEEP_ALIVE: list[torch.library.Library] = []


def _load_all() -> None:
    _STATUS.cpu_path, _STATUS.cpu_error = _load("calexnet_fast_cpu")
    info = _LIB_DIR / "build_info.json"
    if info.exists():
        _STATUS.build_info = json.loads(info.read_text())
    if _STATUS.cpu_path is None:
        _define_python_schema()
        _register_reference("cpu")
    if torch.version.cuda is None:
        _STATUS.cuda_error = "this torch was built without CUDA"
    elif _STATUS.cpu_path is None:
        _STATUS.cuda_error = "not loaded because the CPU library (which defines the op schemas) did not load"
    else:
        cuda_so = _LIB_DIR / "libcalexnet_fast_cuda.so"
        if cuda_so.exists():
            _STATUS.cuda_path, _STATUS.cuda_error = _load("calexnet_fast_cuda")
        else:
            _STATUS.cuda_error = "not built (no nvcc at build time, or CALEXNET_CUDA=OFF)"
    if _STATUS.cuda_path is None and torch.version.cuda is not None:
        _register_reference("cuda")
    if _STATUS.cpu_error is not None or (_STATUS.cuda_error is not None and torch.cuda.is_available()):
        broken = "CPU" if _STATUS.cpu_error is not None else "CUDA"
        reason = _STATUS.cpu_error if _STATUS.cpu_error is not None else _STATUS.cuda_error
        warnings.warn(
            f"calexnet_fast: the {broken} op library is not available ({reason}); compact/scatter_rows use the "
            "plain-PyTorch reference twins there (same results, slower). `python -m calexnet_fast.info` says more.",
            RuntimeWarning,
            stacklevel=3,
        )


def _register_fake_and_autograd() -> None:
    @torch.library.register_fake("calexnet_fast::compact")
    def _compact_fake(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_compact_args(x, mask)
        n = torch.library.get_ctx().new_dynamic_size()
        rows = x.new_empty((n, *x.shape[1:])).contiguous(memory_format=_row_format(x))
        return rows, x.new_empty((n,), dtype=torch.int64)

    @torch.library.register_fake("calexnet_fast::scatter_rows_")
    def _scatter_rows__fake(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
        _check_scatter_args(out, src, index)

    @torch.library.register_fake("calexnet_fast::scatter_rows")
    def _scatter_rows_fake(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _check_scatter_args(out, src, index)
        return torch.empty_like(out)

    def _compact_setup(ctx, inputs, output) -> None:
        x, _ = inputs
        _, index = output
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape

    def _compact_backward(ctx, grad_rows, _grad_index):
        (index,) = ctx.saved_tensors
        zeros = grad_rows.new_zeros(ctx.x_shape)
        return torch.ops.calexnet_fast.scatter_rows(zeros, grad_rows.contiguous(), index), None

    torch.library.register_autograd("calexnet_fast::compact", _compact_backward, setup_context=_compact_setup)

    def _scatter_setup(ctx, inputs, output) -> None:
        out, _, index = inputs
        ctx.save_for_backward(index)
        ctx.rows = out.shape[0]

    def _scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        positions = torch.arange(index.shape[0], device=index.device)
        last = torch.full((ctx.rows,), -1, dtype=torch.int64, device=index.device)
        last.scatter_reduce_(0, index, positions, reduce="amax")
        winner = (last[index] == positions).view(-1, *([1] * (grad.dim() - 1)))
        # Rows of `out` that were overwritten get no gradient; a src row gets one only if it was written.
        grad_out = grad.index_fill(0, index, 0)
        grad_src = grad.index_select(0, index) * winner
        return grad_out, grad_src, None

    torch.library.register_autograd("calexnet_fast::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


if os.environ.get("CALEXNET_NO_EXTENSION") == "1":
    # Used by the tests of the fallback path: behave as if the libraries were missing.
    _STATUS.cpu_error = "disabled by CALEXNET_NO_EXTENSION=1"
    _define_python_schema()
    _register_reference("cpu")
    if torch.version.cuda is not None:
        _STATUS.cuda_error = "disabled by CALEXNET_NO_EXTENSION=1"
        _register_reference("cuda")
    warnings.warn(
        "calexnet_fast: the C++ op libraries are disabled (CALEXNET_NO_EXTENSION=1); compact/scatter_rows use "
        "the plain-PyTorch reference twins.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _load_all()
_register_fake_and_autograd()


def compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the rows of ``x`` where ``mask`` is true into a new dense batch.

    Args:
        x: [B, ...] any dtype; contiguous, channels_last or strided.
        mask: [B] bool on the same device.

    Returns:
        rows: [n, ...] the selected rows in order (channels_last inputs give channels_last rows).
        index: [n] int64 positions of the selected rows in ``x``.
    """
    return torch.ops.calexnet_fast.compact(x, mask)


def scatter_rows_(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write ``src[j]`` into ``out[index[j]]`` in place (last duplicate wins) and return ``out``.

    Args:
        out: [N, ...] destination, modified in place.
        src: [n, ...] rows to write; same dtype, device and trailing shape as ``out``.
        index: [n] int64 in ``[0, N)``; an out-of-range value raises before anything is written.
    """
    torch.ops.calexnet_fast.scatter_rows_(out, src, index)
    return out


def scatter_rows(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``scatter_rows_``: a copy of ``out`` with ``src`` written at ``index`` (differentiable)."""
    return torch.ops.calexnet_fast.scatter_rows(out, src, index)
