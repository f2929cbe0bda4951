"""The compare engine: methods x seeds on one backbone and dataset, one feature cache, Pareto summary.

:func:`run_compare` (``calexnet compare``) computes the backbone's branch features once per split (the
feature cache), trains every method for every seed from them (CPM recipes: :func:`~calexnet_fast.branch_training.
train_branches`; baselines: :func:`~calexnet_fast.baselines.train_baseline`), chooses thresholds on one
stratified half of the test split (or on the validation split, ``calibration="val"``) and sweeps the operating
parameter on the other half (or the whole test split) (:mod:`.points`), and writes ``results.json``
(every operating point, Pareto envelopes, accuracy at 30-70 % reduction, area, mean ± std over seeds),
``pareto.png`` / ``pareto.svg`` and ``table.md`` (the Pareto table, then per-exit accuracies, the reduction
reached within 1 and 2 points of the backbone's accuracy and each head's cost) to ``out``.

Recipes that train identical heads share them (:func:`_training_key`), and recipes whose first branch
trains identically share that head (:func:`_branch1_key`): same seed, same data order, same result.
Everything trained goes to ``work_dir/runs/<name>_seed<seed>``; running the same configuration again resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import io
from ..baselines import BASELINE_NAMES, BaselineConfig, ZTWHead, train_baseline
from ..branch_training import train_branches
from ..data import stratified_subset
from ..distributed import default_device, init_distributed
from ..features import branch_logits
from ..flops import FlopsProfile, head_flops, segment_flops
from ..recipes import RECIPE_NAMES, recipe
from ..run import CacheConfig, data_and_backbone, versions
from ..training import FitConfig, seed_everything
from .pareto import AREA_RANGE, REDUCTIONS, aggregate, seed_summary, summarize
from .points import SweepResult, parse_margins, sweep_cpm, sweep_global_threshold, threshold_grid
from .protocol import Protocol, check_calibration
from .report import exits_table, plot_envelopes, results_table

__all__ = ["CPM_METHODS", "DEFAULT_METHODS", "CompareConfig", "method_head", "run_compare"]

log = logging.getLogger(__name__)

CPM_METHODS: tuple[str, ...] = RECIPE_NAMES
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


@dataclass
class CompareConfig:
    """Everything ``calexnet compare`` is told (the fields and defaults of its command-line options).

    Output: ``out`` (results.json, pareto.png/.svg, table.md), ``work_dir`` (checkpoints and heads of every
    method x seed; default ``out/work``). Data: as ``calexnet train`` (``dataset`` .. ``synthetic_classes``),
    ``train_subset`` / ``subset_seed`` (a stratified subset of the training images), ``flip`` (train on every
    training image and its left-right mirror: cached horizontal-flip augmentation). Backbone: ``backbone``
    .. ``class_map`` as ``calexnet train``. Methods: ``methods`` and ``seeds`` (comma lists; a CPM method may
    name its head, ``calexnet:sdn``), the head (``head_dim`` (``None``: the head's default),
    ``n_prototypes``, ``cpm_head`` = ``"grid"`` (default), ``"prototype"`` or ``"sdn"``: ZTW's SDN head
    without the cascade; BoostNet uses the CalexNet head, grid unless ``"prototype"``), the CPM sweep
    (``margins`` = ``START:STOP:COUNT`` or a comma list, ``margin_mode``, ``min_support``; ``m_train``: the
    training margin of weighted recipes), the baselines'
    threshold grid (``thresholds`` uniform points + ``threshold_quantiles`` calibration quantiles) and ZTW's
    second stage (``ztw_ensemble_epochs``). Protocol: ``calibration`` = ``"test-half"`` (default: thresholds
    are chosen on a stratified half of the test split drawn with ``calibration_seed``, accuracy and FLOPs are
    reported on the other half; the validation split carved from train is then only for early stopping and
    the ``m_train`` calibration) or ``"val"`` (choose on the validation split, report on the whole test
    split). Optimisation, the same for every method and head: ``epochs`` (at most), ``patience`` (early
    stopping on the validation loss, 0: off), ``compile_heads`` (``torch.compile`` the training forward),
    ``batch_size`` .. ``weight_decay``, ``lr_overrides`` (``METHOD=LR`` comma list), ``no_resume``. Feature
    cache: ``cache`` .. ``workers``, ``cache_pool`` (store branch maps average-pooled to at most this side:
    exact for heads that pool so first, refused for the globally pooling ``prototype`` head). Execution:
    ``device``, ``threads``, ``quiet``.
    """

    out: str
    dataset: str
    work_dir: str | None = None
    data_dir: str | None = None
    val_size: float | None = None
    split_seed: int = 0
    image_size: int | None = None
    synthetic_size: Sequence[int] = (512, 256, 256)
    synthetic_classes: int = 10
    train_subset: int | None = None
    subset_seed: int = 0
    backbone: str = "cifar_resnet56"
    backbone_run: str | None = None
    checkpoint: str | None = None
    pretrained_dir: str | None = None
    random_init: bool = False
    stem: str = "cifar"
    branch_points: Sequence[str] | None = None
    n_branches: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_map: str | None = None
    methods: str = ",".join(DEFAULT_METHODS)
    seeds: str = "0,1,2"
    head_dim: int | None = None
    n_prototypes: int = 32
    cpm_head: str = "grid"
    margins: str = "-0.3:0.5:81"
    margin_mode: str = "additive"
    m_train: float = 0.0
    min_support: int = 20
    thresholds: int = 101
    threshold_quantiles: int = 199
    ztw_ensemble_epochs: int = 20
    calibration: str = "test-half"
    calibration_seed: int = 0
    flip: bool = False
    epochs: int = 30
    patience: int = 0
    compile_heads: bool = False
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_overrides: str = ""
    weight_decay: float = 5e-4
    no_resume: bool = False
    cache: str = "memory"
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_pool: int | None = None
    feature_batch_size: int = 256
    workers: int = 0
    device: str | None = None
    threads: int | None = None
    quiet: bool = False


def _training_key(rec) -> str:
    """Recipes that train identical heads share them (``Recipe.training_json``)."""
    return json.dumps(rec.training_json(), sort_keys=True)


def _branch1_key(rec) -> str:
    """What branch 1's training depends on: it always trains with weight 1, so recipes that differ only in
    weighting or calibration train the very same first head (same seed, same data order)."""
    d = {
        "distill": rec.distill,
        "ce_target": rec.ce_target,
        "head": rec.head,
        "head_dim": rec.head_dim,
        "n_prototypes": rec.n_prototypes,
    }
    if rec.distill:
        d.update(kd_temperature=rec.kd_temperature, ce_weight=rec.ce_weight)
    return json.dumps(d, sort_keys=True)


def _share_branch1(donor: Path, run_dir: Path, rec, fit_cfg, run_config: dict) -> Path | None:
    """Put the donor run's finished branch-1 head where ``train_branches`` resumes from (recorded under the
    receiving run's own configuration, with ``shared_from`` naming the donor); None if nothing to share."""
    src, dst = donor / "branch_1" / "head.safetensors", run_dir / "branch_1" / "head.safetensors"
    if dst.is_file() or not src.is_file():
        return None
    tensors, cfg = io.load_state_file(src)
    base = {"recipe": rec.to_json(), "fit": asdict(fit_cfg), **run_config}
    io.save_state_file(dst, tensors, {**cfg, "run": base, "shared_from": str(src)})
    return dst


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
            raise ValueError(
                f"lr_overrides: expected METHOD=LR pairs with METHOD in {list(methods)} and LR > 0, got {part!r}"
            )
        out[name.strip()] = lr
    return out


CPM_HEADS = ("grid", "prototype", "sdn")


def method_head(method: str, default: str) -> tuple[str, str]:
    """``"calexnet:sdn"`` -> ``("calexnet", "sdn")``; a CPM method without ``:HEAD`` takes ``default``."""
    name, _, head = method.partition(":")
    return name, head or default


def _methods_and_seeds(cfg: CompareConfig) -> tuple[list[str], list[int]]:
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if cfg.cpm_head not in CPM_HEADS:
        raise ValueError(f"cpm_head: expected one of {CPM_HEADS}, got {cfg.cpm_head!r}")

    def known(m: str) -> bool:
        name, head = method_head(m, cfg.cpm_head)
        return (name in CPM_METHODS and head in CPM_HEADS) or m in BASELINE_NAMES

    unknown = [m for m in methods if not known(m)]
    if unknown or not methods:
        raise ValueError(
            f"methods: unknown {unknown or 'empty list'}; expected names from "
            f"{list(CPM_METHODS) + list(BASELINE_NAMES)}, a CPM method optionally with :HEAD, HEAD in {CPM_HEADS}"
        )
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected each method once, got {methods}")
    if cfg.cache_pool is not None:
        heads = {method_head(m, cfg.cpm_head)[1] for m in methods if m not in BASELINE_NAMES}
        if "boostnet" in methods and cfg.cpm_head == "prototype":
            heads.add("prototype")
        if "prototype" in heads:
            raise ValueError(
                "cache_pool: the prototype head pools its similarities over the full branch map, so it cannot "
                "train on pooled features; use the grid or sdn head, or no cache_pool"
            )
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds: expected a comma list of ints, got {cfg.seeds!r}") from None
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    return methods, seeds


class _CpmTrainer:
    """Trains (or resumes, or shares) the CPM heads of one recipe, head and seed; what the sweeps need of them."""

    def __init__(self, cfg: CompareConfig, work: Path, spec, dinfo: dict, bb, tr, va, te, device) -> None:
        self.cfg, self.work, self.bb, self.tr, self.va, self.te, self.device = cfg, work, bb, tr, va, te, device
        self.run_config = {"backbone": spec.to_json(), "dataset": {k: v for k, v in dinfo.items() if k != "data_dir"}}
        self.shared: dict[tuple[str, str, int], tuple] = {}
        self.donors: dict[tuple[str, str, int], Path] = {}

    def _run_config(self, head: str) -> dict:
        return self.run_config if head == "prototype" else {**self.run_config, "cpm_head": head}

    def _train(self, rec, head: str, fit_cfg, run_dir: Path, resume: bool):
        factory = None
        if head == "sdn":

            def factory(k: int, in_channels: int, n_classes: int):
                return ZTWHead(in_channels, n_classes, cascading=False, max_size=self.cfg.cache_pool)

        return train_branches(
            self.tr,
            self.va,
            rec,
            fit_cfg,
            out_dir=run_dir,
            resume=resume,
            device=self.device,
            progress=not self.cfg.quiet,
            run_config=self._run_config(head),
            head_factory=factory,
            compile_model=self.cfg.compile_heads,
        )

    def logits(self, rec, head: str, fit_cfg, seed: int) -> tuple:
        """(val branch logits, test branch logits, head FLOPs, name the heads were trained as)."""
        key = (_training_key(rec), head, seed)
        if key in self.shared:
            return self.shared[key]
        name = rec.name if head == self.cfg.cpm_head else f"{rec.name}_{head}"
        run_dir = self.work / "runs" / f"{name}_seed{seed}"
        b1 = (_branch1_key(rec), head, seed)
        seeded = None
        if b1 in self.donors and not self.cfg.no_resume:
            seeded = _share_branch1(self.donors[b1], run_dir, rec, fit_cfg, self._run_config(head))
        try:
            bt = self._train(rec, head, fit_cfg, run_dir, resume=not self.cfg.no_resume)
        except RuntimeError:
            if seeded is None:
                raise
            seeded.unlink()  # the engine's resume format changed: train branch 1 after all
            bt = self._train(rec, head, fit_cfg, run_dir, resume=True)
        self.donors.setdefault(b1, run_dir)
        hf = head_flops(bt.heads, self.bb)
        va, te = (
            branch_logits(bt.heads, self.va, device=self.device),
            branch_logits(bt.heads, self.te, device=self.device),
        )
        self.shared[key] = (va, te, hf, name)
        return self.shared[key]


def run_compare(cfg: CompareConfig) -> int:
    """``calexnet compare``: train and evaluate methods x seeds for one backbone and dataset.

    Returns:
        0; the results are in ``cfg.out``.

    Raises:
        ValueError: a configuration value, the dataset or the backbone cannot be used (the message says which).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init_distributed()
    t_start = time.time()
    out = Path(cfg.out)
    work = Path(cfg.work_dir) if cfg.work_dir else out / "work"
    methods, seeds = _methods_and_seeds(cfg)
    margins = parse_margins(cfg.margins)
    lr_of = _parse_lr_overrides(cfg.lr_overrides, methods)
    seed_everything(0)  # one (random-init) backbone for every seed and every rerun
    splits, dinfo, spec, bb = data_and_backbone(cfg)
    device = torch.device(cfg.device) if cfg.device else default_device()
    if device.type == "cpu":  # NHWC convolutions are faster on CPU; the cached features are the same values
        bb = bb.to(memory_format=torch.channels_last)
    check_calibration(cfg.calibration)
    train_set = splits.train
    train_name = "train"
    if cfg.train_subset:
        train_set = stratified_subset(train_set, cfg.train_subset, cfg.subset_seed, name="train_subset")
        dinfo["train_subset"] = cfg.train_subset
        dinfo["subset_seed"] = cfg.subset_seed
        train_name = f"train_subset{cfg.train_subset}_seed{cfg.subset_seed}"
    if cfg.flip:
        train_set = train_set.with_flips()
        dinfo["flip"] = True
        train_name += "_flips"
    cache_cfg = CacheConfig.of_options(cfg)
    log.info(
        f"compare {methods} x seeds {seeds} on {bb.name} (branch points {bb.branch_points}), {dinfo['name']}: "
        f"{len(train_set)} train / {len(splits.val)} val / {len(splits.test)} test images, device {device}"
    )
    t0 = time.time()
    tr, va, te = (
        cache_cfg.build(bb, ds, name, work, device=device, progress=not cfg.quiet)
        for ds, name in ((train_set, train_name), (splits.val, "val"), (splits.test, "test"))
    )
    t_features = time.time() - t0
    seg = segment_flops(bb)
    protocol = Protocol(cfg.calibration, cfg.calibration_seed, va, te)
    y_cal, z_cal, y_eval, z_eval = protocol.y_cal, protocol.z_cal, protocol.y_eval, protocol.z_eval
    backbone_acc = float((z_eval.argmax(1) == y_eval).double().mean())
    base_cfg = BaselineConfig(
        head_dim=cfg.head_dim,
        n_prototypes=cfg.n_prototypes,
        ztw_ensemble_epochs=cfg.ztw_ensemble_epochs,
        boost_head="prototype" if cfg.cpm_head == "prototype" else "grid",
        max_size=cfg.cache_pool,
    )
    cpm = _CpmTrainer(cfg, work, spec, dinfo, bb, tr, va, te, device)
    sweeps: dict[str, list[SweepResult]] = {m: [] for m in methods}
    timings: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        base_fit = FitConfig.of_options(cfg, seed)
        for method in methods:
            t1 = time.time()
            fit_cfg = dataclasses.replace(base_fit, lr=lr_of.get(method, base_fit.lr))
            if method not in BASELINE_NAMES:
                name, head = method_head(method, cfg.cpm_head)
                rec = recipe(
                    name,
                    head="prototype" if head == "prototype" else "grid",
                    head_dim=cfg.head_dim if head != "sdn" else None,
                    n_prototypes=cfg.n_prototypes,
                    margin_mode=cfg.margin_mode,
                    m_train=cfg.m_train,
                    min_support=cfg.min_support,
                )
                zv, zt, hf, trained_as = cpm.logits(rec, head, fit_cfg, seed)
                zc, ze = protocol.calibration_rows(zv, zt, dim=1), protocol.eval_rows(zt, dim=1)
                exit_acc = (ze.argmax(-1) == y_eval).double().mean(1).tolist()
                sw = sweep_cpm(
                    zc,
                    z_cal,
                    y_cal,
                    ze,
                    z_eval,
                    y_eval,
                    FlopsProfile(tuple(seg), tuple(hf)),
                    margins,
                    aligned=rec.aligned,
                    margin_mode=rec.margin_mode,
                    min_support=rec.min_support,
                    bar_from=rec.bar_from,
                    method=method,
                    seed=seed,
                )
                sw.info = {"head_flops": hf, "heads_trained_as": trained_as, "exit_accuracy": exit_acc}
            else:
                tb = train_baseline(
                    method,
                    tr,
                    fit_cfg,
                    segment_flops=seg,
                    config=base_cfg,
                    out_dir=work / "runs" / f"{method}_seed{seed}",
                    resume=not cfg.no_resume,
                    device=device,
                    progress=not cfg.quiet,
                    val_cache=va,
                    compile_model=cfg.compile_heads,
                )
                ev, et = tb.exit_outputs(va, device=device), tb.exit_outputs(te, device=device)
                cal_scores = protocol.calibration_rows(ev.scores, et.scores, dim=1)
                grid = threshold_grid(cal_scores, cfg.thresholds, cfg.threshold_quantiles)
                profile = FlopsProfile(tuple(seg), tuple(tb.head_flops))
                e_scores, e_preds = protocol.eval_rows(et.scores, dim=1), protocol.eval_rows(et.preds, dim=1)
                sw = sweep_global_threshold(e_scores, e_preds, z_eval, y_eval, profile, grid, method=method, seed=seed)
                exit_acc = (e_preds == y_eval).double().mean(1).tolist()
                sw.info = {"head_flops": tb.head_flops, "exit_accuracy": exit_acc}
            sw.info["seconds"] = time.time() - t1
            timings[method].append(sw.info["seconds"])
            sweeps[method].append(sw)
            s = seed_summary(sw)
            log.info(
                f"{method} seed {seed}: {sw.info['seconds']:.0f}s, acc@50% "
                f"{s['accuracy_at']['0.5']:.4f}, area {s['area']:.4f}, max reduction {s['max_reduction']:.3f}"
            )
    summary = summarize(sweeps, backbone_accuracy=backbone_acc)
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
        "cpm_head": cfg.cpm_head,
        "protocol": protocol.to_json(),
        "flip": cfg.flip,
        "patience": cfg.patience,
        "head_dim": cfg.head_dim,
        "n_prototypes": cfg.n_prototypes,
        "margins": [float(margins[0]), float(margins[-1]), int(margins.numel())],
        "margin_mode": cfg.margin_mode,
        "m_train": cfg.m_train,
        "min_support": cfg.min_support,
        "thresholds": {"uniform": cfg.thresholds, "val_quantiles": cfg.threshold_quantiles},
        "baselines": asdict(base_cfg),
        "cache": cache_cfg.to_json(),
        "work_dir": cfg.work_dir,
        "versions": versions(),
    }
    results = {
        "config": config,
        "backbone": {
            "test_accuracy": backbone_acc,
            "calibration_accuracy": float((z_cal.argmax(1) == y_cal).double().mean()),
            "val_accuracy": float((va.logits_tensor().argmax(1) == va.labels_tensor()).double().mean()),
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
    io.write_json(out / "results.json", results, indent=1)
    title = (
        f"{bb.name} on {dinfo['name']}, branches at {', '.join(bb.branch_points)}; "
        f"mean ± std over seeds {','.join(map(str, seeds))}"
    )
    plot_envelopes(summary, [out / "pareto.png", out / "pareto.svg"], backbone_accuracy=backbone_acc, title=title)
    head_flops = {m: runs[0].info["head_flops"] for m, runs in sweeps.items() if runs}
    table = results_table(summary) + "\n" + exits_table(summary, head_flops, float(sum(seg)))
    io.write_text(out / "table.md", table)
    log.info(f"done in {time.time() - t_start:.0f}s: {out / 'results.json'}, {out / 'pareto.png'}, {out / 'table.md'}")
    print(table)
    return 0
