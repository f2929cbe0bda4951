"""Branch heads (docs/design.md §1) and their folded inference forms.

- ``PrototypePoolingHead`` / ``FoldedPrototypeHead`` (``.prototype``): the augmented prototype-pooling head,
  similarities pooled over the whole map (the default; the fused Triton kernel runs its folded form).
- ``GridPrototypeHead`` / ``FoldedGridPrototypeHead`` (``.grid``): similarities pooled per cell of a small
  grid, augmented with grid-pooled branch features (selectable with ``Recipe(head="grid")``).
"""

from .grid import FoldedGridPrototypeHead, GridPrototypeHead, grid_feature_dim
from .prototype import FoldedPrototypeHead, PrototypePoolingHead

__all__ = [
    "FoldedGridPrototypeHead",
    "FoldedPrototypeHead",
    "GridPrototypeHead",
    "PrototypePoolingHead",
    "grid_feature_dim",
]
