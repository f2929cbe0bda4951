"""``calexnet train-backbone``: train the backbone that branches are later attached to."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..backbones import trainable_backbone
from ..io import write_json
from ..normalization import normalization_for
from ..run import dataset_record_of, load_splits, save_trained_backbone, versions
from ..training import BackboneTrainConfig, evaluate_classifier, seed_everything, train_backbone
from .common import add_data_args, add_execution_args, device_of, log, setup

NAME = "train-backbone"
HELP = "train a torchvision ResNet (or CIFAR ResNet) backbone on a dataset"
DESCRIPTION = (
    "Train the backbone that branches will later be attached to (SGD with Nesterov momentum, per-step cosine "
    "schedule, random crop + flip). A checkpoint is written after every epoch; running the same command again "
    "resumes. The result, OUT/backbone.safetensors, is what `calexnet train --backbone-run OUT` freezes."
)
EPILOG = (
    "example: calexnet train-backbone --arch resnet18 --dataset cifar10 --data-dir ../shared/data/"
    "cifar10-jpeg --out runs/r18 --epochs 200\n"
    "multi-GPU: torchrun --nproc_per_node 4 --no-python calexnet train-backbone ..."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        default="resnet18",
        help="resnet18, resnet50 (torchvision) or cifar_resnet<depth> (default resnet18)",
    )
    p.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default="cifar",
        help="torchvision ResNets: cifar (3x3 stride-1 conv, no max-pool; for 32x32 images) or "
        "imagenet (default cifar)",
    )
    p.add_argument("--out", required=True, help="run directory for checkpoints and the trained backbone")
    add_data_args(p)
    g = p.add_argument_group("optimisation (SGD + Nesterov, cosine schedule, crop + flip augmentation)")
    g.add_argument("--epochs", type=int, default=200, help="default 200")
    g.add_argument("--batch-size", type=int, default=128, help="per process (default 128)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    g.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPU")
    g.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists in --out")
    g.add_argument(
        "--normalization",
        default="imagenet",
        help="input statistics: imagenet (default, what every staged backbone assumes), cifar10, cifar100, cinic10",
    )
    add_execution_args(p)


def run(args: argparse.Namespace) -> int:
    info = setup(args)
    seed_everything(args.seed)
    out = Path(args.out)
    norm = normalization_for(args.arch, args.normalization)
    dataset = dataset_record_of(args)
    splits = load_splits(dataset, norm)
    model = trainable_backbone(args.arch, splits.n_classes, args.stem)
    cfg = BackboneTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        num_workers=args.workers,
        amp=not args.no_amp,
    )
    device = device_of(args)
    log.info(
        f"training {args.arch} ({args.stem} stem) on {dataset['name']}: {len(splits.train)} train / "
        f"{len(splits.val)} val images, {args.epochs} epochs, device {device}, {info.world_size} process(es)"
    )
    if info.is_main:
        write_json(
            out / "config.json",
            {
                "command": NAME,
                "argv": sys.argv,
                "dataset": dataset,
                "arch": args.arch,
                "stem": args.stem,
                "train": asdict(cfg),
                "normalization": norm.to_json(),
                "versions": versions(),
            },
        )
    t0 = time.time()
    result = train_backbone(
        model,
        splits.train,
        splits.val,
        cfg,
        out_dir=out,
        resume=not args.no_resume,
        device=device,
        progress=not args.quiet,
        run_config={"arch": args.arch, "stem": args.stem, "dataset": dataset["name"]},
    )
    if not info.is_main:
        return 0
    test_acc = evaluate_classifier(model, splits.test, device=device, num_workers=args.workers)
    val_acc = result.history[-1].get("val_accuracy") if result.history else None
    meta = {
        "arch": args.arch,
        "stem": args.stem,
        "n_classes": splits.n_classes,
        "normalization": norm.to_json(),
        "dataset": dataset,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "epochs": args.epochs,
        "seconds": time.time() - t0,
    }
    path = save_trained_backbone(out, model, meta)
    write_json(out / "train_log.json", {"history": result.history})
    log.info(f"done: val accuracy {val_acc}, test accuracy {test_acc:.4f}; weights in {path}")
    return 0
