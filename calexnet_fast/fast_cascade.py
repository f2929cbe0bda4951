"""``Cascade``: the fast early-exit cascade (DESIGN.md §2), same constructor and output as ``ReferenceCascade``.

Per branch ``k`` the survivors run stage ``k``, then the branch head and its exit decision:

- on CUDA with Triton, a ``PrototypePoolingHead`` runs as the fused kernel
  ``calexnet_fast.kernels.proto_head_exit`` (head + softmax + argmax + threshold test in one pass over the
  feature map); any other head runs as a module followed by the fused ``exit_decision`` kernel;
- elsewhere the head runs in its folded inference form (BN folded into the projection) in eager PyTorch,
  followed by the reference exit rule.

The survivors' feature maps are gathered into a dense batch by the C++ ``compact`` op (on CUDA its survivor
count is the one host sync of the stage) and only they run the next stage. Every stage's logits are kept
with their input positions and written into the output once at the end by ``scatter_rows_``, whose
last-occurrence-wins rule makes the deepest exit of each sample the one that counts. Each piece falls back
on its own (with one warning, see ``python -m calexnet_fast.info``) where it cannot run.

``Cascade`` is an inference module: heads are always evaluated in their eval-mode (folded) form.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .availability import Plan, cascade_plan
from .cascade import CascadeOutput, ReferenceCascade
from .exit_rule import exit_decision_reference
from .heads import FoldedPrototypeHead, PrototypePoolingHead
from .kernels import exit_decision, proto_head_exit
from .ops import compact, scatter_rows_

__all__ = ["Cascade", "DeployableCascade"]


def _state_key(module: nn.Module, device: torch.device) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced or modified in place."""
    tensors = list(module.parameters()) + list(module.buffers())
    return (device, tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))


class Cascade(ReferenceCascade):
    """The fast cascade: fused Triton heads (CUDA), C++ batch compaction, one scatter of the outputs.

    Constructor and output as :class:`~calexnet_fast.cascade.ReferenceCascade`; see the module docstring
    for what runs where. Build one from a reference cascade with :meth:`from_reference`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._folded_cache: dict[int, tuple[tuple, FoldedPrototypeHead]] = {}

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
        """The cascade of a trained and calibrated run directory (``calexnet train`` + ``calexnet calibrate``).

        Args:
            run: the run directory (``config.json``, ``heads.safetensors``, ``thresholds.safetensors``).
            margin: the CPM margin whose thresholds to use (the nearest calibrated one).
            device: where to put the cascade.

        Raises:
            ValueError: the directory lacks one of those files, or ``margin`` is outside the calibrated sweep.
        """
        from .calibration import CalibrationSweep
        from .recipes import load_heads
        from .training import BackboneSpec, build_backbone

        run = Path(run)
        for name, made_by in [
            ("config.json", "calexnet train"),
            ("heads.safetensors", "calexnet train"),
            ("thresholds.safetensors", "calexnet calibrate"),
        ]:
            if not (run / name).is_file():
                raise ValueError(f"run: expected {run / name} (written by `{made_by}`), it is not there")
        config = json.loads((run / "config.json").read_text())
        backbone = build_backbone(BackboneSpec.from_json(config["backbone"]))
        heads, _ = load_heads(run / "heads.safetensors")
        sweep = CalibrationSweep.load(run / "thresholds.safetensors")
        lo, hi = float(sweep.margins.min()), float(sweep.margins.max())
        i = int((sweep.margins - float(margin)).abs().argmin())
        if not lo - 1e-6 <= float(margin) <= hi + 1e-6:
            raise ValueError(
                f"margin: expected a value within the calibrated sweep "
                f"[{float(sweep.margins.min()):.3f}, {float(sweep.margins.max()):.3f}], got {margin}"
            )
        return cls(backbone, list(heads), sweep.at(i)).to(device)

    def to_torchscript(self) -> torch.jit.ScriptModule:
        """This cascade as TorchScript, for deployment without Python (see :class:`DeployableCascade`).

        The scripted module calls the C++ ops ``calexnet_fast::compact`` / ``scatter_rows_`` from its graph;
        save it with ``.save(path)`` and load it with ``torch.jit.load`` after ``import calexnet_fast`` (Python)
        or after loading ``libcalexnet_fast_cpu.so`` (and ``libcalexnet_fast_cuda.so``) in libtorch.
        """
        heads = [h.fold() if isinstance(h, PrototypePoolingHead) else h for h in self.heads]
        device = self.thresholds.device
        deployable = DeployableCascade(
            list(self.stages), [h.to(device) for h in heads], self.thresholds, n_classes=self.n_classes
        )
        deployable.in_channels = self.in_channels
        deployable.branch_points = list(self.branch_points)
        return torch.jit.script(deployable)

    def plan(self, device: torch.device | str) -> Plan:
        """The backend used for inputs on ``device``, and why (the same report as ``calexnet_fast.info``)."""
        return cascade_plan(torch.device(device).type)

    def folded_head(self, k: int, device: torch.device) -> FoldedPrototypeHead:
        """Head ``k``'s inference form on ``device``, refolded whenever the head's weights change."""
        head = self.heads[k]
        key = _state_key(head, device)
        cached = self._folded_cache.get(k)
        if cached is None or cached[0] != key:
            cached = (key, head.fold().to(device))
            self._folded_cache[k] = cached
        return cached[1]

    def _head_exit(self, k: int, h: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.heads[k]
        thresholds = self.thresholds[k]
        fused = plan.heads == "triton" and h.is_cuda
        if isinstance(head, PrototypePoolingHead):
            folded = self.folded_head(k, h.device)
            if fused:
                logits, exit_, _, _ = proto_head_exit(h, folded, thresholds)
                return logits, exit_
            logits = folded(h)
        else:
            logits = head(h)
        decide = exit_decision if fused else exit_decision_reference
        exit_, _, _ = decide(logits, thresholds)
        return logits, exit_

    def forward(self, x: torch.Tensor) -> CascadeOutput:
        """Run the cascade, each stage only on the samples still in it.

        Args:
            x: [B, in_channels, H, W] normalised images (any float dtype the stages accept; channels_last
                inputs stay channels_last through the compaction).

        Returns:
            :class:`~calexnet_fast.cascade.CascadeOutput`: logits [B, n_classes] in ``x``'s dtype, exit_index
            [B] int64 (``k`` for branch ``k``, ``K + 1`` for the backbone).
        """
        self.check_input(x)
        with torch.inference_mode():
            return self._run_fast(x, self.plan(x.device))

    def _run_fast(self, x: torch.Tensor, plan: Plan) -> CascadeOutput:
        batch = x.shape[0]
        device = x.device
        exit_index = torch.full([batch], self.n_branches + 1, dtype=torch.int64, device=device)
        if batch == 0:
            return CascadeOutput(torch.empty([0, self.n_classes], dtype=x.dtype, device=device), exit_index)
        position = torch.arange(batch, device=device)  # input position of each row still in the batch
        all_logits: list[torch.Tensor] = []
        all_positions: list[torch.Tensor] = []
        h = x
        for k in range(self.n_branches):
            h = self.stages[k](h)
            logits, exit_ = self._head_exit(k, h, plan)
            all_logits.append(logits)
            all_positions.append(position)
            exit_index.index_fill_(0, position, k + 1)  # survivors are overwritten by their later exit
            h, keep = compact(h, ~exit_)  # on CUDA: the stage's one host sync (the survivor count)
            position = position.index_select(0, keep)
            if h.shape[0] == 0:
                break
        if h.shape[0] > 0:
            all_logits.append(self.stages[-1](h))
            all_positions.append(position)
            exit_index.index_fill_(0, position, self.n_branches + 1)
        out = torch.empty([batch, self.n_classes], dtype=x.dtype, device=device)
        rows = torch.cat([z.to(x.dtype) for z in all_logits])
        # Each sample appears once per stage it reached; the last occurrence (its exit) wins.
        scatter_rows_(out, rows, torch.cat(all_positions))
        return CascadeOutput(out, exit_index)


class DeployableCascade(ReferenceCascade):
    """The TorchScript-able form of :class:`Cascade` (made by :meth:`Cascade.to_torchscript`).

    The same skipping with the C++ ``compact`` op between stages and one last-wins ``scatter_rows_`` at
    the end; heads are given in their folded inference form and the exit rule is the reference one (Triton
    kernels are not part of a TorchScript graph).
    """

    def _run(self, x: torch.Tensor) -> CascadeOutput:
        batch = x.shape[0]
        exit_index = torch.full([batch], self.n_branches + 1, dtype=torch.int64, device=x.device)
        position = torch.arange(batch, device=x.device)
        all_logits: list[torch.Tensor] = []
        all_positions: list[torch.Tensor] = []
        h = x
        alive = batch > 0
        k = 0
        for stage, head in zip(self.stages, self.heads):
            # TorchScript unrolls loops over ModuleLists and forbids `break` there: guard with `alive`.
            if alive:
                h = stage(h)
                logits = head(h)
                exit_, _, _ = exit_decision_reference(logits, self.thresholds[k])
                all_logits.append(logits.to(x.dtype))
                all_positions.append(position)
                exit_index.index_fill_(0, position, k + 1)
                h, keep = compact(h, ~exit_)
                position = position.index_select(0, keep)
                alive = position.shape[0] > 0
            k += 1
        if alive:
            all_logits.append(self.stages[-1](h).to(x.dtype))
            all_positions.append(position)
            exit_index.index_fill_(0, position, self.n_branches + 1)
        out = torch.empty([batch, self.n_classes], dtype=x.dtype, device=x.device)
        if batch > 0:
            scatter_rows_(out, torch.cat(all_logits), torch.cat(all_positions))
        return CascadeOutput(out, exit_index)
