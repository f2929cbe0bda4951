"""Batch-compaction ops, C++/CUDA: ``compact``, ``scatter_rows_`` and ``scatter_rows``; and the grid head's CPU
path with the exit decision, C++: ``grid_plan_exit``.

The C++ libraries in ``calexnet_fast/_lib`` define ``torch.ops.calexnet_fast.compact``, ``scatter_rows_`` and
``scatter_rows`` (CPU always, CUDA when built and torch has CUDA), and ``grid_plan_exit`` (CPU; its twin on
CUDA, where the fused Triton kernel is the fast path). Importing this package loads them once
(``_library``), registers the fake kernels (``torch.compile``, ``torch.export``) and autograd (``compact``,
``scatter_rows``), and, for any piece that could not be loaded, registers the plain-PyTorch reference twins
of ``calexnet_fast.reference`` under the same op names with one warning, so the ops always exist and never
silently change meaning. The semantics are written down in ``calexnet_fast.reference``.
"""

from ._library import LibraryStatus, library_status
from .compact import compact
from .grid_plan_exit import grid_plan_exit
from .scatter_rows import scatter_rows, scatter_rows_

__all__ = ["LibraryStatus", "compact", "grid_plan_exit", "library_status", "scatter_rows", "scatter_rows_"]
