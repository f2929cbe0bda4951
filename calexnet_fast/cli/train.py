"""``calexnet train``: train early-exit branches on a frozen backbone with a recipe, into a run directory."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from ..branch_training import train_branches
from ..data import default_min_support, stratified_subset
from ..heads import HEADS
from ..recipes import RECIPE_NAMES, recipe
from ..run import CacheConfig, Run, SplitLogits, data_and_backbone
from ..training import FitConfig, seed_everything
from .common import (
    add_backbone_args,
    add_cache_args,
    add_calibration_args,
    add_data_args,
    add_execution_args,
    add_patience_arg,
    device_of,
    log,
    setup,
)

NAME = "train"
HELP = "train early-exit branches on a frozen backbone with a recipe"
DESCRIPTION = (
    "Freeze a backbone, cache its branch-point features once, and train one prototype-pooling head per branch "
    "point, one after the other, with the chosen recipe; then keep the heads' logits on the validation and test "
    "splits, which is all `calexnet calibrate` and `calexnet evaluate` need. Re-running the same command "
    "resumes (finished branches are kept, an interrupted one continues from its last epoch)."
)
EPILOG = (
    "example (pretrained CIFAR ResNet-56 on CIFAR-10 JPEG, 3 branches placed by FLOPs):\n"
    "  calexnet train --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg --backbone cifar_resnet56 "
    "--pretrained-dir ../shared/data --n-branches 3 --recipe calexnet --out runs/calexnet_s0\n"
    "then: calexnet calibrate --run runs/calexnet_s0 && calexnet evaluate --run runs/calexnet_s0\n"
    "several processes: torchrun --nproc_per_node 2 --no-python calexnet train ..."
)

RECIPE_OPTIONS = (
    "weighting",
    "weight_temperature",
    "weight_floor",
    "distill",
    "kd_temperature",
    "ce_weight",
    "ce_target",
    "aligned",
    "m_train",
    "margin_mode",
    "min_support",
    "bar_from",
    "head",
    "head_dim",
    "n_prototypes",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (every artefact of the run goes there)")
    add_data_args(p)
    p.add_argument(
        "--train-subset",
        type=int,
        help="train on a stratified subset of this many training images (quick CPU runs)",
    )
    p.add_argument(
        "--flip",
        action="store_true",
        help="train on every training image and its left-right mirror (cached horizontal-flip augmentation)",
    )
    add_backbone_args(p)
    g = p.add_argument_group("recipe (each CalexNet fix is its own switch)")
    g.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        default="calexnet",
        help="calexnet (soft weights + KD + aligned calibration), reference (none of them), "
        "reference+<fix> or calexnet-<fix> (default calexnet); options below override it",
    )
    g.add_argument("--weighting", choices=("none", "hard", "soft"), help="survivor weights of branch k >= 2")
    g.add_argument("--weight-temperature", type=float, help="t of the soft weights (0.05)")
    g.add_argument("--weight-floor", type=float, help="weights floor before normalising (1e-3)")
    g.add_argument("--kd", dest="distill", action="store_true", default=None, help="distil from the backbone")
    g.add_argument("--no-kd", dest="distill", action="store_false", help="plain cross-entropy instead of KD")
    g.add_argument("--kd-temperature", type=float, help="T of the KD loss (4)")
    g.add_argument("--ce-weight", type=float, help="alpha of an added alpha * CE term when distilling (0)")
    g.add_argument(
        "--ce-target",
        choices=("backbone", "labels"),
        help="CE target: the backbone's argmax (default) or the ground-truth labels",
    )
    add_calibration_args(g, "the recipe's")
    g.add_argument("--m-train", type=float, help="margin of the thresholds behind the training weights (0)")
    g.add_argument(
        "--head",
        choices=tuple(HEADS),
        help="branch head: grid (similarities pooled per cell of a 2x2 grid) or prototype (pooled over the "
        "whole map); default: the recipe's",
    )
    g.add_argument("--head-dim", type=int, help="head projection width D (default: the head's own)")
    g.add_argument("--n-prototypes", type=int, help="head prototypes K (32)")
    g = p.add_argument_group("optimisation of each head (on cached features)")
    g.add_argument("--epochs", type=int, default=30, help="per branch, at most (default 30)")
    add_patience_arg(g)
    g.add_argument("--batch-size", type=int, default=256, help="per process (default 256)")
    g.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    g.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    g.add_argument("--seed", type=int, default=0, help="seeds head initialisation and shuffling (default 0)")
    g.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist in --out")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each head for training (faster epochs after a one-off compile)",
    )
    add_cache_args(p)
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    info = setup(args)
    seed_everything(args.seed)  # seeds the initialisation of a --random-init backbone too (then saved in the run)
    splits, dataset, spec, bb = data_and_backbone(args)
    options = {f: getattr(args, f) for f in RECIPE_OPTIONS if getattr(args, f) is not None}
    options.setdefault("min_support", default_min_support(len(splits.val)))  # scaled to small validation splits
    rec = recipe(args.recipe, **options)
    fit_cfg = FitConfig.of_options(args, args.seed)
    train_set, train_name = splits.train, "train"
    if args.train_subset:
        train_set = stratified_subset(train_set, args.train_subset, args.split_seed, name="--train-subset")
        train_name = f"train_subset{args.train_subset}"
        dataset["train_subset"] = args.train_subset
    if args.flip:
        train_set, train_name = train_set.with_flips(), f"{train_name}_flips"
        dataset["flip"] = True
    device = device_of(args)
    log.info(
        f"recipe {rec.name} on {bb.name} (branch points {bb.branch_points}), {dataset['name']}: "
        f"{len(train_set)} train / {len(splits.val)} val images, device {device}, {info.world_size} process(es)"
    )
    cache = CacheConfig.of_options(args)
    run_dir = Run(args.out)
    if info.is_main:
        run_dir = Run.create(
            args.out,
            bb,
            spec=spec,
            dataset=dataset,
            recipe=rec.to_json(),
            fit=asdict(fit_cfg),
            command=NAME,
            argv=sys.argv,
            cache=cache.to_json(),
        )
    progress = not args.quiet
    t0 = time.time()
    tr = cache.build(bb, train_set, train_name, run_dir.path, device=device, progress=progress)
    va = cache.build(bb, splits.val, "val", run_dir.path, device=device, progress=progress)
    t_cache = time.time() - t0
    compared = {"backbone": spec.to_json(), "dataset": {k: v for k, v in dataset.items() if k != "data_dir"}}
    res = train_branches(
        tr,
        va,
        rec,
        fit_cfg,
        out_dir=run_dir.path / "branches",
        resume=not args.no_resume,
        device=device,
        progress=progress,
        run_config=compared,
        compile_model=args.compile,
    )
    t_heads = time.time() - t0 - t_cache
    if not info.is_main:
        return 0
    run_dir.save_heads(res.heads, bb, {"recipe": rec.to_json(), "backbone": spec.to_json(), "fit": asdict(fit_cfg)})
    te = cache.build(bb, splits.test, "test", run_dir.path, device=device, progress=progress)
    for split, c in (("val", va), ("test", te)):
        run_dir.save_logits(split, SplitLogits.of_heads(res.heads, c, device=device))
    run_dir.save_train_log(
        {
            "history": res.history,
            "weight_stats": res.weight_stats,
            "train_thresholds": res.train_thresholds.tolist() if res.train_thresholds is not None else None,
            "seconds": {"features": t_cache, "heads": t_heads},
        }
    )
    log.info(f"done in {time.time() - t0:.0f}s; run in {run_dir.path}; next: calexnet calibrate --run {run_dir.path}")
    return 0
