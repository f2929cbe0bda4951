"""Fused prototype-pooling head + exit decision (docs/design.md §1 steps 1-5, softmax, argmax, threshold test).

Public: ``proto_head_exit(features [N, C, H, W], proj_weight, proj_bias, prototypes, cls_weight, cls_bias,
thresholds [n_classes]) -> (logits float32 [N, n_classes], exit bool [N], pred int64 [N], conf float32 [N])``,
also ``torch.ops.calexnet_fast.proto_head_exit``; the head's tensors are a folded prototype head's buffers
(``calexnet_fast.heads.FoldedPrototypeHead.operands()``). Reference twin:
``calexnet_fast.reference.proto_head_exit_reference`` (the folded head in float32 + the exit rule); it is the
op's CPU kernel and the fallback when Triton cannot run on a CUDA tensor.

Numerics: features are read in their own dtype (float16, bfloat16 or float32). For 16-bit features the
projection dot takes the features and the projection weight in that dtype (the weight rounded to it, as
tensor cores need); the similarity dot takes u / ||u|| (in [0, 1]) and the gamma-scaled prototypes in float16,
and the classifier dot the pooled features (scaled into [-1, 1]) and its weight in float16; float16 keeps
3 more mantissa bits than bfloat16 and the scaling rules out overflow. All dots accumulate in float32; bias,
ReLU, norms, pooling sums and maxima and the softmax are float32. The result is more accurate than PyTorch
computing the head in the features' dtype (tests/test_proto_head.py checks it against fp64). For float32
features every dot is float32 and follows ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's
default) -> IEEE fp32, else TF32. NaN propagates as in PyTorch, so a NaN feature never exits.

Layout: the kernel reads any layout whose H and W dims flatten to one pixel stride, which covers both
contiguous NCHW and channels_last (NHWC) without a copy; any other strides are made contiguous first.
"""

from __future__ import annotations

import torch

from ..reference import proto_head_exit_reference
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


def proto_head_launch_config(
    in_channels: int, hw: int, dim: int, n_prototypes: int, n_classes: int, dtype: torch.dtype
) -> dict:
    """Block sizes and launch parameters of the fused kernel (a small deterministic rule, no autotuning).

    Rule:
        grid = (N,): one program per sample, so the pooling reductions over H*W stay on chip and every feature
        element is read exactly once (no second pass, no atomics, no workspace).
        BLOCK_C (channels per dot step): next_pow2(C) clamped to [16, 64] (16-bit features) or [16, 32]
        (float32), then halved (down to 16) until it divides C, so that only a C that is not a multiple of 16
        needs masked channel loads (EVEN_C false).
        16-bit features: the channel loop is unrolled (C_STATIC) when it has <= 2 steps and EVEN_C, then
        BLOCK_P (pixels per tile) <= 128; otherwise a runtime channel loop and BLOCK_P <= 64. num_stages = 3.
        float32 features: runtime channel loop, BLOCK_P <= 64 (<= 32 if not EVEN_C), num_stages = 2.
        D_PAD, K_PAD = next_pow2 of D and K, at least 16 (tl.dot's minimum). Wide heads (D_PAD > 128 or
        K_PAD > 32: larger per-pixel accumulators): runtime channel loop and BLOCK_P <= 32.
        BLOCK_P = next_pow2(H*W) clamped to [16, that cap] and BLOCK_P * D_PAD <= 128 * 128.
        BLOCK_NC (classes per epilogue step) = next_pow2(n_classes) clamped to [16, 128], and the classifier
        tile BLOCK_NC * (D_PAD + 2 * K_PAD) <= 128 * 192 elements (64 * 192 for float32 weights).
        num_warps = 8 when BLOCK_P * D_PAD >= 32 * 128, else 4.

    Hopper (H100/H200) choice and why (D = 128, K = 32, bf16/fp16 features, ResNet layer1/layer2 maps).
    No GPU was available when this was written, so the choice rests on compiling the kernel for sm_90a with
    Triton 3.8 and reading ptxas' report and the SASS (``python bench/proto_head.py --sass``, no GPU needed):
    - C <= 128 (ResNet18 layer1/2): BLOCK_P = 128, 8 warps = two warpgroups, each a wgmma tile of M = 64
      pixels by N = D = 128, BLOCK_C = 64 16-bit channels = one 128-byte row (a full swizzled shared-memory
      line; for channels_last one coalesced 128-byte segment per pixel). 254-255 registers, no spill,
      96-136 KB shared memory, cp.async pipelining over the pixel tiles, ~33 warp-instructions per pixel in
      the hot loop.
    - C >= 256 (ResNet50 layer1/2): the unrolled channel loop would need 270-530 KB of shared memory for its
      pipeline buffers (over Hopper's 227 KB) and BLOCK_P = 128 with a runtime channel loop spills, so
      BLOCK_P = 64 with 8 warps and a runtime channel loop: 217-227 registers, no spill, ~102 KB.
    - One program per SM (>= 220 registers x 256 threads): load latency is hidden by 3 cp.async stages
      (~48 KB of feature tiles in flight per SM, above the ~30 KB Little's law asks at ~4.8 TB/s and ~0.8 us
      over 132 SMs), not by occupancy. With N >= 256 there are ~2 waves.
    - Issue budget: a Hopper SM issues ~4 warp-instructions per clock (~7.9 G/s) and gets ~36 GB/s of an
      H200's bandwidth, so the hot loop keeps up with memory below ~0.22 warp-instructions per feature byte:
      ~0.26 at C = 64 (issue-bound by ~15 % there; normalising u before the float16 rounding costs ~10 % of
      that and buys the accuracy above), 0.13-0.18 at C >= 128. The per-pixel accumulators (sums and max
      kept per pixel slot, reduced once after the loop) are what make this possible: reducing over pixels
      inside the loop tripled the hot loop (~1180 instead of ~475 instructions per 128-pixel tile). The
      classifier epilogue costs ~27 warp-instructions per class and sample (+~30 % at C = 64 with 1000
      classes, negligible with 10-100).
    - Tensor cores in the input dtype for both dots: at (C + K) * D * 2 / (2 C) flops per byte (~190 at
      C = 64) the kernel is near Hopper's fp16 ridge (~200 on an H200); fp32 FMA dots would be compute-bound.
    - float32 features run the dots on FMA units (IEEE) and are a correctness path, not a fast one.
    - No spill in any configuration the tests or benchmarks compile, nor for D = 256 or K = 128 / 256 (ptxas
      for sm_90a with Triton 3.6, the GPU machine's, and 3.8, each configuration compiled as
      ``bench/proto_head.py --sass`` does). The earlier rule spilled 8-816 bytes where C
      is not a multiple of BLOCK_C (the 2-D channel masks; worst at C = 40, 14x14, BLOCK_C = 64,
      BLOCK_P = 128) and 2-2.7 KB for D = 256 or K = 128 with BLOCK_P = 64: hence the BLOCK_C that divides C,
      the runtime channel loop and smaller tiles for masked channels and wide heads, 8 warps down to
      BLOCK_P = 32 (4 warps spill there) and the classifier-tile bound (float32 weights at BLOCK_NC = 128
      spilled ~400 bytes; K = 256 needed 340 KB of shared memory). Still spilling: D >= 512 (~0.6 KB at
      BLOCK_P = 32), no default or tested head; its cost is local-memory traffic, not wrong results.
    These are reasoned first choices, not measured ones; ``python bench/proto_head.py --sweep`` on a GPU times the
    neighbouring configurations.
    """
    d_pad = dot_pad(dim)
    k_pad = dot_pad(n_prototypes)
    wide = d_pad > 128 or k_pad > 32
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    block_c = channel_block(in_channels, 64 if sixteen_bit else 32)
    even_c = in_channels % block_c == 0
    if sixteen_bit:
        c_static = even_c and not wide and -(-in_channels // block_c) <= 2
        p_cap, num_stages = (128 if c_static else 64), 3
    else:  # float32: the dots run on FMA units (IEEE) or TF32
        c_static = False
        p_cap, num_stages = (64 if even_c else 32), 2
    if wide:
        p_cap = 32
    block_p = min(p_cap, dot_pad(hw), max(16, (128 * 128) // d_pad))
    tile = (128 if sixteen_bit else 64) * 192 // (d_pad + 2 * k_pad)  # classifier tile budget, in classes
    nc_cap = max(16, min(128, 1 << (tile.bit_length() - 1)))
    return {
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
        "NUM_C_CHUNKS": -(-in_channels // block_c),
        "C_STATIC": c_static,
        "D_PAD": d_pad,
        "K_PAD": k_pad,
        "BLOCK_NC": min(dot_pad(n_classes), nc_cap),
        "num_warps": 8 if block_p * d_pad >= 32 * 128 else 4,
        "num_stages": num_stages,
    }


def _check(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
) -> None:
    check_head_args(
        features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, lambda c, k, d: 2 * k + d,
        "2K + D",
    )  # fmt: skip


def _pixel_stride(x: torch.Tensor) -> int | None:
    """Stride of the flattened pixel index h * W + w, or None when H and W do not flatten (needs a copy)."""
    _, _, h, w = x.shape
    if w == 1:
        return x.stride(2)
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(3)
    return None


def proto_head_operand_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes the kernel reads ``(proj_weight, proj_bias, prototypes, cls_weight, cls_bias)`` in, for
    features of ``dtype``: the projection weight in the features' dtype; the prototypes and the classifier
    weight (operands of the similarity and classifier dots) in float16 for 16-bit features (the kernel scales
    their activations into [-1, 1]; the weights are gamma-scaled unit prototypes and classifier weights, far
    below float16's 65504), float32 otherwise; the biases in float32.

    ``FoldedPrototypeHead.operands(proto_head_operand_dtypes(features.dtype))`` gives them cast once per head.
    """
    sim = torch.float32 if dtype == torch.float32 else torch.float16
    return (dtype, torch.float32, sim, sim, torch.float32)


def _kernel_arguments(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    config: dict | None = None,
    dot_upcast: bool = False,
) -> tuple[tuple, dict, tuple[torch.Tensor, ...]]:
    """Outputs, positional arguments and keyword arguments (constexprs, launch options) of one launch.

    Device-agnostic (``bench/proto_head.py --sass`` uses it on CPU tensors to compile for a GPU target).
    ``config`` overrides entries of ``proto_head_launch_config`` (benchmark sweeps only).
    """
    n, c, h, w = features.shape
    d, k, nc = proj_weight.shape[0], prototypes.shape[0], cls_weight.shape[0]
    outputs = head_exit_outputs(n, nc, features)
    x = features
    sp = _pixel_stride(x)
    if sp is None:
        x = x.contiguous()
        sp = _pixel_stride(x)
    dt = x.dtype
    # Dot operands as the module docstring says (projection in the features' dtype, the other dots in float16
    # for 16-bit features); bias, classifier bias and thresholds in float32. No-ops for operands already cast.
    operands = (proj_weight, proj_bias, prototypes, cls_weight, cls_bias)
    wq, bias, pq, cw, cb = (t.to(d).contiguous() for t, d in zip(operands, proto_head_operand_dtypes(dt), strict=True))
    thr = thresholds.to(torch.float32).contiguous()
    cfg = proto_head_launch_config(c, h * w, d, k, nc, dt)
    if config:
        cfg.update(config)
        cfg["NUM_C_CHUNKS"] = -(-c // cfg["BLOCK_C"])
    logits = outputs[0]
    args = (
        x, wq, bias, pq, cw, cb, thr, *outputs,
        c, h * w, d, k, nc, 1.0 / (h * w),
        x.stride(0), x.stride(1), sp,
        wq.stride(0), wq.stride(1), pq.stride(0), pq.stride(1),
        cw.stride(0), cw.stride(1), logits.stride(0),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], NUM_C_CHUNKS=cfg["NUM_C_CHUNKS"],
        C_STATIC=cfg["C_STATIC"], EVEN_C=c % cfg["BLOCK_C"] == 0,
        D_PAD=cfg["D_PAD"], K_PAD=cfg["K_PAD"], BLOCK_NC=cfg["BLOCK_NC"],
        DOT_UPCAST=dot_upcast, PREC=dot_precision(dt),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return args, kwargs, outputs


def _launch_proto_head_exit(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused Triton kernel directly (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``config`` overrides entries of ``proto_head_launch_config`` (for ``bench/proto_head.py --sweep`` only).
    """
    _check(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    require_kernel_device(features, "proto_head_exit")
    args, kwargs, outputs = _kernel_arguments(
        features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds, config, interpreting()
    )
    return launch_per_sample("_proto_head_kernel", "proto_head_exit_kernel", features, args, kwargs, outputs)


@torch.library.custom_op("calexnet_fast::proto_head_exit", mutates_args=(), device_types="cuda")
def _proto_head_exit_op(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ok, why = cuda_usable()
    if not ok:
        warn_fallback_once("proto_head_exit", why)
        return _proto_head_exit_cpu(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    return _launch_proto_head_exit(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)


@_proto_head_exit_op.register_kernel("cpu")
def _proto_head_exit_cpu(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds):
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    _check(*args)  # the op called directly (torch.ops) checks its arguments like the wrapper
    return proto_head_exit_reference(*args)


@_proto_head_exit_op.register_fake
def _proto_head_exit_fake(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds):
    _check(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    return head_exit_outputs(features.shape[0], cls_weight.shape[0], features)


def proto_head_exit(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The branch head and its exit decision in one kernel on CUDA.

    Args:
        features: [N, C, H, W] branch-point feature map, float16/bfloat16/float32, contiguous or
            channels_last (other strides are copied to contiguous first).
        proj_weight, proj_bias, prototypes, cls_weight, cls_bias: the folded head's buffers ([D, C], [D],
            [K, D], [n_classes, 2K + D], [n_classes]) on the features' device:
            ``FoldedPrototypeHead.operands()``, or on CUDA ``operands(proto_head_operand_dtypes(features.dtype))``
            (the same values the kernel reads, cast once per head instead of on every call).
        thresholds: [n_classes] per-class thresholds on the same device; ``+inf`` means never exit.

    Returns:
        logits: [N, n_classes] float32.
        exit: [N] bool, ``conf >= thresholds[pred]`` (NaN never exits).
        pred: [N] int64 argmax of the logits (first maximum on ties).
        conf: [N] float32 maximum softmax probability.

    CPU tensors use ``calexnet_fast.reference.proto_head_exit_reference`` (the folded head in float32 + the
    exit rule).
    """
    args = (features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, thresholds)
    _check(*args)
    if features.is_cuda and not torch.compiler.is_compiling() and cuda_usable()[0]:
        return _launch_proto_head_exit(*args)  # what the op's CUDA kernel runs, minus the dispatcher's overhead
    return torch.ops.calexnet_fast.proto_head_exit(*args)
