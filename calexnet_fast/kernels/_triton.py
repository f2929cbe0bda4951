"""Lazy Triton access, the availability probe, and what the launchers share.

Nothing here imports ``triton`` at module import time: ``import calexnet_fast.kernels`` must work without
triton and without a GPU, and ``TRITON_INTERPRET=1`` only takes effect for kernels decorated after it is set,
so the kernel modules are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_version() -> tuple[str | None, str]:
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    try:
        import triton
    except Exception as e:  # a broken install must not break `import calexnet_fast`
        return None, f"triton failed to import ({type(e).__name__}: {e})"
    return str(getattr(triton, "__version__", "unknown")), ""


@functools.cache
def _native_status() -> tuple[bool, str]:
    version, why = _triton_version()
    if version is None:
        return False, why
    if not torch.cuda.is_available():
        return False, f"triton {version} is installed but no CUDA device is visible"
    try:
        from triton.runtime import driver

        target = driver.active.get_current_target()
    except Exception as e:
        return False, f"triton {version} found no usable GPU driver ({type(e).__name__}: {e})"
    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return False, f"triton {version}: GPU sm_{major}{minor} is older than sm_80, which these kernels need"
    return True, (
        f"triton {version} native on {torch.cuda.get_device_name(dev)} (sm_{major}{minor}, "
        f"target {getattr(target, 'backend', '?')})"
    )


def triton_status() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and how (or why not).

    Returns:
        (usable, how): ``usable`` is True when CUDA tensors run the Triton kernels natively, or when
        ``TRITON_INTERPRET=1`` is set (then the internal launchers run them on CPU tensors, slowly; the
        public ops still send CPU tensors to the PyTorch reference). ``how`` is one line for
        ``python -m calexnet_fast.info``.
    """
    version, why = _triton_version()
    if version is None:
        return False, f"{why}; every op uses its PyTorch reference"
    if interpreting():
        return True, (
            f"triton {version} interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors through the "
            "internal launchers, for testing only; the public ops send CPU tensors to the PyTorch reference"
        )
    ok, how = _native_status()
    if ok:
        return True, how
    return (
        False,
        f"{how}; CPU tensors use the PyTorch reference (set TRITON_INTERPRET=1 to test kernels on CPU)",
    )


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``): block sizes of the launch configurations."""
    return 1 << max(0, int(x) - 1).bit_length()


def kernel_module(name: str):
    """Import ``calexnet_fast.kernels.<name>`` (a module defining ``@triton.jit`` kernels) on first use."""
    return importlib.import_module(f"{__package__}.{name}")


_warned: set[str] = set()


def warn_fallback_once(op: str, reason: str) -> None:
    """One warning per op and process when a CUDA tensor falls back to the reference."""
    if op in _warned:
        return
    _warned.add(op)
    warnings.warn(
        f"calexnet_fast.kernels.{op}: Triton cannot run here ({reason}); using the PyTorch reference",
        RuntimeWarning,
        stacklevel=3,
    )


def cuda_usable() -> tuple[bool, str]:
    """Whether a CUDA tensor can take the Triton path (native Triton, not the interpreter)."""
    if interpreting():
        # The interpreter also accepts CUDA tensors (it copies them to the host), so this still works.
        return _triton_version()[0] is not None, "triton interpreter"
    return _native_status()
