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
import json
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


def per_exit(args: argparse.Namespace) -> int:
    import torch

    from calexnet_fast.baselines import BaselineConfig, exit_outputs, make_baseline
    from calexnet_fast.recipes import head_logits
    from calexnet_fast.training import FeatureCache, load_state_file

    results = json.loads((Path(args.out) / "results.json").read_text())
    cfg = results["config"]
    test = FeatureCache.load(Path(args.features) / "test.safetensors")
    y, zb = test.labels_tensor(), test.logits_tensor()
    bb_pred = zb.argmax(1)
    out: dict = {"backbone_test_accuracy": float((bb_pred == y).double().mean()), "methods": {}}
    shapes = test.branch_shapes
    for method in cfg["methods"]:
        rows = []
        for seed in cfg["seeds"]:
            info = next(s for s in results["sweeps"][method] if s["seed"] == seed)["info"]
            run_dir = Path(args.work) / "runs" / f"{info.get('heads_trained_as', method)}_seed{seed}"
            if (run_dir / "model.safetensors").is_file():
                tensors, _ = load_state_file(run_dir / "model.safetensors")
                bcfg = BaselineConfig(**cfg["baselines"])
                model = make_baseline(method, [s[0] for s in shapes], test.n_classes, bcfg)
                model.load_state_dict(tensors)
                eo = exit_outputs(model, test)
                preds, scores = eo.preds, eo.scores
            else:
                from calexnet_fast.baselines import ZTWHead
                from calexnet_fast.heads import PrototypePoolingHead

                heads = []
                for k, s in enumerate(shapes):
                    tensors, _ = load_state_file(run_dir / f"branch_{k + 1}" / "head.safetensors")
                    if cfg.get("cpm_head", "prototype") == "sdn":
                        h = ZTWHead(s[0], test.n_classes, cascading=False)
                    else:
                        h = PrototypePoolingHead(
                            s[0], test.n_classes, dim=cfg["head_dim"], n_prototypes=cfg["n_prototypes"]
                        )
                    h.load_state_dict(tensors)
                    heads.append(h.eval())
                z = torch.stack([head_logits(h, test, k) for k, h in enumerate(heads)])
                p = torch.softmax(z, -1)
                scores, preds = p.max(-1)
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
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "per-exit"):
        s = sub.add_parser(name)
        s.add_argument("--data-root", default=os.environ.get("CALEXNET_DATA", str(DEFAULT_DATA)))
        s.add_argument("--work", required=True, help="compare --work-dir (checkpoints and heads, outside the repo)")
        s.add_argument("--features", required=True, help="compare --cache-dir (feature caches, outside the repo)")
        s.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else per_exit(args)


if __name__ == "__main__":
    sys.exit(main())
