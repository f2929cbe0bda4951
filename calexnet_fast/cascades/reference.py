"""The reference early-exit cascade (docs/design.md §2) and the one cascade loop every cascade runs.

:class:`ReferenceCascade` runs a frozen staged backbone with ``K`` branch heads and per-class thresholds
and really skips work: after each branch the samples that exit leave the batch, the survivors are gathered
into a dense batch and only they run the next stage. Its loop (:meth:`ReferenceCascade._run`) is the one
loop of every cascade; a cascade differs only in three steps of it, each a method:

- ``_head_exit(k, h) -> (logits, exit)``: how branch ``k``'s head and its exit decision run (here: the head
  module, then :func:`calexnet_fast.exit_rule.exit_decision_reference`);
- ``_compact(h, stay) -> (rows, index)``: how the survivors are gathered (here: boolean indexing; on CPU
  not called where no row exits: every row goes on as it is, see ``_none_exit``);
- ``_write(out, logits, positions)``: how every stage's logits land at their input positions, the deepest
  stage of a sample winning (here: one ``index_copy_`` per stage, in stage order).

Here each step is plain PyTorch: this is the semantics the fast ``calexnet_fast.Cascade`` is checked against.
:meth:`ReferenceCascade.simulate` computes every branch's logits and the backbone's for every sample in one
pass, and :meth:`ReferenceCascade.decide` (:func:`calexnet_fast.exit_rule.apply_exit_rule`) turns those
into the very output the real cascade gives (calibration and evaluation use that pair). The exit rule
itself is :mod:`calexnet_fast.exit_rule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..backbones import StagedBackbone
from ..exit_rule import CascadeOutput, apply_exit_rule, check_cascade_thresholds, exit_decision_reference

__all__ = ["ReferenceCascade", "SimulatedOutput"]


class SimulatedOutput(NamedTuple):
    """Every exit's logits for every sample (``ReferenceCascade.simulate``).

    Attributes:
        branch_logits: [K, B, n_classes] logits of branches ``1 .. K``.
        backbone_logits: [B, n_classes] the backbone's own logits.
    """

    branch_logits: torch.Tensor
    backbone_logits: torch.Tensor


class ReferenceCascade(nn.Module):
    """An early-exit cascade over a frozen staged backbone that really drops exited samples.

    Args:
        stages_or_backbone: a :class:`~calexnet_fast.backbones.StagedBackbone`, or its ``K + 1`` stages
            (stage ``k < K`` gives the input of head ``k + 1``; stage ``K`` returns the backbone logits).
            The modules are shared, not copied.
        heads: ``K`` modules, head ``k`` mapping ``f_k`` [B, C_k, H_k, W_k] to logits [B, n_classes].
        thresholds: [K, n_classes] per-class exit thresholds (``+inf``: never exits); default all ``+inf``.
        n_classes: needed only when stages are given and ``thresholds`` is ``None``.
        in_channels: input channels to check (taken from the backbone when one is given).
        input_size: ``(H, W)`` used to probe the heads' output shapes at construction (taken from the
            backbone when one is given; without it the probe is skipped).

    Attributes:
        stages: ``nn.ModuleList`` of ``K + 1`` stages.  heads: ``nn.ModuleList`` of ``K`` heads.
        thresholds: [K, n_classes] float32 buffer (kept float32 by ``.to(dtype)``/``.half()``).
        n_branches, n_classes, in_channels (-1 = unchecked), branch_points.

    The heads run in whatever mode they are in: call ``.eval()`` for inference.

    Export: ``torch.jit.script`` works on the whole module (``forward``, ``simulate``, ``decide``), as long
    as the stages and heads are scriptable. ``torch.export`` works for :meth:`simulate` (fixed shapes);
    the real ``forward`` has data-dependent batch sizes (the survivors) and an early stop when none are
    left, which torch.export cannot trace through the convolutions; use TorchScript or eager for it.
    """

    def __init__(
        self,
        stages_or_backbone: StagedBackbone | Sequence[nn.Module],
        heads: Sequence[nn.Module],
        thresholds: torch.Tensor | Sequence | None = None,
        *,
        n_classes: int | None = None,
        in_channels: int | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(stages_or_backbone, StagedBackbone):
            bb = stages_or_backbone
            stages = list(bb.stages)
            branch_points = list(bb.branch_points)
            if n_classes is not None and int(n_classes) != bb.n_classes:
                raise ValueError(f"n_classes: expected {bb.n_classes} (backbone.n_classes), got {n_classes}")
            n_classes = bb.n_classes
            in_channels = bb.in_channels
            input_size = bb.input_size if input_size is None else input_size
        elif isinstance(stages_or_backbone, (Sequence, nn.ModuleList)) and not isinstance(stages_or_backbone, str):
            stages = list(stages_or_backbone)
            if len(stages) < 2:
                raise ValueError(f"stages_or_backbone: expected at least 2 stages (K + 1, K >= 1), got {len(stages)}")
            branch_points = [f"stage{i}" for i in range(len(stages) - 1)]
        else:
            raise ValueError(
                "stages_or_backbone: expected a StagedBackbone or a sequence of K + 1 nn.Module stages, "
                f"got {type(stages_or_backbone).__name__}"
            )
        for i, s in enumerate(stages):
            if not isinstance(s, nn.Module):
                raise ValueError(f"stages_or_backbone: stage {i}: expected an nn.Module, got {type(s).__name__}")
        n_branches = len(stages) - 1
        if isinstance(heads, nn.Module) and not isinstance(heads, nn.ModuleList):
            raise ValueError(f"heads: expected a sequence of {n_branches} modules, got a single {type(heads).__name__}")
        heads = list(heads)
        if len(heads) != n_branches:
            raise ValueError(
                f"heads: expected {n_branches} heads (one per branch point {branch_points}), got {len(heads)}"
            )
        for i, h in enumerate(heads):
            if not isinstance(h, nn.Module):
                raise ValueError(f"heads[{i}]: expected an nn.Module, got {type(h).__name__}")
        if n_classes is None:
            if thresholds is None:
                raise ValueError(
                    "n_classes: expected an int when stages (not a StagedBackbone) and no thresholds are given"
                )
            n_classes = int(thresholds.shape[-1]) if isinstance(thresholds, torch.Tensor) and thresholds.dim() else 0
            if n_classes == 0:
                try:
                    n_classes = int(torch.as_tensor(thresholds).shape[-1])
                except (TypeError, ValueError, RuntimeError, IndexError):
                    raise ValueError(
                        f"thresholds: expected a [K, n_classes] tensor, got {type(thresholds).__name__}"
                    ) from None
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.n_branches: int = n_branches
        self.n_classes: int = int(n_classes)
        self.in_channels: int = -1 if in_channels is None else int(in_channels)
        self.branch_points: list[str] = branch_points
        if thresholds is None:
            thresholds = torch.full((n_branches, self.n_classes), float("inf"))
        thr = check_cascade_thresholds(thresholds, n_branches, self.n_classes)
        p = next(self.stages.parameters(), None)
        self.register_buffer("thresholds", thr.to(p.device if p is not None else thr.device))
        if input_size is not None and self.in_channels > 0:
            self._probe_heads(input_size)

    # -- construction helpers ---------------------------------------------------------------------

    def _probe_heads(self, input_size: int | tuple[int, int]) -> None:
        """Run a batch of 2 zeros through stages and heads (eval mode, no grad) to check the head outputs."""
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        p = next(self.stages.parameters(), None)
        x = torch.zeros(
            2,
            self.in_channels,
            *size,
            dtype=p.dtype if p is not None else torch.float32,
            device=p.device if p is not None else "cpu",
        )
        saved = [(m, m.training) for h in self.heads for m in h.modules()]
        try:
            self.heads.eval()
            with torch.no_grad():
                h = x
                for k, (stage, head) in enumerate(zip(self.stages, self.heads)):  # noqa: B905 - K+1 vs K
                    h = stage(h)
                    try:
                        z = head(h)
                    except Exception as exc:
                        raise ValueError(
                            f"heads[{k}]: failed on the features of branch point {self.branch_points[k]!r} "
                            f"(shape [B, {', '.join(str(s) for s in h.shape[1:])}]): {exc}"
                        ) from exc
                    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.n_classes:
                        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                        got = f"[B, {got[1]}]" if isinstance(got, list) and len(got) == 2 else got
                        raise ValueError(
                            f"heads[{k}]: expected logits [B, {self.n_classes}] on the features of branch "
                            f"point {self.branch_points[k]!r}, got {got}"
                        )
        finally:
            for m, mode in saved:
                m.training = mode

    def set_thresholds(self, thresholds: torch.Tensor | Sequence) -> None:
        """Replace the thresholds ([K, n_classes], validated, stored as float32 on the module's device)."""
        thr = check_cascade_thresholds(thresholds, self.n_branches, self.n_classes)
        self.thresholds = thr.to(self.thresholds.device)

    def _apply(self, fn, recurse: bool = True):
        # Casting the model (.half(), .to(torch.bfloat16)) must not round the thresholds: that would change
        # which samples exit. Device moves still apply.
        thr = self.thresholds
        out = super()._apply(fn, recurse)
        if self.thresholds.dtype != torch.float32:
            self.thresholds = thr.to(device=self.thresholds.device, dtype=torch.float32)
        return out

    def _parameter_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating parameter of the stages (else of the heads); ``None`` if none."""
        for module in (self.stages, self.heads):
            for t in module.parameters():
                if t.is_floating_point():
                    return t.dtype
        return None

    # -- forward ----------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is [B, in_channels, H, W] on the cascade's device and dtype."""
        if not torch.jit.is_scripting() and not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got shape {list(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x: expected a non-empty image size H x W, got shape {list(x.shape)}")
        if self.in_channels > 0 and x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (dimension 1), got {x.shape[1]}")
        if x.device != self.thresholds.device:
            raise ValueError(f"x: expected device {self.thresholds.device} (that of the cascade), got {x.device}")
        if not torch.jit.is_scripting():  # TorchScript formats a dtype as a number
            dtype = self._parameter_dtype()
            if dtype is not None and x.dtype != dtype:
                raise ValueError(
                    f"x: expected dtype {dtype} (that of the cascade's parameters; cast one to the other), "
                    f"got {x.dtype}"
                )

    def forward(self, x: torch.Tensor) -> CascadeOutput:
        """Run the cascade, computing each stage only for the samples still in it.

        Args:
            x: [B, in_channels, H, W] normalised images, in the dtype and on the device of the cascade.

        Returns:
            :class:`~calexnet_fast.exit_rule.CascadeOutput` (logits [B, n_classes] in ``x``'s dtype,
            exit_index [B] int64).

        This is an inference path (no autograd); train heads on ``StagedBackbone.features`` or
        :meth:`simulate`, which are plain differentiable passes through the heads.
        """
        self.check_input(x)
        with torch.no_grad():  # an inference path: heads train on features() or simulate()
            return self._run(x)

    def _run(self, x: torch.Tensor) -> CascadeOutput:
        """The cascade loop (every cascade's): stage, head and exit decision, compaction; one write at the end.

        Each sample's logits are kept once per stage it reached, with its input position; :meth:`_write`
        lets the last (deepest) of them win, which is the exit it took.
        """
        batch = x.shape[0]
        exit_index = torch.full([batch], self.n_branches + 1, dtype=torch.int64, device=x.device)
        position = torch.arange(batch, device=x.device)  # input position of each row still in the batch
        all_logits: list[torch.Tensor] = []
        all_positions: list[torch.Tensor] = []
        h = x
        alive = batch > 0
        k = 0
        for stage, _ in zip(self.stages, self.heads):
            # TorchScript unrolls loops over ModuleLists and forbids `break` there: guard with `alive`.
            if alive:
                h = stage(h)
                logits, exit_ = self._head_exit(k, h)
                if not self._none_exit(exit_):  # else every row goes on as it is, and a deeper stage writes it
                    all_logits.append(logits.to(x.dtype))
                    all_positions.append(position)
                    exit_index.index_fill_(0, position, k + 1)  # survivors are overwritten by their later exit
                    h, keep = self._compact(h, ~exit_)  # fast cascades: on CUDA the stage's one host sync
                    position = position.index_select(0, keep)
                    alive = position.shape[0] > 0
            k += 1
        if alive:
            all_logits.append(self.stages[-1](h).to(x.dtype))
            all_positions.append(position)
            exit_index.index_fill_(0, position, self.n_branches + 1)
        out = torch.empty([batch, self.n_classes], dtype=x.dtype, device=x.device)
        if batch > 0:
            self._write(out, all_logits, all_positions)
        return CascadeOutput(out, exit_index)

    def _head_exit(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch ``k``: the head module on ``h``, then the exit rule. Returns (logits [n, C], exit [n] bool)."""
        logits = h
        for i, head in enumerate(self.heads):  # TorchScript indexes a ModuleList by literals only
            if i == k:
                logits = head(h)
        exit_, _, _ = exit_decision_reference(logits, self.thresholds[k])
        return logits, exit_

    def _none_exit(self, exit_: torch.Tensor) -> bool:
        """Whether no row leaves at this branch, asked only where the answer costs no host sync (CPU): then
        the loop keeps no output for the stage and hands its rows on uncompacted."""
        return not exit_.is_cuda and not bool(exit_.any())

    def _compact(self, h: torch.Tensor, stay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``h`` where ``stay`` is true, and their positions (boolean indexing)."""
        return h[stay], stay.nonzero().view(-1)

    def _write(self, out: torch.Tensor, logits: list[torch.Tensor], positions: list[torch.Tensor]) -> None:
        """``out[positions[s]] = logits[s]`` stage after stage, so a sample's deepest stage wins."""
        for z, p in zip(logits, positions):  # noqa: B905 - same length
            out.index_copy_(0, p, z)

    @torch.jit.export
    def simulate(self, x: torch.Tensor) -> SimulatedOutput:
        """Every branch's logits and the backbone's for every sample, in one pass (no skipping).

        Args:
            x: [B, in_channels, H, W] normalised images.

        Returns:
            :class:`SimulatedOutput` (branch_logits [K, B, n_classes], backbone_logits [B, n_classes]).
        """
        self.check_input(x)
        zs: list[torch.Tensor] = []
        h = x
        for stage, head in zip(self.stages, self.heads):  # noqa: B905 - K+1 stages, K heads
            h = stage(h)
            zs.append(head(h))
        zb = self.stages[-1](h)
        return SimulatedOutput(torch.stack(zs), zb)

    @torch.jit.export
    def decide(self, simulated: SimulatedOutput) -> CascadeOutput:
        """:func:`~calexnet_fast.exit_rule.apply_exit_rule` with this cascade's thresholds."""
        return apply_exit_rule(simulated.branch_logits, simulated.backbone_logits, self.thresholds)

    def extra_repr(self) -> str:
        return f"n_branches={self.n_branches}, n_classes={self.n_classes}, branch_points={self.branch_points}"
