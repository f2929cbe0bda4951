"""``Cascade``: the fast early-exit cascade (docs/design.md §2), same constructor and output as ``ReferenceCascade``.

It runs the one cascade loop of :class:`~calexnet_fast.cascades.ReferenceCascade`; per branch ``k`` the
survivors run stage ``k``, then the branch head and its exit decision:

- on CUDA with Triton, a ``PrototypePoolingHead`` runs as the fused kernel
  ``calexnet_fast.kernels.proto_head_exit`` and a ``GridPrototypeHead`` as ``grid_head_exit`` (head + softmax +
  argmax + threshold test in one pass over the feature map, on the folded head's buffers cast once per head);
  any other head runs as a module followed by the fused ``exit_decision`` kernel;
- on CPU a ``GridPrototypeHead`` runs its folded form's plan (``calexnet_fast.heads.grid_plan``) as the C++
  op ``grid_plan_exit`` (the whole head and the exit decision in one pass per sample; float32 / float64),
  its plan and threshold row looked up in one pass over a flat record of what they were derived from (the
  lookup runs between two stages, where every Python object it touches is a cache miss);
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

from ..availability import Plan, cascade_plan
from ..exit_rule import CascadeOutput, exit_decision_reference
from ..heads import FoldedGridPrototypeHead, FoldedPrototypeHead, GridPrototypeHead, PrototypePoolingHead
from ..heads.grid_plan import GridHeadPlan
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


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (None for an inference tensor, which has none)."""
    return None if t.is_inference() else t._version


class _Sources:
    """Where a branch's inference form comes from: the head in the cascade's head list, and every submodule,
    parameter and buffer of the head where it sits, each tensor with its address and version.

    :meth:`unchanged` tells in one pass over these flat lists (no module traversal: it runs between two
    stages, where every Python object it touches is a cache miss) whether any of them was replaced (also
    through ``.to()`` or ``load_state_dict`` with ``assign``), moved, or modified in place (an inference
    tensor has no version counter: its replacement is seen, an in-place change inside ``inference_mode`` is
    not)."""

    def __init__(self, cascade: ReferenceCascade, k: int) -> None:
        head = cascade.heads[k]
        self.modules = [(cascade._modules, "heads", cascade.heads), (cascade.heads._modules, str(k), head)]
        self.tensors = []
        for m in head.modules():
            self.modules += [(m._modules, name, sub) for name, sub in m._modules.items()]
            for owner in (m._parameters, m._buffers):
                self.tensors += [(owner, n, t, t.data_ptr(), _version(t)) for n, t in owner.items() if t is not None]

    def unchanged(self) -> bool:
        for owner, name, module in self.modules:
            if owner.get(name) is not module:
                return False
        for owner, name, t, ptr, version in self.tensors:
            if owner.get(name) is not t or t.data_ptr() != ptr or (version is not None and t._version != version):
                return False
        return True


class _Branch:
    """Branch ``k``'s head in its inference form on one device (``None`` for a head without one), with what
    ``Cascade`` derives from it once: the grid head's plans by input geometry and the branch's float32 threshold
    row."""

    def __init__(self, cascade: ReferenceCascade, k: int, device: torch.device) -> None:
        self.k, self.device = k, device
        self.sources = _Sources(cascade, k)
        head = cascade.heads[k]
        self.folded = head.fold().to(device) if isinstance(head, _FOLDABLE) else None
        self.plans: dict[tuple, GridHeadPlan] = {}
        self._row: tuple | None = None  # (thresholds, address, version, row)

    def plan(self, h: torch.Tensor) -> GridHeadPlan:
        """The folded grid head's plan for ``h``'s geometry and dtype."""
        key = (h.shape[1], h.shape[2], h.shape[3], h.dtype)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self.folded.plan(h)
        return plan

    def thresholds(self, thresholds: torch.Tensor) -> torch.Tensor:
        """The branch's row of the cascade's ``thresholds`` as a contiguous float32 tensor, cached until they
        are replaced or modified."""
        row = self._row
        if row is None or row[0] is not thresholds or row[1] != thresholds.data_ptr() or row[2] != thresholds._version:
            version = _version(thresholds)
            row = (thresholds, thresholds.data_ptr(), version, thresholds[self.k].float().contiguous())
            self._row = row if version is not None else None  # an inference tensor changes unseen: not cached
        return row[3]


class Cascade(ReferenceCascade):
    """The fast cascade: fused Triton heads (CUDA), C++ batch compaction, one scatter of the outputs.

    Constructor and output as :class:`~calexnet_fast.cascades.ReferenceCascade`; see the module docstring
    for what runs where. Build one from a reference cascade with :meth:`from_reference`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._branches: dict[int, _Branch] = {}

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
        """Head ``k``'s inference form on ``device``, refolded whenever the head (or one of its weights) is
        replaced or modified. The form is derived: change the head, not the form."""
        folded = self._branch(k, torch.device(device)).folded
        if folded is None:
            raise ValueError(f"heads[{k}]: a {type(self.heads[k]).__name__} has no inference form (no fold())")
        return folded

    def _branch(self, k: int, device: torch.device) -> _Branch:
        branch = self._branches.get(k)
        if branch is None or branch.device != device or not branch.sources.unchanged():
            branch = self._branches[k] = _Branch(self, k, device)
        return branch

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
        if not h.is_cuda:  # CPU: a grid head's plan with the C++ exit, from the branch's cached forms
            branch = self._branch(k, h.device)
            if isinstance(branch.folded, FoldedGridPrototypeHead):
                plan = branch.plan(h)
                if plan.fused:
                    logits, exit_, _, _ = plan.exit(h, branch.thresholds(self.thresholds))
                    return logits, exit_
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
            logits = folded.plan(h)(h)
        else:
            logits = head(h)
        decide = exit_decision if fused else exit_decision_reference
        exit_, _, _ = decide(logits, thresholds)
        return logits, exit_

    _compact = DeployableCascade._compact
    _write = DeployableCascade._write
