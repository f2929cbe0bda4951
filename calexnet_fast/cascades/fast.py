"""``Cascade``: the fast early-exit cascade (docs/design.md §2), same constructor and output as ``ReferenceCascade``.

It runs the one cascade loop of :class:`~calexnet_fast.cascades.ReferenceCascade`; per branch ``k`` the
survivors run stage ``k``, then the branch head and its exit decision:

- on CUDA with Triton, a ``PrototypePoolingHead`` runs as the fused kernel
  ``calexnet_fast.kernels.proto_head_exit`` and a ``GridPrototypeHead`` as ``grid_head_exit`` (head + softmax +
  argmax + threshold test in one pass over the feature map, on the folded head's buffers cast once per head);
  any other head runs as a module followed by the fused ``exit_decision`` kernel;
- on CPU a ``GridPrototypeHead`` runs its folded form's plan (``calexnet_fast.heads.grid_plan``) with the C++
  epilogue ``grid_head_epilogue`` (two matrix products in PyTorch, then cosine, pools, classifier and exit
  decision in one pass; float32 / float64);
- elsewhere the head runs in its folded inference form (BN folded into the projection) in eager PyTorch,
  followed by the reference exit rule.

The survivors' feature maps are gathered into a dense batch by the C++ ``compact`` op (on CUDA its survivor
count is the one host sync of the stage) and only they run the next stage. Every stage's logits are kept
with their input positions and written into the output once at the end by ``scatter_rows_``, whose
last-occurrence-wins rule makes the deepest exit of each sample the one that counts (the compaction and
the write are :class:`~calexnet_fast.cascades.DeployableCascade`'s, the TorchScript form). Each piece falls
back on its own (with one warning, see ``python -m calexnet_fast.info``) where it cannot run.

``Cascade`` is an inference module: heads are always evaluated in their eval-mode (folded) form.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..availability import Plan, cascade_plan
from ..exit_rule import CascadeOutput, exit_decision_reference
from ..heads import FoldedGridPrototypeHead, FoldedPrototypeHead, GridPrototypeHead, PrototypePoolingHead
from ..kernels import (
    exit_decision,
    grid_head_exit,
    grid_head_operand_dtypes,
    proto_head_exit,
    proto_head_operand_dtypes,
)
from .deployable import DeployableCascade
from .reference import ReferenceCascade

if TYPE_CHECKING:
    from .streaming import Stream

__all__ = ["Cascade"]

_FOLDABLE = (PrototypePoolingHead, GridPrototypeHead)  # heads with a fold() inference form


def _state_key(module: nn.Module, device: torch.device) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced or modified in place."""
    tensors = list(module.parameters()) + list(module.buffers())
    return (device, tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))


class Cascade(ReferenceCascade):
    """The fast cascade: fused Triton heads (CUDA), C++ batch compaction, one scatter of the outputs.

    Constructor and output as :class:`~calexnet_fast.cascades.ReferenceCascade`; see the module docstring
    for what runs where. Build one from a reference cascade with :meth:`from_reference`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._folded_cache: dict[int, tuple[tuple, FoldedPrototypeHead | FoldedGridPrototypeHead]] = {}

    @classmethod
    def from_reference(cls, reference: ReferenceCascade) -> Cascade:
        """A ``Cascade`` sharing ``reference``'s stages, heads and thresholds (no copies)."""
        if not isinstance(reference, ReferenceCascade):
            raise ValueError(f"reference: expected a ReferenceCascade, got {type(reference).__name__}")
        fast = cls(
            list(reference.stages),
            list(reference.heads),
            reference.thresholds,
            n_classes=reference.n_classes,
            in_channels=reference.in_channels if reference.in_channels > 0 else None,
        )
        fast.branch_points = list(reference.branch_points)
        return fast

    @classmethod
    def from_run(cls, run: str | Path, margin: float = 0.2, device: torch.device | str = "cpu") -> Cascade:
        """The cascade of a trained and calibrated run directory (``calexnet train`` + ``calexnet calibrate``, or
        saved from Python with :class:`calexnet_fast.run.Run`).

        Args:
            run: the run directory (``config.json``, ``heads.safetensors``, ``thresholds.safetensors``).
            margin: the CPM margin whose thresholds to use (the nearest calibrated one).
            device: where to put the cascade.

        Raises:
            ValueError: (a ``calexnet_fast.run.RunError``) the directory lacks one of those files, a file is
                damaged, or ``margin`` is outside the calibrated sweep.
        """
        from ..run import Run

        backbone, heads, thresholds = Run(run).cascade_parts(margin)
        return cls(backbone, list(heads), thresholds).to(device)

    def to_torchscript(self) -> torch.jit.ScriptModule:
        """This cascade as TorchScript, for deployment without Python (see :class:`DeployableCascade`).

        The scripted module calls the C++ ops ``calexnet_fast::compact`` / ``scatter_rows_`` from its graph;
        save it with ``.save(path)`` and load it with ``torch.jit.load`` after ``import calexnet_fast`` (Python)
        or after loading ``libcalexnet_fast_cpu.so`` (and ``libcalexnet_fast_cuda.so``) in libtorch.
        """
        heads = [h.fold() if isinstance(h, _FOLDABLE) else h for h in self.heads]
        device = self.thresholds.device
        deployable = DeployableCascade(
            list(self.stages), [h.to(device) for h in heads], self.thresholds, n_classes=self.n_classes
        )
        deployable.in_channels = self.in_channels
        deployable.branch_points = list(self.branch_points)
        return torch.jit.script(deployable)

    def stream(self, batches: Iterable[torch.Tensor], stage_batch: int = 64, max_wait: int | None = None) -> Stream:
        """This cascade over a stream of input batches, every stage on full batches of ``stage_batch`` rows:
        ``StreamingCascade(self, stage_batch, max_wait).stream(batches)``
        (:class:`~calexnet_fast.cascades.StreamingCascade`; ``max_wait`` is its latency cap).

        Returns:
            An iterator of :class:`~calexnet_fast.exit_rule.CascadeOutput`, one per input batch, in order: the
            very outputs ``self(x)`` gives each batch (logits to float rounding).
        """
        from .streaming import StreamingCascade  # streaming builds on this module

        return StreamingCascade(self, stage_batch, max_wait).stream(batches)

    def plan(self, device: torch.device | str) -> Plan:
        """The backend used for inputs on ``device``, and why (the same report as ``calexnet_fast.info``)."""
        return cascade_plan(torch.device(device).type)

    def folded_head(self, k: int, device: torch.device) -> FoldedPrototypeHead | FoldedGridPrototypeHead:
        """Head ``k``'s inference form on ``device``, refolded whenever the head's weights change."""
        head = self.heads[k]
        key = _state_key(head, device)
        cached = self._folded_cache.get(k)
        if cached is None or cached[0] != key:
            cached = (key, head.fold().to(device))
            self._folded_cache[k] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> CascadeOutput:
        """Run the cascade, each stage only on the samples still in it.

        Args:
            x: [B, in_channels, H, W] normalised images in the cascade's dtype and on its device
                (channels_last inputs stay channels_last through the compaction).

        Returns:
            :class:`~calexnet_fast.exit_rule.CascadeOutput`: logits [B, n_classes] in ``x``'s dtype,
            exit_index [B] int64 (``k`` for branch ``k``, ``K + 1`` for the backbone).
        """
        self.check_input(x)
        with torch.inference_mode():
            return self._run(x)

    def _head_exit(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch ``k`` as the plan for ``h``'s device says: the fused kernel, or the (folded) head and
        the exit rule (the Triton kernel on CUDA, the reference elsewhere)."""
        head = self.heads[k]
        thresholds = self.thresholds[k]
        fused = h.is_cuda and self.plan(h.device).heads == "triton"
        if isinstance(head, PrototypePoolingHead):
            folded = self.folded_head(k, h.device)
            if fused:
                operands = folded.operands(proto_head_operand_dtypes(h.dtype))  # cast once per head
                logits, exit_, _, _ = proto_head_exit(h, *operands, thresholds)
                return logits, exit_
            logits = folded(h)
        elif isinstance(head, GridPrototypeHead):
            folded = self.folded_head(k, h.device)
            if fused:
                operands = folded.operands(grid_head_operand_dtypes(h.dtype))  # cast once per head
                sizes = (folded.grid, folded.feature_grid, folded.max_size)
                logits, exit_, _, _ = grid_head_exit(h, *operands, thresholds, *sizes)
                return logits, exit_
            plan = folded.plan(h)
            if plan.fused:  # CPU: the C++ epilogue with the exit decision
                logits, exit_, _, _ = plan.exit(h, thresholds)
                return logits, exit_
            logits = plan(h)
        else:
            logits = head(h)
        decide = exit_decision if fused else exit_decision_reference
        exit_, _, _ = decide(logits, thresholds)
        return logits, exit_

    def _compact(self, h: torch.Tensor, stay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The C++ ``compact`` op, but no copy when every row stays on CPU (on CUDA, counting first would be
        a second host sync: ``compact``'s own count is the stage's one)."""
        if not h.is_cuda and bool(stay.all()):
            return h, torch.arange(h.shape[0], device=h.device)
        return DeployableCascade._compact(self, h, stay)

    _write = DeployableCascade._write
