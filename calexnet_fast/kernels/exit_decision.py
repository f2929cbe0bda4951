"""Standalone exit decision: softmax confidence, argmax and per-class threshold test in one pass.

Public: ``exit_decision(logits [N, C], thresholds [C]) -> (exit bool [N], pred int64 [N], conf float32 [N])``,
also ``torch.ops.calexnet_fast.exit_decision``. Reference twin:
``calexnet_fast.exit_rule.exit_decision_reference`` (the CPU kernel of the op, and the fallback when Triton
cannot run on a CUDA tensor).
"""

from __future__ import annotations

import contextlib

import torch

from ..exit_rule import check_thresholds, exit_decision_reference
from ._triton import cuda_usable, interpreting, kernel_module, next_pow2, warn_fallback_once

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def exit_decision_launch_config(n_rows: int, n_classes: int) -> dict[str, int]:
    """Block sizes and launch parameters of the exit-decision kernel (deterministic, no autotuning).

    One program handles ``BLOCK_N`` rows and walks the classes in chunks of ``BLOCK_C`` (an online softmax,
    so any class count works). ``BLOCK_C`` is the class count rounded up to a power of two (at least 16, at
    most 256) and ``BLOCK_N * BLOCK_C = 4096`` elements per chunk (at most 64 rows).

    Hopper (H100/H200) choice and why: the op reads ``N * C`` logits once, so it is memory- or launch-bound;
    4096 fp32 elements per chunk are 16 values (four 16-byte vector loads) per thread with 8 warps, enough
    bytes in flight per SM; 2 pipeline stages overlap the next chunk's load with the exp/sum of this one when
    there are several chunks (C > 256). With 4 warps ptxas (sm_90a, Triton 3.6 and 3.8) spilled up to ~950
    bytes at C = 40-100; with 8 warps nothing spills for C = 10 ... 5000 in float32 / float16 / bfloat16 logits
    under Triton 3.6 (the GPU machine's); Triton 3.8 keeps a 16-byte stack slot for bfloat16 at C = 20 (at
    80 registers: not register pressure; once per batch, so of no consequence). At the sizes a cascade sees
    (N <= a few thousand, C <= 1000) the kernel is a single short launch, which is where its gain over the ~6
    eager kernels comes from.
    """
    block_c = min(max(16, next_pow2(n_classes)), 256)
    block_n = max(1, min(64, 4096 // block_c))
    return {
        "BLOCK_N": block_n,
        "BLOCK_C": block_c,
        "grid": (max(1, -(-n_rows // block_n)),),
        "num_warps": 8,
        "num_stages": 2,
    }


def _check(logits: torch.Tensor, thresholds: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a 2-D tensor [N, C], got {got}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits: expected a dtype in {[str(d) for d in _LOGIT_DTYPES]}, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one class, got shape {list(logits.shape)}")
    check_thresholds(thresholds, logits.shape[1])
    if thresholds.device != logits.device:
        raise ValueError(f"thresholds: expected device {logits.device} (that of logits), got {thresholds.device}")


def _launch_exit_decision(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the Triton kernel directly (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(logits, thresholds)
    if not (logits.is_cuda or interpreting()):
        raise RuntimeError(
            f"logits: the Triton exit_decision kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got "
            f"device {logits.device}; calexnet_fast.kernels.exit_decision uses the reference on CPU"
        )
    n, c = logits.shape
    dev = logits.device
    exit_ = torch.empty(n, dtype=torch.bool, device=dev)
    pred = torch.empty(n, dtype=torch.int64, device=dev)
    conf = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return exit_, pred, conf
    thr = thresholds.to(torch.float32).contiguous()
    cfg = exit_decision_launch_config(n, c)
    k = kernel_module("_exit_decision_kernel")
    with torch.cuda.device(dev) if logits.is_cuda else contextlib.nullcontext():
        k.exit_decision_kernel[cfg["grid"]](
            logits,
            thr,
            exit_,
            pred,
            conf,
            n,
            c,
            logits.stride(0),
            logits.stride(1),
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_C=cfg["BLOCK_C"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return exit_, pred, conf


@torch.library.custom_op("calexnet_fast::exit_decision", mutates_args=(), device_types="cuda")
def _exit_decision_op(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ok, why = cuda_usable()
    if not ok:
        warn_fallback_once("exit_decision", why)
        return _exit_decision_cpu(logits, thresholds)
    return _launch_exit_decision(logits, thresholds)


@_exit_decision_op.register_kernel("cpu")
def _exit_decision_cpu(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(logits, thresholds)  # the op called directly (torch.ops) checks its arguments like the wrapper
    return exit_decision_reference(logits, thresholds)


@_exit_decision_op.register_fake
def _exit_decision_fake(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(logits, thresholds)
    n = logits.shape[0]
    return (
        logits.new_empty((n,), dtype=torch.bool),
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=torch.float32),
    )


def exit_decision(logits: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit rule of docs/design.md §1 for one branch, fused into one kernel on CUDA.

    Args:
        logits: [N, C] branch logits, float16/bfloat16/float32/float64 (computed in float32), any strides.
        thresholds: [C] floating per-class thresholds on the same device; ``+inf`` means never exit.

    Returns:
        exit: [N] bool, ``conf >= thresholds[pred]``; NaN confidence never exits.
        pred: [N] int64, ``torch.argmax(logits, 1)`` (first maximum on ties; a NaN counts as the maximum).
        conf: [N] float32 maximum softmax probability (NaN where the softmax is NaN).

    CPU tensors use ``calexnet_fast.exit_rule.exit_decision_reference``.
    """
    _check(logits, thresholds)
    if logits.is_cuda and not torch.compiler.is_compiling() and cuda_usable()[0]:
        return _launch_exit_decision(logits, thresholds)  # what the op's CUDA kernel runs, minus dispatch
    return torch.ops.calexnet_fast.exit_decision(logits, thresholds)
