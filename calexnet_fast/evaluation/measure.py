"""The measure engine: the accuracy–throughput frontier of trained cascades (``calexnet measure``).

``MeasureConfig(run=RUN)`` takes a trained and calibrated run directory (the equivalent of ``calexnet
evaluate --measure``); ``MeasureConfig(compare=OUT)`` takes every method x seed of a ``calexnet compare``
output directory. For each operating point (margin ``m`` for the CPM methods, a global threshold ``τ`` for
the baselines) the real cascade runs over the test images (:func:`~.speed.measure_points`) in both modes,
per input batch (latency) and streaming (throughput: survivors re-batched across input batches): accuracy
checked against the simulated evaluation (:mod:`.points`) on every image in each mode, speed against the
backbone alone in the same inference form (BatchNorm folded, same memory format), the FLOPs-ideal and the
time-ideal speedup, energy on CUDA.

CPM methods run as :class:`~calexnet_fast.Cascade` unchanged. The baselines keep their own exit rules
(``score_k >= τ``): PTEEnet's score is a separate confidence head, ZTW's and BoostNet's come from ensembles
of every head up to ``k``. They run in ``ScoreCascade``, a :class:`~calexnet_fast.Cascade` whose per-branch
exit decision is the baseline's, with the state those rules need (earlier heads' outputs) compacted together
with the survivors; that state ties a batch's branches together, so the baselines are measured per batch only.

Results (:mod:`.measure_session`): ``speed.json`` (every point, per-method headline numbers per mode with
the seed spread), ``speed.png`` / ``speed.svg`` (accuracy vs FLOPs reduction, accuracy vs measured speedup
in both modes, speedup vs FLOPs reduction against the ideals) and ``speed_table.md``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..backbones import BackboneSpec, build_backbone
from ..baselines import (
    BASELINE_NAMES,
    BaselineConfig,
    ZTWHead,
    baseline_exit_heads,
    baseline_head_flops,
    make_baseline,
)
from ..calibration import calibrate
from ..cascades import Cascade, ScoreCascade
from ..features import branch_logits
from ..flops import FlopsProfile, segment_flops
from ..recipes import make_head, recipe
from ..run import CacheConfig, Run, load_splits, spec_normalization
from ..training import seed_everything
from .compare import method_head
from .measure_session import MeasureConfig, Session, margin_list, payload, previous_runs, report, write_outputs
from .pareto import pareto_envelope
from .points import baseline_decisions, cpm_decisions
from .protocol import calibration_halves
from .speed import frontiers, headline, mode_key

__all__ = ["MeasureConfig", "run_measure"]

log = logging.getLogger(__name__)


def _select_margins(available: torch.Tensor, wanted: list[float] | None) -> list[int]:
    if wanted is None:
        return list(range(available.numel()))
    idx = []
    for m in wanted:
        i = int(torch.argmin((available - m).abs()))
        if i not in idx:
            idx.append(i)
    return idx


def _measure_run(cfg: MeasureConfig) -> int:
    """``calexnet measure --run RUN``: every (selected) calibrated margin of one trained run."""
    t_start = time.time()
    run = Run(cfg.run)
    run_cfg = run.config()
    sweep = run.load_thresholds()
    bb, (heads, _), profile = run.load_backbone(), run.load_heads(), run.flops_profile()
    splits = run.load_data(cfg.data_dir)
    out = Path(cfg.out) if cfg.out else run.path
    idx = _select_margins(sweep.margins, margin_list(cfg.margins))
    session = Session(cfg, bb, splits)
    heads = nn.ModuleList(h.eval() for h in heads)
    zt = branch_logits(heads, session.test, device=session.device)
    thr = [sweep.thresholds[i] for i in idx]
    expected = cpm_decisions(zt, session.test.logits_tensor(), thr)
    cascade = Cascade(session.bb, [h.to(session.device) for h in heads])
    name = (run_cfg.get("recipe") or {}).get("name", "cascade")
    seed = (run_cfg.get("fit") or {}).get("seed", 0)
    rows = session.measure(cascade, thr, profile, [float(sweep.margins[i]) for i in idx], expected, name)
    for row, sim in zip(rows, session.simulated(profile, expected), strict=True):
        row["simulated"] = sim
    runs = [
        {"method": name, "seed": seed, "param_name": "margin", "head_flops": list(profile.head_flops), "points": rows}
    ]
    result = payload(cfg, session, runs, {"run": str(run.path)}, t_start)
    write_outputs(out, result, f"{bb.name}: {name} seed {seed}, {session.device}; {session.form()}")
    report(result, out, cfg.quiet)
    return 0


def _compare_work_dir(out: Path, config: dict, given: str | None) -> Path:
    if given:
        return Path(given)
    if config.get("work_dir"):
        return Path(config["work_dir"])
    argv = list(config.get("argv") or [])  # written before compare recorded a given work_dir
    for i, a in enumerate(argv):
        if a == "--work-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--work-dir="):
            return Path(a.split("=", 1)[1])
    return out / "work"


def _envelope_params(
    sweep: dict, targets: list[float], losses: Sequence[float] = (), backbone_accuracy: float = math.nan
) -> list[float]:
    """Parameters (thresholds, margins) of envelope points of a compare sweep: the one nearest to each target
    reduction, and for each accuracy loss the one with the largest reduction within that loss of
    ``backbone_accuracy``."""
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


def _nearest(params: list, value: float) -> int | None:
    vals = [float(v) for v in params]
    if not vals:
        return None
    if math.isinf(value):
        hits = [i for i, v in enumerate(vals) if v == value]
        return hits[0] if hits else None
    j = int(np.argmin([abs(v - value) if math.isfinite(v) else math.inf for v in vals]))
    return j if abs(vals[j] - value) < 1e-9 else None


def _title(bb, session: Session, config: dict) -> str:
    return (
        f"{bb.name} on {config['dataset']['name']}: real cascade on {session.labels.shape[0]} test images, "
        f"{session.device}, {torch.get_num_threads()} threads; {session.form()}; "
        f"seeds {','.join(map(str, config['seeds']))}"
    )


def _best(rows: list[dict], param_name: str) -> str:
    """Per measured mode: the best speedup, where, and the mismatches against the simulated evaluation."""
    parts = []
    for mode in rows[0]["modes"] if rows else ():
        key = mode_key(mode, "speedup")
        best = max(rows, key=lambda r: r[key])
        parts.append(
            f"{'per batch' if mode == 'batch' else 'streaming'}: best speedup {best[key]:.2f}x at {param_name} "
            f"{best['param']:.3g} (accuracy {best['accuracy']:.4f}), mismatches vs simulated "
            f"{sum(r[mode_key(mode, 'mismatches')] or 0 for r in rows)}"
        )
    return "; ".join(parts)


def _missing(path: Path, work: Path) -> ValueError:
    return ValueError(f"{path} missing: is {work} the compare's work dir (work_dir)?")


def _cpm_heads(config: dict, method: str, channels: Sequence[int], n_classes: int):
    """The recipe of a compare's CPM method (``name`` or ``name:head``) and fresh heads of its kind."""
    name, head = method_head(method, config.get("cpm_head", "prototype"))
    rec = recipe(
        name,
        head="prototype" if head == "prototype" else "grid",
        head_dim=config["head_dim"] if head != "sdn" else None,
        n_prototypes=config["n_prototypes"],
        margin_mode=config["margin_mode"],
        min_support=config["min_support"],
    )
    pool = (config.get("cache") or {}).get("pool")
    if head == "sdn":
        return rec, [ZTWHead(c, n_classes, cascading=False, max_size=pool) for c in channels]
    return rec, [make_head(c, n_classes, rec) for c in channels]


def _cpm_point_set(ctx: dict, method: str, seed: int, sw: dict, params: list[float]):
    """(cascade, thresholds, profile, simulated decisions) of a CPM method's heads at the given margins."""
    config, work, bb, session = ctx["config"], ctx["work"], ctx["bb"], ctx["session"]
    rec, fresh = _cpm_heads(config, method, bb.branch_channels, bb.n_classes)
    trained_as = sw.get("info", {}).get("heads_trained_as", method)
    heads = nn.ModuleList()
    for k, h in enumerate(fresh):
        path = work / "runs" / f"{trained_as}_seed{seed}" / f"branch_{k + 1}" / "head.safetensors"
        if not path.is_file():
            raise _missing(path, work)
        h.load_state_dict(io.load_state_file(path)[0])
        heads.append(h.eval())
    device, va = session.device, ctx["calibration"]
    zv = branch_logits(heads, va, device=device)
    thr_all = calibrate(
        zv,
        va.logits_tensor(),
        va.labels_tensor(),
        torch.tensor(params, dtype=torch.float64),
        aligned=rec.aligned,
        margin_mode=rec.margin_mode,
        min_support=rec.min_support,
        bar_from=rec.bar_from,
    )
    thr = list(thr_all.unbind(0))
    zt = branch_logits(heads, session.test, device=device)
    profile = FlopsProfile(tuple(ctx["seg"]), tuple(float(v) for v in sw["info"]["head_flops"]))
    expected = cpm_decisions(zt, session.test.logits_tensor(), thr)
    return Cascade(session.bb, [h.to(device) for h in heads]), thr, profile, expected


def _baseline_point_set(ctx: dict, method: str, seed: int, params: list[float]):
    """(cascade, thresholds, profile, simulated decisions) of a trained baseline at the given thresholds."""
    config, work, bb, session = ctx["config"], ctx["work"], ctx["bb"], ctx["session"]
    path = work / "runs" / f"{method}_seed{seed}" / "model.safetensors"
    if not path.is_file():
        raise _missing(path, work)
    n_classes = bb.n_classes
    model = make_baseline(method, bb.branch_channels, n_classes, BaselineConfig(**config["baselines"]))
    model.load_state_dict(io.load_state_file(path)[0])
    model.eval()
    profile = FlopsProfile(tuple(ctx["seg"]), tuple(baseline_head_flops(model, bb.branch_shapes)))
    expected = baseline_decisions(model, session.test, params, device=session.device)
    model.to(session.device)
    thr = [torch.full((len(bb.branch_channels), n_classes), t) for t in params]
    cascade = ScoreCascade(
        list(session.bb.stages), baseline_exit_heads(model), thr[0], n_classes=n_classes, in_channels=bb.in_channels
    )
    return cascade, thr, profile, expected


def _measure_compare(cfg: MeasureConfig) -> int:
    """``calexnet measure --compare OUT``: every method x seed of a ``calexnet compare`` output."""
    t_start = time.time()
    src = Path(cfg.compare)
    res_path = src / "results.json"
    if not res_path.is_file():
        raise ValueError(f"compare {src}: no results.json there; expected the output directory of `calexnet compare`")
    results = io.read_json(res_path, "compare results")
    config = results["config"]
    work = _compare_work_dir(src, config, cfg.work_dir)
    methods = [m.strip() for m in (cfg.methods or ",".join(config["methods"])).split(",") if m.strip()]
    unknown = [m for m in methods if m not in config["methods"]]
    if unknown:
        raise ValueError(f"methods: {unknown} were not run by that compare (it ran {config['methods']})")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")] if cfg.seeds else list(config["seeds"])
    except ValueError:
        raise ValueError(f"seeds: expected a comma list of ints, got {cfg.seeds!r}") from None
    wanted = margin_list(cfg.margins)
    if wanted is None:
        c = config["margins"]
        wanted = torch.linspace(float(c[0]), float(c[1]), int(c[2]), dtype=torch.float64).tolist()
    try:
        targets = [float(v) for v in cfg.baseline_reductions.split(",") if v.strip()]
        losses = [float(v) for v in cfg.losses.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            "baseline_reductions, losses: expected comma lists of numbers, got "
            f"{cfg.baseline_reductions!r} / {cfg.losses!r}"
        ) from None
    out = Path(cfg.out) if cfg.out else src
    source = {
        "compare": str(src),
        "work_dir": str(work),
        "results_json_sha256": hashlib.sha256(res_path.read_bytes()).hexdigest()[:16],
    }
    spec = BackboneSpec.from_json(config["backbone"])
    seed_everything(0)  # as `calexnet compare` does before it builds the backbone (matters for --random-init)
    splits = load_splits(dict(config["dataset"]), spec_normalization(spec), cfg.data_dir)
    bb = build_backbone(spec)
    protocol = config.get("protocol") or {"calibration": "val"}
    cal_rows = None
    if protocol["calibration"] == "test-half":  # the compare's halves: calibrate on one, measure the other
        _, cal_rows = calibration_halves(splits.test.labels, protocol["calibration_seed"])
    session = Session(cfg, bb, splits, calibration_rows=cal_rows)
    calibration = session.calibration
    if calibration is None:
        cache_cfg = CacheConfig.from_json(config["cache"])
        if session.dtype != torch.float32:  # its features would not match the compare's cache: never overwrite it
            cache_cfg.storage = "memory"
        calibration = cache_cfg.build(
            session.trained, splits.val, "val", work, device=session.device, progress=session.progress
        )
    ctx = {"config": config, "work": work, "bb": bb, "session": session, "calibration": calibration}
    ctx["seg"] = segment_flops(bb)
    previous = previous_runs(out, cfg, session)
    measured: dict[tuple[str, int], dict] = {}

    def merged() -> list[dict]:
        """Runs measured now, and (with resume) those kept from the previous speed.json, in compare order."""
        keys = set(previous) | set(measured)
        order = {m: i for i, m in enumerate(config["methods"])}
        keys = sorted(keys, key=lambda k: (order.get(k[0], len(order)), k[1]))
        return [measured.get(k) or previous[k] for k in keys]

    sweeps = results.get("sweeps", {})
    for method in methods:
        for seed in seeds:
            sw = next((s for s in sweeps.get(method, []) if s["seed"] == seed), None)
            if sw is None:
                log.info(f"{method} seed {seed}: not in results.json; skipped")
                continue
            t1 = time.time()
            cpm = method not in BASELINE_NAMES
            bb_acc = results["backbone"]["test_accuracy"]
            if cpm:
                params = sorted({float(m) for m in wanted} | set(_envelope_params(sw, [], losses, bb_acc)))
            else:
                params = _envelope_params(sw, targets, losses, bb_acc)
            old = previous.get((method, seed))
            if old is not None and [p["param"] for p in old["points"]] == params:
                measured[(method, seed)] = old
                log.info(f"{method} seed {seed}: kept from the previous speed.json")
                continue
            if cpm:
                cascade, thr, profile, expected = _cpm_point_set(ctx, method, seed, sw, params)
            else:
                cascade, thr, profile, expected = _baseline_point_set(ctx, method, seed, params)
            param_name = "margin" if cpm else "threshold"
            rows = session.measure(cascade, thr, profile, params, expected, f"{method} seed {seed}")
            for row, sim in zip(rows, session.simulated(profile, expected), strict=True):
                j = _nearest(sw["params"], row["param"])
                if j is not None:
                    row["compare"] = {"accuracy": sw["accuracy"][j], "flops_reduction": sw["flops_reduction"][j]}
                row["simulated"] = sim
            measured[(method, seed)] = {
                "method": method,
                "seed": seed,
                "param_name": param_name,
                "head_flops": list(profile.head_flops),
                "seconds": time.time() - t1,
                "points": rows,
            }
            log.info(f"{method} seed {seed}: {len(rows)} points in {time.time() - t1:.0f}s; {_best(rows, param_name)}")
            write_outputs(out, payload(cfg, session, merged(), source, t_start), _title(bb, session, config))
    result = payload(cfg, session, merged(), source, t_start)
    write_outputs(out, result, _title(bb, session, config))
    report(result, out, cfg.quiet)
    return 0


def _render(cfg: MeasureConfig) -> int:
    """``render``: summary, frontiers, figure and table again from an existing speed.json (no measuring)."""
    src = Path(cfg.run or cfg.compare)
    out = Path(cfg.out) if cfg.out else src
    path = src / "speed.json"
    if not path.is_file():
        raise ValueError(f"render: no speed.json in {src}; measure first")
    result = io.read_json(path, "speed.json")
    result["summary"] = headline(result["runs"], result["backbone"]["test_accuracy"], cfg.max_loss)
    result["frontiers"] = frontiers(result["runs"])
    title = result.get("title") or f"real cascade vs backbone alone, {result['environment'].get('device')}"
    write_outputs(out, result, title)
    report(result, out, cfg.quiet)
    return 0


def run_measure(cfg: MeasureConfig) -> int:
    """``calexnet measure``: measure (or with ``render``, re-render) and write the results.

    Returns:
        0; the results are in ``cfg.out`` (default: the source directory).

    Raises:
        ValueError: a configuration value or the source cannot be used (the message says which).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.render:
        return _render(cfg)
    return _measure_run(cfg) if cfg.run else _measure_compare(cfg)
