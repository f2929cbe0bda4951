"""``calexnet calibrate``: CPM exit thresholds on the validation split for a sweep of margins."""

from __future__ import annotations

import argparse
import time

from ..calibration import calibrate_sweep
from ..run import Run
from .common import add_calibration_args, add_execution_args, device_of, log, margins_of, setup

NAME = "calibrate"
HELP = "fit CPM exit thresholds on the validation split for a sweep of margins"
DESCRIPTION = (
    "Class Precision Margin calibration: for every branch and class, the lowest confidence at which the branch's "
    "exits are at least as precise as the backbone minus a margin m. Sweeping m traces the accuracy-FLOPs curve. "
    "Reads the validation logits the run keeps (computing them once if it has none) and writes "
    "RUN/thresholds.safetensors (+ .json)."
)
EPILOG = None

# the calibration options of a run that records no recipe (one saved from Python without it)
DEFAULTS = {"aligned": True, "margin_mode": "additive", "min_support": 20, "bar_from": "subset"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `calexnet train` (or saved from Python)")
    p.add_argument("--margins", help="START:STOP:COUNT or a comma list (default 0:0.5:51)")
    p.add_argument("--margin", type=float, help="a single margin instead of a sweep")
    add_calibration_args(p, "as the run's recipe")
    p.add_argument("--data-dir", help="dataset directory if it moved since training (only to compute missing logits)")
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    setup(args)
    run_dir = Run(args.run)
    rec = {**DEFAULTS, **(run_dir.config().get("recipe") or {})}
    margins = margins_of(args.margins, args.margin)
    val = run_dir.split_logits("val", data_dir=args.data_dir, device=device_of(args), progress=not args.quiet)
    opts = {
        "aligned": rec["aligned"] if args.aligned is None else args.aligned,
        "margin_mode": args.margin_mode or rec["margin_mode"],
        "min_support": args.min_support or rec["min_support"],
        "bar_from": args.bar_from or rec["bar_from"],
    }
    t0 = time.time()
    sweep = calibrate_sweep(val.branch, val.backbone, val.labels, margins, **opts)
    sweep.config.update({"run": str(run_dir.path), "n_val": int(val.labels.shape[0])})
    run_dir.save_thresholds(sweep)
    finite = [float(sweep.thresholds[i].isfinite().float().mean()) for i in range(len(margins))]
    log.info(
        f"{len(margins)} margins x {val.branch.shape[0]} branches calibrated on {val.labels.shape[0]} validation "
        f"samples in {time.time() - t0:.2f}s ({'aligned' if opts['aligned'] else 'unaligned'}); classes that can "
        f"exit: {finite[0]:.0%} at m={float(margins[0]):.3g} .. {finite[-1]:.0%} at m={float(margins[-1]):.3g}"
    )
    log.info(f"thresholds in {run_dir.path / 'thresholds.safetensors'}; next: calexnet evaluate --run {run_dir.path}")
    return 0
