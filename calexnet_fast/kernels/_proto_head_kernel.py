"""Triton kernel of the fused prototype-pooling head + exit decision.

Imported lazily (see ``_triton.kernel_module``): importing this module imports ``triton``.
"""

import triton
import triton.language as tl

from ._exit_decision_kernel import softmax_slots_finish, softmax_slots_update


@triton.jit
def _project_chunk(
    x_base, w_ptr, offs_p, pmask, offs_d, dmask, c0, C, stride_xc, stride_xp, stride_wd, stride_wc, u,
    BLOCK_C: tl.constexpr, MASK_P: tl.constexpr, EVEN_C: tl.constexpr, DOT_UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """u += x[pixels, c0:c0+BLOCK_C] @ W[:, c0:c0+BLOCK_C]^T (fp32 accumulation)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    x_ptrs = x_base + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc
    w_ptrs = w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd
    if EVEN_C:
        if MASK_P:
            x = tl.load(x_ptrs, mask=pmask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs)  # full tiles: no predicates on the hot loads
        wt = tl.load(w_ptrs, mask=dmask[None, :], other=0.0)
    else:
        cmask = offs_c < C
        x = tl.load(x_ptrs, mask=pmask[:, None] & cmask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=cmask[:, None] & dmask[None, :], other=0.0)
    if DOT_UPCAST:
        # The interpreter's bf16 dot is wrong; fp32 operands hold the same (already rounded) values.
        x = x.to(tl.float32)
        wt = wt.to(tl.float32)
    return tl.dot(x, wt, u, input_precision=PREC)


@triton.jit
def _pixel_tile(
    x_base, w_ptr, p0, HW, C, offs_d, dmask, bias, pt, acc_u, acc_s, acc_max,
    stride_xc, stride_xp, stride_wd, stride_wc,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr, C_STATIC: tl.constexpr,
    EVEN_C: tl.constexpr, MASK_P: tl.constexpr, DOT_UPCAST: tl.constexpr, PREC: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):  # fmt: skip
    """Fold pixels p0 .. p0 + BLOCK_P - 1 into the per-row accumulators (sum u, sum s, max s).

    The accumulators keep one row per pixel slot ([BLOCK_P, D] and [BLOCK_P, K]) so that the hot loop has no
    cross-thread reductions; they are reduced over the pixel slots once, after the loop."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    pmask = offs_p < HW
    # The bias initialises the accumulator.
    u = tl.zeros([BLOCK_P, bias.shape[0]], tl.float32) + bias[None, :]
    if C_STATIC:
        # Unrolled, so the pixel loop is the innermost loop and the compiler pipelines its loads.
        for ci in tl.static_range(NUM_C_CHUNKS):
            u = _project_chunk(
                x_base, w_ptr, offs_p, pmask, offs_d, dmask, ci * BLOCK_C, C, stride_xc, stride_xp,
                stride_wd, stride_wc, u, BLOCK_C, MASK_P, EVEN_C, DOT_UPCAST, PREC,
            )  # fmt: skip
    else:
        for c0 in range(0, C, BLOCK_C):
            u = _project_chunk(
                x_base, w_ptr, offs_p, pmask, offs_d, dmask, c0, C, stride_xc, stride_xp,
                stride_wd, stride_wc, u, BLOCK_C, MASK_P, EVEN_C, DOT_UPCAST, PREC,
            )  # fmt: skip
    # NaN must propagate as in torch (relu, norm and amax keep NaN), so that a NaN feature never exits.
    u = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if MASK_P:
        u = tl.where(pmask[:, None], u, 0.0)  # padded pixels would otherwise carry relu(bias)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), 1e-8, propagate_nan=tl.PropagateNan.ALL)
    # Normalise before rounding: entries of u / ||u|| lie in [0, 1], so the similarity dot can take them in
    # float16 (2^-11 relative rounding) even for bfloat16 features, without any risk of overflow.
    un = (u * inv_norm[:, None]).to(SIM_DTYPE)
    if DOT_UPCAST:
        un = un.to(tl.float32)
    s = tl.dot(un, pt, input_precision=PREC)  # [BLOCK_P, K_PAD]; 0 on padded pixels
    acc_u += u
    acc_s += s
    if MASK_P:
        s = tl.where(pmask[:, None], s, float("-inf"))
    acc_max = tl.maximum(acc_max, s, propagate_nan=tl.PropagateNan.ALL)
    return acc_u, acc_s, acc_max


@triton.jit
def proto_head_exit_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    p_ptr,
    cw_ptr,
    cb_ptr,
    thr_ptr,
    logits_ptr,
    exit_ptr,
    pred_ptr,
    conf_ptr,
    C,
    HW,
    D,
    K,
    NC,
    inv_hw,
    stride_xn,
    stride_xc,
    stride_xp,
    stride_wd,
    stride_wc,
    stride_pk,
    stride_pd,
    stride_cwn,
    stride_cwf,
    stride_ln,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_C_CHUNKS: tl.constexpr,
    C_STATIC: tl.constexpr,
    EVEN_C: tl.constexpr,
    D_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per sample: stream its H*W pixels in tiles of BLOCK_P, project (tl.dot over C), ReLU,
    cosine similarity to the prototypes (tl.dot over D), running max / sum of s and sum of u in registers;
    then the classifier, softmax, argmax and threshold test. Only logits, exit, pred, conf are written."""
    n = tl.program_id(0)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    bias = tl.load(b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    pt = tl.load(
        p_ptr + offs_d[:, None] * stride_pd + offs_k[None, :] * stride_pk,
        mask=dmask[:, None] & kmask[None, :],
        other=0.0,
    )  # [D_PAD, K_PAD], dot dtype; padded prototypes are 0 and never reach the logits
    if DOT_UPCAST:
        pt = pt.to(tl.float32)

    acc_u = tl.zeros([BLOCK_P, D_PAD], tl.float32)
    acc_s = tl.zeros([BLOCK_P, K_PAD], tl.float32)
    acc_max = tl.full([BLOCK_P, K_PAD], float("-inf"), tl.float32)
    n_full = HW // BLOCK_P
    for t in range(0, n_full):
        acc_u, acc_s, acc_max = _pixel_tile(
            x_base, w_ptr, t * BLOCK_P, HW, C, offs_d, dmask, bias, pt, acc_u, acc_s, acc_max,
            stride_xc, stride_xp, stride_wd, stride_wc,
            BLOCK_P, BLOCK_C, NUM_C_CHUNKS, C_STATIC, EVEN_C, False, DOT_UPCAST, PREC, p_ptr.dtype.element_ty,
        )  # fmt: skip
    if n_full * BLOCK_P < HW:
        acc_u, acc_s, acc_max = _pixel_tile(
            x_base, w_ptr, n_full * BLOCK_P, HW, C, offs_d, dmask, bias, pt, acc_u, acc_s, acc_max,
            stride_xc, stride_xp, stride_wd, stride_wc,
            BLOCK_P, BLOCK_C, NUM_C_CHUNKS, C_STATIC, EVEN_C, True, DOT_UPCAST, PREC, p_ptr.dtype.element_ty,
        )  # fmt: skip
    run_sum_u = tl.sum(acc_u, axis=0)
    run_sum_s = tl.sum(acc_s, axis=0)
    run_max = tl.max(acc_max, axis=0)
    mean_s = run_sum_s * inv_hw
    avg_u = run_sum_u * inv_hw
    run_max = tl.where(kmask, run_max, 0.0)  # padded prototypes (their weights are 0 too)

    # Epilogue: logits in chunks of classes, folded into an online softmax / argmax. The classifier is a
    # GEMV per sample; it runs as tl.dot with the feature vector in row 0 of a 16-row operand (the minimum
    # M), so a 1000-class classifier costs a few tensor-core steps instead of thousands of FMAs and shuffles
    # per sample. For 16-bit features its operands are float16; the two feature groups are divided by their
    # largest magnitude first (so they lie in [-1, 1]: no overflow) and the partial logits multiplied back.
    wdt = cw_ptr.dtype.element_ty
    row0 = (tl.arange(0, 16) == 0)[:, None]
    scale_s = tl.maximum(tl.max(tl.maximum(tl.abs(run_max), tl.abs(mean_s)), axis=0), 1e-30)
    scale_u = tl.maximum(tl.max(avg_u, axis=0), 1e-30)  # avg_u >= 0
    f_max = tl.where(row0, run_max[None, :] / scale_s, 0.0).to(wdt)  # [16, K_PAD]
    f_mean = tl.where(row0, mean_s[None, :] / scale_s, 0.0).to(wdt)
    f_avg = tl.where(row0, avg_u[None, :] / scale_u, 0.0).to(wdt)  # [16, D_PAD]
    if DOT_UPCAST:
        f_max = f_max.to(tl.float32)
        f_mean = f_mean.to(tl.float32)
        f_avg = f_avg.to(tl.float32)
    # Online softmax / argmax state per class slot (no cross-thread reduction until the end).
    m = tl.full([1, BLOCK_NC], float("-inf"), tl.float32)
    ssum = tl.zeros([1, BLOCK_NC], tl.float32)
    idx = tl.zeros([1, BLOCK_NC], tl.int32)
    nan_idx = tl.zeros([1, BLOCK_NC], tl.int32) + NC
    for c0 in range(0, NC, BLOCK_NC):
        cls = c0 + tl.arange(0, BLOCK_NC)
        clsmask = cls < NC
        wcol = cw_ptr + cls[None, :].to(tl.int64) * stride_cwn  # transposed view: [features, classes]
        kk = kmask[:, None] & clsmask[None, :]
        w_max = tl.load(wcol + offs_k[:, None] * stride_cwf, mask=kk, other=0.0)
        w_mean = tl.load(wcol + (K + offs_k[:, None]) * stride_cwf, mask=kk, other=0.0)
        w_avg = tl.load(
            wcol + (2 * K + offs_d[:, None]) * stride_cwf, mask=dmask[:, None] & clsmask[None, :], other=0.0
        )
        if DOT_UPCAST:
            w_max = w_max.to(tl.float32)
            w_mean = w_mean.to(tl.float32)
            w_avg = w_avg.to(tl.float32)
        z_s = tl.dot(f_max, w_max, input_precision=PREC)
        z_s = tl.dot(f_mean, w_mean, z_s, input_precision=PREC)
        z_u = tl.dot(f_avg, w_avg, input_precision=PREC)  # [16, BLOCK_NC], rows 1..15 are 0
        z = tl.sum(z_s * scale_s + z_u * scale_u, axis=0)
        z += tl.load(cb_ptr + cls, mask=clsmask, other=0.0).to(tl.float32)
        tl.store(logits_ptr + n.to(tl.int64) * stride_ln + cls, z, mask=clsmask)
        m, ssum, idx, nan_idx = softmax_slots_update(z[None, :], clsmask[None, :], cls[None, :], m, ssum, idx, nan_idx)
    pred, conf = softmax_slots_finish(m, ssum, idx, nan_idx, NC)
    thr = tl.load(thr_ptr + pred)
    one = tl.arange(0, 1)
    tl.store(exit_ptr + n + one, conf >= thr)
    tl.store(pred_ptr + n + one, pred.to(tl.int64))
    tl.store(conf_ptr + n + one, conf)
