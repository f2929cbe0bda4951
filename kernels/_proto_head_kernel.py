"""Triton kernel of the fused prototype-pooling head + exit decision.

Imported lazily (see ``_triton.kernel_module``): importing this module imports ``triton``.
"""

import triton
import triton.language as tl

from ._exit_decision_kernel import softmax_argmax_finish, softmax_argmax_update


@triton.jit
def _project_tile(
    x_base,
    w_ptr,
    offs_p,
    pmask,
    offs_d,
    dmask,
    c0,
    C,
    stride_xc,
    stride_xp,
    stride_wd,
    stride_wc,
    u,
    BLOCK_C: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """u += x[pixels, c0:c0+BLOCK_C] @ W[:, c0:c0+BLOCK_C]^T (fp32 accumulation)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x = tl.load(
        x_base + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
        mask=pmask[:, None] & cmask[None, :],
        other=0.0,
    )
    wt = tl.load(
        w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd,
        mask=cmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if DOT_UPCAST:
        # The interpreter's bf16 dot is wrong; fp32 operands hold the same (already rounded) values.
        x = x.to(tl.float32)
        wt = wt.to(tl.float32)
    return tl.dot(x, wt, u, input_precision=PREC)


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

    run_max = tl.full([K_PAD], float("-inf"), tl.float32)
    run_sum_s = tl.zeros([K_PAD], tl.float32)
    run_sum_u = tl.zeros([D_PAD], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < HW
        u = tl.zeros([BLOCK_P, D_PAD], tl.float32)
        if C_STATIC:
            # Unrolled, so the pixel loop is the innermost loop and the compiler pipelines its loads.
            for ci in tl.static_range(NUM_C_CHUNKS):
                u = _project_tile(
                    x_base, w_ptr, offs_p, pmask, offs_d, dmask, ci * BLOCK_C, C,
                    stride_xc, stride_xp, stride_wd, stride_wc, u, BLOCK_C, DOT_UPCAST, PREC,
                )  # fmt: skip
        else:
            for c0 in range(0, C, BLOCK_C):
                u = _project_tile(
                    x_base, w_ptr, offs_p, pmask, offs_d, dmask, c0, C,
                    stride_xc, stride_xp, stride_wd, stride_wc, u, BLOCK_C, DOT_UPCAST, PREC,
                )  # fmt: skip
        u = tl.maximum(u + bias[None, :], 0.0)
        u = tl.where(pmask[:, None], u, 0.0)  # padded pixels would otherwise carry relu(bias)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), 1e-8)
        uq = u.to(p_ptr.dtype.element_ty)
        if DOT_UPCAST:
            uq = uq.to(tl.float32)
        s = tl.dot(uq, pt, input_precision=PREC) * inv_norm[:, None]  # [BLOCK_P, K_PAD]
        run_sum_u += tl.sum(u, axis=0)
        run_sum_s += tl.sum(s, axis=0)
        run_max = tl.maximum(run_max, tl.max(tl.where(pmask[:, None], s, float("-inf")), axis=0))
    mean_s = run_sum_s * inv_hw
    avg_u = run_sum_u * inv_hw
    run_max = tl.where(kmask, run_max, 0.0)

    # Epilogue: logits in chunks of classes, folded into an online softmax / argmax.
    m = tl.full([1], float("-inf"), tl.float32)
    ssum = tl.zeros([1], tl.float32)
    idx = tl.zeros([1], tl.int32)
    nan_idx = tl.zeros([1], tl.int32) + NC
    for c0 in range(0, NC, BLOCK_NC):
        cls = c0 + tl.arange(0, BLOCK_NC)
        clsmask = cls < NC
        wrow = cw_ptr + cls[:, None].to(tl.int64) * stride_cwn
        kk = clsmask[:, None] & kmask[None, :]
        w_max = tl.load(wrow + offs_k[None, :] * stride_cwf, mask=kk, other=0.0).to(tl.float32)
        w_mean = tl.load(wrow + (K + offs_k[None, :]) * stride_cwf, mask=kk, other=0.0).to(tl.float32)
        w_avg = tl.load(
            wrow + (2 * K + offs_d[None, :]) * stride_cwf, mask=clsmask[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        z = tl.sum(w_max * run_max[None, :], axis=1)
        z += tl.sum(w_mean * mean_s[None, :], axis=1)
        z += tl.sum(w_avg * avg_u[None, :], axis=1)
        z += tl.load(cb_ptr + cls, mask=clsmask, other=0.0).to(tl.float32)
        tl.store(logits_ptr + n.to(tl.int64) * stride_ln + cls, z, mask=clsmask)
        m, ssum, idx, nan_idx = softmax_argmax_update(
            z[None, :], clsmask[None, :], c0, m, ssum, idx, nan_idx, BLOCK_NC
        )
    pred, conf = softmax_argmax_finish(m, ssum, idx, nan_idx, NC)
    thr = tl.load(thr_ptr + pred)
    one = tl.arange(0, 1)
    tl.store(exit_ptr + n + one, conf >= thr)
    tl.store(pred_ptr + n + one, pred.to(tl.int64))
    tl.store(conf_ptr + n + one, conf)
