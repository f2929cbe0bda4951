"""Lazy Triton access, the availability probe, and what the launchers share.

Nothing here imports ``triton`` at module import time: ``import calexnet_fast.kernels`` must work without
triton and without a GPU, and ``TRITON_INTERPRET=1`` only takes effect for kernels decorated after it is set,
so the kernel modules are imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings

import torch

from ..exit_rule import check_thresholds


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


# --------------------------------------------------------------------------------------------------
# What the fused head + exit launchers (proto_head, grid_head) share

FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dot_pad(n: int) -> int:
    """A block size for a dot dimension of size ``n``: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(n))


def channel_block(in_channels: int, cap: int) -> int:
    """Channels per dot step: ``next_pow2(C)`` clamped to ``[16, cap]``, then halved (down to 16) until it
    divides C, so that only a C that is not a multiple of 16 needs masked channel loads."""
    block_c = min(cap, dot_pad(in_channels))
    while block_c > 16 and in_channels % block_c:
        block_c //= 2
    return block_c


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' float32 dots: IEEE under ``torch.get_float32_matmul_precision()``
    "highest" (PyTorch's default), else TF32; ignored by Triton for 16-bit operands."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def require_kernel_device(features: torch.Tensor, op: str) -> None:
    """A fused head kernel runs on CUDA tensors (or any under ``TRITON_INTERPRET=1``); else a clear error."""
    if not (features.is_cuda or interpreting()):
        raise RuntimeError(
            f"features: the Triton {op} kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got device "
            f"{features.device}; call calexnet_fast.kernels.{op}, which uses the reference"
        )


def launch_per_sample(module: str, kernel: str, features: torch.Tensor, args, kwargs, outputs):
    """Launch ``module.kernel`` with one program per sample of ``features`` on its device; ``outputs``."""
    if features.shape[0] == 0:
        return outputs
    fn = getattr(kernel_module(module), kernel)
    with torch.cuda.device(features.device) if features.is_cuda else contextlib.nullcontext():
        fn[(features.shape[0],)](*args, **kwargs)
    return outputs


def head_exit_outputs(n: int, n_classes: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty (logits float32 [N, n_classes], exit bool [N], pred int64 [N], conf float32 [N]) on ``like``'s device
    (also what the fake kernels return)."""
    return (
        like.new_empty((n, n_classes), dtype=torch.float32),
        like.new_empty((n,), dtype=torch.bool),
        like.new_empty((n,), dtype=torch.int64),
        like.new_empty((n,), dtype=torch.float32),
    )


def check_head_args(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    width,
    width_text: str,
) -> None:
    """Raise ``ValueError`` naming the argument unless the fused head + exit kernels can take these tensors:
    features [N, C, H, W] (non-empty H x W, a dtype of ``FEATURE_DTYPES``), a folded head's buffers
    ([D, C], [D], [K, D], [n_classes, width(C, K, D)], [n_classes]; ``width_text`` spells the width for the
    message) and thresholds [n_classes], all floating, on the features' device."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features: expected a 4-D tensor [N, C, H, W], got {got}")
    if features.dtype not in FEATURE_DTYPES:
        raise ValueError(f"features: expected a dtype in {[str(d) for d in FEATURE_DTYPES]}, got {features.dtype}")
    named = [
        ("proj_weight", proj_weight),
        ("proj_bias", proj_bias),
        ("prototypes", prototypes),
        ("cls_weight", cls_weight),
        ("cls_bias", cls_bias),
        ("thresholds", thresholds),
    ]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if proj_weight.dim() != 2:
        raise ValueError(f"proj_weight: expected a 2-D tensor [D, C], got shape {list(proj_weight.shape)}")
    d, c = proj_weight.shape
    if features.shape[1] != c:
        raise ValueError(
            f"features: expected {c} channels (dim 1, the head's in_channels), got {features.shape[1]} "
            f"(shape {list(features.shape)})"
        )
    if features.shape[2] == 0 or features.shape[3] == 0:
        raise ValueError(f"features: expected a non-empty H x W, got shape {list(features.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"prototypes: expected shape [K, {d}], got {list(prototypes.shape)}")
    k = prototypes.shape[0]
    if list(proj_bias.shape) != [d]:
        raise ValueError(f"proj_bias: expected shape [{d}], got {list(proj_bias.shape)}")
    wd = width(c, k, d)
    if cls_weight.dim() != 2 or cls_weight.shape[1] != wd or cls_weight.shape[0] < 1:
        raise ValueError(f"cls_weight: expected shape [n_classes, {wd}] ({width_text}), got {list(cls_weight.shape)}")
    nc = cls_weight.shape[0]
    if list(cls_bias.shape) != [nc]:
        raise ValueError(f"cls_bias: expected shape [{nc}], got {list(cls_bias.shape)}")
    check_thresholds(thresholds, nc)
    for name, t in named:
        if t.device != features.device:
            raise ValueError(f"{name}: expected device {features.device} (that of features), got {t.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
