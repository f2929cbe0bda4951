"""The baselines' exit heads: each exit of a trained baseline as one step of a score cascade.

An exit head is ``forward(h, state) -> (logits [n, C], score [n], pred [n], state)``: ``state`` is what the
baseline's rule carries from exit to exit (``None`` at exit 1; a tensor whose rows are the samples, e.g. the
earlier heads' outputs), ``logits`` what the cascade outputs for a sample leaving there (its argmax is
``pred``). The score cascade exits a sample where ``score >= τ`` and compacts the state rows with the
survivors. Scores and predictions equal the models' own ``exit_outputs``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import GridPrototypeHead, PrototypePoolingHead
from .models import ZTW, BoostNet, PTEEnet, PTEEnetExit, boosted_predictions

__all__ = ["BoostNetExitHead", "PTEEnetExitHead", "ZTWExitHead", "baseline_exit_heads"]


class PTEEnetExitHead(nn.Module):
    """PTEEnet's exit ``k`` as an exit head: score = the sigmoid confidence head, pred = argmax of the
    classifier (:meth:`PTEEnet.exit_outputs`)."""

    def __init__(self, block: PTEEnetExit) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor, state: torch.Tensor | None = None):
        logits, conf = self.block(h)
        return logits, conf.float(), logits.argmax(-1), None


class BoostNetExitHead(nn.Module):
    """BoostNet's exit ``k``: ``F_k = out_k + r F_{k-1}`` from the raw outputs of heads ``1..k`` (the state,
    [n, k, C]); score and pred = max and argmax of ``softmax(F_k)`` (:meth:`BoostNet.exit_outputs`); the
    output is ``softmax(F_k)``. Prototype heads run in their folded inference form, as in :class:`Cascade`
    (a snapshot: fold again after further training)."""

    def __init__(self, model: BoostNet, k: int) -> None:
        super().__init__()
        head = model.heads[k]
        self.head = head.fold() if isinstance(head, (PrototypePoolingHead, GridPrototypeHead)) else head
        self.r, self.k = model.r, k

    def forward(self, h: torch.Tensor, state: torch.Tensor | None = None):
        out = self.head(h).float().unsqueeze(1)
        outs = out if state is None else torch.cat([state, out], dim=1)  # [n, k + 1, C]
        p = torch.softmax(boosted_predictions(outs.transpose(0, 1), self.r)[-1], dim=-1)
        conf, pred = p.max(dim=-1)
        return p, conf, pred, outs


class ZTWExitHead(nn.Module):
    """ZTW's exit ``k``: internal classifier ``k`` (reading head ``k-1``'s logits, the last row of the state
    [n, k, C]) and the level-``k`` geometric ensemble of heads ``1..k``; score and pred = max and argmax of
    the ensemble's probability (:meth:`ZTW.exit_outputs`); the output is that probability."""

    def __init__(self, model: ZTW, k: int) -> None:
        super().__init__()
        self.head, self.ensembles, self.k = model.heads[k], model.ensembles, k
        self.n_levels = len(model.heads)

    def forward(self, h: torch.Tensor, state: torch.Tensor | None = None):
        z = self.head(h, state[:, -1] if state is not None else None).unsqueeze(1)
        zs = z if state is None else torch.cat([state, z], dim=1)  # [n, k + 1, C]
        # level k reads levels <= k only: pad the later levels (their values do not matter) and take level k
        pad = zs.new_zeros(zs.shape[0], self.n_levels - zs.shape[1], zs.shape[2])
        logq = self.ensembles(torch.cat([zs, pad], dim=1).transpose(0, 1).float())[self.k]
        conf, pred = logq.exp().max(dim=-1)
        return logq.exp(), conf, pred, zs


def baseline_exit_heads(model: nn.Module) -> list[nn.Module]:
    """The K exit heads of a trained baseline (:class:`PTEEnet`, :class:`ZTW` or :class:`BoostNet`)."""
    if isinstance(model, PTEEnet):
        return [PTEEnetExitHead(b) for b in model.heads]
    if isinstance(model, BoostNet):
        return [BoostNetExitHead(model, k) for k in range(len(model.heads))]
    if isinstance(model, ZTW):
        return [ZTWExitHead(model, k) for k in range(len(model.heads))]
    raise ValueError(f"model: expected a PTEEnet, ZTW or BoostNet, got {type(model).__name__}")
