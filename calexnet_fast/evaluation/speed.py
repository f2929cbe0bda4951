"""Measured speed at real accuracy: the real cascade at each operating point, timed against the backbone.

:func:`measure_points` runs the real cascade (:class:`calexnet_fast.Cascade`, or the baselines'
``ScoreCascade``: survivors are compacted between stages and later stages run only on them) over the test
images at every operating point, in one or both *modes* (:data:`MODES`):

* ``"batch"`` (latency): the cascade per input batch, as ``cascade(x)``;
* ``"stream"`` (throughput): the same cascade over the stream of input batches
  (:class:`~calexnet_fast.cascades.StreamingCascade`): survivors are re-batched across input batches so
  every stage runs on full stage batches. A ``ScoreCascade`` cannot stream (its exit rule carries state
  from branch to branch within a batch): the baselines are measured per batch only.

At each point:

* accuracy, exit histogram and FLOPs reduction come from the real cascade's own outputs
  (:func:`~.points.point_metrics`), and every mode is checked against the simulated evaluation on every
  image: ``mismatches`` / ``mismatches_streaming`` count the samples whose prediction or exit differ (0
  expected; a difference can only come from a confidence within float rounding of a threshold, since the
  real cascade runs folded heads on compacted batches);
* throughput is measured against the frozen backbone alone on the same device, dtype, batch size, memory
  format and images (one decoded, normalised tensor: only model work is timed), in interleaved rounds
  (:func:`~.timing.interleaved_rounds`; on CPU each round is one pass over the timed batches, every batch
  going through the backbone and the cascade in turn and then into the stream,
  :class:`~.timing.BatchInterleaved`, so that all of them meet the same stretches of a shared machine's speed;
  on CUDA, where energy is read per call, one call of each per round); images/s is the median over rounds, a
  measured speedup the median
  of the per-round ratios to the backbone timed in the same round (:meth:`~.timing.Rounds.paired_ratio`: the
  machine's drift between rounds cancels; ``speedup`` per batch, ``speedup_streaming`` streaming:
  :func:`mode_key`), with its 95 % interval (``speedup_interval_95``: :meth:`~.timing.Rounds.paired_interval`);
* two ideals: the FLOPs-ideal ``1 / (1 - r)`` from the FLOPs reduction ``r`` realised on the timing images,
  and the time-ideal (:func:`time_ideal`) from every stage's and head's measured time on a full batch
  (:func:`stage_times`), weighted by the fraction of the timing images reaching it: what the cascade would
  reach if fewer rows cost nothing extra per row and nothing else cost anything;
* on CUDA, energy per image from the driver's power readings.

:func:`headline` and :func:`frontiers` summarise the measured points over seeds, per mode.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..cascades import StreamingCascade
from ..flops import FlopsProfile, exit_histogram
from .pareto import aggregate, pareto_envelope
from .points import point_metrics
from .timing import BatchInterleaved, PowerMeter, TimingConfig, interleaved_rounds, sync, timing_subset

__all__ = ["MODES", "frontiers", "headline", "measure_points", "mode_key", "stage_times", "time_ideal"]

log = logging.getLogger(__name__)

MODES = ("batch", "stream")
"""The two ways a cascade runs: per input batch (latency) and streaming (throughput)."""
_CANDIDATE = {"batch": "cascade", "stream": "streaming"}  # the mode's name in images_per_s, seconds_per_round


def mode_key(mode: str, key: str) -> str:
    """The name of a per-mode value in a measured point: ``key`` per batch, ``key + "_streaming"`` streaming
    (``speedup`` / ``speedup_streaming``, ``mismatches`` / ``mismatches_streaming``, ...)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return key if mode == "batch" else f"{key}_streaming"


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


@torch.inference_mode()
def stage_times(cascade: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> tuple[list, list]:
    """Median seconds of each stage and of each branch (head + exit decision) on the full batch ``x``.

    Every piece is timed inside whole passes through the cascade's own steps (stage ``k``, then its
    ``_head_exit``), in order, with nothing exiting (thresholds set to ``+inf`` for the passes, restored
    after), so a baseline's exit heads get the state they carry from branch to branch. One untimed pass first.

    Returns:
        (``K + 1`` stage times, ``K`` branch times), seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    saved = cascade.thresholds.clone()
    cascade.set_thresholds(torch.full_like(saved, math.inf))
    k_branches = cascade.n_branches
    stage_s: list[list[float]] = [[] for _ in range(k_branches + 1)]
    head_s: list[list[float]] = [[] for _ in range(k_branches)]

    def clocked(fn):
        sync(device)
        t0 = time.perf_counter()
        value = fn()
        sync(device)
        return value, time.perf_counter() - t0

    try:
        for r in range(repeats + 1):
            h = x
            for k, stage in enumerate(cascade.stages):
                h, dt = clocked(lambda stage=stage, h=h: stage(h))
                if r:
                    stage_s[k].append(dt)
                if k < k_branches:
                    _, dt = clocked(lambda k=k, h=h: cascade._head_exit(k, h))
                    if r:
                        head_s[k].append(dt)
    finally:
        cascade.set_thresholds(saved)
    return [statistics.median(v) for v in stage_s], [statistics.median(v) for v in head_s]


def time_ideal(stage_s: Sequence[float], head_s: Sequence[float], reach: Sequence[float]) -> float:
    """The speedup over the backbone (the sum of ``stage_s``) if every stage and branch cost its full-batch
    time per image, paid only by the samples reaching it.

    Args:
        stage_s: ``K + 1`` stage times on a full batch.
        head_s: ``K`` branch times (head + exit decision) on a full batch; branch ``k`` follows stage ``k``.
        reach: ``K + 1`` fractions of the samples that run stage ``k`` (1 for stage 0).
    """
    if not len(stage_s) == len(reach) == len(head_s) + 1:
        raise ValueError(
            f"stage_s, head_s, reach: expected K + 1, K and K + 1 values, got {len(stage_s)}, {len(head_s)}, "
            f"{len(reach)}"
        )
    cost = sum(f * (s + (head_s[k] if k < len(head_s) else 0.0)) for k, (f, s) in enumerate(zip(reach, stage_s)))
    return sum(stage_s) / cost if cost > 0 else math.inf


def _decisions(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = list(outputs)
    pred = torch.cat([o.logits.argmax(1).cpu() for o in outputs])
    return pred, torch.cat([o.exit_index.cpu() for o in outputs])


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
    modes: Sequence[str] = MODES,
    stage_batch: int | None = None,
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
        modes: a non-empty subset of :data:`MODES`. ``"stream"`` is left out (with one log line) for a
            cascade that cannot stream; if nothing is left, ``"batch"`` is measured.
        stage_batch: rows per stage run when streaming (default: ``config.batch_size``).

    Returns:
        One dict per point: ``param``, ``accuracy`` (real cascade), ``flops_reduction``, ``exit_fractions``,
        ``modes`` (those measured), ``timed_images``, ``timed_flops_reduction``, ``ideal_speedup``
        (``1 / (1 - timed_flops_reduction)``), ``time_ideal_speedup`` (:func:`time_ideal`),
        ``full_batch_seconds`` {stages, heads}, ``images_per_s`` and ``seconds_per_round`` {backbone,
        cascade (per batch), streaming}, and per mode (:func:`mode_key`): ``mismatches`` (vs ``expected``;
        ``None`` without it), ``speedup``, ``speedup_rounds`` (per-round ratios), ``achieved_over_ideal``
        (speedup / FLOPs-ideal), ``achieved_over_time_ideal``; ``energy_j_per_image`` {name: J} or ``None``.
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
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes: expected a non-empty subset of {MODES}, got {list(modes)}")
    modes = [m for m in MODES if m in modes]
    streaming = None
    if "stream" in modes:
        try:
            streaming = StreamingCascade(cascade, stage_batch=stage_batch or cfg.batch_size)
        except ValueError as e:
            log.info(f"{desc}: measured per batch only ({e})")
            modes = ["batch"]
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
    runs = {
        "batch": lambda batches: (cascade(xb) for xb in batches),
        "stream": lambda batches: streaming.stream(batches),
    }

    def timed(run):
        def call():
            for _ in run(timed_batches):
                pass

        return call

    if meter is None:  # CPU: no energy to record per call; interleaved batch by batch against the machine's noise
        per_batch = {"backbone": backbone} | ({"cascade": cascade} if "batch" in modes else {})
        stream = ("streaming", streaming.stream) if "stream" in modes else None
        fns = {"pass": BatchInterleaved(timed_batches, per_batch, stream, device)}
    else:
        fns = {"backbone": timed(lambda batches: (backbone(xb) for xb in batches))}
        fns |= {_CANDIDATE[m]: timed(runs[m]) for m in modes}
    stage_s, head_s = stage_times(cascade, timed_batches[0], device, cfg.repeats) if n_timed else ([], [])

    rows = []
    for i, thr in enumerate(tqdm(thresholds, desc=desc, disable=not progress, leave=False)):
        cascade.set_thresholds(thr)
        decisions = {m: _decisions(runs[m](all_batches)) for m in modes}
        pred, exit_index = decisions[modes[0]]
        rounds = interleaved_rounds(
            fns,
            device,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            noise_tolerance=cfg.noise_tolerance,
            max_extra_rounds=cfg.max_extra_rounds,
            meter=meter,
        )
        med, times = rounds.medians(), rounds.seconds
        timed_exit = exit_index.index_select(0, sub)
        timed_r = profile.flops_reduction(exit_histogram(timed_exit, profile.n_branches))
        reach = [float((timed_exit > k).double().mean()) for k in range(len(stage_s))]
        row = {
            "param": float(params[i]) if params is not None else float(i),
            **point_metrics(pred, exit_index, labels, profile),
            "modes": list(modes),
            "timed_images": n_timed,
            "timed_flops_reduction": timed_r,
            "ideal_speedup": 1.0 / (1.0 - timed_r) if timed_r < 1 else math.inf,
            "time_ideal_speedup": time_ideal(stage_s, head_s, reach) if stage_s else math.nan,
            "full_batch_seconds": {"stages": stage_s, "heads": head_s},
            "images_per_s": {name: n_timed / t for name, t in med.items()},
            "seconds_per_round": times,
        }
        for m in modes:
            name = _CANDIDATE[m]
            mismatches = None
            if expected is not None:
                (e_pred, e_exit), (m_pred, m_exit) = expected[i], decisions[m]
                mismatches = int(((m_pred != e_pred.cpu()) | (m_exit != e_exit.cpu())).sum())
            speedup = rounds.paired_ratio("backbone", name)
            row[mode_key(m, "mismatches")] = mismatches
            row[mode_key(m, "speedup")] = speedup
            row[mode_key(m, "speedup_interval_95")] = list(rounds.paired_interval("backbone", name))
            row[mode_key(m, "speedup_rounds")] = [b / c for b, c in zip(times["backbone"], times[name], strict=True)]
            row[mode_key(m, "achieved_over_ideal")] = speedup / row["ideal_speedup"]
            row[mode_key(m, "achieved_over_time_ideal")] = speedup / row["time_ideal_speedup"]
        row["energy_j_per_image"] = (
            {name: statistics.median(j / n_timed for j in v) for name, v in rounds.joules.items()}
            if len(rounds.joules) == len(fns)
            else None
        )
        row["load_average_1min"] = os.getloadavg()[0]  # how busy the machine was (shared machines)
        rows.append(row)
    return rows


def _speedups(points: list[dict], mode: str) -> list[dict]:
    """The points measured in ``mode`` (those with its speedup)."""
    key = mode_key(mode, "speedup")
    return [p for p in points if p.get(key) is not None]


HEADLINE_LOSSES: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)  # accuracy losses of the headline table
HEADLINE_SPEEDUPS: tuple[float, ...] = (1.5, 2.0)  # measured speedups the headline reads accuracy at


def _best_within(points: list[dict], key: str, floor: float) -> dict | None:
    ok = [p for p in points if p["accuracy"] >= floor - 1e-12]
    return max(ok, key=lambda p: p[key]) if ok else None


def headline(runs: list[dict], backbone_accuracy: float, max_loss: float = 0.01, canonical_margin: float = 0.2) -> dict:
    """Per method and measured mode: the largest measured speedup with accuracy >= backbone - ``max_loss`` and
    the speedup at ``m = canonical_margin`` (CPM methods), each as mean ± std over seeds
    (:func:`~.pareto.aggregate`); keys named by :func:`mode_key` (``max_speedup_within_loss`` per batch,
    ``max_speedup_within_loss_streaming``, ...). Also per mode ``max_speedup_within`` (the same for each of
    :data:`HEADLINE_LOSSES`, keyed ``"0.005"`` ...) and ``accuracy_at_speedup`` (per speedup of
    :data:`HEADLINE_SPEEDUPS`, keyed ``"1.5"`` ...: the highest accuracy among the points measured at least
    that fast; NaN for a seed with none). A mode no run of a method was measured in is left out.

    Args:
        runs: ``{"method", "seed", "param_name", "points": [...]}`` as in ``speed.json``.
        backbone_accuracy: the backbone's test accuracy (fraction).
        max_loss: allowed accuracy loss, absolute (0.01 = 1 percentage point).
    """
    out: dict[str, dict] = {}
    tag = f"m{canonical_margin:g}"
    for method in dict.fromkeys(r["method"] for r in runs):
        method_runs = [r for r in runs if r["method"] == method]
        entry: dict = {"max_loss": max_loss}
        at_m_acc = []
        for r in method_runs:
            if r["param_name"] == "margin":
                hit = [p for p in r["points"] if abs(p["param"] - canonical_margin) < 1e-9]
                if hit:
                    at_m_acc.append(hit[0]["accuracy"])
        for mode in MODES:
            if not any(_speedups(r["points"], mode) for r in method_runs):
                continue
            key = mode_key(mode, "speedup")
            best, best_pts, at_m = [], [], []
            within = {f"{loss:g}": [] for loss in HEADLINE_LOSSES}
            fast_acc = {f"{x:g}": [] for x in HEADLINE_SPEEDUPS}
            for r in method_runs:
                points = _speedups(r["points"], mode)
                for loss in HEADLINE_LOSSES:
                    hit = _best_within(points, key, backbone_accuracy - loss)
                    within[f"{loss:g}"].append(hit[key] if hit else float("nan"))
                for x in HEADLINE_SPEEDUPS:
                    fast = [p["accuracy"] for p in points if p[key] >= x]
                    fast_acc[f"{x:g}"].append(max(fast) if fast else float("nan"))
                top = _best_within(points, key, backbone_accuracy - max_loss)
                best.append(top[key] if top else float("nan"))
                best_pts.append(
                    {k: top[k] for k in ("param", "accuracy", "flops_reduction", "ideal_speedup")} if top else None
                )
                if r["param_name"] == "margin":
                    hit = [p for p in points if abs(p["param"] - canonical_margin) < 1e-9]
                    if hit:
                        at_m.append(hit[0][key])
            entry[mode_key(mode, "max_speedup_within_loss")] = aggregate(best)
            entry[mode_key(mode, "max_speedup_within")] = {k: aggregate(v) for k, v in within.items()}
            entry[mode_key(mode, "accuracy_at_speedup")] = {k: aggregate(v) for k, v in fast_acc.items()}
            entry[mode_key(mode, "max_speedup_points")] = best_pts
            if at_m:
                entry[mode_key(mode, f"speedup_at_{tag}")] = aggregate(at_m)
        if at_m_acc:
            entry[f"accuracy_at_{tag}"] = aggregate(at_m_acc)
        out[method] = entry
    return out


def frontiers(runs: list[dict]) -> dict:
    """Per method and seed, the upper Pareto envelopes of the measured points: accuracy vs FLOPs reduction and,
    per measured mode, accuracy vs measured speedup (``accuracy_vs_speedup``, ``accuracy_vs_speedup_streaming``;
    each sorted by increasing reduction / speedup)."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        acc = [p["accuracy"] for p in r["points"]]
        fx, fy = pareto_envelope([p["flops_reduction"] for p in r["points"]], acc)
        entry = {
            "seed": r["seed"],
            "accuracy_vs_flops_reduction": {"flops_reduction": fx.tolist(), "accuracy": fy.tolist()},
        }
        for mode in MODES:
            points = _speedups(r["points"], mode)
            if points:
                key = mode_key(mode, "speedup")
                sx, sy = pareto_envelope([p[key] for p in points], [p["accuracy"] for p in points])
                entry[mode_key(mode, "accuracy_vs_speedup")] = {"speedup": sx.tolist(), "accuracy": sy.tolist()}
        out.setdefault(r["method"], []).append(entry)
    return out
