"""Measured speed at real accuracy: the real cascade at each operating point, timed against the backbone.

:func:`measure_points` runs the real cascade (:class:`calexnet_fast.Cascade`, or the baselines'
``ScoreCascade``: survivors are compacted between stages and later stages run only on them) over the test
images at every operating point:

* its accuracy, exit histogram and FLOPs reduction come from the real cascade's own outputs
  (:func:`~.points.point_metrics`), and are checked against the simulated evaluation: ``mismatches``
  counts the samples whose prediction or exit differ (0 expected; a difference can only come from a
  confidence within float rounding of a threshold, since the real cascade runs folded heads on compacted
  batches);
* its throughput is measured against the frozen backbone alone on the same device, dtype, batch size,
  memory format and images (one decoded, normalised tensor: only model work is timed), in interleaved
  rounds (:func:`~.timing.interleaved_rounds`); images/s is the median over rounds, the measured speedup
  the ratio of the medians; the ideal speedup ``1 / (1 - r)`` uses the FLOPs reduction ``r`` realised on
  the timing images; on CUDA, energy per image comes from the driver's power readings.

:func:`headline` and :func:`frontiers` summarise the measured points over seeds.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from ..flops import FlopsProfile, exit_histogram
from .pareto import aggregate, pareto_envelope
from .points import point_metrics
from .timing import PowerMeter, TimingConfig, interleaved_rounds, timing_subset

__all__ = ["frontiers", "headline", "measure_points"]


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


@torch.inference_mode()
def measure_points(
    cascade: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    thresholds: Sequence[torch.Tensor],
    profile: FlopsProfile,
    *,
    params: Sequence[float] | None = None,
    expected: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    config: TimingConfig | None = None,
    progress: bool = False,
    desc: str = "points",
) -> list[dict]:
    """Run the real cascade at every operating point; accuracy from its outputs, speed against the backbone.

    Args:
        cascade: a :class:`~calexnet_fast.Cascade` (or ``ScoreCascade``) on the images' device.
        backbone: the frozen backbone alone (same stages), on the same device and dtype.
        images: [N, C, H, W] decoded, normalised test images (device, dtype and memory format as timed).
        labels: [N] int64.
        thresholds: one [K, n_classes] threshold matrix per point.
        profile: per-sample FLOPs of the cascade's segments and heads.
        params: the operating parameter of each point (margin or threshold), stored with it.
        expected: per point, the simulated evaluation's (pred [N], exit_index [N]) to check against
            (:func:`~.points.cpm_decisions`, :func:`~.points.baseline_decisions`).
        config: :class:`~.timing.TimingConfig`.

    Returns:
        One dict per point: ``param``, ``accuracy`` (real cascade), ``flops_reduction``, ``exit_fractions``,
        ``mismatches`` (vs ``expected``; ``None`` without it), ``timed_flops_reduction``, ``ideal_speedup``
        (``1 / (1 - timed_flops_reduction)``), ``images_per_s`` {backbone, cascade} (medians), ``speedup``,
        ``speedup_rounds`` (per-round ratios), ``energy_j_per_image`` {backbone, cascade} or ``None``.
    """
    from tqdm.auto import tqdm

    cfg = config or TimingConfig()
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape [{n}], got {list(labels.shape)}")
    if params is not None and len(params) != len(thresholds):
        raise ValueError(f"params: expected {len(thresholds)} values (one per point), got {len(params)}")
    if expected is not None and len(expected) != len(thresholds):
        raise ValueError(f"expected: expected {len(thresholds)} (pred, exit) pairs, got {len(expected)}")
    device = images.device
    labels = labels.cpu()
    all_batches = _batches(images, cfg.batch_size)
    sub = timing_subset(n, cfg)
    timed_images = images if sub.numel() == n else images.index_select(0, sub.to(device))
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        timed_images = timed_images.contiguous(memory_format=torch.channels_last)
    n_timed = int(timed_images.shape[0])
    timed_batches = _batches(timed_images, cfg.batch_size)
    meter = PowerMeter(device) if device.type == "cuda" else None

    def run_backbone():
        for xb in timed_batches:
            backbone(xb)

    def run_cascade():
        for xb in timed_batches:
            cascade(xb)

    rows = []
    for i, thr in enumerate(tqdm(thresholds, desc=desc, disable=not progress, leave=False)):
        cascade.set_thresholds(thr)
        preds, exits = [], []
        for xb in all_batches:
            out = cascade(xb)
            preds.append(out.logits.argmax(1).cpu())
            exits.append(out.exit_index.cpu())
        pred, exit_index = torch.cat(preds), torch.cat(exits)
        mismatches = None
        if expected is not None:
            e_pred, e_exit = expected[i]
            mismatches = int(((pred != e_pred.cpu()) | (exit_index != e_exit.cpu())).sum())
        rounds = interleaved_rounds(
            {"backbone": run_backbone, "cascade": run_cascade},
            device,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            noise_tolerance=cfg.noise_tolerance,
            max_extra_rounds=cfg.max_extra_rounds,
            meter=meter,
        )
        med = rounds.medians()
        times = rounds.seconds
        timed_r = profile.flops_reduction(exit_histogram(exit_index.index_select(0, sub), profile.n_branches))
        row = {
            "param": float(params[i]) if params is not None else float(i),
            **point_metrics(pred, exit_index, labels, profile),
            "mismatches": mismatches,
            "timed_images": n_timed,
            "timed_flops_reduction": timed_r,
            "ideal_speedup": 1.0 / (1.0 - timed_r) if timed_r < 1 else math.inf,
            "images_per_s": {name: n_timed / t for name, t in med.items()},
            "seconds_per_round": times,
            "speedup": med["backbone"] / med["cascade"],
            "speedup_rounds": [b / c for b, c in zip(times["backbone"], times["cascade"], strict=True)],
            "energy_j_per_image": (
                {name: statistics.median(j / n_timed for j in v) for name, v in rounds.joules.items()}
                if "cascade" in rounds.joules
                else None
            ),
        }
        row["achieved_over_ideal"] = row["speedup"] / row["ideal_speedup"]
        row["load_average_1min"] = os.getloadavg()[0]  # how busy the machine was (shared machines)
        rows.append(row)
    return rows


def headline(runs: list[dict], backbone_accuracy: float, max_loss: float = 0.01, canonical_margin: float = 0.2) -> dict:
    """Per method: the largest measured speedup with accuracy >= backbone - ``max_loss`` and the speedup at
    ``m = canonical_margin`` (CPM methods), each as mean ± std over seeds (:func:`~.pareto.aggregate`).

    Args:
        runs: ``{"method", "seed", "param_name", "points": [...]}`` as in ``speed.json``.
        backbone_accuracy: the backbone's test accuracy (fraction).
        max_loss: allowed accuracy loss, absolute (0.01 = 1 percentage point).
    """
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        best, best_pts, at_m, at_m_acc = [], [], [], []
        for r in (r for r in runs if r["method"] == method):
            ok = [p for p in r["points"] if p["accuracy"] >= backbone_accuracy - max_loss - 1e-12]
            top = max(ok, key=lambda p: p["speedup"]) if ok else None
            best.append(top["speedup"] if top else float("nan"))
            best_pts.append(
                {k: top[k] for k in ("param", "accuracy", "flops_reduction", "ideal_speedup")} if top else None
            )
            if r["param_name"] == "margin":
                hit = [p for p in r["points"] if abs(p["param"] - canonical_margin) < 1e-9]
                if hit:
                    at_m.append(hit[0]["speedup"])
                    at_m_acc.append(hit[0]["accuracy"])
        entry = {
            "max_speedup_within_loss": aggregate(best),
            "max_speedup_points": best_pts,
            "max_loss": max_loss,
        }
        if at_m:
            entry[f"speedup_at_m{canonical_margin:g}"] = aggregate(at_m)
            entry[f"accuracy_at_m{canonical_margin:g}"] = aggregate(at_m_acc)
        out[method] = entry
    return out


def frontiers(runs: list[dict]) -> dict:
    """Per method and seed, the upper Pareto envelopes of the measured points: accuracy vs FLOPs reduction and
    accuracy vs measured speedup (each sorted by increasing reduction / speedup)."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        acc = [p["accuracy"] for p in r["points"]]
        fx, fy = pareto_envelope([p["flops_reduction"] for p in r["points"]], acc)
        sx, sy = pareto_envelope([p["speedup"] for p in r["points"]], acc)
        out.setdefault(r["method"], []).append(
            {
                "seed": r["seed"],
                "accuracy_vs_flops_reduction": {"flops_reduction": fx.tolist(), "accuracy": fy.tolist()},
                "accuracy_vs_speedup": {"speedup": sx.tolist(), "accuracy": sy.tolist()},
            }
        )
    return out
