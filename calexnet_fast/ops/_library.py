"""Loading the C++ op libraries once, and the reference fallback for any piece that does not load.

At import: load ``_lib/libcalexnet_fast_cpu.so`` (it defines the op schemas and their CPU kernels) and, when
torch has CUDA, ``_lib/libcalexnet_fast_cuda.so``. Whatever did not load gets the plain-PyTorch twins of
``calexnet_fast.reference`` registered under the same op names (defining the schemas in Python when the CPU
library is missing), with one ``RuntimeWarning`` saying why; ``library_status()`` records it all for
``python -m calexnet_fast.info``. ``CALEXNET_NO_EXTENSION=1`` behaves as if the libraries were missing.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..reference import (
    compact_reference,
    grid_plan_exit_reference,
    max_pool2d_reference,
    scatter_rows__reference,
    scatter_rows_reference,
)

_LIB_DIR = Path(__file__).resolve().parent.parent / "_lib"


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
_KEEP_ALIVE: list[torch.library.Library] = []


def library_status() -> LibraryStatus:
    """The load status of the C++ op libraries (paths, errors, build info, reference fallbacks)."""
    return _STATUS


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


_GRID_PLAN_EXIT = (  # as in csrc/ops_cpu.cpp
    "grid_plan_exit(Tensor x, Tensor proj_weight_t, Tensor proj_bias, Tensor prototypes_t, Tensor s_windows, "
    "Tensor x_windows, Tensor cls_weight, Tensor cls_bias, Tensor thresholds, float eps) -> (Tensor logits, "
    "Tensor exit, Tensor pred, Tensor conf)"
)
_MAX_POOL2D = (  # as in csrc/ops_cpu.cpp
    "max_pool2d(Tensor x, int kernel_h, int kernel_w, int stride_h, int stride_w, int padding_h, int padding_w) "
    "-> Tensor"
)


def _define_python_schema() -> None:
    lib = torch.library.Library("calexnet_fast", "DEF")  # noqa: TOR901
    lib.define("compact(Tensor x, Tensor mask) -> (Tensor rows, Tensor index)")
    lib.define("scatter_rows_(Tensor(a!) out, Tensor src, Tensor index) -> ()")
    lib.define("scatter_rows(Tensor out, Tensor src, Tensor index) -> Tensor")
    lib.define(_GRID_PLAN_EXIT)
    lib.define(_MAX_POOL2D)
    _KEEP_ALIVE.append(lib)


def _scatter_rows__noreturn(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    scatter_rows__reference(out, src, index)  # the op's schema returns nothing (functionalization)


def _register_reference(device: str) -> None:
    lib = torch.library.Library("calexnet_fast", "IMPL")  # noqa: TOR901
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    lib.impl("compact", compact_reference, dispatch_key)
    lib.impl("scatter_rows_", _scatter_rows__noreturn, dispatch_key)
    lib.impl("scatter_rows", scatter_rows_reference, dispatch_key)
    if device == "cpu":  # (on CUDA the twins are registered always, by _register_cpu_only_ops_cuda)
        lib.impl("grid_plan_exit", grid_plan_exit_reference, dispatch_key)
        lib.impl("max_pool2d", max_pool2d_reference, dispatch_key)
    _KEEP_ALIVE.append(lib)
    _STATUS.fallbacks.append(device)


def _register_cpu_only_ops_cuda() -> None:
    """``grid_plan_exit`` and ``max_pool2d`` have no CUDA kernels (the fused Triton kernel and torch's own pool
    are the fast paths there): their twins."""
    if torch.version.cuda is not None:
        lib = torch.library.Library("calexnet_fast", "IMPL")  # noqa: TOR901
        lib.impl("grid_plan_exit", grid_plan_exit_reference, "CUDA")
        lib.impl("max_pool2d", max_pool2d_reference, "CUDA")
        _KEEP_ALIVE.append(lib)


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


def _disable_libraries() -> None:
    """``CALEXNET_NO_EXTENSION=1`` (the tests of the fallback path): behave as if the libraries were missing."""
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
        stacklevel=3,
    )


if os.environ.get("CALEXNET_NO_EXTENSION") == "1":
    _disable_libraries()
else:
    _load_all()
_register_cpu_only_ops_cuda()
