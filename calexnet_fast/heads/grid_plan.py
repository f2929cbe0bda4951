"""The folded grid head's fast eager form: a :class:`GridHeadPlan` per input geometry.

``calexnet_fast.reference.grid_head_reference`` (the twin) pools every part of the head's feature vector,
flattens and concatenates them; on the small maps of a CNN's branch points most of its time is operator
calls and copies, not arithmetic (a 4 x 4 feature grid on a 2 x 2 map repeats every pixel four times, twice,
and the classifier then reads 8x the values there are). A plan is built once per input geometry (H, W,
dtype, device) from the folded head's buffers and sizes:

- **gathers folded into the classifier**: a pooling whose every cell covers exactly one pixel (the grid
  equals the map, or is larger and only repeats pixels) is the same gather for max and mean; it is linear
  in the map, so the classifier columns of both are summed onto the pixels they read, and that part
  becomes one matrix product with the map itself;
- **no copies before the classifier**: the working map is channels_last (as in the twin: a contiguous
  input is converted once), the similarities are computed as rows of it, and every part is read in the
  order its values sit in memory, pixel-major; the classifier's columns are permuted to that order once,
  in the plan, instead of every part being copied to channel-major order on every call.

It equals the twin up to float rounding (sums in another order). ``FoldedGridPrototypeHead`` runs it in
eager mode (TorchScript runs the twin); plans are cached per head and rebuilt when a buffer changes.

On CPU in float32 / float64 a plan also runs the head **with its exit decision** (:meth:`GridHeadPlan.exit`,
what ``Cascade`` uses there): the C++ op ``calexnet_fast::grid_plan_exit`` on the working map in its own
layout, one pass per sample (projection and ReLU, prototype products, cosine division, every cell's max and
mean, classifier, exit rule), no intermediate tensors and one operator call. Its operands are the plan's:
the transposed projection and prototypes, the distinct pixel windows of each part's cells, with the
classifier's weights of the cells that share a window summed (and, for one-pixel windows, max and mean
summed).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..ops import library_status
from ..ops.grid_plan_exit import grid_plan_exit
from ..reference import cosine_eps, grid_pool, working_map

__all__ = ["GridHeadPlan", "cell_windows", "grid_head_plan", "single_pixel_cells"]

# head -> {geometry key: (buffer versions, plan)}, dropped with the head
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_PLANS = 16  # per head: a stream of inputs of ever new sizes does not grow the cache without bound


def single_pixel_cells(size: int, cells: int) -> torch.Tensor | None:
    """The pixel each of ``cells`` adaptive pooling windows over ``size`` pixels reads, when every window is
    exactly one pixel wide (PyTorch's windows ``[floor(i size / cells), ceil((i + 1) size / cells))``, which
    ``grid_pool``'s fixed windows equal), else ``None``."""
    starts = [(i * size) // cells for i in range(cells)]
    ends = [-((-(i + 1) * size) // cells) for i in range(cells)]
    if any(e - s != 1 for s, e in zip(starts, ends, strict=True)):
        return None
    return torch.tensor(starts, dtype=torch.int64)


def cell_windows(height: int, width: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """The pixel window ``(r0, r1, c0, c1)`` of each cell of a ``rows x cols`` adaptive pooling grid over a
    ``height x width`` map, row-major (PyTorch's windows, which ``grid_pool`` takes)."""
    r = [((i * height) // rows, -((-(i + 1) * height) // rows)) for i in range(rows)]
    c = [((j * width) // cols, -((-(j + 1) * width) // cols)) for j in range(cols)]
    return [(r0, r1, c0, c1) for r0, r1 in r for c0, c1 in c]


def epilogue_part(
    w_max: torch.Tensor, w_mean: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's operands of ``grid_plan_exit``: its distinct windows [W, 4] and its classifier columns
    [n_classes, width] (float64) in the op's feature order, from the part's classifier weights ``w_max``,
    ``w_mean`` [n_classes, ch, rows, cols]: cells with the same window have their columns summed (the pools
    are the same there), and a one-pixel window, where max and mean are the pixel, is read once with both."""
    n_cls, ch, rows, cols = w_max.shape
    index: dict[tuple[int, int, int, int], int] = {}
    windows = cell_windows(height, width, rows, cols)
    for window in windows:
        index.setdefault(window, len(index))
    summed = torch.zeros(len(index), 2, n_cls, ch, dtype=torch.float64)
    for cell, window in enumerate(windows):
        gi, gj = divmod(cell, cols)
        summed[index[window], 0] += w_max[:, :, gi, gj].double()
        summed[index[window], 1] += w_mean[:, :, gi, gj].double()
    columns = []
    for (r0, r1, c0, c1), i in index.items():
        one_pixel = r1 - r0 == 1 and c1 - c0 == 1
        columns += [summed[i, 0] + summed[i, 1]] if one_pixel else [summed[i, 0], summed[i, 1]]
    return torch.tensor(list(index), dtype=torch.int64).reshape(-1, 4), torch.cat(columns, dim=1)


class _Part:
    """One pooled part of the head's feature vector (a tensor ``t`` [N, ch, h, w] pooled to ``rows x cols``
    cells by max and by mean), as the plan computes it: ``folded`` (one gather: the map itself, its columns
    summed onto the pixels) or pooled (max, then mean)."""

    def __init__(self, w_max: torch.Tensor, w_mean: torch.Tensor, h: int, w: int, rows: int, cols: int) -> None:
        n_cls, ch = w_max.shape[0], w_max.shape[1]
        r, c = single_pixel_cells(h, rows), single_pixel_cells(w, cols)
        self.rows, self.cols = rows, cols
        self.folded = r is not None and c is not None
        if self.folded:
            pixel = (r[:, None] * w + c[None, :]).reshape(-1)  # the pixel each cell reads
            summed = torch.zeros(n_cls, ch, h * w, dtype=w_max.dtype)
            summed.index_add_(2, pixel, (w_max + w_mean).reshape(n_cls, ch, rows * cols))
            self.blocks = [summed]  # [n_cls, ch, pixels]
        else:
            self.blocks = [w_max.reshape(n_cls, ch, -1), w_mean.reshape(n_cls, ch, -1)]

    def columns(self) -> torch.Tensor:
        """The part's classifier columns [n_cls, width], pixel-major (the order of a channels_last map)."""
        return torch.cat([b.transpose(1, 2).reshape(b.shape[0], -1) for b in self.blocks], dim=1)

    def values(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The part's values [N, width] in :meth:`columns` order: views of the channels_last ``t`` or of its
        pools (which keep the layout), no copies."""
        pooled = [t] if self.folded else [grid_pool(t, self.rows, self.cols, m) for m in (True, False)]
        return [p.permute(0, 2, 3, 1).reshape(p.shape[0], p.shape[1] * p.shape[2] * p.shape[3]) for p in pooled]


class GridHeadPlan:
    """The folded grid head for inputs of one geometry (module docstring).

    Args:
        buffers: the folded head's ``(proj_weight, proj_bias, prototypes, cls_weight, cls_bias)``.
        grid, feature_grid, max_size: its G, F and S.
        height, width: the input's spatial size H x W.
        dtype: the input's dtype; the plan's operands are cast to it once.
    """

    def __init__(
        self,
        buffers: tuple[torch.Tensor, ...],
        grid: int,
        feature_grid: int,
        max_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
    ) -> None:
        proj_weight, proj_bias, prototypes, cls_weight, cls_bias = buffers
        d, c = proj_weight.shape
        k, n_cls = prototypes.shape[0], cls_weight.shape[0]
        self.h, self.w = min(height, max_size), min(width, max_size)
        self.max_size, self.eps = max_size, cosine_eps(dtype)
        device = proj_weight.device
        wc = cls_weight.detach().double().cpu()
        sizes = [k * grid * grid] * 2 + [c * feature_grid * feature_grid] * 2
        s_max, s_mean, x_max, x_mean = torch.split(wc, sizes, dim=1)
        s_shape, x_shape = (n_cls, k, grid, grid), (n_cls, c, feature_grid, feature_grid)
        self.s_part = _Part(s_max.reshape(s_shape), s_mean.reshape(s_shape), self.h, self.w, grid, grid)
        fg = feature_grid
        self.x_part = _Part(x_max.reshape(x_shape), x_mean.reshape(x_shape), self.h, self.w, fg, fg)
        columns = [self.s_part.columns(), self.x_part.columns()]
        self.cls_weight = torch.cat(columns, dim=1).to(device, dtype).contiguous()
        self.cls_bias = cls_bias.detach().to(device, dtype)
        self.proj_weight = proj_weight.detach().to(dtype).contiguous()  # [D, C]
        self.proj_bias = proj_bias.detach().to(dtype)
        self.prototypes = prototypes.detach().to(dtype).contiguous()  # [K, D]
        self.dim, self.n_prototypes = d, k
        self.fused = device.type == "cpu" and dtype in (torch.float32, torch.float64) and _cpu_kernel()
        if self.fused:  # grid_plan_exit's operands
            s_windows, s_cols = epilogue_part(s_max.reshape(s_shape), s_mean.reshape(s_shape), self.h, self.w)
            x_windows, x_cols = epilogue_part(x_max.reshape(x_shape), x_mean.reshape(x_shape), self.h, self.w)
            cols = torch.cat([s_cols, x_cols], dim=1).to(dtype).contiguous()
            proj_t, prototypes_t = self.proj_weight.t().contiguous(), self.prototypes.t().contiguous()
            self.exit_operands = (proj_t, self.proj_bias.contiguous(), prototypes_t, s_windows, x_windows, cols)
            self.exit_operands += (self.cls_bias.contiguous(),)

    def _similarity(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` [N, K, h, w] (a channels_last view) of the channels_last working map ``x``."""
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
        u = torch.addmm(self.proj_bias, rows, self.proj_weight.t()).relu_()  # [N hw, D]
        norm = torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(self.eps)
        s = torch.mm(u, self.prototypes.t()).div_(norm)  # [N hw, K]
        return s.reshape(n, h, w, self.n_prototypes).permute(0, 3, 1, 2)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, n_classes] in ``features.dtype`` for ``features`` [N, C, H, W] of the plan's geometry."""
        x = working_map(features, self.max_size).contiguous(memory_format=torch.channels_last)  # as the twin
        if x.shape[0] == 0:
            return x.new_empty((0, self.cls_bias.shape[0]))
        s = self._similarity(x)
        values = self.s_part.values(s) + self.x_part.values(x)
        return F.linear(torch.cat(values, dim=1), self.cls_weight, self.cls_bias)

    def exit(
        self, features: torch.Tensor, thresholds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [N, n_classes] (``features.dtype``), exit [N] bool, pred [N] int64 and conf [N] float32 of the
        head and the exit rule with per-class ``thresholds`` [n_classes] (module docstring; the plan must be
        :attr:`fused`: CPU, float32 or float64, the C++ library loaded)."""
        if not self.fused:
            raise RuntimeError(
                "GridHeadPlan.exit: this plan has no C++ exit path (it needs CPU float32/float64 inputs and the "
                "CPU op library; `python -m calexnet_fast.info` says whether it loaded): run the plan, then "
                "calexnet_fast.exit_rule.exit_decision_reference"
            )
        x = features  # [N, C, h, w], its own layout: pooled to the working map where it is larger
        if features.shape[2] != self.h or features.shape[3] != self.w:
            x = working_map(features, self.max_size)
        if thresholds.dtype != torch.float32 or not thresholds.is_contiguous():
            thresholds = thresholds.float().contiguous()
        return grid_plan_exit(x, *self.exit_operands, thresholds, self.eps)


def _cpu_kernel() -> bool:
    """Whether ``grid_plan_exit`` runs the C++ kernel on CPU (not the twin registered in its place)."""
    return library_status().cpu_path is not None


def grid_head_plan(head, features: torch.Tensor) -> GridHeadPlan:
    """The plan of the folded grid head ``head`` for ``features``' geometry, from the head's cache (built on
    first use, rebuilt when one of the head's buffers is replaced or modified in place)."""
    buffers = (head.proj_weight, head.proj_bias, head.prototypes, head.cls_weight, head.cls_bias)
    h, w = features.shape[2], features.shape[3]
    key = (h, w, features.dtype, features.device, head.grid, head.feature_grid, head.max_size)
    # (inference tensors have no version counter: a head folded under inference_mode is keyed by address)
    versions = tuple((b.data_ptr(), -1 if b.is_inference() else b._version, b.device) for b in buffers)
    cache = _plans.setdefault(head, {})
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        plan = GridHeadPlan(buffers, head.grid, head.feature_grid, head.max_size, h, w, features.dtype)
        hit = cache[key] = (versions, plan)
    return hit[1]
