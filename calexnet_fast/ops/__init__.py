"""Batch-compaction ops, C++/CUDA: ``compact``, ``scatter_rows_`` and ``scatter_rows``; the grid head's CPU
path with the exit decision, C++: ``grid_plan_exit``; the inference form's max pool, C++: ``max_pool2d``.

The C++ libraries in ``calexnet_fast/_lib`` define ``torch.ops.calexnet_fast.compact``, ``scatter_rows_`` and
``scatter_rows`` (CPU always, CUDA when built and torch has CUDA), and ``grid_plan_exit`` and ``max_pool2d``
(CPU; their twins on CUDA, where the fused Triton kernel and torch's own pool are the fast paths). Importing
this package loads them once (``_library``), registers the fake kernels (``torch.compile``, ``torch.export``)
and autograd (``compact``, ``scatter_rows``), and, for any piece that could not be loaded, registers the
plain-PyTorch reference twins of ``calexnet_fast.reference`` under the same op names with one warning, so the
ops always exist and never silently change meaning. The semantics are written down in ``calexnet_fast.reference``.
"""

from ._library import LibraryStatus, library_status
from .compact import compact
from .grid_plan_exit import grid_plan_exit
from .max_pool2d import max_pool2d
from .scatter_rows import scatter_rows, scatter_rows_

__all__ = [
    "LibraryStatus",
    "compact",
    "grid_plan_exit",
    "library_status",
    "max_pool2d",
    "scatter_rows",
    "scatter_rows_",
]
