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
from .speed import HEADLINE_LOSSES, HEADLINE_SPEEDUPS, MODES, mode_key

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


_MODE_MARK = {"batch": ("o", "per batch"), "stream": ("^", "streaming")}


def plot_speed(
    runs: list[dict],
    paths: Sequence[str | os.PathLike],
    *,
    backbone_accuracy: float | None = None,
    title: str | None = None,
) -> None:
    """Three panels (``calexnet measure``'s figure): accuracy vs FLOPs reduction; accuracy vs measured speedup
    per mode (per batch: circles and the method's line, streaming: triangles and a thinner dashed line; each
    seed's upper Pareto envelope as a line, the FLOPs-ideal ``1 / (1 - r)`` of the envelope points dotted);
    measured speedup vs FLOPs reduction per mode against the FLOPs-ideal curve and the time-ideal points."""
    fig, (ax1, ax2, ax3) = _pyplot().subplots(1, 3, figsize=(17, 4.8), dpi=130)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    reductions = []
    for i, method in enumerate(methods):
        color, ls, lw = method_style(method, i)
        first = True
        for r in (r for r in runs if r["method"] == method):
            pts = r["points"]
            acc = 100 * np.asarray([p["accuracy"] for p in pts])
            red = 100 * np.asarray([p["flops_reduction"] for p in pts])
            reductions += [p["timed_flops_reduction"] for p in pts]
            label = method if first else None
            ax1.scatter(red, acc, s=14, color=color, alpha=0.7)
            ex, ey = pareto_envelope(red, acc)
            ax1.plot(ex, ey, ls, color=color, lw=0.7 * lw, alpha=0.85, label=label)
            ideal = np.asarray([p["ideal_speedup"] for p in pts])
            ix, iy = pareto_envelope(ideal, acc)
            ax2.plot(ix, iy, ":", color=color, lw=0.8, alpha=0.6)
            time_ideal = _floats([p.get("time_ideal_speedup") for p in pts])
            ax3.scatter(red, time_ideal, s=18, marker="x", color=color, alpha=0.6)
            for mode in MODES:
                key = mode_key(mode, "speedup")
                mp = [p for p in pts if p.get(key) is not None]
                if not mp:
                    continue
                marker, words = _MODE_MARK[mode]
                m_acc = 100 * np.asarray([p["accuracy"] for p in mp])
                m_red = 100 * np.asarray([p["flops_reduction"] for p in mp])
                sp = np.asarray([p[key] for p in mp])
                style = (ls, 0.7 * lw) if mode == "batch" else ("--", 0.5 * lw)
                mode_label = f"{method}, {words}" if first else None
                ax2.scatter(sp, m_acc, s=14, marker=marker, color=color, alpha=0.7)
                sx, sy = pareto_envelope(sp, m_acc)
                ax2.plot(sx, sy, style[0], color=color, lw=style[1], alpha=0.85, label=mode_label)
                order = np.argsort(m_red)
                line = dict(marker=marker, ms=4, color=color, lw=style[1], alpha=0.8, label=mode_label)
                ax3.plot(m_red[order], sp[order], style[0], **line)
            first = False
    if reductions:
        r = np.linspace(min(min(reductions), 0.0), min(0.95, max(max(reductions), 0.0)), 100)
        ax3.plot(100 * r, 1 / (1 - r), "k--", lw=1.0, label="FLOPs-ideal 1/(1-r)")
    ax3.scatter([], [], marker="x", color="0.3", label="time-ideal (full-batch stage times)")
    for ax in (ax1, ax2):
        if backbone_accuracy is not None:
            ax.axhline(100 * backbone_accuracy, color="k", ls=":", lw=1.0, label="backbone alone")
            ax.axhline(100 * backbone_accuracy - 1, color="0.5", ls="--", lw=0.8, label="backbone − 1 pt")
        ax.set_ylabel("test accuracy (%) of the real cascade")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    ax1.set_xlabel("FLOPs reduction vs. the backbone alone (%)")
    ax2.set_xlabel("measured speedup vs. the backbone alone (images/s ratio); dotted: FLOPs-ideal")
    ax2.axvline(1.0, color="0.6", lw=0.8)
    ax3.set_xlabel("FLOPs reduction vs. the backbone alone (%)")
    ax3.set_ylabel("measured speedup vs. the backbone alone")
    ax3.axhline(1.0, color="0.6", lw=0.8)
    ax1.legend(fontsize=7, loc="lower left")
    ax3.legend(fontsize=6, loc="upper left")
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


def exits_table(summary: dict, head_flops: dict[str, list[float]] | None = None, backbone_flops: float = 0.0) -> str:
    """Markdown: each exit's own accuracy (%, mean ± std over seeds; the sweeps' ``exit_accuracy``) and the
    FLOPs reduction reached within 1 and 2 points of the backbone's accuracy (``reduction_at_loss``), per
    method; with ``head_flops`` (method -> per-head FLOPs) and ``backbone_flops``, each head's cost in % of
    the backbone. Methods without those entries are left out."""
    rows = [(m, s) for m, s in summary.items() if "exit_accuracy" in s and "reduction_at_loss" in s]
    if not rows:
        return ""
    k_count = len(rows[0][1]["exit_accuracy"])
    head = "| method | " + " | ".join(f"exit {k + 1} acc" for k in range(k_count))
    head += " | reduction @ ≤ 1 pt loss | reduction @ ≤ 2 pt loss |"
    with_cost = bool(head_flops) and backbone_flops > 0
    if with_cost:
        head += " head FLOPs, % of backbone |"
    lines = [head, "|" + " --- |" * (k_count + 3 + with_cost)]
    for m, s in rows:
        cells = [_pct(a) for a in s["exit_accuracy"]]
        cells += [_pct(s["reduction_at_loss"][k]) for k in ("0.01", "0.02")]
        if with_cost:
            cells.append(" / ".join(f"{100 * f / backbone_flops:.2f}" for f in head_flops.get(m, [])))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mode_words(mode: str) -> str:
    return "per batch" if mode == "batch" else "streaming"


def speed_table(summary: dict, canonical_margin: float = 0.2) -> str:
    """Markdown table of ``calexnet measure``'s headline numbers per mode (mean ± std over seeds; "–" for a
    mode a method was not measured in)."""
    tag = f"m{canonical_margin:g}"
    head = ["method"]
    head += [f"max speedup at ≤ 1 pt loss, {_mode_words(m)}" for m in MODES]
    head += [f"speedup at m = {canonical_margin:g}, {_mode_words(m)}" for m in MODES]
    head += [f"accuracy at m = {canonical_margin:g} (%)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, s in summary.items():
        best = [s.get(mode_key(m, "max_speedup_within_loss")) for m in MODES]
        at_m = [s.get(mode_key(m, f"speedup_at_{tag}")) for m in MODES]
        n = next((b["n"] for b in best if b), 0)
        cells = ["–" if v is None else mean_std(v, unit="×") for v in best + at_m]  # –: mode not measured
        cells += [mean_std(s.get(f"accuracy_at_{tag}"), scale=100.0), str(n)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_table(summary: dict) -> str:
    """Markdown: per method and measured mode, the largest measured speedup within each accuracy loss of
    :data:`~.speed.HEADLINE_LOSSES` and the accuracy at each measured speedup of
    :data:`~.speed.HEADLINE_SPEEDUPS` (mean ± std over seeds; "n/a" where a seed has no such point)."""
    head = ["method", "mode"] + [f"speedup @ ≤ {100 * loss:g} pt loss" for loss in HEADLINE_LOSSES]
    head += [f"accuracy (%) @ ≥ {x:g}×" for x in HEADLINE_SPEEDUPS] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, s in summary.items():
        for mode in MODES:
            within = s.get(mode_key(mode, "max_speedup_within"))
            if within is None:
                continue
            acc = s[mode_key(mode, "accuracy_at_speedup")]
            cells = [mean_std(within[f"{loss:g}"], unit="×", missing="seeds have none") for loss in HEADLINE_LOSSES]
            cells += [mean_std(acc[f"{x:g}"], scale=100.0, missing="seeds reach none") for x in HEADLINE_SPEEDUPS]
            n = within[f"{HEADLINE_LOSSES[0]:g}"]["n"]
            lines.append(f"| {method} | {_mode_words(mode)} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def margin_table(runs: list[dict]) -> str:
    """Markdown table of the measured CPM points, mean ± std over seeds per method and margin: both modes'
    speedups, the FLOPs- and time-ideal, and each mode's speedup over the FLOPs-ideal."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["param_name"] == "margin":
            for p in r["points"]:
                groups.setdefault((r["method"], p["param"]), []).append(p)
    lines = [
        "| method | margin | accuracy (%) | FLOPs reduction (%) | speedup per batch | speedup streaming "
        "| FLOPs-ideal 1/(1-r) | time-ideal | per batch / FLOPs-ideal | streaming / FLOPs-ideal | seeds |",
        "|" + " --- |" * 11,
    ]
    for (method, m), pts in groups.items():

        def cell(key, scale=1.0, digits=2, unit="", pts=pts):
            values = [p.get(key) for p in pts]
            if all(v is None for v in values):
                return "–"
            agg = aggregate([math.nan if v is None else v for v in values])
            return mean_std(agg, scale=scale, digits=digits, unit=unit)

        cells = [cell("accuracy", 100.0), cell("flops_reduction", 100.0, 1)]
        cells += [cell(mode_key(mode, "speedup"), unit="×") for mode in MODES]
        cells += [cell("ideal_speedup", unit="×"), cell("time_ideal_speedup", unit="×")]
        cells += [cell(mode_key(mode, "achieved_over_ideal")) for mode in MODES]
        lines.append(f"| {method} | {m:g} | " + " | ".join(cells) + f" | {len(pts)} |")
    return "\n".join(lines) + "\n"


def _num(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def points_table(runs: list[dict]) -> str:
    """Markdown table of every measured point, both modes ("–" where a mode or a value was not measured)."""
    lines = [
        "| method | seed | param | accuracy (%) | FLOPs red. (%) | backbone img/s | per batch img/s "
        "| streaming img/s | speedup per batch | speedup streaming | FLOPs-ideal | time-ideal "
        "| mismatches (batch, stream) |",
        "|" + " --- |" * 13,
    ]
    for r in runs:
        for p in r["points"]:
            ips = p["images_per_s"]
            mismatches = ", ".join(_num(p.get(mode_key(m, "mismatches")), "d") for m in MODES)
            cells = [
                r["method"],
                str(r["seed"]),
                f"{r['param_name'][0]}={p['param']:.4g}",
                f"{100 * p['accuracy']:.2f}",
                f"{100 * p['flops_reduction']:.1f}",
                *(_num(ips.get(name), ".0f") for name in ("backbone", "cascade", "streaming")),
                *(_num(p.get(mode_key(m, "speedup")), ".2f") for m in MODES),
                _num(p["ideal_speedup"], ".2f"),
                _num(p.get("time_ideal_speedup"), ".2f"),
                mismatches,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
