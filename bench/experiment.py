"""The real experiment of docs/results.md: a learning-rate search, then the full-budget comparison.

Frozen pretrained CIFAR ResNet-56 on CIFAR-10 JPEG, 3 branches at equal-FLOPs points, every training image and
its mirror (cached horizontal flips; the branch maps cached average-pooled to 8 x 8, which is exactly what
every head of the comparison reads), early stopping on the 5,000 validation images carved out of train,
thresholds chosen on a stratified half of the test split, accuracy reported on the other half.

``lr-search`` runs ``calexnet compare`` on seed 0 for each candidate learning rate with a short schedule and
picks, per method family, the rate with the lowest validation loss (never a test number): the reference recipe
stands for every CPM recipe with the grid head, ``reference:sdn`` for the two SDN-head rows, and each baseline
for itself. It writes ``lr_search.json`` to ``--out``. ``run`` runs the comparison (8 methods + the two
SDN-head rows, ``calexnet:sdn`` and ``reference:sdn``, x 3 seeds) with those rates. ``measure`` times the real
cascades of the comparison on the reported test half in both modes (``calexnet measure``: per method and seed
the Pareto-envelope points within 0.5, 1, 2 and 5 points of the backbone's accuracy; CalexNet, ZTW and
BoostNet for every seed, the reference and PTEEnet for seed 0) and writes ``speed.json``, ``speed.png`` and
``speed_table.md`` to ``--out``. ``all`` does the three.

    python bench/experiment.py all --out docs/results --work /work/cache/full/work --features /work/cache/full/features
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

METHODS = ",".join(
    ("calexnet", "reference", "reference+weights", "reference+kd", "reference+aligned")
    + ("pteenet", "ztw", "boostnet", "calexnet:sdn", "reference:sdn")
)
PROTOCOL = [
    "--flip", "--cache-pool", "8", "--calibration", "test-half", "--calibration-seed", "0", "--margins=-0.3:0.5:81",
    "--patience", "3", "--compile-heads", "--batch-size", "256", "--threads", "2",
]  # fmt: skip
EPOCHS = 20
SEARCH_EPOCHS = 8
SEARCH_PATIENCE = 2
SEARCH_LRS = (1e-3, 3e-3, 1e-2)
# searched method -> the methods of the comparison that take its learning rate
FAMILIES = {
    "reference": ("calexnet", "reference", "reference+weights", "reference+kd", "reference+aligned"),
    "reference:sdn": ("calexnet:sdn", "reference:sdn"),
    "ztw": ("ztw",),
    "boostnet": ("boostnet",),
    "pteenet": ("pteenet",),
}


def compare_argv(args: argparse.Namespace, work: Path, out: Path, extra: list[str]) -> list[str]:
    """The ``calexnet compare`` command line of the experiment (``extra``: methods, seeds, epochs, rates)."""
    data = Path(args.data_root)
    return [
        sys.executable, "-m", "calexnet_fast.cli", "compare", "--dataset", "cifar10",
        "--data-dir", str(data / "cifar10-jpeg"), "--pretrained-dir", str(data), "--backbone", "cifar_resnet56",
        "--n-branches", "3", *PROTOCOL, "--cache", "disk", "--cache-dir", str(args.features),
        "--work-dir", str(work), "--out", str(out), *extra,
    ]  # fmt: skip


def _call(argv: list[str]) -> None:
    print(" ".join(argv), flush=True)
    rc = subprocess.call(argv)
    if rc:
        raise SystemExit(f"command failed with exit status {rc}")


def best_val_loss(run_dir: Path) -> float:
    """The sum over a run's trained parts (CPM: each branch head; baselines: stage 1) of its lowest
    validation loss, from the histories saved with the trained files."""
    from calexnet_fast.io import load_state_file

    if (run_dir / "model.safetensors").is_file():
        _, info = load_state_file(run_dir / "model.safetensors")
        histories = [info["history"]["stage1"]]
    else:
        histories = [load_state_file(p)[1]["history"] for p in sorted(run_dir.glob("branch_*/head.safetensors"))]
    if not histories:
        raise FileNotFoundError(f"{run_dir}: no trained head or model found")
    return float(sum(min(r["val_loss"] for r in h) for h in histories))


def lr_search(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    table: dict[str, dict[str, float]] = {m: {} for m in FAMILIES}
    for lr in SEARCH_LRS:
        work = Path(args.work) / "lr_search" / f"lr{lr:g}"
        extra = [
            "--methods", ",".join(FAMILIES), "--seeds", "0", "--epochs", str(SEARCH_EPOCHS),
            "--patience", str(SEARCH_PATIENCE), "--lr", f"{lr:g}",
        ]  # fmt: skip
        _call(compare_argv(args, work, work / "out", extra))
        for m in FAMILIES:
            name = m.replace(":", "_") if ":" in m else m
            table[m][f"{lr:g}"] = best_val_loss(work / "runs" / f"{name}_seed0")
    chosen = {m: float(min(v, key=v.get)) for m, v in table.items()}
    result = {
        "candidates": list(SEARCH_LRS),
        "epochs": SEARCH_EPOCHS,
        "patience": SEARCH_PATIENCE,
        "seed": 0,
        "criterion": "sum over trained parts of the lowest validation loss (5,000 images carved out of train)",
        "val_loss": table,
        "chosen": chosen,
        "applies_to": {m: list(v) for m, v in FAMILIES.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_search.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"val_loss": table, "chosen": chosen}, indent=1))
    return result


def run(args: argparse.Namespace) -> None:
    search = json.loads((Path(args.out) / "lr_search.json").read_text())
    overrides = ",".join(f"{m}={search['chosen'][fam]:g}" for fam, ms in FAMILIES.items() for m in ms)
    extra = ["--methods", METHODS, "--seeds", args.seeds, "--epochs", str(EPOCHS), "--lr-overrides", overrides]
    _call(compare_argv(args, Path(args.work), Path(args.out), extra))


MEASURE = [
    "--margins", "none", "--losses", "0.005,0.01,0.02,0.05", "--baseline-reductions=", "--timing-images", "1536",
    "--repeats", "3", "--threads", "2", "--quiet",
]  # fmt: skip
MEASURED = (("calexnet,ztw,boostnet", "0,1,2"), ("reference,pteenet", "0"))


def measure(args: argparse.Namespace) -> None:
    out = str(args.out)
    for i, (methods, seeds) in enumerate(MEASURED):
        argv = [sys.executable, "-m", "calexnet_fast.cli", "measure", "--compare", out, "--work-dir", str(args.work)]
        argv += ["--out", out, *MEASURE, "--methods", methods, "--seeds", seeds] + (["--resume"] if i else [])
        _call(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("lr-search", "run", "measure", "all"))
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="the shared data folder (default ../shared/data)")
    p.add_argument("--out", required=True, help="results.json, figures, table.md and lr_search.json go here")
    p.add_argument("--work", required=True, help="trained heads and checkpoints (resumable)")
    p.add_argument("--features", required=True, help="the feature caches (reused by every command)")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    if args.command in ("lr-search", "all"):
        lr_search(args)
    if args.command in ("run", "all"):
        run(args)
    if args.command in ("measure", "all"):
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
