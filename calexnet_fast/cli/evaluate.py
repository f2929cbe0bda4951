"""``calexnet evaluate``: accuracy and FLOPs reduction of the calibrated cascade, per margin."""

from __future__ import annotations

import argparse

from ..evaluation import evaluate_points
from ..run import Run
from .common import add_execution_args, device_of, log, setup

NAME = "evaluate"
HELP = "accuracy and FLOPs reduction of the calibrated cascade on the test split"
DESCRIPTION = (
    "Apply every calibrated threshold set to the test split (thresholds come from validation only) and report "
    "accuracy, FLOPs reduction (FlopCounterMode counts; a failed head is still paid for) and where samples exit. "
    "Reads the logits the run keeps (computing them once if it has none). Writes RUN/results.json."
)
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `calexnet train` (after `calexnet calibrate`)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="default test")
    p.add_argument("--data-dir", help="dataset directory if it moved since training (only to compute missing logits)")
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    setup(args)
    run_dir = Run(args.run)
    config = run_dir.config()
    sweep = run_dir.load_thresholds()
    z = run_dir.split_logits(args.split, data_dir=args.data_dir, device=device_of(args), progress=not args.quiet)
    profile = run_dir.flops_profile()
    points = evaluate_points(z.branch, z.backbone, z.labels, sweep.thresholds, sweep.margins, profile)
    bb_acc = float((z.backbone.argmax(1) == z.labels).float().mean())
    name = (config.get("recipe") or {}).get("name", "cascade")
    results = {
        "run": str(run_dir.path),
        "split": args.split,
        "n": int(z.labels.shape[0]),
        "recipe": name,
        "seed": (config.get("fit") or {}).get("seed"),
        "backbone": config["backbone"],
        "backbone_accuracy": bb_acc,
        "flops": {
            "segments": list(profile.segment_flops),
            "heads": list(profile.head_flops),
            "backbone": profile.backbone_flops,
        },
        "calibration": sweep.config,
        "points": points,
    }
    run_dir.save_results(results)
    if not args.quiet:
        print(
            f"backbone accuracy {bb_acc:.4f} ({profile.backbone_flops / 1e6:.1f} MFLOPs/sample); "
            f"{name} on the {args.split} split:"
        )
        print(f"{'margin':>8} {'accuracy':>9} {'FLOPs red.':>10}  exits (branches 1..K, backbone)")
        for p in points:
            ex = " ".join(f"{v:.2f}" for v in p["exit_fractions"])
            print(f"{p['margin']:8.3f} {p['accuracy']:9.4f} {p['flops_reduction']:10.1%}  {ex}")
    log.info(f"results in {run_dir.path / 'results.json'}")
    return 0
