"""The augmented prototype-pooling branch head of docs/design.md §1 and its folded inference form.

``PrototypePoolingHead`` is the trainable module (steps 1-5 of the design):

1. projection ``u = ReLU(BN(Conv1x1_{C->D}(f)))``;
2. ``K`` learnable prototypes ``P`` [K, D]; similarity ``s[k, h, w] = gamma * cos(u[:, h, w], P[k])``
   with a learnable scale ``gamma``;
3. prototype pooling: max and mean of ``s`` over (h, w) -> 2K values;
4. augmentation: the global average of ``u`` over (h, w) -> 2K + D features, in the order
   ``[max (K), mean (K), avg u (D)]``;
5. a linear classifier -> logits.

Cosine convention: ``F.normalize(u, dim=channel, eps) . F.normalize(P, dim=1, eps)``, i.e. each vector is
divided by ``max(||v||, eps)`` with ``eps = 1e-8`` (float16: its smallest normal number, see
``calexnet_fast.reference.cosine_eps``), so a zero projection gives similarity 0, never NaN.

``PrototypePoolingHead.fold()`` returns a ``FoldedPrototypeHead``: BN folded into the projection, prototypes
normalised and multiplied by gamma. Its forward is ``calexnet_fast.reference.folded_head_reference``; its
buffers (``FoldedPrototypeHead.operands()``) are what the fused Triton kernel
``calexnet_fast.kernels.proto_head_exit`` takes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import COSINE_EPS, cosine_eps, folded_head_reference


def _check_features(
    features: torch.Tensor, in_channels: int, device: torch.device, dtype: torch.dtype | None = None
) -> None:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features: expected a torch.Tensor [N, C, H, W], got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features: expected a 4-D tensor [N, C, H, W], got shape {list(features.shape)}")
    if features.shape[1] != in_channels:
        raise ValueError(
            f"features: expected {in_channels} channels (dim 1), got {features.shape[1]} (shape {list(features.shape)})"
        )
    if features.shape[2] == 0 or features.shape[3] == 0:
        raise ValueError(f"features: expected a non-empty spatial size H x W, got shape {list(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features: expected a floating dtype, got {features.dtype}")
    if features.device != device:
        raise ValueError(f"features: expected device {device} (that of the head's weights), got {features.device}")
    if dtype is not None and features.dtype != dtype:
        raise ValueError(
            f"features: expected dtype {dtype} (that of the head's weights; cast one to the other), "
            f"got {features.dtype}"
        )


# FoldedPrototypeHead.operands: {head: {dtypes: (buffer versions, cast buffers)}}, dropped with the head.
_operand_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FoldedHead(nn.Module):
    """What the folded (inference) heads share: five checked buffers, ``proj_weight`` [D, C], ``proj_bias`` [D],
    ``prototypes`` [K, D], ``cls_weight`` [n_classes, width(C, K, D)], ``cls_bias`` [n_classes] (floating
    tensors, copied; ``ValueError`` naming the first that does not fit), and the sizes they imply."""

    def __init__(
        self,
        proj_weight: torch.Tensor,
        proj_bias: torch.Tensor,
        prototypes: torch.Tensor,
        cls_weight: torch.Tensor,
        cls_bias: torch.Tensor,
        width: Callable[[int, int, int], int],
    ) -> None:
        super().__init__()
        buffers = {"proj_weight": proj_weight, "proj_bias": proj_bias, "prototypes": prototypes}
        buffers.update(cls_weight=cls_weight, cls_bias=cls_bias)
        for name, t in buffers.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a floating torch.Tensor, got {got}")
        for name, t in [("proj_weight", proj_weight), ("prototypes", prototypes), ("cls_weight", cls_weight)]:
            if t.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")
        d, c = proj_weight.shape
        k = prototypes.shape[0]
        checks = [
            ("proj_bias", proj_bias, [d]),
            ("prototypes", prototypes, [k, d]),
            ("cls_weight", cls_weight, [cls_weight.shape[0], width(c, k, d)]),
            ("cls_bias", cls_bias, [cls_weight.shape[0]]),
        ]
        for name, t, shape in checks:
            if list(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {list(t.shape)}")
        for name, t in buffers.items():
            self.register_buffer(name, t.detach().clone())

    @property
    def in_channels(self) -> int:
        return self.proj_weight.shape[1]

    @property
    def dim(self) -> int:
        return self.proj_weight.shape[0]

    @property
    def n_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def n_classes(self) -> int:
        return self.cls_weight.shape[0]

    def operands(self, dtypes: tuple[torch.dtype, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """The buffers in the fused kernels' argument order ``(proj_weight, proj_bias, prototypes, cls_weight,
        cls_bias)``.

        Args:
            dtypes: five dtypes, one per buffer (for example
                ``calexnet_fast.kernels.proto_head_operand_dtypes(features.dtype)``): the buffers are returned
                cast to them and contiguous, computed once per head and ``dtypes`` and recomputed whenever a
                buffer is replaced or modified in place. ``None``: the buffers themselves.
        """
        bufs = (self.proj_weight, self.proj_bias, self.prototypes, self.cls_weight, self.cls_bias)
        if dtypes is None:
            return bufs
        if len(dtypes) != len(bufs):
            raise ValueError(f"dtypes: expected {len(bufs)} dtypes (one per buffer), got {len(dtypes)}")
        key = tuple((b.data_ptr(), b._version, b.device) for b in bufs)
        cache = _operand_cache.setdefault(self, {})
        hit = cache.get(tuple(dtypes))
        if hit is None or hit[0] != key:
            hit = (key, tuple(b.to(d).contiguous() for b, d in zip(bufs, dtypes, strict=True)))
            cache[tuple(dtypes)] = hit
        return hit[1]


class FoldedPrototypeHead(FoldedHead):
    """Inference form of ``PrototypePoolingHead`` (what the fused kernel consumes).

    Buffers:
        proj_weight: [D, C], conv1x1 weight with eval-mode BN folded in.
        proj_bias: [D].
        prototypes: [K, D], ``gamma * P / max(||P||, 1e-8)``.
        cls_weight: [n_classes, 2K + D].
        cls_bias: [n_classes].

    ``forward(features [N, C, H, W]) -> logits [N, n_classes]`` computes
    ``u = relu(f W^T + b)``, ``s = (u P^T) / max(||u||, 1e-8)``, then max/mean of ``s`` and the mean of ``u``
    over the pixels and the classifier, in the dtype of ``features``.
    """

    def __init__(
        self,
        proj_weight: torch.Tensor,
        proj_bias: torch.Tensor,
        prototypes: torch.Tensor,
        cls_weight: torch.Tensor,
        cls_bias: torch.Tensor,
    ) -> None:
        super().__init__(proj_weight, proj_bias, prototypes, cls_weight, cls_bias, lambda c, k, d: 2 * k + d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript cannot compile the checks' messages
            _check_features(features, self.in_channels, self.proj_weight.device)
        return folded_head_reference(
            features, self.proj_weight, self.proj_bias, self.prototypes, self.cls_weight, self.cls_bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_classes={self.n_classes}, dim={self.dim}, "
            f"n_prototypes={self.n_prototypes}"
        )


def check_positive_ints(**sizes: object) -> None:
    """Raise ``ValueError`` naming the first size that is not a positive int."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


class PrototypeProjection(nn.Module):
    """What the trainable prototype heads share: the projection ``u = ReLU(BN(Conv1x1_{C->D}(x)))``, K
    prototypes with the similarity scale gamma, the similarity map ``s = gamma * cos(u, P)`` and the fold of
    BN into the projection. A head adds its pooling and ``self.classifier`` (created after these, so the
    state-dict order is ``proj, bn, prototypes, gamma, classifier``)."""

    def __init__(self, in_channels: int, n_classes: int, dim: int, n_prototypes: int, gamma_init: float) -> None:
        super().__init__()
        check_positive_ints(in_channels=in_channels, n_classes=n_classes, dim=dim, n_prototypes=n_prototypes)
        self.in_channels = in_channels
        self.eps = COSINE_EPS  # an attribute, not a global, so the head can be scripted
        self.n_classes = n_classes
        self.dim = dim
        self.n_prototypes = n_prototypes
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim))
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))

    def similarity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C, h, w] -> the projection ``u`` [N, D, h, w] and the similarity map ``s`` [N, K, h, w]."""
        u = torch.relu(self.bn(self.proj(x)))
        un = F.normalize(u, dim=1, eps=cosine_eps(u.dtype, self.eps))
        pn = F.normalize(self.prototypes, dim=1, eps=cosine_eps(self.prototypes.dtype, self.eps))
        return u, self.gamma * torch.einsum("ndhw,kd->nkhw", un, pn)

    @torch.no_grad()
    def folded_projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BN (running statistics) folded into the projection: weight [D, C], bias [D], and the prototypes
        normalised and scaled by gamma [K, D]."""
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise RuntimeError("fold: BatchNorm has no running statistics (track_running_stats=False)")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [D]
        w = self.proj.weight.flatten(1) * scale[:, None]  # [D, C]
        b = bn.bias - bn.running_mean * scale
        p = self.gamma * F.normalize(self.prototypes, dim=1, eps=cosine_eps(self.prototypes.dtype, self.eps))
        return w, b, p


class PrototypePoolingHead(PrototypeProjection):
    """The augmented prototype-pooling head (docs/design.md §1, steps 1-5).

    Args:
        in_channels: C, channels of the branch-point feature map.
        n_classes: number of classes.
        dim: D, projection width (default 128).
        n_prototypes: K, number of prototypes (default 32).
        gamma_init: initial value of the learnable similarity scale gamma (default 10: cosines live in
            [-1, 1], a scale of about 10 lets the classifier see usefully spread values from the start).

    ``forward(features [N, C, H, W]) -> logits [N, n_classes]``. Parameters: conv ``C*D`` (no bias: BN
    follows), BN ``2D``, prototypes ``K*D``, gamma 1, classifier ``(2K + D + 1) * n_classes``.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        dim: int = 128,
        n_prototypes: int = 32,
        gamma_init: float = 10.0,
    ) -> None:
        super().__init__(in_channels, n_classes, dim, n_prototypes, gamma_init)
        self.classifier = nn.Linear(2 * n_prototypes + dim, n_classes)

    @property
    def feature_dim(self) -> int:
        """2K + D, the width of the pooled feature vector the classifier sees."""
        return 2 * self.n_prototypes + self.dim

    def pooled_features(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, 2K + D] pooled features ``[max s (K), mean s (K), avg u (D)]``."""
        if not torch.jit.is_scripting():  # TorchScript cannot compile the checks' messages
            _check_features(features, self.in_channels, self.proj.weight.device, self.proj.weight.dtype)
        u, s = self.similarity(features)  # [N, D, H, W], [N, K, H, W]
        s = s.flatten(2)
        return torch.cat([s.amax(dim=2), s.mean(dim=2), u.flatten(2).mean(dim=2)], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_features(features))

    @torch.no_grad()
    def fold(self) -> FoldedPrototypeHead:
        """The inference form: BN (running statistics) folded into the projection, prototypes normalised and
        scaled by gamma. Equals ``self.eval()(f)`` up to float rounding; it does not track later training."""
        w, b, p = self.folded_projection()
        return FoldedPrototypeHead(w, b, p, self.classifier.weight, self.classifier.bias)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_classes={self.n_classes}, dim={self.dim}, "
            f"n_prototypes={self.n_prototypes}"
        )
