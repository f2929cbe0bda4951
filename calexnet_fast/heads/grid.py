"""The grid prototype-pooling head: prototype similarities pooled per cell of a small grid, so the head keeps
the spatial layout that the global pooling of ``PrototypePoolingHead`` throws away.

``GridPrototypeHead`` is the trainable module:

1. working map ``x = adaptive_avg_pool(f, (min(H, S), min(W, S)))`` (``S = max_size``, default 8): the
   projection is linear, so projecting the pooled map equals pooling the projected one before the ReLU,
   at ``(S / H)^2`` of the cost;
2. projection ``u = ReLU(BN(Conv1x1_{C->D}(x)))``;
3. ``K`` learnable prototypes ``P`` [K, D]; similarity map ``s[k, i, j] = gamma * cos(u[:, i, j], P[k])``
   (the cosine convention of ``calexnet_fast.reference``: a zero projection gives 0, never NaN);
4. grid pooling: max and mean of ``s`` per cell of a ``G x G`` grid (``grid``, default 2) -> ``2 K G^2``;
5. augmentation: max and mean of the working map ``x`` per cell of an ``F x F`` grid (``feature_grid``,
   default 4; SDN-style pooling of the branch features, the max taken over their local means so that the
   head reads the feature map once) -> ``2 C F^2``; order ``[max s, mean s, max x, mean x]``, each
   flattened channel-major (adaptive pooling, ``calexnet_fast.reference.grid_pool``: any H, W works, also
   smaller than the grid);
6. a linear classifier -> logits.

``GridPrototypeHead.fold()`` returns a ``FoldedGridPrototypeHead``: BN folded into the projection, prototypes
normalised and multiplied by gamma; its forward runs the plan of ``.grid_plan`` for the input's geometry
(TorchScript: the twin ``calexnet_fast.reference.grid_head_reference``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference import grid_head_reference, grid_pool, working_map
from .grid_plan import GridHeadPlan, grid_head_plan
from .prototype import FoldedHead, PrototypeProjection, _check_features, check_positive_ints


def grid_feature_dim(in_channels: int, n_prototypes: int, grid: int, feature_grid: int) -> int:
    """``2 K G^2 + 2 C F^2``, the width of the pooled feature vector the classifier sees (D does not enter:
    the projection reaches the classifier only through the similarities)."""
    return 2 * n_prototypes * grid * grid + 2 * in_channels * feature_grid * feature_grid


class FoldedGridPrototypeHead(FoldedHead):
    """Inference form of ``GridPrototypeHead``.

    Buffers: ``proj_weight`` [D, C] (BN folded in), ``proj_bias`` [D], ``prototypes`` [K, D]
    (``gamma * P / max(||P||, 1e-8)``), ``cls_weight`` [n_classes, 2 K G^2 + 2 C F^2], ``cls_bias``
    [n_classes]; ints ``grid``, ``feature_grid``, ``max_size``.

    ``forward(features [N, C, H, W]) -> logits [N, n_classes]`` in the dtype of ``features``: in eager mode
    the plan for the input's geometry (``calexnet_fast.heads.grid_plan``: classifier columns folded onto the
    pixels where the grids only repeat them, no copies before the classifier), under TorchScript its twin
    ``calexnet_fast.reference.grid_head_reference``; the two agree up to float rounding.
    """

    def __init__(
        self,
        proj_weight: torch.Tensor,
        proj_bias: torch.Tensor,
        prototypes: torch.Tensor,
        cls_weight: torch.Tensor,
        cls_bias: torch.Tensor,
        grid: int = 2,
        feature_grid: int = 4,
        max_size: int = 8,
    ) -> None:
        check_positive_ints(grid=grid, feature_grid=feature_grid, max_size=max_size)
        width = lambda c, k, d: grid_feature_dim(c, k, grid, feature_grid)
        super().__init__(proj_weight, proj_bias, prototypes, cls_weight, cls_bias, width)
        self.grid = grid
        self.feature_grid = feature_grid
        self.max_size = max_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript cannot compile the checks' messages, nor the plans
            _check_features(features, self.in_channels, self.proj_weight.device)
            return self._planned(features)
        return grid_head_reference(
            features,
            self.proj_weight,
            self.proj_bias,
            self.prototypes,
            self.cls_weight,
            self.cls_bias,
            self.grid,
            self.feature_grid,
            self.max_size,
        )

    @torch.jit.unused
    def _planned(self, features: torch.Tensor) -> torch.Tensor:
        return grid_head_plan(self, features)(features)

    @torch.jit.unused
    def plan(self, features: torch.Tensor) -> GridHeadPlan:
        """The plan (``calexnet_fast.heads.grid_plan``) this head runs for inputs of ``features``' geometry,
        dtype and device; ``plan.exit(features, thresholds)`` runs the head with its exit decision where
        ``plan.fused`` (CPU, float32 / float64)."""
        _check_features(features, self.in_channels, self.proj_weight.device)
        return grid_head_plan(self, features)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_classes={self.n_classes}, dim={self.dim}, "
            f"n_prototypes={self.n_prototypes}, grid={self.grid}, feature_grid={self.feature_grid}, "
            f"max_size={self.max_size}"
        )


class GridPrototypeHead(PrototypeProjection):
    """The grid prototype-pooling head (module docstring, steps 1-6).

    Args:
        in_channels: C, channels of the branch-point feature map.
        n_classes: number of classes.
        dim: D, projection width (default 32).
        n_prototypes: K, number of prototypes (default 32).
        grid: G, the similarity grid is G x G (default 2); at most ``max_size``.
        feature_grid: F, the working map is max- and mean-pooled to F x F (default 4).
        max_size: S, the map is average-pooled to at most S x S before the projection (default 8).
        gamma_init: initial similarity scale gamma (default 10, as ``PrototypePoolingHead``).

    ``forward(features [N, C, H, W]) -> logits [N, n_classes]``. Parameters: conv ``C*D`` (no bias: BN
    follows), BN ``2D``, prototypes ``K*D``, gamma 1, classifier ``(2 K G^2 + 2 C F^2 + 1) * n_classes``.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        dim: int = 32,
        n_prototypes: int = 32,
        grid: int = 2,
        feature_grid: int = 4,
        max_size: int = 8,
        gamma_init: float = 10.0,
    ) -> None:
        check_positive_ints(grid=grid, feature_grid=feature_grid, max_size=max_size)
        if grid > max_size:
            raise ValueError(f"grid: expected at most max_size = {max_size} cells a side, got {grid}")
        super().__init__(in_channels, n_classes, dim, n_prototypes, gamma_init)
        self.grid = grid
        self.feature_grid = feature_grid
        self.max_size = max_size
        self.classifier = nn.Linear(self.feature_dim, n_classes)

    @property
    def feature_dim(self) -> int:
        """2 K G^2 + 2 C F^2, the width of the pooled feature vector the classifier sees."""
        return grid_feature_dim(self.in_channels, self.n_prototypes, self.grid, self.feature_grid)

    def pooled_features(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, 2 K G^2 + 2 C F^2] features ``[max s, mean s, max x, mean x]``."""
        if not torch.jit.is_scripting():  # TorchScript cannot compile the checks' messages
            _check_features(features, self.in_channels, self.proj.weight.device, self.proj.weight.dtype)
        x = working_map(features, self.max_size)
        _, s = self.similarity(x)  # [N, K, h, w]
        g, fg = self.grid, self.feature_grid
        parts = [grid_pool(s, g, g, True), grid_pool(s, g, g, False), grid_pool(x, fg, fg, True)]
        parts.append(grid_pool(x, fg, fg, False))
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_features(features))

    @torch.no_grad()
    def fold(self) -> FoldedGridPrototypeHead:
        """The inference form: BN (running statistics) folded into the projection, prototypes normalised and
        scaled by gamma. Equals ``self.eval()(f)`` up to float rounding; it does not track later training."""
        w, b, p = self.folded_projection()
        return FoldedGridPrototypeHead(
            w, b, p, self.classifier.weight, self.classifier.bias, self.grid, self.feature_grid, self.max_size
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_classes={self.n_classes}, dim={self.dim}, "
            f"n_prototypes={self.n_prototypes}, grid={self.grid}, feature_grid={self.feature_grid}, "
            f"max_size={self.max_size}"
        )
