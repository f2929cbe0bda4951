"""Measured speed at real accuracy: the accuracy–throughput frontier of trained cascades (issue 8).

``calexnet measure --run RUN`` (the equivalent of ``calexnet evaluate --measure``) takes a trained and
calibrated run directory; ``calexnet measure --compare OUT`` takes every method x seed of a ``calexnet
compare`` output directory. For each operating point (margin ``m`` for the CPM methods, a global threshold
``τ`` for the baselines) the **real** cascade (:class:`calexnet_fast.Cascade`: survivors are compacted
between stages and later stages run only on them) runs over the test images, and

* its accuracy, exit histogram and FLOPs reduction come from the real cascade's own outputs, and are
  checked against the simulated evaluation (every exit of every sample computed on the same features,
  then the exit rule, as ``calexnet evaluate`` / ``calexnet compare`` do): ``mismatches`` counts the
  samples whose prediction or exit differ (0 expected; a difference can only come from a confidence within
  float rounding of a threshold, since the real cascade runs folded heads on compacted batches);
* its throughput is measured against the frozen backbone alone on the same device, dtype, batch size,
  memory format and data: the test images are decoded **once** into one normalised tensor, and only the
  model work on batches of that tensor is timed (no decoding, no data loading, no host-device copies).
  Backbone and cascade run in interleaved rounds (their order alternates from round to round) over the
  same timing images; images/s is the median over rounds, the measured speedup the ratio of the medians;
  the ideal speedup ``1 / (1 - r)`` uses the FLOPs reduction ``r`` realised on the timing images;
* on CUDA, energy per image comes from the driver's power readings (NVML: ``torch.cuda.power_draw`` or
  ``pynvml``) sampled in a background thread during each timed call; on CPU energy is not measured.

CPM methods run as :class:`~calexnet_fast.Cascade` unchanged. The baselines keep their own exit rules
(``score_k >= τ``), which are not the CPM rule on one head's logits: PTEEnet's score is a separate
confidence head, ZTW's and BoostNet's come from ensembles of every head up to ``k``. They run in
:class:`ScoreCascade`, a :class:`~calexnet_fast.Cascade` whose per-branch exit decision is the baseline's,
with the state those rules need (earlier heads' outputs) compacted together with the survivors.

Results: ``speed.json`` (every point, per-method headline numbers with the seed spread), ``speed.png`` /
``speed.svg`` (accuracy vs FLOPs reduction next to accuracy vs measured speedup) and ``speed_table.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .baselines import (
    ZTW,
    BoostNet,
    PTEEnet,
    PTEEnetExit,
    boosted_predictions,
    exit_outputs,
    global_threshold_exit,
)
from .cascade import apply_exit_rule
from .fast_cascade import Cascade
from .flops import FlopsProfile, exit_histogram
from .heads import PrototypePoolingHead
from .training import FeatureCache

__all__ = [
    "CLI_COMMANDS",
    "BoostNetExitHead",
    "PTEEnetExitHead",
    "PowerMeter",
    "ScoreCascade",
    "TimingConfig",
    "ZTWExitHead",
    "backbone_features",
    "baseline_exit_heads",
    "decode_images",
    "headline",
    "measure_points",
    "plot_speed",
    "speed_table",
]

PIPELINE_NOTE = (
    "test images decoded once into one normalised tensor; only the model work on batches of that tensor is "
    "timed (no decoding or data loading); backbone alone and cascade run on the same batches, device, dtype "
    "and memory format, in interleaved rounds (order alternating), median over rounds"
)
CPU_ENERGY_NOTE = "energy not measured on CPU (no power readings are taken)"


# --------------------------------------------------------------------------------------------------
# data and features
# --------------------------------------------------------------------------------------------------


def decode_images(dataset, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` decoded and normalised once, in dataset order.

    Args:
        dataset: yields ``(image [3, H, W] float32 normalised, label)``; an ``ImageDataset`` is switched to
            its un-augmented view.

    Returns:
        images [N, 3, H, W] float32 (contiguous), labels [N] int64.
    """
    from torch.utils.data import DataLoader

    if hasattr(dataset, "with_options"):
        dataset = dataset.with_options(augment=False)
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("dataset: expected at least one image, got an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


@torch.inference_mode()
def backbone_features(backbone, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> FeatureCache:
    """An in-memory :class:`~calexnet_fast.training.FeatureCache` of the backbone on ``images`` (kept in the
    dtype the backbone computes in), computed on the very tensor and batches the real cascade reads.

    Args:
        backbone: a ``StagedBackbone`` on the images' device.
        images: [N, C, H, W] (already on the device, in the memory format used for timing).
    """
    from tqdm.auto import tqdm

    feats: list[list[torch.Tensor]] = []
    logits = []
    for xb in tqdm(_batches(images, batch_size), desc="backbone features", disable=not progress, leave=False):
        f, z = backbone.features(xb)
        feats.append([t.cpu().contiguous() for t in f])
        logits.append(z.float().cpu())
    k = len(feats[0])
    features = [torch.cat([b[i] for b in feats]) for i in range(k)]
    n = images.shape[0]
    return FeatureCache(features, torch.cat(logits), torch.zeros(n, dtype=torch.int64), {"source": "measure"})


# --------------------------------------------------------------------------------------------------
# the baselines' exit rules inside the real cascade
# --------------------------------------------------------------------------------------------------


class ScoreCascade(Cascade):
    """A :class:`~calexnet_fast.Cascade` with a score-based exit rule per branch (the baselines').

    Head ``k`` is an *exit head*: ``forward(h, state) -> (logits [n, C], score [n], pred [n], state)``, where
    ``state`` is whatever the rule carries from branch to branch (``None`` at branch 1; a tensor whose rows
    are the samples, e.g. the earlier heads' outputs) and ``logits`` is what the cascade outputs for a sample
    leaving there (its argmax must be ``pred``). A sample leaves at the first branch with
    ``score >= thresholds[k, pred]`` (a NaN score never exits); a global threshold ``τ`` is the matrix
    filled with ``τ``. Stage skipping, compaction and the output scatter are :class:`Cascade`'s own: only
    the per-branch decision is replaced, and the state rows are compacted with the same survivor mask as
    the feature map. Not re-entrant (the state lives on the module during a forward).
    """

    def _head_exit(self, k: int, h: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
        if k == 0:
            self._carry, self._keep = None, None
        state = self._carry
        if state is not None:
            state = state[self._keep]  # the rows Cascade kept with compact(h, keep), in the same order
        logits, score, pred, state = self.heads[k](h, state)
        exit_ = score.float() >= self.thresholds[k].to(score.device)[pred]
        self._carry, self._keep = state, ~exit_
        return logits, exit_


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
        self.head = head.fold() if isinstance(head, PrototypePoolingHead) else head
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


# --------------------------------------------------------------------------------------------------
# timing and energy
# --------------------------------------------------------------------------------------------------


@dataclass
class TimingConfig:
    """How points are timed.

    Attributes:
        batch_size: images per forward, the same for the backbone and the cascade.
        repeats: interleaved rounds (backbone, cascade) per point; medians over rounds.
        warmup: untimed calls of each before the rounds.
        timing_images: images timed per round (a fixed random subset of the test images, the same for
            every point; ``None`` or 0: all of them). Accuracy always uses every test image.
        timing_seed: seed of that subset.
        noise_tolerance: if the slowest round of the backbone or of the cascade took more than this factor
            times its fastest (another job got in the way), more rounds are run ...
        max_extra_rounds: ... up to this many, so that the median is not set by the disturbed rounds.
            Every round is recorded (``seconds_per_round``).
    """

    batch_size: int = 256
    repeats: int = 5
    warmup: int = 1
    timing_images: int | None = None
    timing_seed: int = 0
    noise_tolerance: float = 1.2
    max_extra_rounds: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {self.warmup}")
        if not self.noise_tolerance >= 1.0 or self.max_extra_rounds < 0:
            raise ValueError(
                f"noise_tolerance, max_extra_rounds: expected >= 1 and >= 0, got {self.noise_tolerance} and "
                f"{self.max_extra_rounds}"
            )
        if self.timing_images is not None and self.timing_images < 0:
            raise ValueError(f"timing_images: expected >= 0 (0: all), got {self.timing_images}")


def _noisy(times: dict[str, list[float]], tolerance: float) -> bool:
    """Whether any candidate's slowest round took more than ``tolerance`` times its fastest."""
    return any(ts and max(ts) > tolerance * min(ts) for ts in times.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PowerMeter:
    """Mean power draw of a CUDA device over a timed section (NVML, sampled every ``interval`` s).

    ``available`` is False on CPU and where no NVML reading works (``reason`` says why). Use as a context
    manager around the timed work; ``watts`` is then the mean of the samples (``None`` if unavailable).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = torch.device(device), interval
        self.available, self.reason, self._read = False, CPU_ENERGY_NOTE, None
        self.watts: float | None = None
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.power_draw(self.device)  # milliwatts, through NVML
            self._read = lambda: torch.cuda.power_draw(self.device) / 1000.0
            self.available, self.reason = True, "torch.cuda.power_draw (NVML)"
            return
        except Exception as e:  # noqa: BLE001 - any failure means: not available here
            first = f"torch.cuda.power_draw failed ({type(e).__name__}: {e})"
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or torch.cuda.current_device())
            pynvml.nvmlDeviceGetPowerUsage(handle)
            self._read = lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            self.available, self.reason = True, "pynvml nvmlDeviceGetPowerUsage"
        except Exception as e:  # noqa: BLE001
            self.reason = f"energy not available: {first}; pynvml: {type(e).__name__}: {e}"

    def __enter__(self) -> PowerMeter:
        self._samples: list[float] = []
        self._stop = threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._samples.append(float(self._read()))
            except Exception:  # noqa: BLE001
                return
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()
            self.watts = statistics.fmean(self._samples) if self._samples else None


def _timed(fn: Callable[[], object], device: torch.device, meter: PowerMeter | None) -> tuple[float, float | None]:
    """Wall time of ``fn()`` in seconds and the energy in joules (``None`` without a power meter)."""
    _sync(device)
    if meter is not None and meter.available:
        with meter:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
        return dt, (meter.watts * dt if meter.watts is not None else None)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, None


def timing_subset(n: int, config: TimingConfig) -> torch.Tensor:
    """Sorted indices of the images timed in every round (all of them unless ``config.timing_images``)."""
    if not config.timing_images or config.timing_images >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(config.timing_seed)
    return torch.sort(torch.randperm(n, generator=g)[: config.timing_images]).values


# --------------------------------------------------------------------------------------------------
# measuring operating points
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure_points(
    cascade: Cascade,
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
        cascade: a :class:`~calexnet_fast.Cascade` (or :class:`ScoreCascade`) on the images' device.
        backbone: the frozen backbone alone (same stages), on the same device and dtype.
        images: [N, C, H, W] decoded, normalised test images (device, dtype and memory format as timed).
        labels: [N] int64.
        thresholds: one [K, n_classes] threshold matrix per point.
        profile: per-sample FLOPs of the cascade's segments and heads.
        params: the operating parameter of each point (margin or threshold), stored with it.
        expected: per point, the simulated evaluation's (pred [N], exit_index [N]) to check against.
        config: :class:`TimingConfig`.

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
    k_count = cascade.n_branches
    labels = labels.cpu()
    all_batches = _batches(images, cfg.batch_size)
    sub = timing_subset(n, cfg)
    timed_images = images if sub.numel() == n else images.index_select(0, sub.to(device))
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        timed_images = timed_images.contiguous(memory_format=torch.channels_last)
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
        hist = exit_histogram(exit_index, k_count)
        timed_hist = exit_histogram(exit_index.index_select(0, sub), k_count)
        mismatches = None
        if expected is not None:
            e_pred, e_exit = expected[i]
            mismatches = int(((pred != e_pred.cpu()) | (exit_index != e_exit.cpu())).sum())
        for _ in range(cfg.warmup):
            run_backbone()
            run_cascade()
        times: dict[str, list[float]] = {"backbone": [], "cascade": []}
        energy: dict[str, list[float]] = {"backbone": [], "cascade": []}
        r = 0
        while r < cfg.repeats or (r < cfg.repeats + cfg.max_extra_rounds and _noisy(times, cfg.noise_tolerance)):
            order = ("backbone", "cascade") if r % 2 == 0 else ("cascade", "backbone")
            for name in order:
                dt, joules = _timed(run_backbone if name == "backbone" else run_cascade, device, meter)
                times[name].append(dt)
                if joules is not None:
                    energy[name].append(joules / timed_images.shape[0])
            r += 1
        med = {name: statistics.median(ts) for name, ts in times.items()}
        timed_r = profile.flops_reduction(timed_hist)
        rows.append(
            {
                "param": float(params[i]) if params is not None else float(i),
                "accuracy": float((pred == labels).double().mean()),
                "flops_reduction": profile.flops_reduction(hist),
                "exit_fractions": (hist.double() / n).tolist(),
                "mismatches": mismatches,
                "timed_images": int(timed_images.shape[0]),
                "timed_flops_reduction": timed_r,
                "ideal_speedup": 1.0 / (1.0 - timed_r) if timed_r < 1 else math.inf,
                "images_per_s": {name: timed_images.shape[0] / t for name, t in med.items()},
                "seconds_per_round": times,
                "speedup": med["backbone"] / med["cascade"],
                "speedup_rounds": [b / c for b, c in zip(times["backbone"], times["cascade"], strict=True)],
                "energy_j_per_image": (
                    {name: statistics.median(v) for name, v in energy.items()} if energy["cascade"] else None
                ),
            }
        )
        rows[-1]["achieved_over_ideal"] = rows[-1]["speedup"] / rows[-1]["ideal_speedup"]
        rows[-1]["load_average_1min"] = os.getloadavg()[0]  # how busy the machine was (shared machines)
    return rows


def cpm_expected(
    branch_logits: torch.Tensor, backbone_logits: torch.Tensor, thresholds: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The simulated evaluation's (pred, exit_index) at each CPM point (:func:`apply_exit_rule`)."""
    out = []
    for thr in thresholds:
        o = apply_exit_rule(branch_logits.float(), backbone_logits.float(), thr)
        out.append((o.logits.argmax(1), o.exit_index))
    return out


def baseline_expected(
    model: nn.Module, cache: FeatureCache, taus: Sequence[float], device=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The simulated evaluation's (pred, exit_index) at each global threshold (as ``calexnet compare``)."""
    eo = exit_outputs(model, cache, device=device)
    preds = torch.cat([eo.preds.long(), cache.logits_tensor().argmax(1).unsqueeze(0)])  # [K + 1, N]
    exits = global_threshold_exit(eo.scores.float(), torch.as_tensor(list(taus), dtype=torch.float32))
    cols = torch.arange(preds.shape[1])
    return [(preds[e - 1, cols], e) for e in exits]


# --------------------------------------------------------------------------------------------------
# summaries, figure, table
# --------------------------------------------------------------------------------------------------


def headline(runs: list[dict], backbone_accuracy: float, max_loss: float = 0.01, canonical_margin: float = 0.2) -> dict:
    """Per method: the largest measured speedup with accuracy >= backbone - ``max_loss`` and the speedup at
    ``m = canonical_margin`` (CPM methods), each as mean ± std over seeds (:func:`evaluation.aggregate`).

    Args:
        runs: ``{"method", "seed", "param_name", "points": [...]}`` as in ``speed.json``.
        backbone_accuracy: the backbone's test accuracy (fraction).
        max_loss: allowed accuracy loss, absolute (0.01 = 1 percentage point).
    """
    from .evaluation import aggregate

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
    from .evaluation import pareto_envelope

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


def _style(method: str, i: int):
    from .evaluation import _STYLE

    return _STYLE.get(method, (f"C{i % 10}", "-", 1.5))


def plot_speed(
    runs: list[dict], paths: Sequence[str | Path], *, backbone_accuracy: float | None = None, title: str | None = None
) -> None:
    """Two panels: accuracy vs FLOPs reduction and accuracy vs measured speedup (every measured point, each
    seed's upper Pareto envelope as a line; the ideal ``1 / (1 - r)`` of the envelope points dotted)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .evaluation import pareto_envelope

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=130)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for i, method in enumerate(methods):
        color, ls, lw = _style(method, i)
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
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
    plt.close(fig)


def _fmt(agg: dict | None, digits: int = 2, scale: float = 1.0, unit: str = "×") -> str:
    if not agg or agg.get("mean") is None or not math.isfinite(agg["mean"]):
        values = (agg or {}).get("values") or []
        missing = sum(1 for v in values if v is None or not math.isfinite(v))
        return f"n/a ({missing}/{len(values)} seeds have none)" if missing else "n/a"
    return f"{scale * agg['mean']:.{digits}f}{unit} ± {scale * agg['std']:.{digits}f}"


def speed_table(summary: dict, canonical_margin: float = 0.2) -> str:
    """Markdown table of :func:`headline`'s numbers (mean ± std over seeds)."""
    key, acc_key = f"speedup_at_m{canonical_margin:g}", f"accuracy_at_m{canonical_margin:g}"
    lines = [
        f"| method | max measured speedup at ≤ 1 pt loss | speedup at m = {canonical_margin:g} | "
        f"accuracy at m = {canonical_margin:g} (%) | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, s in summary.items():
        n = s["max_speedup_within_loss"]["n"]
        lines.append(
            f"| {method} | {_fmt(s['max_speedup_within_loss'])} | {_fmt(s.get(key))} | "
            f"{_fmt(s.get(acc_key), 2, 100.0, '')} | {n} |"
        )
    return "\n".join(lines) + "\n"


def margin_table(runs: list[dict]) -> str:
    """Markdown table of the CPM points, mean ± std over seeds per method and margin."""
    from .evaluation import aggregate

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
            return _fmt(aggregate([p[key] for p in pts]), digits, scale, unit)

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


# --------------------------------------------------------------------------------------------------
# calexnet measure
# --------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MARGINS = "0,0.05,0.1,0.15,0.2,0.3"
DEFAULT_BASELINE_REDUCTIONS = "0.1,0.2,0.3,0.4,0.5"


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``calexnet measure``."""
    from . import cli

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of `calexnet train` + `calexnet calibrate`")
    src.add_argument("--compare", help="output directory of `calexnet compare` (every method x seed in it)")
    p.add_argument("--work-dir", help="--compare: its work dir (default: as recorded in results.json, else OUT/work)")
    p.add_argument("--methods", help="--compare: comma list (default: every method it ran)")
    p.add_argument("--seeds", help="--compare: comma list (default: every seed it ran)")
    p.add_argument(
        "--margins",
        default=DEFAULT_MARGINS,
        help=f"CPM margins to measure: a comma list or START:STOP:COUNT, or 'all' (--run: every calibrated "
        f"margin); --run uses the calibrated margins closest to these (default {DEFAULT_MARGINS})",
    )
    p.add_argument(
        "--baseline-reductions",
        default=DEFAULT_BASELINE_REDUCTIONS,
        help="--compare: baseline thresholds to measure: per target FLOPs reduction, the point of the method's "
        f"Pareto envelope (from results.json) nearest to it (default {DEFAULT_BASELINE_REDUCTIONS}; '' for none)",
    )
    p.add_argument(
        "--baseline-losses",
        default="",
        help="--compare: more baseline thresholds: per accuracy loss (e.g. 0.01 = 1 pt), the envelope point with "
        "the largest FLOPs reduction whose accuracy in results.json is within that loss of the backbone's",
    )
    p.add_argument("--out", help="directory for speed.json, speed.png, speed.svg, speed_table.md (default: the input)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward, backbone and cascade (256)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per point (5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each before the rounds (1)")
    p.add_argument(
        "--timing-images",
        type=int,
        default=0,
        help="time each round on a fixed random subset of this many test images (0: all); accuracy always "
        "uses all of them",
    )
    p.add_argument(
        "--max-extra-rounds",
        type=int,
        default=4,
        help="more rounds (up to this many) when a candidate's slowest round is > 1.2x its fastest (4)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last images and backbone (default: on)",
    )
    p.add_argument("--max-loss", type=float, default=0.01, help="accuracy loss of the headline (0.01 = 1 pt)")
    p.add_argument("--resume", action="store_true", help="keep runs already in OUT/speed.json measured alike")
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: recompute the summary, frontiers, figure and table from the input's speed.json",
    )
    p.add_argument("--data-dir", help="dataset directory if it moved")
    cli._add_run_args(p)


def _margin_list(text: str) -> list[float] | None:
    from . import cli

    if text.strip() == "all":
        return None
    return [float(v) for v in cli._margins(text, None)]


def _prepare(model: nn.Module, device, dtype, channels_last: bool) -> nn.Module:
    model = model.eval().to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["cpu_count"] = os.cpu_count()
    from .availability import cascade_plan

    env["cascade_plan"] = cascade_plan(device.type).describe()
    return env


class _Session:
    """What every run of one ``calexnet measure`` call shares: device, images, backbone and its features."""

    def __init__(self, args, bb, splits) -> None:
        from . import cli

        self.device = cli._device(args)
        self.dtype = DTYPES[args.dtype]
        self.channels_last = True if args.channels_last is None else bool(args.channels_last)
        self.timing = TimingConfig(
            args.batch_size,
            args.repeats,
            args.warmup,
            args.timing_images or None,
            max_extra_rounds=args.max_extra_rounds,
        )
        self.progress = not cli._QUIET
        self.bb = _prepare(bb, self.device, self.dtype, self.channels_last)
        t0 = time.time()
        x, y = decode_images(splits.test)
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.images, self.labels = x, y
        cli.log(f"decoded {x.shape[0]} test images into one tensor {list(x.shape)} in {time.time() - t0:.1f}s")
        t0 = time.time()
        self.test = backbone_features(self.bb, x, args.batch_size, self.progress)
        self.test.labels = y
        self.backbone_accuracy = float((self.test.logits_tensor().argmax(1) == y).double().mean())
        cli.log(
            f"backbone features of the test images in {time.time() - t0:.1f}s; accuracy {self.backbone_accuracy:.4f}"
        )

    def measure(self, cascade, thresholds, profile, params, expected, desc) -> list[dict]:
        cascade = _prepare(cascade, self.device, self.dtype, False)
        return measure_points(
            cascade,
            self.bb,
            self.images,
            self.labels,
            [t.to(self.device) for t in thresholds],
            profile,
            params=params,
            expected=expected,
            config=self.timing,
            progress=self.progress,
            desc=desc,
        )


def _write_outputs(out: Path, payload: dict, title: str) -> None:
    from .evaluation import write_json

    payload["title"] = title
    write_json(out / "speed.json", payload)
    if payload["runs"]:
        plot_speed(
            payload["runs"],
            [out / "speed.png", out / "speed.svg"],
            backbone_accuracy=payload["backbone"]["test_accuracy"],
            title=title,
        )
        tables = [speed_table(payload["summary"]), margin_table(payload["runs"]), points_table(payload["runs"])]
        (out / "speed_table.md").write_text("\n".join(tables))


def _payload(args, session: _Session, runs: list[dict], source: dict, t_start: float) -> dict:
    bb_ips = [p["images_per_s"]["backbone"] for r in runs for p in r["points"]]
    return {
        "command": "measure",
        "argv": sys.argv,
        "source": source,
        "pipeline": PIPELINE_NOTE,
        "energy": PowerMeter(session.device).reason if session.device.type == "cuda" else CPU_ENERGY_NOTE,
        "timing": asdict(session.timing),
        "dtype": args.dtype,
        "channels_last": session.channels_last,
        "environment": _environment(session.device),
        "backbone": {
            "test_accuracy": session.backbone_accuracy,
            "n_test": int(session.labels.shape[0]),
            "images_per_s_median_over_points": statistics.median(bb_ips) if bb_ips else None,
        },
        "summary": headline(runs, session.backbone_accuracy, args.max_loss),
        "frontiers": frontiers(runs),
        "runs": runs,
        "seconds": time.time() - t_start,
    }


def _previous(out: Path, args, session: _Session) -> dict:
    import json

    path = out / "speed.json"
    if not args.resume or not path.is_file():
        return {}
    old = json.loads(path.read_text())
    cfg = session.timing
    same = ("batch_size", "repeats", "warmup", "timing_images", "timing_seed")
    if any((old.get("timing") or {}).get(k) != getattr(cfg, k) for k in same) or old.get("dtype") != args.dtype:
        return {}

    def settled(run: dict) -> bool:
        # a point whose rounds were disturbed and that did not get every extra round is measured again
        return all(
            not _noisy(p["seconds_per_round"], cfg.noise_tolerance)
            or len(p["seconds_per_round"]["backbone"]) >= cfg.repeats + cfg.max_extra_rounds
            for p in run["points"]
        )

    return {(r["method"], r["seed"]): r for r in old.get("runs", []) if settled(r)}


def _select_margins(available: torch.Tensor, wanted: list[float] | None) -> list[int]:
    if wanted is None:
        return list(range(available.numel()))
    idx = []
    for m in wanted:
        i = int(torch.argmin((available - m).abs()))
        if i not in idx:
            idx.append(i)
    return idx


def _measure_run(args) -> int:
    """``calexnet measure --run RUN``: every (selected) calibrated margin of one trained run."""
    from . import cli
    from .calibration import CalibrationSweep
    from .flops import profile_flops
    from .recipes import head_logits

    cli._setup(args)
    t_start = time.time()
    run, cfg, bb, heads, splits = cli._load_run(args)
    thr_path = run / "thresholds.safetensors"
    if not thr_path.is_file():
        raise SystemExit(f"error: --run {run}: no thresholds.safetensors; run `calexnet calibrate --run {run}` first")
    try:
        sweep = CalibrationSweep.load(thr_path)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out) if args.out else run
    wanted = _margin_list(args.margins)
    idx = _select_margins(sweep.margins, wanted)
    session = _Session(args, bb, splits)
    profile = profile_flops(bb, heads)
    heads = nn.ModuleList(h.eval() for h in heads)
    zt = torch.stack([head_logits(h, session.test, k, device=session.device) for k, h in enumerate(heads)])
    zb = session.test.logits_tensor()
    thr = [sweep.thresholds[i] for i in idx]
    margins = [float(sweep.margins[i]) for i in idx]
    simulated = cli.evaluate_points(zt, zb, session.labels, sweep.thresholds[idx], sweep.margins[idx], profile)
    cascade = Cascade(session.bb, [h.to(session.device) for h in heads])
    rows = session.measure(cascade, thr, profile, margins, cpm_expected(zt, zb, thr), cfg["recipe"]["name"])
    for row, sim in zip(rows, simulated, strict=True):
        row["simulated"] = {k: sim[k] for k in ("accuracy", "flops_reduction")}
    runs = [
        {
            "method": cfg["recipe"]["name"],
            "seed": cfg["fit"]["seed"],
            "param_name": "margin",
            "head_flops": list(profile.head_flops),
            "points": rows,
        }
    ]
    payload = _payload(args, session, runs, {"run": str(run)}, t_start)
    _write_outputs(out, payload, f"{bb.name}: {cfg['recipe']['name']} seed {cfg['fit']['seed']}, {session.device}")
    _report(payload, out)
    return 0


def _report(payload: dict, out: Path) -> None:
    from . import cli

    if not cli._QUIET:
        print(
            f"backbone accuracy {payload['backbone']['test_accuracy']:.4f}, "
            f"{payload['backbone']['images_per_s_median_over_points']:.0f} images/s (median over points)"
        )
        print(points_table(payload["runs"]))
        print(speed_table(payload["summary"]))
    cli.log(f"results in {out / 'speed.json'}, {out / 'speed.png'}, {out / 'speed_table.md'}")


def _compare_work_dir(out: Path, config: dict, given: str | None) -> Path:
    if given:
        return Path(given)
    argv = list(config.get("argv") or [])
    for i, a in enumerate(argv):
        if a == "--work-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--work-dir="):
            return Path(a.split("=", 1)[1])
    return out / "work"


def _baseline_taus(
    sweep: dict, targets: list[float], losses: Sequence[float] = (), backbone_accuracy: float = math.nan
) -> list[float]:
    """Thresholds of envelope points of a compare sweep: the one nearest to each target reduction, and for each
    accuracy loss the one with the largest reduction within that loss of ``backbone_accuracy``."""
    from .evaluation import pareto_envelope

    params = [float(v) for v in sweep["params"]]
    red, acc = sweep["flops_reduction"], sweep["accuracy"]
    ex, ey = pareto_envelope(red, acc)
    picks = [int(np.argmin(np.abs(ex - t))) for t in targets if ex.size]
    for loss in losses:
        ok = np.nonzero(ey >= backbone_accuracy - loss - 1e-12)[0]
        if ok.size:
            picks.append(int(ok[np.argmax(ex[ok])]))
    taus: list[float] = []
    for j in sorted(set(picks)):
        # the envelope point's threshold: among sweep points with that reduction and accuracy, the first
        cand = [i for i in range(len(params)) if red[i] == ex[j] and acc[i] == ey[j]]
        tau = params[cand[0]]
        if tau not in taus:
            taus.append(tau)
    return sorted(taus)


def _measure_compare(args) -> int:
    """``calexnet measure --compare OUT``: every method x seed of a ``calexnet compare`` output."""
    import json

    from . import cli
    from .baselines import BaselineConfig, baseline_head_flops, make_baseline
    from .calibration import calibrate
    from .evaluation import CPM_METHODS
    from .flops import segment_flops
    from .recipes import head_logits, make_head, recipe
    from .training import BackboneSpec, load_state_file, seed_everything

    cli._setup(args)
    t_start = time.time()
    src = Path(args.compare)
    res_path = src / "results.json"
    if not res_path.is_file():
        raise SystemExit(f"error: --compare {src}: no results.json there; expected the --out of `calexnet compare`")
    results = json.loads(res_path.read_text())
    config = results["config"]
    work = _compare_work_dir(src, config, args.work_dir)
    methods = [m.strip() for m in (args.methods or ",".join(config["methods"])).split(",") if m.strip()]
    unknown = [m for m in methods if m not in config["methods"]]
    if unknown:
        raise SystemExit(f"error: --methods: {unknown} were not run by that compare (it ran {config['methods']})")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(config["seeds"])
    except ValueError:
        raise SystemExit(f"error: --seeds: expected a comma list of ints, got {args.seeds!r}") from None
    wanted = _margin_list(args.margins)
    if wanted is None:
        c = config["margins"]
        wanted = torch.linspace(float(c[0]), float(c[1]), int(c[2]), dtype=torch.float64).tolist()
    try:
        targets = [float(v) for v in args.baseline_reductions.split(",") if v.strip()]
        losses = [float(v) for v in args.baseline_losses.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            "error: --baseline-reductions / --baseline-losses: expected comma lists of numbers, got "
            f"{args.baseline_reductions!r} / {args.baseline_losses!r}"
        ) from None
    out = Path(args.out) if args.out else src
    source = {
        "compare": str(src),
        "work_dir": str(work),
        "results_json_sha256": hashlib.sha256(res_path.read_bytes()).hexdigest()[:16],
    }
    spec = BackboneSpec.from_json(config["backbone"])
    seed_everything(0)  # as `calexnet compare` does before it builds the backbone (matters for --random-init)
    ns = argparse.Namespace(data_dir=args.data_dir)
    splits, _ = cli._load_data(ns, cli._normalization(spec), dict(config["dataset"]))
    bb = cli._build_backbone(spec)
    session = _Session(args, bb, splits)
    device = session.device
    cache_cfg = dict(config["cache"])
    if session.dtype != torch.float32:  # its features would not match the compare's cache: never overwrite it
        cache_cfg["storage"] = "memory"
    va, _ = cli._cache(args, cache_cfg, work, session.bb, splits.val, "val", device)
    z_val, y_val = va.logits_tensor(), va.labels_tensor()
    seg = segment_flops(bb)
    n_classes = bb.n_classes
    previous = _previous(out, args, session)
    measured: dict[tuple[str, int], dict] = {}

    def merged() -> list[dict]:
        """Runs measured now, and (with --resume) those kept from the previous speed.json, in compare order."""
        keys = set(previous) | set(measured)
        order = {m: i for i, m in enumerate(config["methods"])}
        keys = sorted(keys, key=lambda k: (order.get(k[0], len(order)), k[1]))
        return [measured.get(k) or previous[k] for k in keys]

    sweeps = results.get("sweeps", {})
    for method in methods:
        for seed in seeds:
            sw = next((s for s in sweeps.get(method, []) if s["seed"] == seed), None)
            if sw is None:
                cli.log(f"{method} seed {seed}: not in results.json; skipped")
                continue
            t1 = time.time()
            if method in CPM_METHODS:
                rec = recipe(
                    method,
                    head_dim=config["head_dim"],
                    n_prototypes=config["n_prototypes"],
                    margin_mode=config["margin_mode"],
                    min_support=config["min_support"],
                )
                params = [float(m) for m in wanted]
            else:
                rec = None
                params = _baseline_taus(sw, targets, losses, results["backbone"]["test_accuracy"])
            old = previous.get((method, seed))
            if old is not None and [p["param"] for p in old["points"]] == params:
                measured[(method, seed)] = old
                cli.log(f"{method} seed {seed}: kept from the previous speed.json")
                continue
            if rec is not None:
                trained_as = sw.get("info", {}).get("heads_trained_as", method)
                heads = nn.ModuleList()
                for k, ch in enumerate(bb.branch_channels):
                    path = work / "runs" / f"{trained_as}_seed{seed}" / f"branch_{k + 1}" / "head.safetensors"
                    if not path.is_file():
                        raise SystemExit(f"error: {path} missing: is --work-dir {work} the compare's work dir?")
                    h = make_head(ch, n_classes, rec)
                    h.load_state_dict(load_state_file(path)[0])
                    heads.append(h.eval())
                zv = torch.stack([head_logits(h, va, k, device=device) for k, h in enumerate(heads)])
                thr_all = calibrate(
                    zv,
                    z_val,
                    y_val,
                    torch.tensor(params, dtype=torch.float64),
                    aligned=rec.aligned,
                    margin_mode=rec.margin_mode,
                    min_support=rec.min_support,
                    bar_from=rec.bar_from,
                )
                thr = list(thr_all.unbind(0))
                zt = torch.stack([head_logits(h, session.test, k, device=device) for k, h in enumerate(heads)])
                profile = FlopsProfile(tuple(seg), tuple(float(v) for v in sw["info"]["head_flops"]))
                expected = cpm_expected(zt, session.test.logits_tensor(), thr)
                cascade = Cascade(session.bb, [h.to(device) for h in heads])
                param_name = "margin"
            else:
                path = work / "runs" / f"{method}_seed{seed}" / "model.safetensors"
                if not path.is_file():
                    raise SystemExit(f"error: {path} missing: is --work-dir {work} the compare's work dir?")
                model = make_baseline(method, bb.branch_channels, n_classes, BaselineConfig(**config["baselines"]))
                model.load_state_dict(load_state_file(path)[0])
                model.eval()
                hf = baseline_head_flops(model, bb.branch_shapes)
                profile = FlopsProfile(tuple(seg), tuple(hf))
                expected = baseline_expected(model, session.test, params, device=device)
                model.to(device)
                k_count = len(bb.branch_channels)
                thr = [torch.full((k_count, n_classes), t) for t in params]
                cascade = ScoreCascade(
                    list(session.bb.stages),
                    baseline_exit_heads(model),
                    thr[0],
                    n_classes=n_classes,
                    in_channels=bb.in_channels,
                )
                param_name = "threshold"
            rows = session.measure(cascade, thr, profile, params, expected, f"{method} seed {seed}")
            for row in rows:
                j = _nearest(sw["params"], row["param"])
                if j is not None:
                    row["compare"] = {"accuracy": sw["accuracy"][j], "flops_reduction": sw["flops_reduction"][j]}
                row["simulated"] = None
            for row, (e_pred, e_exit) in zip(rows, expected, strict=True):
                row["simulated"] = {
                    "accuracy": float((e_pred.cpu() == session.labels).double().mean()),
                    "flops_reduction": profile.flops_reduction(exit_histogram(e_exit.cpu(), profile.n_branches)),
                }
            measured[(method, seed)] = {
                "method": method,
                "seed": seed,
                "param_name": param_name,
                "head_flops": list(profile.head_flops),
                "seconds": time.time() - t1,
                "points": rows,
            }
            best = max(rows, key=lambda r: r["speedup"])
            cli.log(
                f"{method} seed {seed}: {len(rows)} points in {time.time() - t1:.0f}s; best speedup "
                f"{best['speedup']:.2f}x at {param_name} {best['param']:.3g} (accuracy {best['accuracy']:.4f}); "
                f"mismatches vs simulated {sum(r['mismatches'] for r in rows)}"
            )
            payload = _payload(args, session, merged(), source, t_start)
            _write_outputs(out, payload, _title(bb, session, config))
    payload = _payload(args, session, merged(), source, t_start)
    _write_outputs(out, payload, _title(bb, session, config))
    _report(payload, out)
    return 0


def _title(bb, session: _Session, config: dict) -> str:
    return (
        f"{bb.name} on {config['dataset']['name']}: real cascade on {session.labels.shape[0]} test images, "
        f"{session.device}, {torch.get_num_threads()} threads, batch {session.timing.batch_size}; "
        f"seeds {','.join(map(str, config['seeds']))}"
    )


def _nearest(params: list, value: float) -> int | None:
    vals = [float(v) for v in params]
    if not vals:
        return None
    if math.isinf(value):
        hits = [i for i, v in enumerate(vals) if v == value]
        return hits[0] if hits else None
    j = int(np.argmin([abs(v - value) if math.isfinite(v) else math.inf for v in vals]))
    return j if abs(vals[j] - value) < 1e-9 else None


def _render(args) -> int:
    """``--render``: summary, frontiers, figure and table again from an existing speed.json (no measuring)."""
    import json

    from . import cli
    from .evaluation import write_json

    cli._setup(args)
    src = Path(args.run or args.compare)
    out = Path(args.out) if args.out else src
    path = src / "speed.json"
    if not path.is_file():
        raise SystemExit(f"error: --render: no speed.json in {src}; measure first")
    payload = json.loads(path.read_text())
    payload["summary"] = headline(payload["runs"], payload["backbone"]["test_accuracy"], args.max_loss)
    payload["frontiers"] = frontiers(payload["runs"])
    title = payload.get("title") or f"real cascade vs backbone alone, {payload['environment'].get('device')}"
    if out != src:
        write_json(out / "speed.json", payload)
    _write_outputs(out, payload, title)
    _report(payload, out)
    return 0


def run_measure(args: argparse.Namespace) -> int:
    """``calexnet measure``."""
    if args.render:
        return _render(args)
    return _measure_run(args) if args.run else _measure_compare(args)


CLI_COMMANDS = [
    {
        "name": "measure",
        "help": "measured speed of the real cascade at each operating point (the equivalent of "
        "`calexnet evaluate --measure`)",
        "add_arguments": add_measure_arguments,
        "run": run_measure,
        "description": "Run the real calexnet_fast.Cascade (survivors compacted between stages) over the test "
        "images at each operating point and time it against the frozen backbone alone: same device, dtype, "
        "batch size and images (decoded once into one tensor; only model work is timed), interleaved rounds, "
        "medians. Records the real cascade's accuracy (checked against the simulated evaluation), FLOPs "
        "reduction, measured and ideal 1/(1-r) speedup per point, and the headline numbers: the largest "
        "measured speedup at <= 1 pt accuracy loss and the speedup at m = 0.2, mean ± std over seeds. "
        "Writes speed.json, speed.png, speed.svg and speed_table.md.",
        "epilog": "examples:\n  calexnet measure --run runs/calexnet_s0 --threads 2\n"
        "  calexnet measure --compare docs/results --threads 2 --timing-images 2048 --repeats 3",
    }
]
