"""Fused grid prototype-pooling head + exit decision (docs/design.md §1, the grid head; softmax, argmax,
threshold test).

Public: ``grid_head_exit(features [N, C, H, W], proj_weight, proj_bias, prototypes, cls_weight, cls_bias,
thresholds [n_classes], grid=2, feature_grid=4, max_size=8) -> (logits float32 [N, n_classes], exit bool [N],
pred int64 [N], conf float32 [N])``, also ``torch.ops.calexnet_fast.grid_head_exit``; the head's tensors are a
folded grid head's buffers (``calexnet_fast.heads.FoldedGridPrototypeHead``; ``grid``, ``feature_grid``,
``max_size`` its ints). Reference twin: ``calexnet_fast.reference.grid_head_exit_reference`` (the folded grid head
in float32 + the exit rule); it is the op's CPU kernel and the fallback when Triton cannot run on a CUDA tensor.

What the kernel computes, in one pass over the feature map: the working map (the features average-pooled to
``min(H, S) x min(W, S)`` with ``F.adaptive_avg_pool2d``'s windows, any H and W: where the windows overlap,
their shared pixels are read twice, from cache), the projection + bias + ReLU per cell, the cosine to the
prototypes (a zero projection gives 0, never NaN), max and mean of the similarities per cell of the adaptive
``G x G`` grid and of the working map per cell of the adaptive ``F x F`` grid, the classifier, softmax, argmax
and the per-class threshold test. No shape falls back to the reference.

Numerics (as ``calexnet_fast.kernels.proto_head``): features are read in their own dtype (float16, bfloat16 or
float32) and averaged in float32. For 16-bit features the projection dot takes the working map and the
projection weight in the features' dtype (the working map rounded to it, as PyTorch's pooling in that dtype
does); the similarity dot takes u / ||u|| (in [0, 1]) and the gamma-scaled prototypes in float16, and each
classifier dot one pooled cell's vectors (scaled into [-1, 1]) and the classifier weight in float16. All dots
accumulate in float32; bias, ReLU, norms, pooling sums and maxima and the softmax are float32. For float32
features every dot is float32 and follows ``torch.get_float32_matmul_precision()`` ("highest", PyTorch's
default: IEEE fp32, else TF32). NaN propagates as in PyTorch, so a NaN feature never exits.

Layout: the kernel reads the features through their four strides, so contiguous NCHW, channels_last and any
other strided view are read in place, without a copy.
"""

from __future__ import annotations

import torch

from ..reference import grid_head_exit_reference
from ._triton import (
    channel_block,
    check_head_args,
    cuda_usable,
    dot_pad,
    dot_precision,
    head_exit_outputs,
    interpreting,
    launch_per_sample,
    require_kernel_device,
    warn_fallback_once,
)
from .proto_head import proto_head_operand_dtypes

# The grid kernel reads its operands in the dtypes the prototype kernel does (projection weight in the features'
# dtype, prototypes and classifier weight in float16 for 16-bit features, biases in float32).
grid_head_operand_dtypes = proto_head_operand_dtypes


def grid_head_launch_config(
    in_channels: int,
    working_cells: int,
    dim: int,
    n_prototypes: int,
    n_classes: int,
    dtype: torch.dtype,
) -> dict:
    """Block sizes and launch parameters of the fused grid kernel (a small deterministic rule, no autotuning).

    ``working_cells`` is ``min(H, S) * min(W, S)``, the cells of the working map (<= 64 for the default S = 8).

    Rule:
        grid = (N,): one program per sample; the working map of a chunk of channels, its pooling and the
        projection accumulator stay in registers, every feature element is read once (no workspace beyond the
        program's own logits row, no atomics).
        P_PAD (working cells, one per row) = next_pow2(cells), at least 16 (tl.dot's minimum M).
        BLOCK_C (channels per chunk) = next_pow2(C) clamped to [16, 64] (16-bit features) or [16, 32]
        (float32), halved until it divides C (only a C that is not a multiple of 16 needs channel masks) and
        until P_PAD * BLOCK_C <= 64 * 64 (the working-map chunk: 16 fp32 registers per thread at 4 warps).
        D_PAD, K_PAD = next_pow2 of D and K, at least 16.
        BLOCK_NC (classes per logits step) = next_pow2(n_classes) clamped to [16, 32].
        num_warps = 8 when P_PAD * BLOCK_C * max(1, BLOCK_NC / 16) >= 64 * 64 (the working-map chunk and the
        classifier tiles of a cell), else 4; num_stages = 2.

    Hopper (H100/H200, sm_90) choice and why, for the default head (D = 32, K = 32, G = 2, F = 4, S = 8) on the
    CIFAR ResNet-56 branch maps (16x32x32, 32x16x16, 64x8x8; 10 or 100 classes; bf16 features). No GPU was
    available when this was written: the choice rests on compiling for sm_90a with Triton 3.8 and reading
    ptxas' report (``python bench/grid_head.py --sass``, no GPU needed):
    - The per-sample input is small (8-32 KB in bf16) and the working map has <= 64 cells: a program's tiles
      are [64, BLOCK_C] (working map), [64, 32] (u) and [64, 32] (s); several programs share an SM and hide
      the load latency by occupancy (no software pipelining: the window loop is a handful of gathers per
      chunk). ptxas for sm_90a (Triton 3.8; ``bench/grid_head.py --sass``: 3 maps x 10 / 100 classes x
      bf16 / fp32 x NHWC / NCHW), no spill in any of the 24: bf16 channels_last 128 / 145 / 136 registers
      (16x32x32, 32x16x16 at 4 warps, 64x8x8 at 8 warps; 10 classes), 168 / 106 / 140 with 100 classes;
      NCHW needs more (162-250: the strided gathers' addresses), float32 128-248. Before the classifier tiles
      entered the warp rule, 4 warps spilled 4 bytes (32x16x16, 100 classes, bf16 NCHW) and 396-684 bytes
      (64x8x8, 100 classes, BLOCK_NC 32-64). 3-12 KB of shared memory (layout conversions of the dots'
      operands): occupancy is bounded by registers, 1-3 programs per SM quadrant.
    - In bf16 all three maps fit one channel chunk (BLOCK_C = C = 16 / 32 / 64): one read of the logits row, one
      barrier. ResNet-56 maps are multiples of the working size (windows 4x4, 2x2, 1x1), so no window
      overlaps.
    - Cost model: the pooling of the working map per cell of the F x F grid is 2 * F^2 * 64 * BLOCK_C masked
      reductions per chunk, more instructions than the projection (tensor cores) and than the feature loads
      (64 * kh * kw * BLOCK_C elements); at 10-100 classes the classifier columns of the pooled working map
      (n_classes * 2 C F^2 weights, L2-resident, read per sample) are the largest traffic. At the batch sizes
      of a cascade (N <= 256, a few MB of features) the kernel is latency-bound either way: one launch in
      place of the ~15 kernels of the folded head + exit decision is the gain. A multi-sample program (the
      classifier dot with real rows) is the next step if ``bench/grid_head.py --device cuda`` shows the
      classifier's L2 traffic to dominate.
    - ``python bench/grid_head.py --sass`` recompiles these configurations and prints the numbers above.
    These are reasoned first choices, not measured ones.
    """
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    p_pad = dot_pad(working_cells)
    block_c = channel_block(in_channels, 64 if sixteen_bit else 32)
    while block_c > 16 and p_pad * block_c > 64 * 64:
        block_c //= 2
    d_pad, k_pad = dot_pad(dim), dot_pad(n_prototypes)
    block_nc = min(32, dot_pad(n_classes))
    return {
        "P_PAD": p_pad,
        "BLOCK_C": block_c,
        "D_PAD": d_pad,
        "K_PAD": k_pad,
        "BLOCK_NC": block_nc,
        "num_warps": 8 if p_pad * block_c * max(1, block_nc // 16) >= 64 * 64 else 4,
        "num_stages": 2,
    }


def _check(
    features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid, max_size
):
    for name, v in (("grid", grid), ("feature_grid", feature_grid), ("max_size", max_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    width = lambda c, k, d: 2 * k * grid * grid + 2 * c * feature_grid * feature_grid  # noqa: E731
    check_head_args(
        features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, width,
        f"2 K G^2 + 2 C F^2 with G = {grid}, F = {feature_grid}",
    )  # fmt: skip


def _max_window(n_in: int, n_out: int) -> int:
    """The largest window of an adaptive pooling of ``n_in`` to ``n_out`` (PyTorch's windows)."""
    return max(((o + 1) * n_in + n_out - 1) // n_out - (o * n_in) // n_out for o in range(n_out))


def _kernel_arguments(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    grid: int,
    feature_grid: int,
    max_size: int,
    config: dict | None = None,
    dot_upcast: bool = False,
) -> tuple[tuple, dict, tuple[torch.Tensor, ...]]:
    """Outputs, positional arguments and keyword arguments (constexprs, launch options) of one launch.

    Device-agnostic (``bench/grid_head.py --sass`` uses it on CPU tensors to compile for a GPU target).
    ``config`` overrides entries of ``grid_head_launch_config``.
    """
    n, c, h, w = features.shape
    d, k, nc = proj_weight.shape[0], prototypes.shape[0], cls_weight.shape[0]
    hs, ws = min(h, max_size), min(w, max_size)
    outputs = head_exit_outputs(n, nc, features)
    x, dt = features, features.dtype
    operands = (proj_weight, proj_bias, prototypes, cls_weight, cls_bias)
    wq, bias, pq, cw, cb = (t.to(d).contiguous() for t, d in zip(operands, grid_head_operand_dtypes(dt), strict=True))
    thr = thresholds.to(torch.float32).contiguous()
    cfg = grid_head_launch_config(c, hs * ws, d, k, nc, dt)
    cfg.update(config or {})
    logits = outputs[0]
    args = (
        x, wq, bias, pq, cw, cb, thr, *outputs,
        c, h, w, hs, ws, _max_window(h, hs), _max_window(w, ws), d, k, nc, grid, feature_grid,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        wq.stride(0), wq.stride(1), pq.stride(0), pq.stride(1),
        cw.stride(0), cw.stride(1), logits.stride(0),
    )  # fmt: skip
    kwargs = dict(
        P_PAD=cfg["P_PAD"], BLOCK_C=cfg["BLOCK_C"], EVEN_C=c % cfg["BLOCK_C"] == 0,
        D_PAD=cfg["D_PAD"], K_PAD=cfg["K_PAD"], BLOCK_NC=cfg["BLOCK_NC"],
        DOT_UPCAST=dot_upcast, PREC=dot_precision(dt),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return args, kwargs, outputs


def _launch_grid_head_exit(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    grid: int = 2,
    feature_grid: int = 4,
    max_size: int = 8,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused Triton kernel directly (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    _check(*args, grid, feature_grid, max_size)
    require_kernel_device(features, "grid_head_exit")
    kargs, kwargs, outputs = _kernel_arguments(*args, grid, feature_grid, max_size, config, interpreting())
    return launch_per_sample("_grid_head_kernel", "grid_head_exit_kernel", features, kargs, kwargs, outputs)


@torch.library.custom_op("calexnet_fast::grid_head_exit", mutates_args=(), device_types="cuda")
def _grid_head_exit_op(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    grid: int,
    feature_grid: int,
    max_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid)
    ok, why = cuda_usable()
    if not ok:
        warn_fallback_once("grid_head_exit", why)
        return _grid_head_exit_cpu(*args, max_size)
    return _launch_grid_head_exit(*args, max_size)


@_grid_head_exit_op.register_kernel("cpu")
def _grid_head_exit_cpu(
    features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid, max_size
):
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid)
    _check(*args, max_size)  # the op called directly (torch.ops) checks its arguments like the wrapper
    return grid_head_exit_reference(*args, max_size)


@_grid_head_exit_op.register_fake
def _grid_head_exit_fake(
    features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid, max_size
):
    _check(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid, max_size)
    return head_exit_outputs(features.shape[0], cls_weight.shape[0], features)


def grid_head_exit(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    grid: int = 2,
    feature_grid: int = 4,
    max_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid branch head and its exit decision in one kernel on CUDA.

    Args:
        features: [N, C, H, W] branch-point feature map, float16/bfloat16/float32, any strides.
        proj_weight, proj_bias, prototypes, cls_weight, cls_bias: the folded grid head's buffers ([D, C], [D],
            [K, D], [n_classes, 2 K G^2 + 2 C F^2], [n_classes]) on the features' device; on CUDA best cast once
            per head to ``grid_head_operand_dtypes(features.dtype)`` (the values the kernel reads).
        thresholds: [n_classes] per-class thresholds on the same device; ``+inf`` means never exit.
        grid, feature_grid, max_size: the head's G, F and S (``FoldedGridPrototypeHead``'s ints).

    Returns:
        logits: [N, n_classes] float32.
        exit: [N] bool, ``conf >= thresholds[pred]`` (NaN never exits).
        pred: [N] int64 argmax of the logits (first maximum on ties).
        conf: [N] float32 maximum softmax probability.

    CPU tensors use ``calexnet_fast.reference.grid_head_exit_reference`` (the folded grid head in float32 + the
    exit rule).
    """
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, grid, feature_grid)
    _check(*args, max_size)
    if features.is_cuda and not torch.compiler.is_compiling() and cuda_usable()[0]:
        return _launch_grid_head_exit(*args, max_size)  # the op's CUDA kernel, minus the dispatcher's overhead
    return torch.ops.calexnet_fast.grid_head_exit(*args, max_size)
