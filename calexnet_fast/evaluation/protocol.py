"""Where thresholds are chosen and where they are judged: the evaluation protocol of ``compare`` and ``measure``.

``"test-half"`` (the default of ``calexnet compare``): a stratified half of the test split, drawn with a fixed
seed (:func:`calibration_halves`), calibrates; the other half is reported. ``"val"``: the validation split carved out
of train calibrates and the whole test split is reported. A pretrained backbone has usually seen every
training image, so only the first keeps calibration and report on images it has not seen (docs/design.md §1).
"""

from __future__ import annotations

import torch

from ..data import stratified_split

__all__ = ["CALIBRATIONS", "Protocol", "check_calibration", "calibration_halves"]

CALIBRATIONS = ("test-half", "val")


def check_calibration(mode: str) -> None:
    if mode not in CALIBRATIONS:
        raise ValueError(f"calibration: expected one of {CALIBRATIONS}, got {mode!r}")


def calibration_halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reported rows, calibration rows) of the test split: stratified halves drawn with ``seed``."""
    return stratified_split(labels, 0.5, seed=seed)


class Protocol:
    """The calibration and reported rows of one ``compare`` run (``mode`` in :data:`CALIBRATIONS`), with the
    backbone's logits and labels on each (``z_cal``, ``y_cal``, ``z_eval``, ``y_eval``); ``va`` and ``te`` are
    the validation and test feature caches."""

    def __init__(self, mode: str, seed: int, va, te) -> None:
        check_calibration(mode)
        y_test, z_test = te.labels_tensor(), te.logits_tensor()
        self.mode, self.seed = mode, seed
        if mode == "test-half":
            self.eval_idx, self.cal_idx = calibration_halves(y_test, seed)
            self.y_cal, self.z_cal = y_test[self.cal_idx], z_test[self.cal_idx]
            self.y_eval, self.z_eval = y_test[self.eval_idx], z_test[self.eval_idx]
        else:
            self.eval_idx = self.cal_idx = None
            self.y_cal, self.z_cal = va.labels_tensor(), va.logits_tensor()
            self.y_eval, self.z_eval = y_test, z_test

    def calibration_rows(self, on_val: torch.Tensor, on_test: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The calibration rows, given a quantity on the validation and on the test split (rows on ``dim``)."""
        return on_val if self.cal_idx is None else on_test.index_select(dim, self.cal_idx)

    def eval_rows(self, on_test: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The reported rows of a quantity on the test split (rows on ``dim``)."""
        return on_test if self.eval_idx is None else on_test.index_select(dim, self.eval_idx)

    def to_json(self) -> dict:
        return {
            "calibration": self.mode,
            "calibration_seed": self.seed if self.mode == "test-half" else None,
            "n_calibration": int(self.y_cal.numel()),
            "n_reported": int(self.y_eval.numel()),
        }
