"""Triton kernel of the exit decision and the online softmax/argmax helper shared with the fused head.

Imported lazily (see ``_triton.kernel_module``): importing this module imports ``triton``.
"""

import triton
import triton.language as tl

# Steps both online softmaxes below share (Triton inlines them: the kernels compute exactly what they did with
# the steps written out in each).


@triton.jit
def _without_nan(z, valid):
    """(``z`` with NaN and invalid entries set to -inf, where ``z`` is NaN)."""
    isnan = z != z
    return tl.where(valid & (~isnan), z, float("-inf")), isnan


@triton.jit
def _rescale(m, new_m):
    """``exp(m - new_m)``, the factor of a running sum whose max moves from ``m`` to ``new_m``; 0 while ``m``
    is -inf (nothing summed yet). An +inf maximum gives inf - inf = NaN, as torch.softmax does."""
    return tl.where(m == float("-inf"), 0.0, tl.exp(m - new_m))


@triton.jit
def _shifted_exp(zc, new_m):
    """``exp(zc - new_m)``; -inf entries contribute 0."""
    return tl.where(zc == float("-inf"), 0.0, tl.exp(zc - new_m))


@triton.jit
def _max_probability(mx, ssum, has_nan):
    """The max softmax probability ``1 / ssum``; NaN where the row has a NaN or is all -inf."""
    conf = tl.where(mx == float("-inf"), float("nan"), 1.0 / ssum)
    return tl.where(has_nan, float("nan"), conf)


@triton.jit
def softmax_argmax_update(z, valid, c0, m, s, idx, nan_idx, BLOCK: tl.constexpr):
    """Fold one chunk of logits into a running (max, sum of exp, argmax, first NaN column) per row.

    Args:
        z: [R, BLOCK] fp32 logits of classes c0 .. c0 + BLOCK - 1; entries where ``valid`` is False
            are ignored.
        valid: [R, BLOCK] bool.
        c0: class index of column 0 of this chunk (chunks come in ascending order).
        m, s: [R] fp32 running max (NaN-free, -inf when empty) and sum of ``exp(z - m)``.
        idx: [R] int32 first index of the running max (``torch.argmax`` semantics without NaN).
        nan_idx: [R] int32 first NaN column, or a value >= n_classes when none yet.
    """
    cols = c0 + tl.arange(0, BLOCK)
    zc, isnan = _without_nan(z, valid)
    cm = tl.max(zc, axis=1)
    ci = tl.argmax(zc, axis=1, tie_break_left=True)
    # Strictly greater: on ties an earlier chunk (smaller index) wins, as in torch.argmax.
    idx = tl.where(cm > m, c0 + ci, idx)
    new_m = tl.maximum(m, cm)
    s = s * _rescale(m, new_m) + tl.sum(_shifted_exp(zc, new_m[:, None]), axis=1)
    nan_cols = tl.where(isnan & valid, cols[None, :], 2147483647)
    nan_idx = tl.minimum(nan_idx, tl.min(nan_cols, axis=1))
    return new_m, s, idx, nan_idx


@triton.jit
def softmax_argmax_finish(m, s, idx, nan_idx, n_classes):
    """(pred int32, conf fp32) from the running state: torch.argmax (NaN wins, first one) and the max softmax
    probability 1 / sum(exp(z - max)); NaN when the row has a NaN, an +inf, or is all -inf."""
    has_nan = nan_idx < n_classes
    pred = tl.where(has_nan, nan_idx, idx)
    return pred, _max_probability(m, s, has_nan)


@triton.jit
def softmax_slots_update(z, valid, cols, m, s, idx, nan_idx):
    """Like ``softmax_argmax_update`` but per slot (column) of the chunk, with no cross-thread reduction:
    every state tensor has the chunk's shape [R, B] and slot j sees classes j, j + B, j + 2B, ... in
    ascending order. ``softmax_slots_finish`` combines the slots once at the end."""
    zc, isnan = _without_nan(z, valid)
    idx = tl.where(zc > m, cols, idx)  # strictly greater: the slot keeps its first maximum
    new_m = tl.maximum(m, zc)
    s = s * _rescale(m, new_m) + _shifted_exp(zc, new_m)
    nan_idx = tl.minimum(nan_idx, tl.where(isnan & valid, cols, 2147483647))
    return new_m, s, idx, nan_idx


@triton.jit
def softmax_slots_finish(m, s, idx, nan_idx, n_classes):
    """(pred int32 [R], conf fp32 [R]) from per-slot states [R, B], with the semantics of
    ``softmax_argmax_finish``: the first index of the maximum (NaN first), conf NaN where torch's is."""
    big = 2147483647
    mx = tl.max(m, axis=1)
    ssum = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx[:, None])), axis=1)
    # all slots -inf: every idx is still 0, and torch.argmax returns 0 as well
    pred = tl.min(tl.where(m == mx[:, None], idx, big), axis=1)
    nan_first = tl.min(nan_idx, axis=1)
    has_nan = nan_first < n_classes
    pred = tl.where(has_nan, nan_first, pred)
    return pred, _max_probability(mx, ssum, has_nan)


@triton.jit
def exit_decision_kernel(
    z_ptr,
    thr_ptr,
    exit_ptr,
    pred_ptr,
    conf_ptr,
    N,
    C,
    stride_zn,
    stride_zc,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_zn
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    idx = tl.zeros([BLOCK_N], tl.int32)
    nan_idx = tl.zeros([BLOCK_N], tl.int32) + C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = rmask[:, None] & (cols < C)[None, :]
        col_off = cols.to(tl.int64) * stride_zc  # int64: (C - 1) * stride_zc can pass 2**31 (a column view)
        z = tl.load(z_ptr + row_off[:, None] + col_off[None, :], mask=valid, other=0.0)
        m, s, idx, nan_idx = softmax_argmax_update(z.to(tl.float32), valid, c0, m, s, idx, nan_idx, BLOCK_C)
    pred, conf = softmax_argmax_finish(m, s, idx, nan_idx, C)
    thr = tl.load(thr_ptr + pred, mask=rmask, other=float("inf"))
    tl.store(exit_ptr + rows, conf >= thr, mask=rmask)
    tl.store(pred_ptr + rows, pred.to(tl.int64), mask=rmask)
    tl.store(conf_ptr + rows, conf, mask=rmask)
