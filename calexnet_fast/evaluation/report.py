"""Figures and Markdown tables of ``calexnet compare`` and ``calexnet measure``, in one style.

Every figure is drawn with matplotlib's Agg backend, one colour / line style / width per method
(:func:`method_style`), and written to each path given (the extension picks the format: ``.png``,
``.svg``, ``.pdf``). Every table cell of a statistic over seeds reads ``mean ± std`` (:func:`mean_std`),
or says how many seeds have no value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .pareto import AREA_RANGE, REDUCTIONS, aggregate, pareto_envelope

__all__ = [
    "margin_table",
    "mean_std",
    "method_style",
    "plot_envelopes",
    "plot_speed",
    "points_table",
    "results_table",
    "speed_table",
]

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


def method_style(method: str, i: int) -> tuple[str, str, float]:
    """(colour, line style, line width) of a method; the ``i``-th unknown one gets matplotlib's ``C{i}``."""
    return _STYLE.get(method, (f"C{i % 10}", "-", 1.5))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, paths: Sequence[str | os.PathLike]) -> None:
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
    _pyplot().close(fig)


def _floats(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def plot_envelopes(
    summary: dict,
    paths: Sequence[str | os.PathLike],
    *,
    backbone_accuracy: float | None = None,
    title: str | None = None,
    area_range: tuple[float, float] = AREA_RANGE,
) -> None:
    """Every method's mean envelope with a ±1 std seed band (``calexnet compare``'s figure).

    Args:
        summary: from :func:`calexnet_fast.evaluation.pareto.summarize`.
        paths: files to write.
        backbone_accuracy: drawn as a horizontal line.
        title: figure title.
        area_range: shaded reduction range (the area's).
    """
    fig, ax = _pyplot().subplots(figsize=(7.5, 5.0), dpi=140)
    ax.axvspan(100 * area_range[0], 100 * area_range[1], color="0.93", zorder=0)
    lows = []
    for i, (method, s) in enumerate(summary.items()):
        color, ls, lw = method_style(method, i)
        x = 100 * np.asarray(s["band"]["flops_reduction"], dtype=np.float64)
        m = 100 * _floats(s["band"]["mean"])
        sd = 100 * _floats(s["band"]["std"])
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
    _save(fig, paths)


def plot_speed(
    runs: list[dict],
    paths: Sequence[str | os.PathLike],
    *,
    backbone_accuracy: float | None = None,
    title: str | None = None,
) -> None:
    """Two panels (``calexnet measure``'s figure): accuracy vs FLOPs reduction and accuracy vs measured
    speedup (every measured point, each seed's upper Pareto envelope as a line; the ideal ``1 / (1 - r)`` of
    the envelope points dotted)."""
    fig, (ax1, ax2) = _pyplot().subplots(1, 2, figsize=(12, 4.8), dpi=130)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for i, method in enumerate(methods):
        color, ls, lw = method_style(method, i)
        first = True
        for r in (r for r in runs if r["method"] == method):
            pts = r["points"]
            acc = 100 * np.asarray([p["accuracy"] for p in pts])
            red = 100 * np.asarray([p["flops_reduction"] for p in pts])
            sp = np.asarray([p["speedup"] for p in pts])
            ideal = np.asarray([p["ideal_speedup"] for p in pts])
            label = method if first else None
            ax1.scatter(red, acc, s=14, color=color, alpha=0.7)
            ax2.scatter(sp, acc, s=14, color=color, alpha=0.7)
            ex, ey = pareto_envelope(red, acc)
            ax1.plot(ex, ey, ls, color=color, lw=0.7 * lw, alpha=0.85, label=label)
            sx, sy = pareto_envelope(sp, acc)
            ax2.plot(sx, sy, ls, color=color, lw=0.7 * lw, alpha=0.85, label=label)
            ix, iy = pareto_envelope(ideal, acc)
            ax2.plot(ix, iy, ":", color=color, lw=0.8, alpha=0.6)
            first = False
    for ax in (ax1, ax2):
        if backbone_accuracy is not None:
            ax.axhline(100 * backbone_accuracy, color="k", ls=":", lw=1.0, label="backbone alone")
            ax.axhline(100 * backbone_accuracy - 1, color="0.5", ls="--", lw=0.8, label="backbone − 1 pt")
        ax.grid(True, alpha=0.3)
        ax.set_ylabel("test accuracy (%) of the real cascade")
    ax1.set_xlabel("FLOPs reduction vs. the backbone alone (%)")
    ax2.set_xlabel("measured speedup vs. the backbone alone (images/s ratio); dotted: ideal 1/(1-r)")
    ax2.axvline(1.0, color="0.6", lw=0.8)
    ax1.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, paths)


def mean_std(
    agg: dict | None, *, scale: float = 1.0, digits: int = 2, unit: str = "", missing: str = "seeds have none"
) -> str:
    """``"{mean}{unit} ± {std}"`` of an :func:`~calexnet_fast.evaluation.pareto.aggregate` (values times
    ``scale``), or ``"n/a (i/n {missing})"`` when ``i`` of its ``n`` seeds have no value."""
    if not agg or agg.get("mean") is None or not math.isfinite(agg["mean"]):
        values = (agg or {}).get("values") or []
        n_missing = sum(1 for v in values if v is None or not math.isfinite(v))
        return f"n/a ({n_missing}/{len(values)} {missing})" if n_missing else "n/a"
    return f"{scale * agg['mean']:.{digits}f}{unit} ± {scale * agg['std']:.{digits}f}"


def _pct(agg: dict) -> str:
    return mean_std(agg, scale=100.0, digits=1, missing="seeds miss")


def results_table(summary: dict, reductions: Sequence[float] = REDUCTIONS, area_range=AREA_RANGE) -> str:
    """``calexnet compare``'s Markdown table: accuracy (%) at each reduction, the area over ``area_range``
    (mean accuracy, %) and the largest reduction reached, mean ± std over seeds; the best mean per column in
    bold. ``summary`` is :func:`~calexnet_fast.evaluation.pareto.summarize`'s (NaN or ``null`` for none)."""
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
            t = _pct(s["accuracy_at"][c])
            cells.append(f"**{t}**" if best[c] == m else t)
        a = _pct(s["area"])
        cells.append(f"**{a}**" if best["area"] == m else a)
        cells.append(_pct(s["max_reduction"]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_table(summary: dict, canonical_margin: float = 0.2) -> str:
    """Markdown table of ``calexnet measure``'s headline numbers (mean ± std over seeds)."""
    key, acc_key = f"speedup_at_m{canonical_margin:g}", f"accuracy_at_m{canonical_margin:g}"
    lines = [
        f"| method | max measured speedup at ≤ 1 pt loss | speedup at m = {canonical_margin:g} | "
        f"accuracy at m = {canonical_margin:g} (%) | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, s in summary.items():
        n = s["max_speedup_within_loss"]["n"]
        lines.append(
            f"| {method} | {mean_std(s['max_speedup_within_loss'], unit='×')} | {mean_std(s.get(key), unit='×')} | "
            f"{mean_std(s.get(acc_key), scale=100.0)} | {n} |"
        )
    return "\n".join(lines) + "\n"


def margin_table(runs: list[dict]) -> str:
    """Markdown table of the measured CPM points, mean ± std over seeds per method and margin."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["param_name"] == "margin":
            for p in r["points"]:
                groups.setdefault((r["method"], p["param"]), []).append(p)
    lines = [
        "| method | margin | accuracy (%) | FLOPs reduction (%) | measured speedup | ideal 1/(1-r) | achieved/ideal "
        "| seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, m), pts in groups.items():

        def cell(key, scale=1.0, digits=2, unit="", pts=pts):
            return mean_std(aggregate([p[key] for p in pts]), scale=scale, digits=digits, unit=unit)

        lines.append(
            f"| {method} | {m:g} | {cell('accuracy', 100.0)} | {cell('flops_reduction', 100.0, 1)} | "
            f"{cell('speedup', unit='×')} | {cell('ideal_speedup', unit='×')} | {cell('achieved_over_ideal')} | "
            f"{len(pts)} |"
        )
    return "\n".join(lines) + "\n"


def points_table(runs: list[dict]) -> str:
    """Markdown table of every measured point."""
    lines = [
        "| method | seed | param | accuracy (%) | FLOPs red. (%) | backbone img/s | cascade img/s | speedup "
        "| ideal | achieved/ideal | mismatches |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        for p in r["points"]:
            ips = p["images_per_s"]
            lines.append(
                f"| {r['method']} | {r['seed']} | {r['param_name'][0]}={p['param']:.4g} | "
                f"{100 * p['accuracy']:.2f} | {100 * p['flops_reduction']:.1f} | {ips['backbone']:.0f} | "
                f"{ips['cascade']:.0f} | {p['speedup']:.2f} | {p['ideal_speedup']:.2f} | "
                f"{p['achieved_over_ideal']:.2f} | {p['mismatches']} |"
            )
    return "\n".join(lines) + "\n"
