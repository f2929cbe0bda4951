"""``calexnet measure``: measured speed of the real cascade at each operating point."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..evaluation import MeasureConfig, run_measure
from ..evaluation.measure_session import DEFAULT_BASELINE_REDUCTIONS, DEFAULT_MARGINS, DEFAULT_MODES, DTYPES
from .common import add_execution_args, setup

NAME = "measure"
HELP = "measured speed of the real cascade at each operating point (the equivalent of `calexnet evaluate --measure`)"
DESCRIPTION = (
    "Run the real calexnet_fast.Cascade (survivors compacted between stages) over the test images at each "
    "operating point, in two modes: per input batch (latency) and streaming (throughput: survivors re-batched "
    "across input batches so every stage runs on full stage batches; the baselines' score cascades run per "
    "batch only). Each is timed against the frozen backbone alone in the same inference form (BatchNorm folded "
    "into the convolutions, channels_last): same device, dtype, batch size and images (decoded once into one "
    "tensor; only model work is timed), interleaved rounds, medians. Records per point the real cascade's "
    "accuracy (checked against the simulated evaluation on every image, in each mode), FLOPs reduction, the "
    "measured speedup of each mode, the FLOPs-ideal 1/(1-r) and the time-ideal (every stage and head at its "
    "full-batch time, paid by the samples reaching it), and the headline numbers per mode: the largest measured "
    "speedup at <= 1 pt accuracy loss and the speedup at m = 0.2, mean ± std over seeds. Writes speed.json, "
    "speed.png, speed.svg and speed_table.md."
)
EPILOG = (
    "examples:\n  calexnet measure --run runs/calexnet_s0 --threads 2\n"
    "  calexnet measure --run runs/calexnet_s0 --modes stream --stage-batch 128 --batch-size 64\n"
    "  calexnet measure --compare docs/results --threads 2 --timing-images 2048 --repeats 3"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of `calexnet train` + `calexnet calibrate` (or saved from Python)")
    src.add_argument("--compare", help="output directory of `calexnet compare` (every method x seed in it)")
    p.add_argument("--work-dir", help="--compare: its work dir (default: as recorded in results.json, else OUT/work)")
    p.add_argument("--methods", help="--compare: comma list (default: every method it ran)")
    p.add_argument("--seeds", help="--compare: comma list (default: every seed it ran)")
    p.add_argument(
        "--margins",
        default=DEFAULT_MARGINS,
        help=f"CPM margins to measure: a comma list or START:STOP:COUNT, 'all' (--run: every calibrated "
        f"margin) or 'none' (--compare: only the --losses points); --run uses the calibrated margins closest to "
        f"these (default {DEFAULT_MARGINS})",
    )
    p.add_argument(
        "--baseline-reductions",
        default=DEFAULT_BASELINE_REDUCTIONS,
        help="--compare: baseline thresholds to measure: per target FLOPs reduction, the point of the method's "
        f"Pareto envelope (from results.json) nearest to it (default {DEFAULT_BASELINE_REDUCTIONS}; '' for none)",
    )
    p.add_argument(
        "--losses",
        default="",
        help="--compare: more points for every method: per accuracy loss (e.g. 0.01 = 1 pt), the point (margin "
        "or threshold) of the method's Pareto envelope with the largest FLOPs reduction whose accuracy in "
        "results.json is within that loss of the backbone's",
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
    p.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the frozen stages' inference form (BatchNorm folded into the convolutions, fast max pools), for "
        "the backbone and the cascade alike: the form that is timed (default: on)",
    )
    p.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help="comma list: batch (the cascade per input batch: latency), stream (streaming over the batches: "
        f"throughput) (default {DEFAULT_MODES})",
    )
    p.add_argument("--stage-batch", type=int, help="stream: rows per stage run (default: --batch-size)")
    p.add_argument("--max-loss", type=float, default=0.01, help="accuracy loss of the headline (0.01 = 1 pt)")
    p.add_argument("--resume", action="store_true", help="keep runs already in OUT/speed.json measured alike")
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: recompute the summary, frontiers, figure and table from the input's speed.json",
    )
    p.add_argument("--data-dir", help="dataset directory if it moved")
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    setup(args)
    return run_measure(MeasureConfig(**{f.name: getattr(args, f.name) for f in fields(MeasureConfig)}))
