"""Accuracy–FLOPs evaluation of early-exit methods, over seeds (DESIGN.md §1 "Evaluation").

A method has one operating parameter: the CPM margin ``m`` for CalexNet, the reference and the ablations
(thresholds calibrated on the **validation** split, :func:`sweep_cpm`), or one global threshold ``τ`` for
the baselines (:func:`sweep_global_threshold`; its grid is uniform on [0, 1] plus quantiles of the
validation scores). Each operating point is measured on the **test** split: accuracy and FLOPs reduction
``1 − E[cost] / cost(backbone)`` under :mod:`calexnet_fast.flops`' cost model (failed heads are paid for).

Per method and seed, :func:`pareto_envelope` keeps the upper Pareto envelope of the points;
:func:`envelope_value` reads it at a reduction by linear interpolation between envelope points (a mix of
two operating points achieves any point on the segment between them); below the envelope's smallest
reduction its first accuracy applies (that point saves more and is at least as accurate); beyond its
largest reduction the method cannot go (NaN). :func:`envelope_area` is the mean accuracy of the envelope
over 30–70 % reduction (the area divided by the width; NaN if the envelope does not reach 70 %).
:func:`summarize` gives mean ± std (sample std, ``ddof=1``) over seeds, :func:`plot_envelopes` the figure
(PNG + SVG, matplotlib Agg) and :func:`results_table` the Markdown table.

``calexnet compare`` (:func:`add_compare_arguments`, :func:`run_compare`) runs methods × seeds for one
backbone and dataset: the backbone's branch features are computed once per split (the engine's feature
cache), every method trains from them, and ``results.json``, ``pareto.png``, ``pareto.svg`` and
``table.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .calibration import calibrate
from .cascade import apply_exit_rule
from .flops import FlopsProfile, exit_histogram

__all__ = [
    "CLI_COMMANDS",
    "CPM_METHODS",
    "DEFAULT_METHODS",
    "REDUCTIONS",
    "SweepResult",
    "add_compare_arguments",
    "aggregate",
    "envelope_area",
    "envelope_value",
    "pareto_envelope",
    "plot_envelopes",
    "results_table",
    "run_compare",
    "summarize",
    "sweep_cpm",
    "sweep_global_threshold",
    "threshold_grid",
]

REDUCTIONS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
AREA_RANGE: tuple[float, float] = (0.3, 0.7)
CPM_METHODS: tuple[str, ...] = (
    "calexnet",
    "reference",
    "reference+weights",
    "reference+kd",
    "reference+aligned",
    "calexnet-weights",
    "calexnet-kd",
    "calexnet-aligned",
)
DEFAULT_METHODS: tuple[str, ...] = (
    "calexnet",
    "reference",
    "reference+weights",
    "reference+kd",
    "reference+aligned",
    "pteenet",
    "ztw",
    "boostnet",
)


# --------------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """The operating points of one method and seed, measured on the test split.

    Attributes:
        method: method name.
        seed: training seed.
        param_name: ``"margin"`` (CPM) or ``"threshold"`` (global threshold).
        params: the operating parameter of each point.
        accuracy: test accuracy of each point (fraction).
        flops_reduction: ``1 − E[cost] / cost(backbone)`` of each point.
        exit_fractions: per point, the K + 1 fractions of test samples leaving at branch 1..K, backbone.
        info: extra facts (head FLOPs, training time, ...).
    """

    method: str
    seed: int
    param_name: str
    params: list[float]
    accuracy: list[float]
    flops_reduction: list[float]
    exit_fractions: list[list[float]]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["params"] = [_finite_or_str(v) for v in self.params]
        return d

    @classmethod
    def from_json(cls, d: dict) -> SweepResult:
        d = dict(d)
        d["params"] = [float(v) for v in d["params"]]
        return cls(**d)


def _finite_or_str(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _point(exit_index: torch.Tensor, correct: torch.Tensor, profile: FlopsProfile) -> tuple[float, float, list[float]]:
    counts = exit_histogram(exit_index, profile.n_branches).double()
    return (
        float(correct.double().mean()),
        profile.flops_reduction(counts),
        (counts / counts.sum()).tolist(),
    )


def _check_labels(labels: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name}: expected a 1-D tensor of {n} labels, got {got}")
    return labels.long().cpu()


def sweep_cpm(
    val_branch_logits: torch.Tensor,
    val_backbone_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_branch_logits: torch.Tensor,
    test_backbone_logits: torch.Tensor,
    test_labels: torch.Tensor,
    profile: FlopsProfile,
    margins: Sequence[float] | torch.Tensor,
    *,
    aligned: bool,
    margin_mode: str = "additive",
    min_support: int = 20,
    bar_from: str = "subset",
    method: str = "cpm",
    seed: int = 0,
) -> SweepResult:
    """CPM thresholds calibrated on validation for every margin, applied to the test split.

    Args:
        val_branch_logits: [K, Nv, C] branch logits on the validation split.
        val_backbone_logits: [Nv, C]; val_labels: [Nv].
        test_branch_logits: [K, Nt, C]; test_backbone_logits: [Nt, C]; test_labels: [Nt].
        profile: the cascade's FLOPs (backbone segments and these heads).
        margins: M margins.
        aligned, margin_mode, min_support, bar_from: CPM options (:func:`calexnet_fast.calibration.calibrate`).
        method, seed: labels of the result.

    Returns:
        :class:`SweepResult` with one point per margin (``param_name="margin"``).
    """
    if test_branch_logits.dim() != 3 or test_branch_logits.shape[0] != profile.n_branches:
        raise ValueError(
            f"test_branch_logits: expected [K={profile.n_branches}, N, C], got {list(test_branch_logits.shape)}"
        )
    y = _check_labels(test_labels, test_branch_logits.shape[1], "test_labels")
    m = torch.as_tensor(margins, dtype=torch.float64).reshape(-1)
    thr = calibrate(
        val_branch_logits,
        val_backbone_logits,
        val_labels,
        m,
        aligned=aligned,
        margin_mode=margin_mode,
        min_support=min_support,
        bar_from=bar_from,
    )
    z = test_branch_logits.float().cpu()
    zb = test_backbone_logits.float().cpu()
    res = SweepResult(method, seed, "margin", m.tolist(), [], [], [])
    for i in range(m.shape[0]):
        out = apply_exit_rule(z, zb, thr[i])
        acc, red, fr = _point(out.exit_index, out.logits.argmax(1) == y, profile)
        res.accuracy.append(acc)
        res.flops_reduction.append(red)
        res.exit_fractions.append(fr)
    return res


def threshold_grid(
    val_scores: torch.Tensor | None = None, n_uniform: int = 101, n_quantiles: int = 199
) -> torch.Tensor:
    """Global thresholds to sweep: ``n_uniform`` points on [0, 1], quantiles of the validation scores (so
    the grid is dense where the scores are, e.g. near 1 for max-probabilities), and ``+inf`` (no exit).

    Args:
        val_scores: [K, N] (or any shape) validation scores; only the validation split places the grid.
        n_uniform, n_quantiles: grid sizes.

    Returns:
        Sorted unique float64 thresholds.
    """
    parts = [torch.linspace(0.0, 1.0, n_uniform, dtype=torch.float64)]
    if val_scores is not None and n_quantiles > 0:
        s = val_scores.detach().double().flatten().cpu()
        s = s[torch.isfinite(s)]
        if s.numel():
            q = torch.linspace(0.0, 1.0, n_quantiles + 2, dtype=torch.float64)[1:-1]
            parts.append(torch.quantile(s, q))
    parts.append(torch.tensor([float("inf")], dtype=torch.float64))
    return torch.unique(torch.cat(parts))


def sweep_global_threshold(
    test_scores: torch.Tensor,
    test_preds: torch.Tensor,
    test_backbone_logits: torch.Tensor,
    test_labels: torch.Tensor,
    profile: FlopsProfile,
    thresholds: Sequence[float] | torch.Tensor,
    *,
    method: str = "baseline",
    seed: int = 0,
) -> SweepResult:
    """A global-threshold exit rule on the test split, for every threshold.

    A sample leaves at the first exit ``k`` with ``test_scores[k] >= τ`` and takes ``test_preds[k]``; one
    that leaves nowhere takes the backbone's argmax (:func:`calexnet_fast.baselines.global_threshold_exit`).

    Args:
        test_scores: [K, N]; test_preds: [K, N] int64; test_backbone_logits: [N, C]; test_labels: [N].
        profile: the cascade's FLOPs.
        thresholds: T thresholds (e.g. :func:`threshold_grid` of the validation scores).

    Returns:
        :class:`SweepResult` with one point per threshold (``param_name="threshold"``).
    """
    from .baselines import global_threshold_exit

    if test_scores.dim() != 2 or test_scores.shape[0] != profile.n_branches:
        raise ValueError(f"test_scores: expected [K={profile.n_branches}, N], got {list(test_scores.shape)}")
    if test_preds.shape != test_scores.shape:
        raise ValueError(f"test_preds: expected shape {list(test_scores.shape)}, got {list(test_preds.shape)}")
    n = test_scores.shape[1]
    y = _check_labels(test_labels, n, "test_labels")
    taus = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    preds = torch.cat([test_preds.long().cpu(), test_backbone_logits.argmax(1).cpu().unsqueeze(0)])  # [K+1, N]
    exits = global_threshold_exit(test_scores.float().cpu(), taus.float())  # [T, N]
    res = SweepResult(method, seed, "threshold", taus.tolist(), [], [], [])
    cols = torch.arange(n)
    for t in range(taus.shape[0]):
        pred = preds[exits[t] - 1, cols]
        acc, red, fr = _point(exits[t], pred == y, profile)
        res.accuracy.append(acc)
        res.flops_reduction.append(red)
        res.exit_fractions.append(fr)
    return res


# --------------------------------------------------------------------------------------------------
# envelopes and summary statistics
# --------------------------------------------------------------------------------------------------


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


def seed_summary(sweep: SweepResult, reductions: Sequence[float] = REDUCTIONS, area_range=AREA_RANGE) -> dict:
    """Envelope, accuracy at each reduction and area for one method and seed."""
    ex, ey = pareto_envelope(sweep.flops_reduction, sweep.accuracy)
    return {
        "envelope": {"flops_reduction": ex.tolist(), "accuracy": ey.tolist()},
        "accuracy_at": {f"{r:g}": envelope_value(ex, ey, r) for r in reductions},
        "area": envelope_area(ex, ey, *area_range),
        "max_reduction": float(ex[-1]) if ex.size else float("nan"),
    }


def summarize(
    sweeps: dict[str, list[SweepResult]],
    reductions: Sequence[float] = REDUCTIONS,
    area_range: tuple[float, float] = AREA_RANGE,
    band_grid: np.ndarray | None = None,
) -> dict:
    """Per method: per-seed envelopes and metrics, their mean ± std, and the seed band on a grid.

    Args:
        sweeps: method -> one :class:`SweepResult` per seed.
        reductions: where accuracy is read off the envelopes.
        area_range: reduction range of the area.
        band_grid: reductions of the band (default 0 … 0.8 by 0.005).

    Returns:
        ``{method: {"seeds": [...], "accuracy_at": {r: aggregate}, "area": aggregate,
        "max_reduction": aggregate, "band": {"flops_reduction", "mean", "std"}}}``; band values are NaN
        where any seed's envelope does not reach.
    """
    grid = np.round(np.arange(0.0, 0.8001, 0.005), 6) if band_grid is None else np.asarray(band_grid)
    out = {}
    for method, runs in sweeps.items():
        per_seed = [seed_summary(s, reductions, area_range) for s in runs]
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
    return out


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write ``obj`` as JSON (NaN/inf become ``null``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# figure and table
# --------------------------------------------------------------------------------------------------

_STYLE = {
    "calexnet": ("#d62728", "-", 2.6),
    "reference": ("#1f77b4", "-", 1.8),
    "reference+weights": ("#9467bd", "--", 1.4),
    "reference+kd": ("#8c564b", "--", 1.4),
    "reference+aligned": ("#e377c2", "--", 1.4),
    "pteenet": ("#2ca02c", "-.", 1.6),
    "ztw": ("#ff7f0e", "-.", 1.6),
    "boostnet": ("#17becf", "-.", 1.6),
}


def plot_envelopes(
    summary: dict,
    paths: Sequence[str | os.PathLike],
    *,
    backbone_accuracy: float | None = None,
    title: str | None = None,
    area_range: tuple[float, float] = AREA_RANGE,
) -> None:
    """Every method's mean envelope with a ±1 std seed band (matplotlib, Agg backend).

    Args:
        summary: from :func:`summarize`.
        paths: files to write (the extension picks the format: ``.png``, ``.svg``, ``.pdf``).
        backbone_accuracy: drawn as a horizontal line.
        title: figure title.
        area_range: shaded reduction range (the area's).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=140)
    ax.axvspan(100 * area_range[0], 100 * area_range[1], color="0.93", zorder=0)
    lows = []
    for i, (method, s) in enumerate(summary.items()):
        color, ls, lw = _STYLE.get(method, (f"C{i % 10}", "-", 1.5))
        x = 100 * np.asarray(s["band"]["flops_reduction"], dtype=np.float64)
        m = 100 * np.asarray([np.nan if v is None else v for v in s["band"]["mean"]], dtype=np.float64)
        sd = 100 * np.asarray([np.nan if v is None else v for v in s["band"]["std"]], dtype=np.float64)
        ok = np.isfinite(m)
        if not ok.any():
            continue
        ax.plot(x[ok], m[ok], ls, color=color, lw=lw, label=method, zorder=3)
        ax.fill_between(x[ok], (m - sd)[ok], (m + sd)[ok], color=color, alpha=0.18, lw=0, zorder=2)
        lows.append(
            np.nanmin(m[ok & (x >= 100 * area_range[0] - 1e-9) & (x <= 100 * area_range[1] + 1e-9)])
            if (ok & (x >= 100 * area_range[0])).any()
            else np.nanmin(m[ok])
        )
    if backbone_accuracy is not None:
        ax.axhline(100 * backbone_accuracy, color="k", ls=":", lw=1.2, label="backbone alone", zorder=1)
    ax.set_xlabel("FLOPs reduction vs. the backbone alone (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 80)
    if lows:
        top = 100 * backbone_accuracy + 2 if backbone_accuracy is not None else None
        ax.set_ylim(max(0.0, min(lows) - 3), top)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
    plt.close(fig)


def _fmt(agg: dict, scale: float = 100.0, digits: int = 1) -> str:
    if agg["mean"] is None or not math.isfinite(agg["mean"]):
        missing = sum(1 for v in agg["values"] if v is None or not math.isfinite(v))
        return f"n/a ({missing}/{agg['n']} seeds miss)" if agg["n"] else "n/a"
    return f"{scale * agg['mean']:.{digits}f} ± {scale * agg['std']:.{digits}f}"


def results_table(summary: dict, reductions: Sequence[float] = REDUCTIONS, area_range=AREA_RANGE) -> str:
    """Markdown table: accuracy (%) at each reduction, the area over ``area_range`` (mean accuracy, %)
    and the largest reduction reached, mean ± std over seeds; the best mean per column in bold."""
    cols = [f"{r:g}" for r in reductions]
    best = {}
    for c in cols + ["area"]:
        vals = {m: (s["accuracy_at"][c] if c != "area" else s["area"])["mean"] for m, s in summary.items()}
        vals = {m: v for m, v in vals.items() if v is not None and math.isfinite(v)}
        best[c] = max(vals, key=vals.get) if vals else None
    head = (
        "| method | "
        + " | ".join(f"acc @ {100 * r:.0f} %" for r in reductions)
        + f" | area {100 * area_range[0]:.0f}–{100 * area_range[1]:.0f} % | max reduction |"
    )
    lines = [head, "|" + " --- |" * (len(reductions) + 3)]
    for m, s in summary.items():
        cells = []
        for c in cols:
            t = _fmt(s["accuracy_at"][c])
            cells.append(f"**{t}**" if best[c] == m else t)
        a = _fmt(s["area"])
        cells.append(f"**{a}**" if best["area"] == m else a)
        cells.append(_fmt(s["max_reduction"]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# calexnet compare
# --------------------------------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``calexnet compare`` (data, backbone and cache options as ``calexnet train``)."""
    from . import cli

    p.add_argument("--out", required=True, help="where results.json, pareto.png/.svg and table.md go")
    p.add_argument(
        "--work-dir",
        help="checkpoints and trained heads of every method x seed (default OUT/work); running the same "
        "command again resumes from there",
    )
    cli._add_data_args(p)
    p.add_argument("--train-subset", type=int, help="train on a stratified subset of this many training images")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of that subset (default 0)")
    cli._add_backbone_args(p)
    g = p.add_argument_group("methods")
    g.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma list of CPM recipes (" + ", ".join(CPM_METHODS) + ") and baselines (pteenet, ztw, "
        "boostnet); default: " + ",".join(DEFAULT_METHODS),
    )
    g.add_argument("--seeds", default="0,1,2", help="comma list of training seeds (default 0,1,2)")
    g.add_argument("--head-dim", type=int, default=128, help="prototype head D (CPM methods, BoostNet; 128)")
    g.add_argument("--n-prototypes", type=int, default=32, help="prototype head K (32)")
    g.add_argument(
        "--cpm-head",
        choices=("prototype", "sdn"),
        default="prototype",
        help="head of the CPM methods: the CalexNet prototype-pooling head (default), or ZTW's SDN head "
        "without the cascade (learned max/avg pooling to 4x4, linear) to separate recipe from head",
    )
    g.add_argument("--margins", default="0:1:101", help="CPM margins START:STOP:COUNT or a list (0:1:101)")
    g.add_argument("--margin-mode", choices=("additive", "relative"), default="additive")
    g.add_argument("--min-support", type=int, default=20, help="CPM minimum exiting set per class (20)")
    g.add_argument("--thresholds", type=int, default=101, help="uniform global thresholds on [0, 1] (101)")
    g.add_argument("--threshold-quantiles", type=int, default=199, help="plus this many validation quantiles")
    g.add_argument("--ztw-ensemble-epochs", type=int, default=20, help="ZTW second stage epochs (20)")
    g = p.add_argument_group("optimisation (the same for every method and head)")
    g.add_argument("--epochs", type=int, default=30, help="per head (default 30)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument(
        "--lr-overrides",
        default="",
        help="per-method learning rates, e.g. pteenet=3e-3,ztw=1e-2 (default: --lr for every method)",
    )
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--no-resume", action="store_true", help="retrain even if finished runs exist in the work dir")
    cli._add_cache_args(p)
    cli._add_run_args(p)


def _training_key(rec) -> str:
    """Recipes that train identical heads share them (``aligned`` and the m_train options only shape the
    training weights, which ``weighting="none"`` does not use)."""
    d = rec.to_json()
    d.pop("name")
    if d["weighting"] == "none":
        for k in ("aligned", "m_train", "margin_mode", "min_support", "bar_from", "weight_temperature", "weight_floor"):
            d.pop(k)
    if not d["distill"]:
        d.pop("kd_temperature")
        d.pop("ce_weight")
    return json.dumps(d, sort_keys=True)


def _parse_lr_overrides(text: str, methods: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not sep or name.strip() not in methods or not lr > 0:
            raise SystemExit(
                f"error: --lr-overrides: expected METHOD=LR pairs with METHOD in {list(methods)} and LR > 0, "
                f"got {part!r}"
            )
        out[name.strip()] = lr
    return out


def _branch1_key(rec) -> str:
    """What branch 1's training depends on: it always trains with weight 1, so recipes that differ only in
    weighting or calibration train the very same first head (same seed, same data order)."""
    d = {"distill": rec.distill, "ce_target": rec.ce_target, "head_dim": rec.head_dim, "n_prototypes": rec.n_prototypes}
    if rec.distill:
        d.update(kd_temperature=rec.kd_temperature, ce_weight=rec.ce_weight)
    return json.dumps(d, sort_keys=True)


def _share_branch1(donor: Path, run_dir: Path, rec, fit_cfg, run_config: dict) -> Path | None:
    """Put the donor run's finished branch-1 head where ``train_branches`` resumes from (recorded under the
    receiving run's own configuration, with ``shared_from`` naming the donor); None if nothing to share."""
    from .training import load_state_file, save_state_file

    src, dst = donor / "branch_1" / "head.safetensors", run_dir / "branch_1" / "head.safetensors"
    if dst.is_file() or not src.is_file():
        return None
    tensors, cfg = load_state_file(src)
    base = {"recipe": rec.to_json(), "fit": asdict(fit_cfg), **run_config}
    save_state_file(dst, tensors, {**cfg, "run": base, "shared_from": str(src)})
    return dst


def _stack_logits(heads, cache, device) -> torch.Tensor:
    from .recipes import head_logits

    return torch.stack([head_logits(h, cache, k, device=device) for k, h in enumerate(heads)])


def run_compare(args: argparse.Namespace) -> int:
    """``calexnet compare``: train and evaluate methods x seeds for one backbone and dataset."""
    from . import cli
    from .baselines import BASELINE_NAMES, BaselineConfig, train_baseline
    from .data import stratified_split
    from .flops import head_flops, segment_flops
    from .recipes import recipe, train_branches
    from .training import FitConfig, seed_everything

    cli._setup(args)
    t_start = time.time()
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CPM_METHODS and m not in BASELINE_NAMES]
    if unknown or not methods:
        raise SystemExit(
            f"error: --methods: unknown {unknown or 'empty list'}; expected names from "
            f"{list(CPM_METHODS) + list(BASELINE_NAMES)}"
        )
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds: expected a comma list of ints, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("error: --seeds: expected at least one seed")
    margins = cli._margins(args.margins, None)
    lr_of = _parse_lr_overrides(args.lr_overrides, methods)
    seed_everything(0)  # one (random-init) backbone for every seed and every rerun
    splits, dinfo = cli._load_data(args)
    spec = cli._backbone_spec(args, splits.n_classes)
    splits = splits.with_normalization(cli._normalization(spec))
    bb = cli._build_backbone(spec)
    spec.branch_points, spec.n_branches = list(bb.branch_points), None
    device = cli._device(args)
    if device.type == "cpu":  # NHWC convolutions are faster on CPU; the cached features are the same values
        bb = bb.to(memory_format=torch.channels_last)
    train_set = splits.train
    if args.train_subset:
        if not 0 < args.train_subset < len(train_set):
            raise SystemExit(f"error: --train-subset: expected 1..{len(train_set) - 1}, got {args.train_subset}")
        _, idx = stratified_split(train_set.labels, args.train_subset, seed=args.subset_seed)
        train_set = train_set.subset(idx)
        dinfo["train_subset"] = args.train_subset
        dinfo["subset_seed"] = args.subset_seed
    cache_cfg = {
        "storage": args.cache,
        "dir": str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
        "dtype": args.cache_dtype,
        "batch_size": args.feature_batch_size,
        "workers": args.workers,
    }
    cli.log(
        f"compare {methods} x seeds {seeds} on {bb.name} (branch points {bb.branch_points}), {dinfo['name']}: "
        f"{len(train_set)} train / {len(splits.val)} val / {len(splits.test)} test images, device {device}"
    )
    t0 = time.time()
    train_name = "train" if not args.train_subset else f"train_subset{args.train_subset}_seed{args.subset_seed}"
    tr, _ = cli._cache(args, cache_cfg, work, bb, train_set, train_name, device)
    va, _ = cli._cache(args, cache_cfg, work, bb, splits.val, "val", device)
    te, _ = cli._cache(args, cache_cfg, work, bb, splits.test, "test", device)
    t_features = time.time() - t0
    seg = segment_flops(bb)
    y_val, z_val = va.labels_tensor(), va.logits_tensor()
    y_test, z_test = te.labels_tensor(), te.logits_tensor()
    backbone_acc = float((z_test.argmax(1) == y_test).double().mean())
    base_cfg = BaselineConfig(
        head_dim=args.head_dim, n_prototypes=args.n_prototypes, ztw_ensemble_epochs=args.ztw_ensemble_epochs
    )
    sweeps: dict[str, list[SweepResult]] = {m: [] for m in methods}
    shared: dict[tuple[str, int], tuple] = {}
    donors: dict[tuple[str, int], Path] = {}
    head_factory = None
    if args.cpm_head == "sdn":
        from .baselines import ZTWHead

        def head_factory(k: int, in_channels: int, n_classes: int):
            return ZTWHead(in_channels, n_classes, cascading=False)

    timings: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        try:
            fit_cfg = FitConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                weight_decay=args.weight_decay,
                seed=seed,
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        base_fit = fit_cfg
        for method in methods:
            t1 = time.time()
            fit_cfg = dataclasses.replace(base_fit, lr=lr_of.get(method, base_fit.lr))
            if method in CPM_METHODS:
                rec = recipe(
                    method,
                    head_dim=args.head_dim,
                    n_prototypes=args.n_prototypes,
                    margin_mode=args.margin_mode,
                    min_support=args.min_support,
                )
                key = (_training_key(rec), seed)
                if key not in shared:
                    run_dir = work / "runs" / f"{rec.name}_seed{seed}"
                    run_config = {
                        "backbone": spec.to_json(),
                        "dataset": {k: v for k, v in dinfo.items() if k != "data_dir"},
                    }
                    if args.cpm_head != "prototype":
                        run_config["cpm_head"] = args.cpm_head
                    b1 = (_branch1_key(rec), seed)
                    seeded = None
                    if b1 in donors and not args.no_resume:
                        seeded = _share_branch1(donors[b1], run_dir, rec, fit_cfg, run_config)
                    try:
                        bt = train_branches(
                            tr,
                            va,
                            rec,
                            fit_cfg,
                            out_dir=run_dir,
                            resume=not args.no_resume,
                            device=device,
                            progress=not cli._QUIET,
                            run_config=run_config,
                            head_factory=head_factory,
                        )
                    except RuntimeError:
                        if seeded is None:
                            raise
                        seeded.unlink()  # the engine's resume format changed: train branch 1 after all
                        bt = train_branches(
                            tr,
                            va,
                            rec,
                            fit_cfg,
                            out_dir=run_dir,
                            resume=True,
                            device=device,
                            progress=not cli._QUIET,
                            run_config=run_config,
                            head_factory=head_factory,
                        )
                    donors.setdefault(b1, run_dir)
                    heads = bt.heads
                    hf = head_flops(heads, bb)
                    shared[key] = (_stack_logits(heads, va, device), _stack_logits(heads, te, device), hf, rec.name)
                zv, zt, hf, trained_as = shared[key]
                sw = sweep_cpm(
                    zv,
                    z_val,
                    y_val,
                    zt,
                    z_test,
                    y_test,
                    FlopsProfile(tuple(seg), tuple(hf)),
                    margins,
                    aligned=rec.aligned,
                    margin_mode=rec.margin_mode,
                    min_support=rec.min_support,
                    bar_from=rec.bar_from,
                    method=method,
                    seed=seed,
                )
                sw.info = {"head_flops": hf, "heads_trained_as": trained_as}
            else:
                tb = train_baseline(
                    method,
                    tr,
                    fit_cfg,
                    segment_flops=seg,
                    config=base_cfg,
                    out_dir=work / "runs" / f"{method}_seed{seed}",
                    resume=not args.no_resume,
                    device=device,
                    progress=not cli._QUIET,
                )
                ev, et = tb.exit_outputs(va, device=device), tb.exit_outputs(te, device=device)
                grid = threshold_grid(ev.scores, args.thresholds, args.threshold_quantiles)
                sw = sweep_global_threshold(
                    et.scores,
                    et.preds,
                    z_test,
                    y_test,
                    FlopsProfile(tuple(seg), tuple(tb.head_flops)),
                    grid,
                    method=method,
                    seed=seed,
                )
                sw.info = {"head_flops": tb.head_flops}
            sw.info["seconds"] = time.time() - t1
            timings[method].append(sw.info["seconds"])
            sweeps[method].append(sw)
            s = seed_summary(sw)
            cli.log(
                f"{method} seed {seed}: {sw.info['seconds']:.0f}s, acc@50% "
                f"{s['accuracy_at']['0.5']:.4f}, area {s['area']:.4f}, max reduction {s['max_reduction']:.3f}"
            )
    summary = summarize(sweeps)
    config = {
        "command": "compare",
        "argv": sys.argv,
        "dataset": dinfo,
        "backbone": spec.to_json(),
        "branch_points": list(bb.branch_points),
        "methods": methods,
        "seeds": seeds,
        "fit": {k: v for k, v in asdict(base_fit).items() if k != "seed"},
        "lr_overrides": lr_of,
        "cpm_head": args.cpm_head,
        "head_dim": args.head_dim,
        "n_prototypes": args.n_prototypes,
        "margins": [float(margins[0]), float(margins[-1]), int(margins.numel())],
        "margin_mode": args.margin_mode,
        "min_support": args.min_support,
        "thresholds": {"uniform": args.thresholds, "val_quantiles": args.threshold_quantiles},
        "baselines": asdict(base_cfg),
        "cache": cache_cfg,
        "versions": cli._versions(),
    }
    results = {
        "config": config,
        "backbone": {
            "test_accuracy": backbone_acc,
            "val_accuracy": float((z_val.argmax(1) == y_val).double().mean()),
            "segment_flops": seg,
            "flops": float(sum(seg)),
        },
        "reductions": list(REDUCTIONS),
        "area_range": list(AREA_RANGE),
        "summary": summary,
        "sweeps": {m: [s.to_json() for s in runs] for m, runs in sweeps.items()},
        "seconds": {
            "features": t_features,
            "methods": {m: aggregate(v) for m, v in timings.items()},
            "total": time.time() - t_start,
        },
    }
    write_json(out / "results.json", results)
    title = (
        f"{bb.name} on {dinfo['name']}, branches at {', '.join(bb.branch_points)}; "
        f"mean ± std over seeds {','.join(map(str, seeds))}"
    )
    plot_envelopes(summary, [out / "pareto.png", out / "pareto.svg"], backbone_accuracy=backbone_acc, title=title)
    table = results_table(json.loads(json.dumps(_json_safe(summary))))
    (out / "table.md").write_text(table)
    cli.log(f"done in {time.time() - t_start:.0f}s: {out / 'results.json'}, {out / 'pareto.png'}, {out / 'table.md'}")
    print(table)
    return 0


CLI_COMMANDS = [
    {
        "name": "compare",
        "help": "train and evaluate methods x seeds on one backbone and dataset (accuracy-FLOPs Pareto)",
        "add_arguments": add_compare_arguments,
        "run": run_compare,
        "description": "Train every method (CPM recipes and the PTEEnet / ZTW / BoostNet baselines) for every "
        "seed from one feature cache, calibrate on the validation split, measure accuracy and FLOPs reduction "
        "on the test split, and write results.json (every operating point, Pareto envelopes, accuracy at "
        "30-70 %% reduction, area, mean ± std over seeds), pareto.png / pareto.svg and table.md to --out.",
        "epilog": "example: calexnet compare --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg "
        "--pretrained-dir ../shared/data --n-branches 3 --out results --seeds 0,1,2",
    }
]
