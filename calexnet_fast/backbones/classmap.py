"""A backbone whose classes are finer than the labels: probabilities summed per label (a class map).

A CIFAR-100 network has 100 fine classes; trained on the 20 coarse labels, a cascade wants the probability of
each coarse label, ``p(label j) = Σ_{i : map[i] = j} softmax(z)_i``. :class:`ClassMap` computes its logarithm
(a log-probability is a valid logit: its softmax gives the summed probabilities back) and is appended to the
backbone's last stage, so every consumer (heads, calibration, cascades, TorchScript) sees a backbone with
``n_labels`` classes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .staged import FrozenStage, StagedBackbone

__all__ = ["ClassMap", "check_class_map", "with_class_map"]


def check_class_map(class_map: Sequence[int] | torch.Tensor, n_classes: int | None = None) -> list[int]:
    """``class_map`` as a list of ints: entry ``i`` is the label of backbone class ``i``; every label
    ``0 .. max`` must have at least one class.

    Raises:
        ValueError: not a 1-D list of non-negative ints, a label without a class, or (with ``n_classes``) not
            one entry per backbone class.
    """
    try:
        idx = torch.as_tensor(class_map)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"class_map: expected a list of ints (one label per backbone class), got {class_map!r}"
        ) from None
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(
            f"class_map: expected a non-empty 1-D list of ints (one label per backbone class), got "
            f"{idx.dtype} of shape {list(idx.shape)}"
        )
    if int(idx.min()) < 0:
        raise ValueError(f"class_map: expected labels >= 0, got {int(idx.min())}")
    if n_classes is not None and idx.numel() != n_classes:
        raise ValueError(f"class_map: expected {n_classes} entries (the backbone's classes), got {idx.numel()}")
    n_labels = int(idx.max()) + 1
    empty = sorted(set(range(n_labels)) - set(idx.tolist()))
    if empty:
        raise ValueError(f"class_map: every label 0..{n_labels - 1} needs at least one class; labels {empty} have none")
    return [int(v) for v in idx.tolist()]


class ClassMap(nn.Module):
    """Logits over ``n_classes`` fine classes -> log-probabilities of ``n_labels`` labels.

    ``out[:, j] = log Σ_{i : class_map[i] = j} softmax(z)_i``, computed stably per label (log-sum-exp), in
    float32 or wider, returned in ``z``'s dtype. TorchScript-able.
    """

    def __init__(self, class_map: Sequence[int] | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(check_class_map(class_map), dtype=torch.int64))
        self.n_classes = int(self.index.numel())
        self.n_labels = int(self.index.max()) + 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.n_classes:
            raise ValueError(f"z: expected logits [B, {self.n_classes}], got shape {list(z.shape)}")
        work = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        lp = torch.log_softmax(work, dim=1)
        idx = self.index.unsqueeze(0).expand(z.shape[0], self.n_classes)
        top = torch.full((z.shape[0], self.n_labels), float("-inf"), dtype=lp.dtype, device=lp.device)
        top = top.scatter_reduce(1, idx, lp, reduce="amax", include_self=True)
        total = torch.zeros_like(top).scatter_add(1, idx, torch.exp(lp - top.gather(1, idx)))
        return (top + torch.log(total)).to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.n_classes} classes -> {self.n_labels} labels"


def with_class_map(backbone: StagedBackbone, class_map: Sequence[int] | torch.Tensor) -> StagedBackbone:
    """``backbone`` with its classes mapped to labels (:class:`ClassMap` appended to the last stage); the
    stages are shared, not copied. Its ``n_classes`` is the number of labels."""
    cmap = ClassMap(check_class_map(class_map, backbone.n_classes))
    last = backbone.stages[-1]
    stages = [*backbone.stages[:-1], FrozenStage(OrderedDict([*last.named_children(), ("class_map", cmap)]))]
    return StagedBackbone(
        stages,
        backbone.branch_points,
        in_channels=backbone.in_channels,
        input_size=backbone.input_size,
        mean=backbone.mean,
        std=backbone.std,
        name=f"{backbone.name} (class map {cmap.n_classes} -> {cmap.n_labels})",
        source_keys=backbone._source_keys,
    )
