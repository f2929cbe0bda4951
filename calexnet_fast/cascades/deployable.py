"""``DeployableCascade``: the TorchScript form of the fast cascade (made by ``Cascade.to_torchscript``)."""

from __future__ import annotations

import torch

from ..ops import compact, scatter_rows_
from .reference import ReferenceCascade

__all__ = ["DeployableCascade"]


class DeployableCascade(ReferenceCascade):
    """The TorchScript-able form of :class:`~calexnet_fast.Cascade` (made by ``Cascade.to_torchscript``).

    The cascade loop of :class:`~calexnet_fast.cascades.ReferenceCascade` with the fast cascade's
    compaction and output write, both C++ ops that are part of the TorchScript graph: ``compact`` between
    stages and one last-wins ``scatter_rows_`` at the end. Heads are given in their folded inference form
    and run as modules followed by the reference exit rule (Triton kernels are not part of a TorchScript
    graph).
    """

    def _compact(self, h: torch.Tensor, stay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The survivors as a dense batch and their positions (the C++ ``compact`` op)."""
        return compact(h, stay)

    def _write(self, out: torch.Tensor, logits: list[torch.Tensor], positions: list[torch.Tensor]) -> None:
        """Every stage's logits in one ``scatter_rows_``, whose last-occurrence-wins rule keeps each sample's
        deepest stage (its exit)."""
        scatter_rows_(out, torch.cat(logits), torch.cat(positions))
