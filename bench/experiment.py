"""The real experiment of docs/results.md, and a per-exit look at what it trained.

``run`` launches the exact ``calexnet compare`` command behind docs/results (frozen pretrained CIFAR
ResNet-56, CIFAR-10 JPEG, 3 branches at equal-FLOPs points, 8 methods x 3 seeds, CPU budget choices).
``per-exit`` reads the heads that run left in its work directory and measures, on the test split, every
exit's own accuracy and its agreement with the backbone (what the Pareto curves are made of), writing
``per_exit.json`` next to ``results.json``.

    python bench/experiment.py run --data-root ../shared/data --work /work/cache/eval/work \
        --features /work/cache/eval/features --out docs/results
    python bench/experiment.py per-exit --work /work/cache/eval/work --features /work/cache/eval/features \
        --out docs/results
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The CPU budget (2 shared cores, about an hour for everything; see docs/results.md for the reasons).
BUDGET = [
    "--train-subset", "10000", "--seeds", "0,1,2", "--epochs", "3", "--lr", "3e-2",
    "--lr-overrides", "pteenet=3e-3", "--head-dim", "32", "--n-prototypes", "16",
]  # fmt: skip


def compare_argv(data_root: str, work: str, features: str, out: str) -> list[str]:
    """The ``calexnet compare`` arguments of the experiment."""
    return [
        "compare", "--dataset", "cifar10", "--data-dir", str(Path(data_root) / "cifar10-jpeg"),
        "--pretrained-dir", str(data_root), "--backbone", "cifar_resnet56", "--n-branches", "3", *BUDGET,
        "--cache", "disk", "--cache-dir", str(features), "--work-dir", str(work), "--out", str(out),
        "--threads", "2",
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    argv = [
        sys.executable,
        "-m",
        "calexnet_fast.cli",
        *compare_argv(args.data_root, args.work, args.features, args.out),
    ]
    print(" ".join(argv), flush=True)
    return subprocess.call(argv)


def _exit_data(args: argparse.Namespace, results: dict, method: str, seed: int, cache):
    """``("cpm", branch logits [K, N, C])`` or ``("global", ExitOutputs)`` of a trained method on ``cache``."""
    from calexnet_fast.baselines import BaselineConfig, ZTWHead, exit_outputs, make_baseline
    from calexnet_fast.features import branch_logits
    from calexnet_fast.heads import PrototypePoolingHead
    from calexnet_fast.io import load_state_file

    cfg = results["config"]
    shapes = cache.branch_shapes
    info = next(s for s in results["sweeps"][method] if s["seed"] == seed)["info"]
    run_dir = Path(args.work) / "runs" / f"{info.get('heads_trained_as', method)}_seed{seed}"
    if (run_dir / "model.safetensors").is_file():
        tensors, _ = load_state_file(run_dir / "model.safetensors")
        model = make_baseline(method, [s[0] for s in shapes], cache.n_classes, BaselineConfig(**cfg["baselines"]))
        model.load_state_dict(tensors)
        return "global", exit_outputs(model, cache)
    heads = []
    for k, s in enumerate(shapes):
        tensors, _ = load_state_file(run_dir / f"branch_{k + 1}" / "head.safetensors")
        if cfg.get("cpm_head", "prototype") == "sdn":
            h = ZTWHead(s[0], cache.n_classes, cascading=False)
        else:
            h = PrototypePoolingHead(s[0], cache.n_classes, dim=cfg["head_dim"], n_prototypes=cfg["n_prototypes"])
        h.load_state_dict(tensors)
        heads.append(h.eval())
    return "cpm", branch_logits(heads, cache)


def per_exit(args: argparse.Namespace) -> int:
    import torch

    from calexnet_fast import io
    from calexnet_fast.features import FeatureCache

    results = io.read_json(Path(args.out) / "results.json", "compare results")
    cfg = results["config"]
    test = FeatureCache.load(Path(args.features) / "test.safetensors")
    y, zb = test.labels_tensor(), test.logits_tensor()
    bb_pred = zb.argmax(1)
    out: dict = {"backbone_test_accuracy": float((bb_pred == y).double().mean()), "methods": {}}
    for method in cfg["methods"]:
        rows = []
        for seed in cfg["seeds"]:
            kind, data = _exit_data(args, results, method, seed, test)
            if kind == "global":
                preds, scores = data.preds, data.scores
            else:
                scores, preds = torch.softmax(data, -1).max(-1)
            rows.append(
                {
                    "seed": seed,
                    "accuracy": (preds == y).double().mean(1).tolist(),
                    "agreement_with_backbone": (preds == bb_pred).double().mean(1).tolist(),
                    "mean_score": scores.double().mean(1).tolist(),
                }
            )
        out["methods"][method] = rows
        acc = torch.tensor([r["accuracy"] for r in rows]).mean(0)
        print(f"{method:20s} per-exit test accuracy (mean over seeds): {[round(float(a), 4) for a in acc]}")
    path = Path(args.out) / "per_exit.json"
    io.write_json(path, out, indent=1)
    print(f"wrote {path}")
    return 0


def heldout(args: argparse.Namespace) -> int:
    """Re-evaluate the trained methods with calibration on half of the test split (images the backbone never
    trained on, unlike the validation split carved out of train) and measurement on the other half."""
    import torch

    from calexnet_fast import evaluation as ev
    from calexnet_fast import io
    from calexnet_fast.data import stratified_split
    from calexnet_fast.features import FeatureCache
    from calexnet_fast.flops import FlopsProfile
    from calexnet_fast.recipes import recipe

    results = io.read_json(Path(args.out) / "results.json", "compare results")
    cfg = results["config"]
    test = FeatureCache.load(Path(args.features) / "test.safetensors")
    y, zb = test.labels_tensor(), test.logits_tensor()
    meas, cal = stratified_split(y, 0.5, seed=0)
    seg = tuple(results["backbone"]["segment_flops"])
    lo, hi, num = cfg["margins"]
    margins = torch.linspace(lo, hi, num, dtype=torch.float64)
    sweeps: dict = {}
    for method in cfg["methods"]:
        sweeps[method] = []
        for seed in cfg["seeds"]:
            info = next(s for s in results["sweeps"][method] if s["seed"] == seed)["info"]
            profile = FlopsProfile(seg, tuple(info["head_flops"]))
            kind, data = _exit_data(args, results, method, seed, test)
            if kind == "cpm":
                rec = recipe(method)
                sw = ev.sweep_cpm(
                    data[:, cal],
                    zb[cal],
                    y[cal],
                    data[:, meas],
                    zb[meas],
                    y[meas],
                    profile,
                    margins,
                    aligned=rec.aligned,
                    margin_mode=cfg["margin_mode"],
                    min_support=cfg["min_support"],
                    method=method,
                    seed=seed,
                )
            else:
                grid = ev.threshold_grid(
                    data.scores[:, cal], cfg["thresholds"]["uniform"], cfg["thresholds"]["val_quantiles"]
                )
                sw = ev.sweep_global_threshold(
                    data.scores[:, meas],
                    data.preds[:, meas],
                    zb[meas],
                    y[meas],
                    profile,
                    grid,
                    method=method,
                    seed=seed,
                )
            sweeps[method].append(sw)
    summary = ev.summarize(sweeps)
    out = Path(args.out) / "heldout_calibration"
    bb_acc = float((zb[meas].argmax(1) == y[meas]).double().mean())
    io.write_json(
        out / "results.json",
        {
            "what": "calibration (CPM thresholds, baseline threshold grid) on a stratified half of the test split "
            "(split seed 0), measurement on the other half; heads as trained by the compare run in ..",
            "backbone_accuracy_measured_half": bb_acc,
            "summary": summary,
            "sweeps": {m: [s.to_json() for s in v] for m, v in sweeps.items()},
        },
        indent=1,
    )
    ev.plot_envelopes(
        summary,
        [out / "pareto.png", out / "pareto.svg"],
        backbone_accuracy=bb_acc,
        title="calibrated on half of the test split, measured on the other half",
    )
    table = ev.results_table(summary)
    io.write_text(out / "table.md", table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "per-exit", "heldout"):
        s = sub.add_parser(name)
        s.add_argument("--data-root", default=os.environ.get("CALEXNET_DATA", str(DEFAULT_DATA)))
        s.add_argument("--work", required=True, help="compare --work-dir (checkpoints and heads, outside the repo)")
        s.add_argument("--features", required=True, help="compare --cache-dir (feature caches, outside the repo)")
        s.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    return {"run": run, "per-exit": per_exit, "heldout": heldout}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
