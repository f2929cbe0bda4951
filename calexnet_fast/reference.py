"""The plain-PyTorch reference twins of every fast path: the semantics the C++ ops and Triton kernels are
tested against, and what runs wherever a fast path cannot.

- ``compact_reference(x, mask) -> (rows, index)``: twin of ``calexnet_fast.ops.compact``.
- ``scatter_rows__reference(out, src, index) -> out``: twin of ``calexnet_fast.ops.scatter_rows_``;
  ``scatter_rows_reference`` of the out-of-place ``scatter_rows``.
- ``folded_head_reference(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias) -> logits``:
  the folded prototype-pooling head (``calexnet_fast.heads.FoldedPrototypeHead``'s forward).
- ``grid_head_reference(features, proj_weight, proj_bias, prototypes, cls_weight, cls_bias, grid, feature_grid,
  max_size) -> logits``: the folded grid prototype-pooling head (``calexnet_fast.heads.FoldedGridPrototypeHead``);
  ``grid_pool`` / ``working_map`` its pooling.
- ``grid_head_exit_reference(...) -> (logits, exit, pred, conf)``: twin of the fused kernel
  ``calexnet_fast.kernels.grid_head_exit``: the folded grid head in float32, then the exit rule.
- ``proto_head_exit_reference(...) -> (logits, exit, pred, conf)``: twin of the fused kernel
  ``calexnet_fast.kernels.proto_head_exit``: the folded head in float32, then the exit rule.
- ``grid_plan_exit_reference(x, ...) -> (logits, exit, pred, conf)``: twin of the C++ op
  ``calexnet_fast.ops.grid_plan_exit``: the folded grid head on its working map, laid out by its CPU plan, and
  the exit rule.
- ``max_pool2d_reference(x, kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w)``: twin of the C++ op
  ``calexnet_fast.ops.max_pool2d`` (torch's max pooling, dilation 1, floor mode).
- The exit rule's own twin, ``exit_decision_reference`` (of ``calexnet_fast.kernels.exit_decision``), is the
  exit rule itself and lives in ``calexnet_fast.exit_rule``.

Semantics of the batch-compaction ops (both devices, and the twins here):
    compact(x, mask) -> (rows, index): ``rows = x[mask]`` as a new tensor (rows keep a contiguous or
        channels_last per-row layout; other layouts come out contiguous) and ``index`` the int64 positions of
        the true entries, increasing. Meta tensors are refused (the row count depends on mask's values).
    scatter_rows_(out, src, index): ``out[index[j]] = src[j]`` in place; every index must lie in
        ``[0, out.size(0))`` or the op raises before writing anything; with duplicate indices the last
        occurrence wins; ``src`` and ``index`` may share memory with ``out`` (they are read as they were
        before the call); an ``out`` whose elements share memory (expanded, overlapping strides) is refused.
        ``scatter_rows`` does the same on a copy of ``out``. On meta tensors the arguments are checked and
        nothing is written (there are no index values to check).

Cosine convention of the prototype heads: each vector is divided by ``max(||v||, eps)`` with
``eps = COSINE_EPS = 1e-8``, so a zero projection gives similarity 0, never NaN. In float16, where 1e-8
rounds to zero, ``eps`` is raised to float16's smallest normal number (``cosine_eps``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exit_rule import exit_decision_reference

__all__ = [
    "COSINE_EPS",
    "check_compact_args",
    "check_scatter_args",
    "check_scatter_out",
    "compact_reference",
    "cosine_eps",
    "elements_may_share_memory",
    "folded_head_reference",
    "grid_head_exit_reference",
    "grid_head_reference",
    "grid_plan_exit_reference",
    "max_pool2d_reference",
    "working_map",
    "grid_pool",
    "last_occurrence",
    "proto_head_exit_reference",
    "row_format",
    "scatter_rows__reference",
    "scatter_rows_reference",
]

COSINE_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# compact / scatter_rows_ / scatter_rows
# --------------------------------------------------------------------------------------------------


def _check_tensors(op: str, **tensors: object) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")


def check_compact_args(x: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless ``compact(x, mask)`` is well defined."""
    _check_tensors("compact", x=x, mask=mask)
    if x.dim() < 1:
        raise ValueError("compact: x: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor")
    if mask.dtype != torch.bool:
        raise ValueError(f"compact: mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1:
        raise ValueError(f"compact: mask: expected a 1-D tensor of shape [{x.shape[0]}], got shape {list(mask.shape)}")
    if mask.shape[0] != x.shape[0]:
        raise ValueError(f"compact: mask: expected length {x.shape[0]} (x.size(0)), got {mask.shape[0]}")
    if mask.device != x.device:
        raise ValueError(f"compact: mask: expected device {x.device} (that of x), got {mask.device}")
    if x.device.type == "meta":
        raise ValueError(
            "compact: x: expected a tensor with data (the number of rows depends on mask's values), got a meta tensor"
        )


def check_scatter_args(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless ``scatter_rows(out, src, index)`` is well defined
    (the range of the index values is checked separately, on the data)."""
    _check_tensors("scatter_rows", out=out, src=src, index=index)
    if out.dim() < 1:
        raise ValueError("scatter_rows: out: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor")
    if src.device != out.device:
        raise ValueError(f"scatter_rows: src: expected device {out.device} (that of out), got {src.device}")
    if index.device != out.device:
        raise ValueError(f"scatter_rows: index: expected device {out.device} (that of out), got {index.device}")
    if index.dtype != torch.int64:
        raise ValueError(f"scatter_rows: index: expected dtype torch.int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"scatter_rows: index: expected a 1-D tensor, got shape {list(index.shape)}")
    if src.dtype != out.dtype:
        raise ValueError(f"scatter_rows: src: expected dtype {out.dtype} (that of out), got {src.dtype}")
    if src.dim() != out.dim() or src.shape[1:] != out.shape[1:]:
        raise ValueError(
            f"scatter_rows: out: expected trailing shape matching src {list(src.shape)} (all but the first "
            f"dimension), got out of shape {list(out.shape)}"
        )
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"scatter_rows: index: expected length {src.shape[0]} (src.size(0)), got {index.shape[0]}")


def elements_may_share_memory(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded or otherwise overlapping view).

    A sufficient test for "they do not", the same as the C++ ops' (csrc/ops_common.h): over the dims of
    size > 1 sorted by stride, each stride exceeds the largest offset that the smaller-stride dims reach."""
    if t.numel() == 0:
        return False  # no element, nothing to share
    span = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_scatter_out(out: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``scatter_rows_`` cannot write ``out`` in place: its elements share memory,
    so writing a row could change another (the C++ ops refuse it too, before looking at the indices)."""
    if elements_may_share_memory(out):
        raise ValueError(
            f"scatter_rows_: out: expected a tensor whose elements do not share memory, got shape "
            f"{list(out.shape)} with strides {list(out.stride())} (an expanded or overlapping view); "
            "write into out.clone() instead"
        )


def row_format(t: torch.Tensor) -> torch.memory_format:
    """The per-row layout ``compact`` keeps: channels_last for 4-D channels_last rows, else contiguous."""
    if t.dim() == 4 and not t[:1].is_contiguous() and t[:1].is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def compact_reference(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of ``compact``: boolean indexing.

    Args:
        x: [B, ...] any dtype, any layout.
        mask: [B] bool, same device.

    Returns:
        rows: [n, ...] the rows where ``mask`` is true, in order (a new tensor).
        index: [n] int64 positions of those rows in ``x``.
    """
    check_compact_args(x, mask)
    index = mask.nonzero().view(-1)
    rows = x[mask].contiguous(memory_format=row_format(x))
    return rows, index


def _validate_index(index: torch.Tensor, rows: int) -> None:
    bad = (index < 0) | (index >= rows)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"scatter_rows: index: expected every value in [0, {rows}) (out.size(0)), got index[{j}] = {int(index[j])}"
        )


def last_occurrence(index: torch.Tensor, rows: int) -> torch.Tensor:
    """[n] bool: True where ``index[j]`` is the last occurrence of its value (the write that wins).

    Args:
        index: [n] int64 in ``[0, rows)``.
        rows: the number of target rows.
    """
    positions = torch.arange(index.shape[0], device=index.device)
    last = torch.full((rows,), -1, dtype=torch.int64, device=index.device)
    last.scatter_reduce_(0, index, positions, reduce="amax")
    return last[index] == positions


def scatter_rows__reference(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``scatter_rows_``: ``out[index] = src`` in place, last duplicate wins.

    Args:
        out: [N, ...] written in place.
        src: [n, ...] same trailing shape and dtype as ``out``.
        index: [n] int64 in ``[0, N)``.

    Returns:
        ``out``.
    """
    check_scatter_args(out, src, index)
    check_scatter_out(out)
    if out.device.type == "meta":  # no data: nothing to check or write (as the op's fake kernel)
        return out
    _validate_index(index, out.shape[0])
    if index.numel() == 0:
        return out
    # index_copy_ leaves duplicates unspecified; keep only the last occurrence of each target row. src[keep]
    # and index[keep] are copies: a src (or index) sharing memory with out is read as it was before the call.
    keep = last_occurrence(index, out.shape[0])
    out.index_copy_(0, index[keep], src[keep])
    return out


def scatter_rows_reference(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``scatter_rows``: like ``scatter_rows__reference`` on a copy of ``out``."""
    check_scatter_args(out, src, index)
    return scatter_rows__reference(out.clone(), src, index)


# --------------------------------------------------------------------------------------------------
# The folded prototype-pooling head, and the fused head + exit decision
# --------------------------------------------------------------------------------------------------


def cosine_eps(dtype: torch.dtype, eps: float = COSINE_EPS) -> float:
    """``eps`` for a cosine computed in ``dtype``: raised to float16's smallest normal number (2**-14) in
    float16, where 1e-8 would round to zero and a zero vector would give 0 / 0 = NaN. TorchScript-able."""
    if dtype == torch.float16:
        return max(eps, 6.103515625e-05)
    return eps


def folded_head_reference(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    eps: float = COSINE_EPS,
) -> torch.Tensor:
    """Logits of the folded prototype-pooling head, in plain PyTorch, computed in the dtype of ``features``.

    ``u = relu(f W^T + b)``, ``s = (u P^T) / max(||u||, eps)``, then ``[max s, mean s, mean u]`` over the
    pixels and the classifier. The buffers are cast to ``features.dtype``; pass ``features.float()`` (or
    ``.double()``) for a higher precision result.

    Args:
        features: [N, C, H, W] feature map (any memory format).
        proj_weight: [D, C] projection with BN folded in.
        proj_bias: [D] projection bias.
        prototypes: [K, D] prototypes, already normalised and multiplied by gamma.
        cls_weight: [n_classes, 2K + D] classifier weight over ``[max s, mean s, avg u]``.
        cls_bias: [n_classes] classifier bias.
        eps: the cosine's norm floor (``cosine_eps`` raises it where the dtype cannot hold it).

    Returns:
        [N, n_classes] logits in ``features.dtype``.
    """
    dt = features.dtype
    n, c, h, w = features.shape
    x = features.reshape(n, c, h * w).transpose(1, 2)  # [N, HW, C]
    u = torch.relu(torch.matmul(x, proj_weight.to(dt).t()) + proj_bias.to(dt))  # [N, HW, D]
    norm = torch.linalg.vector_norm(u, dim=2, keepdim=True).clamp_min(cosine_eps(dt, eps))
    s = torch.matmul(u, prototypes.to(dt).t()) / norm  # [N, HW, K]
    feats = torch.cat([s.amax(dim=1), s.mean(dim=1), u.mean(dim=1)], dim=1)  # [N, 2K + D]
    return F.linear(feats, cls_weight.to(dt), cls_bias.to(dt))


def proto_head_exit_reference(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of the fused head + exit kernel: the folded head in float32, then the exit rule.

    Returns:
        logits [N, n_classes] float32, exit [N] bool, pred [N] int64, conf [N] float32.
    """
    logits = folded_head_reference(
        features.float(), proj_weight.float(), proj_bias.float(), prototypes.float(), cls_weight.float(),
        cls_bias.float(),
    )  # fmt: skip
    exit_, pred, conf = exit_decision_reference(logits, thresholds)
    return logits, exit_, pred, conf


def grid_pool(t: torch.Tensor, rows: int, cols: int, use_max: bool) -> torch.Tensor:
    """Adaptive max (``use_max``) or average pooling of ``t`` [N, C, H, W] to ``rows x cols`` cells: ``t``
    itself when it has that size, fixed-window pooling when the grid divides the map (the same windows,
    much faster on CPU), else ``F.adaptive_*_pool2d``. TorchScript-able."""
    h, w = t.shape[2], t.shape[3]
    if h == rows and w == cols:
        return t
    if h % rows == 0 and w % cols == 0:
        k = [h // rows, w // cols]
        return F.max_pool2d(t, k, k) if use_max else F.avg_pool2d(t, k, k)
    return F.adaptive_max_pool2d(t, [rows, cols]) if use_max else F.adaptive_avg_pool2d(t, [rows, cols])


def working_map(features: torch.Tensor, max_size: int) -> torch.Tensor:
    """The grid head's working map: ``features`` [N, C, H, W] average-pooled to ``min(H, S) x min(W, S)``
    (``S = max_size``; the features themselves when they are no larger). The head's one pass over the
    features: everything else it computes reads this small map."""
    h, w = features.shape[2], features.shape[3]
    return grid_pool(features, min(h, max_size), min(w, max_size), False)


def grid_head_reference(
    features: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    grid: int = 2,
    feature_grid: int = 4,
    max_size: int = 8,
    eps: float = COSINE_EPS,
) -> torch.Tensor:
    """Logits of the folded grid prototype-pooling head, in plain PyTorch, in the dtype of ``features``.

    ``x = adaptive_avg_pool(f, (min(H, S), min(W, S)))`` (``S = max_size``, :func:`working_map`),
    ``u = relu(x W^T + b)`` per cell of ``x``, ``s = (u P^T) / max(||u||, eps)`` kept as a [K, h, w] map; then
    the features ``[max s (K G^2), mean s (K G^2), max x (C F^2), mean x (C F^2)]``, each an adaptive pool
    (:func:`grid_pool`) to a ``G x G`` (``grid``) or ``F x F`` (``feature_grid``) grid flattened
    channel-major, and the classifier.

    Args:
        features: [N, C, H, W] feature map (any memory format).
        proj_weight: [D, C] projection with BN folded in.
        proj_bias: [D] projection bias.
        prototypes: [K, D] prototypes, already normalised and multiplied by gamma.
        cls_weight: [n_classes, 2 K G^2 + 2 C F^2] classifier weight.
        cls_bias: [n_classes] classifier bias.
        grid, feature_grid, max_size: G, F and S above.
        eps: the cosine's norm floor (``cosine_eps`` raises it where the dtype cannot hold it).

    Returns:
        [N, n_classes] logits in ``features.dtype``.
    """
    dt = features.dtype
    n, c = features.shape[0], features.shape[1]
    x = working_map(features, max_size).contiguous(memory_format=torch.channels_last)  # CPU pools: fast in NHWC
    hs, ws = x.shape[2], x.shape[3]
    rows = x.permute(0, 2, 3, 1).reshape(n * hs * ws, c)  # a view
    u = torch.addmm(proj_bias.to(dt), rows, proj_weight.to(dt).t()).relu_()  # [N hw, D]
    norm = torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(cosine_eps(dt, eps))
    s = (
        (torch.mm(u, prototypes.to(dt).t()) / norm).reshape(n, hs, ws, prototypes.shape[0]).permute(0, 3, 1, 2)
    )  # [N, K, h, w]
    feats = torch.cat(
        [
            grid_pool(s, grid, grid, True).flatten(1),
            grid_pool(s, grid, grid, False).flatten(1),
            grid_pool(x, feature_grid, feature_grid, True).flatten(1),
            grid_pool(x, feature_grid, feature_grid, False).flatten(1),
        ],
        dim=1,
    )
    return F.linear(feats, cls_weight.to(dt), cls_bias.to(dt))


def grid_head_exit_reference(
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
    """Plain-PyTorch twin of the fused grid head + exit kernel: the folded grid head in float32, then the exit
    rule.

    Returns:
        logits [N, n_classes] float32, exit [N] bool, pred [N] int64, conf [N] float32.
    """
    buffers = (proj_weight, proj_bias, prototypes, cls_weight, cls_bias)
    if features.shape[0] == 0:  # an empty batch (the head's reshapes cannot infer a size from 0 rows)
        logits = features.new_empty((0, cls_weight.shape[0]), dtype=torch.float32)
    else:
        logits = grid_head_reference(features.float(), *(b.float() for b in buffers), grid, feature_grid, max_size)
    exit_, pred, conf = exit_decision_reference(logits, thresholds)
    return logits, exit_, pred, conf


def grid_plan_exit_reference(
    x: torch.Tensor,
    proj_weight_t: torch.Tensor,
    proj_bias: torch.Tensor,
    prototypes_t: torch.Tensor,
    s_windows: torch.Tensor,
    x_windows: torch.Tensor,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor,
    thresholds: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of the C++ op ``calexnet_fast::grid_plan_exit``: the folded grid head on its working
    map, with the classifier's columns laid out over pixel windows (``calexnet_fast.heads.grid_plan`` builds
    the operands), and the exit decision.

    Args:
        x: [N, C, h, w] the working map (``P = h w`` pixels, row-major), any memory format.
        proj_weight_t: [C, D] the folded projection, transposed; proj_bias: [D].
        prototypes_t: [D, K] the normalised, gamma-scaled prototypes, transposed.
        s_windows, x_windows: [W, 4] int64 pixel windows ``(r0, r1, c0, c1)`` pooled over the similarities
            ``s / max(||u||, eps)`` (``u = relu(x @ proj_weight_t + proj_bias)`` per pixel,
            ``s = u @ prototypes_t``) and over ``x``.
        cls_weight: [n_classes, F] the classifier over the features: for each window of ``s_windows``, then of
            ``x_windows``, the max then the mean of the part's vectors over the window (one vector, the
            pixel's, for a window of one pixel).
        cls_bias: [n_classes]; thresholds: [n_classes] float32 per-class thresholds.
        eps: the cosine's norm floor.

    Returns:
        logits [N, n_classes] in ``x``'s dtype, exit [N] bool, pred [N] int64, conf [N] float32 (as
        :func:`~calexnet_fast.exit_rule.exit_decision_reference` from those logits).
    """
    n, c, h, w = x.shape
    if proj_weight_t.shape[0] != c or proj_weight_t.shape[1] != prototypes_t.shape[0]:
        raise ValueError(
            f"grid_plan_exit: x {list(x.shape)}, proj_weight_t {list(proj_weight_t.shape)} and prototypes_t "
            f"{list(prototypes_t.shape)} disagree (expected [N, C, h, w], [C, D] and [D, K])"
        )
    u = torch.relu(x.permute(0, 2, 3, 1).reshape(n, h * w, c) @ proj_weight_t + proj_bias)  # [N, P, D]
    s = u @ prototypes_t  # [N, P, K]
    norm = torch.linalg.vector_norm(u, dim=2, keepdim=True).clamp_min(eps)
    sim = (s / norm).reshape(n, h, w, s.shape[2])  # pixel-major maps
    features = []
    for part, windows in ((sim, s_windows), (x.permute(0, 2, 3, 1), x_windows)):
        for i, (r0, r1, c0, c1) in enumerate(windows.tolist()):
            if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
                raise ValueError(f"grid_plan_exit: window {i} = {(r0, r1, c0, c1)} lies outside the {h}x{w} map")
            cell = part[:, r0:r1, c0:c1, :].reshape(n, (r1 - r0) * (c1 - c0), part.shape[3])
            features += [cell[:, 0]] if cell.shape[1] == 1 else [cell.amax(dim=1), cell.mean(dim=1)]
    pooled = torch.cat(features, dim=1) if features else x.new_zeros((n, 0))  # no windows: the bias alone
    logits = F.linear(pooled, cls_weight, cls_bias)
    exit_, pred, conf = exit_decision_reference(logits, thresholds)
    return logits, exit_, pred, conf


def max_pool2d_reference(
    x: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int, padding_w: int
) -> torch.Tensor:
    """Plain-PyTorch twin of the C++ op ``calexnet_fast::max_pool2d``: ``torch.nn.functional.max_pool2d`` with
    dilation 1 and floor mode (windows clipped to the map, a NaN in a window propagates)."""
    return F.max_pool2d(x, (kernel_h, kernel_w), (stride_h, stride_w), (padding_h, padding_w))
