"""Pareto envelopes of operating points, reading them at a reduction, their area, and statistics over seeds.

Per method and seed, :func:`pareto_envelope` keeps the upper Pareto envelope of the points;
:func:`envelope_value` reads it at a reduction by linear interpolation between envelope points (a mix of
two operating points achieves any point on the segment between them); below the envelope's smallest
reduction its first accuracy applies (that point saves more and is at least as accurate); beyond its
largest reduction the method cannot go (NaN). :func:`envelope_area` is the mean accuracy of the envelope
over 30–70 % reduction (the area divided by the width; NaN if the envelope does not reach 70 %).
:func:`reduction_at_accuracy` is the largest reduction the envelope reaches at or above an accuracy (read at
the backbone's accuracy minus 1 and 2 points: "the reduction at ≤ 1 % loss").
:func:`aggregate` gives mean ± std (sample std, ``ddof=1``) over seeds, :func:`summarize` all of it per method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .points import SweepResult

__all__ = [
    "AREA_RANGE",
    "REDUCTIONS",
    "aggregate",
    "envelope_area",
    "envelope_value",
    "pareto_envelope",
    "reduction_at_accuracy",
    "seed_summary",
    "summarize",
]

REDUCTIONS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
AREA_RANGE: tuple[float, float] = (0.3, 0.7)
LOSSES: tuple[float, ...] = (0.01, 0.02)  # accuracy losses (fractions) at which the reached reduction is read


def pareto_envelope(flops_reduction: Sequence[float], accuracy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The upper Pareto envelope: points no other point beats on both reduction and accuracy.

    Returns:
        (reduction, accuracy) float64 arrays sorted by increasing reduction, accuracy strictly decreasing.
        Non-finite points are ignored; ties keep one point.
    """
    x = np.asarray(flops_reduction, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"accuracy: expected {x.shape[0]} values like flops_reduction, got {y.shape[0]}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return x, y
    order = np.lexsort((-y, -x))  # by reduction descending, then accuracy descending
    keep_x, keep_y = [], []
    best = -np.inf
    for i in order:
        if y[i] > best:
            keep_x.append(x[i])
            keep_y.append(y[i])
            best = y[i]
    return np.asarray(keep_x[::-1]), np.asarray(keep_y[::-1])


def envelope_value(env_x: np.ndarray, env_y: np.ndarray, reduction: float | np.ndarray) -> np.ndarray | float:
    """Accuracy of an envelope at ``reduction`` (linear between envelope points; NaN past its end).

    Args:
        env_x, env_y: from :func:`pareto_envelope`.
        reduction: a float or an array.
    """
    r = np.asarray(reduction, dtype=np.float64)
    if env_x.size == 0:
        out = np.full(r.shape, np.nan)
    else:
        out = np.interp(r, env_x, env_y, left=env_y[0], right=np.nan)
        out = np.where(r > env_x[-1] + 1e-12, np.nan, out)
    return float(out) if out.ndim == 0 else out


def envelope_area(env_x: np.ndarray, env_y: np.ndarray, lo: float = 0.3, hi: float = 0.7) -> float:
    """Mean accuracy of the envelope over ``[lo, hi]`` reduction (its area there divided by ``hi − lo``).

    NaN when the envelope does not reach ``hi`` (the method cannot save that much).
    """
    if not hi > lo:
        raise ValueError(f"hi: expected > lo={lo}, got {hi}")
    if env_x.size == 0 or env_x[-1] < hi - 1e-12:
        return float("nan")
    xs = np.concatenate([[lo], env_x[(env_x > lo) & (env_x < hi)], [hi]])
    ys = envelope_value(env_x, env_y, xs)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / (hi - lo))


def aggregate(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` over seeds; std is the sample std (ddof=1; 0 for one value).

    Mean and std are NaN (``null`` in JSON) if any value is NaN: a method that misses a point on one seed
    has no mean there.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return {"mean": float("nan"), "std": float("nan"), "n": int(v.size), "values": v.tolist()}
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size), "values": v.tolist()}


def reduction_at_accuracy(env_x: np.ndarray, env_y: np.ndarray, min_accuracy: float) -> float:
    """The largest reduction on the envelope (linear between its points) whose accuracy is at least
    ``min_accuracy``; 0 when no point reaches it (running the backbone alone: no reduction, no loss)."""
    ok = np.flatnonzero(env_y >= min_accuracy)
    if ok.size == 0:
        return 0.0
    i = int(ok[-1])
    if i + 1 == env_x.size:
        return float(env_x[i])
    x0, x1, y0, y1 = env_x[i], env_x[i + 1], env_y[i], env_y[i + 1]
    return float(x0 + (x1 - x0) * (y0 - min_accuracy) / (y0 - y1))


def seed_summary(
    sweep: SweepResult,
    reductions: Sequence[float] = REDUCTIONS,
    area_range=AREA_RANGE,
    backbone_accuracy: float | None = None,
) -> dict:
    """Envelope, accuracy at each reduction, area and (given the backbone's accuracy) the reduction reached
    at each of :data:`LOSSES` for one method and seed."""
    ex, ey = pareto_envelope(sweep.flops_reduction, sweep.accuracy)
    out = {
        "envelope": {"flops_reduction": ex.tolist(), "accuracy": ey.tolist()},
        "accuracy_at": {f"{r:g}": envelope_value(ex, ey, r) for r in reductions},
        "area": envelope_area(ex, ey, *area_range),
        "max_reduction": float(ex[-1]) if ex.size else float("nan"),
    }
    if backbone_accuracy is not None:
        out["reduction_at_loss"] = {
            f"{loss:g}": reduction_at_accuracy(ex, ey, backbone_accuracy - loss) for loss in LOSSES
        }
    return out


def summarize(
    sweeps: dict[str, list[SweepResult]],
    reductions: Sequence[float] = REDUCTIONS,
    area_range: tuple[float, float] = AREA_RANGE,
    band_grid: np.ndarray | None = None,
    backbone_accuracy: float | None = None,
) -> dict:
    """Per method: per-seed envelopes and metrics, their mean ± std, and the seed band on a grid.

    Args:
        sweeps: method -> one :class:`~calexnet_fast.evaluation.points.SweepResult` per seed.
        reductions: where accuracy is read off the envelopes.
        area_range: reduction range of the area.
        band_grid: reductions of the band (default 0 … 0.8 by 0.005).
        backbone_accuracy: the backbone's accuracy on the same images: adds ``reduction_at_loss`` (the
            reduction reached at each of :data:`LOSSES`), per seed and aggregated.

    Returns:
        ``{method: {"seeds": [...], "accuracy_at": {r: aggregate}, "area": aggregate,
        "max_reduction": aggregate, "band": {"flops_reduction", "mean", "std"}}}``, plus
        ``reduction_at_loss`` with ``backbone_accuracy`` and ``exit_accuracy`` (per exit, aggregated) where
        the sweeps' ``info`` records it; band values are NaN where any seed's envelope does not reach.
    """
    grid = np.round(np.arange(0.0, 0.8001, 0.005), 6) if band_grid is None else np.asarray(band_grid)
    out = {}
    for method, runs in sweeps.items():
        per_seed = [seed_summary(s, reductions, area_range, backbone_accuracy) for s in runs]
        curves = np.stack(
            [
                envelope_value(
                    np.asarray(p["envelope"]["flops_reduction"]), np.asarray(p["envelope"]["accuracy"]), grid
                )
                for p in per_seed
            ]
        )
        all_ok = np.all(np.isfinite(curves), axis=0)
        mean = np.where(all_ok, np.nanmean(np.where(all_ok, curves, 0.0), axis=0), np.nan)
        std = (
            np.where(all_ok, np.std(np.where(all_ok, curves, 0.0), axis=0, ddof=1), np.nan)
            if len(runs) > 1
            else np.where(all_ok, 0.0, np.nan)
        )
        out[method] = {
            "seeds": [{"seed": s.seed, **p} for s, p in zip(runs, per_seed, strict=True)],
            "accuracy_at": {f"{r:g}": aggregate([p["accuracy_at"][f"{r:g}"] for p in per_seed]) for r in reductions},
            "area": aggregate([p["area"] for p in per_seed]),
            "max_reduction": aggregate([p["max_reduction"] for p in per_seed]),
            "band": {"flops_reduction": grid.tolist(), "mean": mean.tolist(), "std": std.tolist()},
        }
        if backbone_accuracy is not None:
            out[method]["reduction_at_loss"] = {
                f"{loss:g}": aggregate([p["reduction_at_loss"][f"{loss:g}"] for p in per_seed]) for loss in LOSSES
            }
        exit_acc = [(s.info or {}).get("exit_accuracy") for s in runs]
        if exit_acc and all(a is not None for a in exit_acc):
            out[method]["exit_accuracy"] = [aggregate(list(col)) for col in zip(*exit_acc, strict=True)]
    return out
