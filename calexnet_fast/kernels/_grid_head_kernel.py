"""Triton kernel of the fused grid prototype-pooling head + exit decision.

Imported lazily (see ``_triton.kernel_module``): importing this module imports ``triton``.
"""

import triton
import triton.language as tl

from ._exit_decision_kernel import softmax_slots_finish, softmax_slots_update


@triton.jit
def _window(o, n_in, n_out):
    """[start, end) of output cell ``o`` of an adaptive pooling of ``n_in`` to ``n_out`` (PyTorch's rule)."""
    return (o * n_in) // n_out, ((o + 1) * n_in + n_out - 1) // n_out


@triton.jit
def _cell_pool(v, cell, n_grid, ci, cj, cmask, HS, WS):
    """Max and mean of the rows of ``v`` [P_PAD, B] (one row per working-map cell ``(ci, cj)``, valid where
    ``cmask``) over cell ``cell`` of an adaptive ``n_grid x n_grid`` grid of the HS x WS working map."""
    r0, r1 = _window(cell // n_grid, HS, n_grid)
    q0, q1 = _window(cell % n_grid, WS, n_grid)
    m = (cmask & (ci >= r0) & (ci < r1) & (cj >= q0) & (cj < q1))[:, None]
    vmax = tl.max(tl.where(m, v, float("-inf")), axis=0)
    vmean = tl.sum(tl.where(m, v, 0.0), axis=0) * (1.0 / ((r1 - r0) * (q1 - q0)))
    return vmax, vmean


@triton.jit
def _cell_logits(
    vmax, vmean, vmask, w_ptrs_max, w_ptrs_mean, wmask, z, DOT_UPCAST: tl.constexpr, PREC: tl.constexpr
):  # fmt: skip
    """``z`` [BLOCK_NC] += the classifier's columns of one pooled cell: ``W_max^T vmax + W_mean^T vmean``.

    A GEMV run as tl.dot with the feature vector in row 0 of a 16-row operand (tl.dot's minimum M). For
    float16 weights (16-bit features) the two vectors are divided by their largest magnitude first (they then
    lie in [-1, 1]: no overflow, float16's 11 bits) and the partial logits multiplied back."""
    wdt = w_ptrs_max.dtype.element_ty
    vmax = tl.where(vmask, vmax, 0.0)
    vmean = tl.where(vmask, vmean, 0.0)
    scale = tl.maximum(tl.max(tl.maximum(tl.abs(vmax), tl.abs(vmean)), axis=0), 1e-30)
    row0 = (tl.arange(0, 16) == 0)[:, None]
    f_max = tl.where(row0, vmax[None, :] / scale, 0.0).to(wdt)
    f_mean = tl.where(row0, vmean[None, :] / scale, 0.0).to(wdt)
    w_max = tl.load(w_ptrs_max, mask=wmask, other=0.0)
    w_mean = tl.load(w_ptrs_mean, mask=wmask, other=0.0)
    if DOT_UPCAST:
        # The interpreter's bf16 dot is wrong; fp32 operands hold the same (already rounded) values.
        f_max, f_mean = f_max.to(tl.float32), f_mean.to(tl.float32)
        w_max, w_mean = w_max.to(tl.float32), w_mean.to(tl.float32)
    part = tl.dot(f_max, w_max, input_precision=PREC)
    part = tl.dot(f_mean, w_mean, part, input_precision=PREC)  # [16, BLOCK_NC], rows 1..15 are 0
    return z + tl.sum(part, axis=0) * scale


@triton.jit
def grid_head_exit_kernel(
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
    H,
    W,
    HS,
    WS,
    KH,
    KW,
    D,
    K,
    NC,
    G,
    FG,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wd,
    stride_wc,
    stride_pk,
    stride_pd,
    stride_cwn,
    stride_cwf,
    stride_ln,
    P_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,
    D_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per sample. Per chunk of BLOCK_C channels: average the feature map into the HS x WS working
    map (adaptive windows of at most KH x KW pixels, one row per cell, in registers), project it (tl.dot over
    the channels into u [P_PAD, D_PAD]), and add the classifier's share of the chunk's F x F max / mean pooled
    working map to the sample's logits row. Then bias, ReLU, cosine to the prototypes, the G x G max / mean
    pooled similarities' share of the logits, softmax, argmax and the threshold test.

    The logits row (the program's own) accumulates the per-chunk partial logits: it starts as the classifier
    bias, each chunk reads it back (``.cg``: from L2, past L1) after a CTA barrier that orders the previous
    chunk's stores (a block's global writes are visible to its threads after ``bar.sync``)."""
    n = tl.program_id(0)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    row = logits_ptr + n.to(tl.int64) * stride_ln
    # working-map cells, one per row: p = ci * WS + cj, with their adaptive windows of feature pixels
    p = tl.arange(0, P_PAD)
    cmask = p < HS * WS
    ci = p // WS
    cj = p % WS
    h0, h1 = _window(ci, H, HS)
    w0, w1 = _window(cj, W, WS)
    inv_area = 1.0 / ((h1 - h0) * (w1 - w0)).to(tl.float32)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    gg = G * G
    ff = FG * FG
    col_xmax = 2 * K * gg  # classifier columns: [max s, mean s, max x, mean x], each channel-major
    col_xmean = col_xmax + C * ff

    for n0 in range(0, NC, BLOCK_NC):
        cls = n0 + tl.arange(0, BLOCK_NC)
        tl.store(row + cls, tl.load(cb_ptr + cls, mask=cls < NC, other=0.0), mask=cls < NC)
    tl.debug_barrier()

    u = tl.zeros([P_PAD, D_PAD], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        chmask = offs_c < C
        # 1. the working map's chunk: each feature element read once (overlapping adaptive windows: twice)
        acc = tl.zeros([P_PAD, BLOCK_C], tl.float32)
        for dy in range(0, KH):
            hh = h0 + dy
            hok = cmask & (hh < h1)
            for dx in range(0, KW):
                ww = w0 + dx
                ok = hok & (ww < w1)
                ptrs = x_base + (hh * stride_xh + ww * stride_xw)[:, None] + offs_c[None, :] * stride_xc
                if EVEN_C:
                    xv = tl.load(ptrs, mask=ok[:, None], other=0.0)
                else:
                    xv = tl.load(ptrs, mask=ok[:, None] & chmask[None, :], other=0.0)
                acc += xv.to(tl.float32)
        xw = acc * inv_area[:, None]  # [P_PAD, BLOCK_C]; 0 on padded cells and channels
        # 2. projection, in the projection weight's dtype (the features' own), fp32 accumulation
        wt = tl.load(
            w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd,
            mask=chmask[:, None] & dmask[None, :],
            other=0.0,
        )
        xq = xw.to(w_ptr.dtype.element_ty)
        if DOT_UPCAST:
            xq, wt = xq.to(tl.float32), wt.to(tl.float32)
        u = tl.dot(xq, wt, u, input_precision=PREC)
        # 3. the classifier's share of this chunk's max / mean working map per cell of the F x F grid
        for n0 in range(0, NC, BLOCK_NC):
            cls = n0 + tl.arange(0, BLOCK_NC)
            clsmask = cls < NC
            z = tl.load(row + cls, mask=clsmask, other=0.0, cache_modifier=".cg")
            wmask = chmask[:, None] & clsmask[None, :]
            wbase = cw_ptr + cls[None, :].to(tl.int64) * stride_cwn + (offs_c[:, None] * ff) * stride_cwf
            for f in range(0, ff):
                vmax, vmean = _cell_pool(xw, f, FG, ci, cj, cmask, HS, WS)
                z = _cell_logits(
                    vmax, vmean, chmask, wbase + (col_xmax + f) * stride_cwf, wbase + (col_xmean + f) * stride_cwf,
                    wmask, z, DOT_UPCAST, PREC,
                )  # fmt: skip
            tl.store(row + cls, z, mask=clsmask)
        tl.debug_barrier()

    # 4. bias, ReLU, cosine to the prototypes. NaN propagates as in torch, so that a NaN feature never exits.
    bias = tl.load(b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    u = tl.maximum(u + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    u = tl.where(cmask[:, None], u, 0.0)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), 1e-8, propagate_nan=tl.PropagateNan.ALL)
    # u / ||u|| lies in [0, 1]: the similarity dot takes it in the prototypes' dtype (float16 for 16-bit features)
    un = (u * inv_norm[:, None]).to(p_ptr.dtype.element_ty)
    pt = tl.load(
        p_ptr + offs_d[:, None] * stride_pd + offs_k[None, :] * stride_pk,
        mask=dmask[:, None] & kmask[None, :],
        other=0.0,
    )  # [D_PAD, K_PAD]; padded prototypes are 0 and never reach the logits
    if DOT_UPCAST:
        un, pt = un.to(tl.float32), pt.to(tl.float32)
    s = tl.dot(un, pt, input_precision=PREC)  # [P_PAD, K_PAD]

    # 5. the G x G pooled similarities' share, then online softmax / argmax per class slot and the exit test
    m = tl.full([1, BLOCK_NC], float("-inf"), tl.float32)
    ssum = tl.zeros([1, BLOCK_NC], tl.float32)
    idx = tl.zeros([1, BLOCK_NC], tl.int32)
    nan_idx = tl.zeros([1, BLOCK_NC], tl.int32) + NC
    for n0 in range(0, NC, BLOCK_NC):
        cls = n0 + tl.arange(0, BLOCK_NC)
        clsmask = cls < NC
        z = tl.load(row + cls, mask=clsmask, other=0.0, cache_modifier=".cg")
        wmask = kmask[:, None] & clsmask[None, :]
        wbase = cw_ptr + cls[None, :].to(tl.int64) * stride_cwn + (offs_k[:, None] * gg) * stride_cwf
        for g in range(0, gg):
            smax, smean = _cell_pool(s, g, G, ci, cj, cmask, HS, WS)
            z = _cell_logits(
                smax, smean, kmask, wbase + g * stride_cwf, wbase + (K * gg + g) * stride_cwf, wmask, z,
                DOT_UPCAST, PREC,
            )  # fmt: skip
        tl.store(row + cls, z, mask=clsmask)
        m, ssum, idx, nan_idx = softmax_slots_update(z[None, :], clsmask[None, :], cls[None, :], m, ssum, idx, nan_idx)
    pred, conf = softmax_slots_finish(m, ssum, idx, nan_idx, NC)
    thr = tl.load(thr_ptr + pred)
    one = tl.arange(0, 1)
    tl.store(exit_ptr + n + one, conf >= thr)
    tl.store(pred_ptr + n + one, pred.to(tl.int64))
    tl.store(conf_ptr + n + one, conf)
