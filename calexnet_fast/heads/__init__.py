"""Branch heads (docs/design.md §1) and their folded inference forms.

- ``PrototypePoolingHead`` / ``FoldedPrototypeHead`` (``.prototype``): the augmented prototype-pooling head,
  similarities pooled over the whole map (the default; the fused Triton kernel runs its folded form).
- ``GridPrototypeHead`` / ``FoldedGridPrototypeHead`` (``.grid``): similarities pooled per cell of a small
  grid, augmented with grid-pooled branch features (selectable with ``Recipe(head="grid")``).
"""

from .grid import FoldedGridPrototypeHead, GridPrototypeHead, grid_feature_dim
from .prototype import FoldedPrototypeHead, PrototypePoolingHead

HEADS = {"prototype": PrototypePoolingHead, "grid": GridPrototypeHead}  # head name -> trainable head class
DEFAULT_HEAD_DIMS = {"prototype": 128, "grid": 32}  # each head's default projection width D


def make_branch_head(name: str, in_channels: int, n_classes: int, dim: int | None = None, n_prototypes: int = 32):
    """A fresh branch head by name (``"prototype"`` or ``"grid"``), D defaulting to the head's own."""
    if name not in HEADS:
        raise ValueError(f"head: expected one of {tuple(HEADS)}, got {name!r}")
    return HEADS[name](in_channels, n_classes, dim=dim or DEFAULT_HEAD_DIMS[name], n_prototypes=n_prototypes)


__all__ = [
    "DEFAULT_HEAD_DIMS",
    "HEADS",
    "FoldedGridPrototypeHead",
    "FoldedPrototypeHead",
    "GridPrototypeHead",
    "PrototypePoolingHead",
    "grid_feature_dim",
    "make_branch_head",
]
