"""The reference early-exit cascade (DESIGN.md §2), in plain PyTorch.

:class:`ReferenceCascade` runs a frozen staged backbone with ``K`` branch heads and per-class thresholds
and really skips work: after each branch the samples that exit are scattered into the output buffer at their
input positions and the survivors are gathered into a dense batch, both by plain boolean indexing, and only
they run the next stage (``calexnet_fast.Cascade`` does the same with the fast ops).
:meth:`ReferenceCascade.simulate` computes every branch's logits and the backbone's for every sample in one
pass, and :func:`apply_exit_rule` turns those into the very output the real cascade gives (calibration and
evaluation use that pair).

The exit test is ``calexnet_fast.exit_rule.exit_decision_reference`` (the one definition of the rule):
a sample exits at the first branch ``k`` with ``max softmax(z_k) >= thresholds[k-1, argmax z_k]``; a NaN
confidence never exits; ``+inf`` means the class never exits; a sample that exits nowhere takes the
backbone's logits. ``exit_index`` is ``k`` (1-based) for branch ``k`` and ``K + 1`` for the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .backbones import StagedBackbone
from .exit_rule import exit_decision_reference

__all__ = [
    "CascadeOutput",
    "ReferenceCascade",
    "SimulatedOutput",
    "apply_exit_rule",
    "check_cascade_thresholds",
]


class CascadeOutput(NamedTuple):
    """What a cascade returns, in the input order.

    Attributes:
        logits: [B, n_classes] the logits of the exit each sample took (input compute dtype).
        exit_index: [B] int64, ``k`` for branch ``k`` (1-based), ``K + 1`` for the backbone.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor


class SimulatedOutput(NamedTuple):
    """Every exit's logits for every sample (``ReferenceCascade.simulate``).

    Attributes:
        branch_logits: [K, B, n_classes] logits of branches ``1 .. K``.
        backbone_logits: [B, n_classes] the backbone's own logits.
    """

    branch_logits: torch.Tensor
    backbone_logits: torch.Tensor


def check_cascade_thresholds(
    thresholds: torch.Tensor | Sequence, n_branches: int, n_classes: int, name: str = "thresholds"
) -> torch.Tensor:
    """Validate cascade thresholds and return them as a float32 tensor (same device as given).

    Args:
        thresholds: [K, n_classes] floating values; ``+inf`` (never exits) and ``-inf`` (always exits) are
            allowed, NaN is not. Array-likes are converted with ``torch.as_tensor``.
        n_branches: ``K``.
        n_classes: number of classes.

    Raises:
        ValueError: naming ``name``, the expected and the given shape / dtype / value.
    """
    if not isinstance(thresholds, torch.Tensor):
        try:
            if isinstance(thresholds, (str, bytes)):
                raise TypeError(type(thresholds).__name__)
            thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{name}: expected a tensor of shape [{n_branches}, {n_classes}], got {type(thresholds).__name__}"
            ) from None
    if thresholds.dim() != 2 or tuple(thresholds.shape) != (n_branches, n_classes):
        raise ValueError(
            f"{name}: expected shape [{n_branches}, {n_classes}] (K branches x n_classes), got {list(thresholds.shape)}"
        )
    if not thresholds.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {thresholds.dtype}")
    if bool(torch.isnan(thresholds).any()):
        bad = torch.isnan(thresholds).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected no NaN (use +inf for 'never exits'), got NaN at {bad}")
    return thresholds.to(torch.float32)


def apply_exit_rule(
    branch_logits: torch.Tensor, backbone_logits: torch.Tensor, thresholds: torch.Tensor
) -> CascadeOutput:
    """The cascade's output computed from simulated logits (identical to the real cascade's).

    Args:
        branch_logits: [K, B, C] logits of every branch for every sample.
        backbone_logits: [B, C] the backbone's logits.
        thresholds: [K, C] per-branch, per-class thresholds.

    Returns:
        :class:`CascadeOutput`; logits in ``branch_logits``' dtype.
    """
    if branch_logits.dim() != 3:
        raise ValueError(f"branch_logits: expected a 3-D tensor [K, B, C], got shape {list(branch_logits.shape)}")
    n_branches, batch, n_classes = branch_logits.shape[0], branch_logits.shape[1], branch_logits.shape[2]
    if backbone_logits.dim() != 2 or backbone_logits.shape[0] != batch or backbone_logits.shape[1] != n_classes:
        raise ValueError(f"backbone_logits: expected shape [{batch}, {n_classes}], got {list(backbone_logits.shape)}")
    if thresholds.dim() != 2 or thresholds.shape[0] != n_branches or thresholds.shape[1] != n_classes:
        raise ValueError(f"thresholds: expected shape [{n_branches}, {n_classes}], got {list(thresholds.shape)}")
    device = branch_logits.device
    exit_index = torch.full([batch], n_branches + 1, dtype=torch.int64, device=device)
    logits = backbone_logits.to(branch_logits.dtype).clone()
    done = torch.zeros([batch], dtype=torch.bool, device=device)
    for k in range(n_branches):
        ex, _, _ = exit_decision_reference(branch_logits[k], thresholds[k])
        take = ex & ~done
        exit_index = exit_index.masked_fill(take, k + 1)
        logits = torch.where(take.unsqueeze(1), branch_logits[k], logits)
        done = done | ex
    return CascadeOutput(logits, exit_index)


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

    # -- forward ----------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is [B, in_channels, H, W]."""
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got shape {list(x.shape)}")
        if self.in_channels > 0 and x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (dimension 1), got {x.shape[1]}")

    def forward(self, x: torch.Tensor) -> CascadeOutput:
        """Run the cascade, computing each stage only for the samples still in it.

        Args:
            x: [B, in_channels, H, W] normalised images.

        Returns:
            :class:`CascadeOutput` (logits [B, n_classes] in the heads' compute dtype, exit_index [B] int64).

        This is an inference path (no autograd); train heads on ``StagedBackbone.features`` or
        :meth:`simulate`, which are plain differentiable passes through the heads.
        """
        self.check_input(x)
        with torch.no_grad():  # an inference path: heads train on features() or simulate()
            return self._run(x)

    def _run(self, x: torch.Tensor) -> CascadeOutput:
        # Plain PyTorch on purpose (boolean indexing): this is the semantics the fast Cascade is checked
        # against, and the baseline it is measured against.
        batch = x.shape[0]
        exit_index = torch.full([batch], self.n_branches + 1, dtype=torch.int64, device=x.device)
        out = torch.empty([0])
        position = torch.arange(batch, device=x.device)  # input position of each row still in the batch
        h = x
        alive = True
        k = 0
        for stage, head in zip(self.stages, self.heads):
            # TorchScript unrolls loops over ModuleLists and forbids `break` there: guard with `alive`.
            if alive:
                h = stage(h)
                z = head(h)
                if k == 0:
                    out = torch.empty([batch, self.n_classes], dtype=z.dtype, device=z.device)
                ex, _, _ = exit_decision_reference(z, self.thresholds[k])
                dest = position[ex]
                out[dest] = z[ex].to(out.dtype)
                exit_index[dest] = k + 1
                stay = ~ex
                h = h[stay]
                position = position[stay]
                alive = position.shape[0] > 0
            k += 1
        if alive:
            zb = self.stages[-1](h)
            out[position] = zb.to(out.dtype)
        return CascadeOutput(out, exit_index)

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
        """:func:`apply_exit_rule` with this cascade's thresholds."""
        return apply_exit_rule(simulated.branch_logits, simulated.backbone_logits, self.thresholds)

    def extra_repr(self) -> str:
        return f"n_branches={self.n_branches}, n_classes={self.n_classes}, branch_points={self.branch_points}"
