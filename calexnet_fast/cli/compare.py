"""``calexnet compare``: train and evaluate methods x seeds on one backbone and dataset (accuracy-FLOPs Pareto)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..evaluation import CPM_METHODS, DEFAULT_METHODS, CompareConfig, run_compare
from ..evaluation.compare import CPM_HEADS
from ..evaluation.protocol import CALIBRATIONS
from .common import add_backbone_args, add_cache_args, add_data_args, add_execution_args, add_patience_arg, setup

NAME = "compare"
HELP = "train and evaluate methods x seeds on one backbone and dataset (accuracy-FLOPs Pareto)"
DESCRIPTION = (
    "Train every method (CPM recipes and the PTEEnet / ZTW / BoostNet baselines) for every seed from one feature "
    "cache, calibrate on a stratified half of the test split (or on the validation split), measure accuracy and "
    "FLOPs reduction on the other half (or the whole test split), and write "
    "results.json (every operating point, Pareto envelopes, accuracy at 30-70 %% reduction, area, mean ± std over "
    "seeds), pareto.png / pareto.svg and table.md to --out."
)
EPILOG = (
    "example: calexnet compare --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg "
    "--pretrained-dir ../shared/data --n-branches 3 --out results --seeds 0,1,2"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="where results.json, pareto.png/.svg and table.md go")
    p.add_argument(
        "--work-dir",
        help="checkpoints and trained heads of every method x seed (default OUT/work); running the same "
        "command again resumes from there",
    )
    add_data_args(p)
    p.add_argument("--train-subset", type=int, help="train on a stratified subset of this many training images")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of that subset (default 0)")
    p.add_argument(
        "--flip",
        action="store_true",
        help="train on every training image and its left-right mirror (cached horizontal-flip augmentation)",
    )
    add_backbone_args(p)
    g = p.add_argument_group("methods")
    g.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma list of CPM recipes (" + ", ".join(CPM_METHODS) + "), each optionally with its own head "
        "as RECIPE:HEAD (e.g. calexnet:sdn), and baselines (pteenet, ztw, boostnet); default: "
        + ",".join(DEFAULT_METHODS),
    )
    g.add_argument("--seeds", default="0,1,2", help="comma list of training seeds (default 0,1,2)")
    g.add_argument(
        "--head-dim", type=int, help="CalexNet head D (CPM methods, BoostNet; default: the head's own, grid 32)"
    )
    g.add_argument("--n-prototypes", type=int, default=32, help="CalexNet head K (32)")
    g.add_argument(
        "--cpm-head",
        choices=CPM_HEADS,
        default="grid",
        help="head of the CPM methods: the grid prototype-pooling head (default), the global prototype-pooling "
        "head, or ZTW's SDN head without the cascade (learned max/avg pooling to 4x4, linear) to separate "
        "recipe from head; BoostNet uses the CalexNet head (grid unless prototype)",
    )
    g.add_argument(
        "--margins",
        default="-0.3:0.5:81",
        help="CPM margins START:STOP:COUNT or a list (-0.3:0.5:81; write --margins=-0.3:0.5:81 on the command "
        "line). A negative margin asks the exits for more precision than the backbone has: within ~1 point of "
        "its accuracy the operating points need margins around -0.1",
    )
    g.add_argument("--margin-mode", choices=("additive", "relative"), default="additive")
    g.add_argument(
        "--m-train",
        type=float,
        default=0.0,
        help="margin of the thresholds behind the training weights of weighted recipes (0)",
    )
    g.add_argument("--min-support", type=int, default=20, help="CPM minimum exiting set per class (20)")
    g.add_argument("--thresholds", type=int, default=101, help="uniform global thresholds on [0, 1] (101)")
    g.add_argument("--threshold-quantiles", type=int, default=199, help="plus this many validation quantiles")
    g.add_argument("--ztw-ensemble-epochs", type=int, default=20, help="ZTW second stage epochs (20)")
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default="test-half",
        help="test-half (default): choose thresholds on a stratified half of the test split, report the other "
        "half; val: choose on the validation split carved from train, report the whole test split",
    )
    g.add_argument("--calibration-seed", type=int, default=0, help="seed of the test halves (default 0)")
    g = p.add_argument_group("optimisation (the same for every method and head)")
    g.add_argument("--epochs", type=int, default=30, help="per head, at most (default 30)")
    add_patience_arg(g)
    g.add_argument(
        "--compile-heads", action="store_true", help="torch.compile the training forward (pays off on long runs)"
    )
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
    add_cache_args(p)
    p.add_argument(
        "--cache-pool",
        type=int,
        help="store branch maps average-pooled to at most this side (8 keeps exactly what the grid head reads; "
        "SDN and PTEEnet heads then pool so first too)",
    )
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    setup(args)
    return run_compare(CompareConfig(**{f.name: getattr(args, f.name) for f in fields(CompareConfig)}))
