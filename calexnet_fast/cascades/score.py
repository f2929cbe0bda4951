"""``ScoreCascade``: the fast cascade with the baselines' score-based exit decision per branch."""

from __future__ import annotations

import torch

from ..exit_rule import exit_test
from .fast import Cascade

__all__ = ["ScoreCascade"]


class ScoreCascade(Cascade):
    """A :class:`~calexnet_fast.Cascade` with a score-based exit rule per branch (the baselines').

    Head ``k`` is an *exit head* (``calexnet_fast.baselines.exit_heads``): ``forward(h, state) -> (logits
    [n, C], score [n], pred [n], state)``, where ``state`` is whatever the rule carries from branch to branch
    (``None`` at branch 1; a tensor whose rows are the samples, e.g. the earlier heads' outputs) and
    ``logits`` is what the cascade outputs for a sample leaving there (its argmax must be ``pred``). A sample
    leaves at the first branch with ``score >= thresholds[k, pred]``
    (:func:`calexnet_fast.exit_rule.exit_test`; a NaN score never exits); a global threshold ``τ`` is the
    matrix filled with ``τ``. The cascade loop, stage skipping, compaction and the output write are
    :class:`Cascade`'s own: only the per-branch decision is replaced, and the state rows are compacted with
    the same survivor mask as the feature map. Not re-entrant (the state lives on the module during a
    forward).
    """

    def _head_exit(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k == 0:
            self._carry, self._keep = None, None
        state = self._carry
        if state is not None:
            state = state[self._keep]  # the rows the loop kept with _compact(h, keep), in the same order
        logits, score, pred, state = self.heads[k](h, state)
        exit_ = exit_test(score, pred, self.thresholds[k])
        self._carry, self._keep = state, ~exit_
        return logits, exit_
