"""The ``calexnet`` command line: train a backbone, train branches with any recipe, calibrate, evaluate.

Every artefact of a run lives in one directory (``--out`` / ``--run``)::

    RUN/config.json              what was run: dataset, backbone, recipe, optimisation, cache, versions
    RUN/branches/branch_k/       per-branch epoch checkpoints (resume) and the finished head
    RUN/heads.safetensors (+.json)      the trained heads
    RUN/train_log.json           loss history, training weights, m_train thresholds
    RUN/thresholds.safetensors (+.json) CPM thresholds for a sweep of margins (``calibrate``)
    RUN/results.json             accuracy and FLOPs reduction per margin on the test split (``evaluate``)
    RUN/cache/*.safetensors      branch features of each split (with ``--cache disk``)

Subcommands register themselves in :data:`COMMANDS` through :func:`register_command`; a module listed in
``PLUGIN_MODULES`` can add more by defining ``CLI_COMMANDS``, a list of dicts with the keys of
:func:`register_command` (``compare`` comes that way from the evaluation module).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["COMMANDS", "build_parser", "main", "register_command"]

PLUGIN_MODULES: tuple[str, ...] = ("calexnet_fast.evaluation", "calexnet_fast.baselines", "calexnet_fast.measure")


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None
    epilog: str | None = None


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    description: str | None = None,
    epilog: str | None = None,
) -> None:
    """Add a ``calexnet <name>`` subcommand (``run(args)`` returns an exit status or ``None`` for 0)."""
    COMMANDS[name] = Command(name, help, add_arguments, run, description, epilog)


def _load_plugins() -> None:
    for mod_name in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue
            raise
        for spec in getattr(mod, "CLI_COMMANDS", []) or []:
            if spec["name"] not in COMMANDS:
                register_command(**spec)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_QUIET = False


def log(msg: str) -> None:
    """Print a progress line to stderr (rank 0 only, not with --quiet)."""
    from .training import dist_info

    if not _QUIET and dist_info().is_main:
        print(f"[calexnet] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_run_config(run: Path) -> dict:
    cfg = run / "config.json"
    if not cfg.is_file():
        raise SystemExit(
            f"error: --run {run}: no config.json there; expected a directory written by `calexnet train --out {run}`"
        )
    return json.loads(cfg.read_text())


def _margins(text: str | None, single: float | None):
    import torch

    if single is not None:
        return torch.tensor([single], dtype=torch.float64)
    if text is None:
        text = "0:0.5:51"
    parts = text.split(":")
    try:
        if len(parts) == 3:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise ValueError
            return torch.linspace(start, stop, num, dtype=torch.float64)
        return torch.tensor([float(v) for v in text.split(",")], dtype=torch.float64)
    except ValueError:
        raise SystemExit(
            f"error: --margins: expected START:STOP:COUNT (e.g. 0:0.5:51) or a comma list (0,0.1,0.2), got {text!r}"
        ) from None


def _versions() -> dict:
    import torch

    from . import __version__

    return {"calexnet_fast": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def _setup(args: argparse.Namespace):
    import torch

    from .training import init_distributed

    global _QUIET
    _QUIET = bool(getattr(args, "quiet", False))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return init_distributed()


def _device(args):
    import torch

    from .training import default_device

    return torch.device(args.device) if getattr(args, "device", None) else default_device()


# --------------------------------------------------------------------------------------------------
# shared arguments
# --------------------------------------------------------------------------------------------------


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from .data import DATASETS

    g = p.add_argument_group("data (nothing is downloaded)")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        required=required,
        help="cifar10 (pickles or ImageFolder), cifar100 (100 fine labels), cifar100-coarse (20 "
        "superclasses), cinic10, imagefolder, synthetic (generated, for smoke tests)",
    )
    g.add_argument(
        "--data-dir",
        help="dataset directory (default: $CALEXNET_<NAME>_DIR, or a known folder name "
        "under $CALEXNET_DATA, e.g. cifar-10-batches-py, cifar10-jpeg, CINIC-10)",
    )
    g.add_argument(
        "--val-size",
        type=float,
        default=5000,
        help="validation images carved out of train when the dataset has no valid split: a count, "
        "or a fraction < 1 (default 5000)",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of that stratified split; keep it fixed across runs (default 0)",
    )
    g.add_argument("--image-size", type=int, help="resize images to this side (default: as stored, 32 for CIFAR)")
    g.add_argument(
        "--synthetic-size",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default=(512, 256, 256),
        help="sizes of --dataset synthetic (default 512 256 256)",
    )
    g.add_argument("--synthetic-classes", type=int, default=10, help="classes of --dataset synthetic (default 10)")


def _load_data(args, normalization=None, dataset: dict | None = None):
    from .data import load_dataset

    d = dataset or {}
    name = d.get("name", getattr(args, "dataset", None))
    val_size = d.get("val_size", getattr(args, "val_size", 5000))
    val_size = int(val_size) if float(val_size) >= 1 else float(val_size)
    data_dir = getattr(args, "data_dir", None) or d.get("data_dir")
    synth = None
    if name == "synthetic":
        synth = d.get("synthetic") or {
            "n_train": args.synthetic_size[0],
            "n_val": args.synthetic_size[1],
            "n_test": args.synthetic_size[2],
            "n_classes": args.synthetic_classes,
            "seed": args.split_seed,
        }
    try:
        splits = load_dataset(
            name,
            data_dir,
            val_size=val_size,
            split_seed=d.get("split_seed", getattr(args, "split_seed", 0)),
            normalization=normalization,
            image_size=d.get("image_size", getattr(args, "image_size", None)),
            synthetic=synth,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    info = {
        "name": name,
        "data_dir": str(splits.root) if splits.root else None,
        "val_size": val_size,
        "split_seed": d.get("split_seed", getattr(args, "split_seed", 0)),
        "image_size": d.get("image_size", getattr(args, "image_size", None)),
        "synthetic": synth,
    }
    return splits, info


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature cache (the frozen backbone runs once per split)")
    g.add_argument(
        "--cache",
        choices=("memory", "disk"),
        default="memory",
        help="keep branch features in memory, or in RUN/cache/<split>.safetensors (memory-mapped, "
        "reused by calibrate/evaluate and by other runs given the same --cache-dir)",
    )
    g.add_argument(
        "--cache-dir",
        help="where disk caches live (default RUN/cache); share it between runs "
        "on the same backbone and data: files are reused only if they match",
    )
    g.add_argument(
        "--cache-dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="storage dtype of cached features (default float16; logits are always float32)",
    )
    g.add_argument("--feature-batch-size", type=int, default=256, help="images per backbone forward (default 256)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: GPU if available)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _cache(args, cfg_cache: dict | None, run: Path, backbone, dataset, split: str, device):
    import torch

    from .training import build_feature_cache

    c = cfg_cache or {
        "storage": args.cache,
        "dir": args.cache_dir,
        "dtype": args.cache_dtype,
        "batch_size": args.feature_batch_size,
        "workers": args.workers,
    }
    path = None
    if c["storage"] == "disk":
        path = Path(c["dir"] or run / "cache") / f"{split}.safetensors"
    log(f"features of the {split} split ({len(dataset)} images){' -> ' + str(path) if path else ''}")
    cache = build_feature_cache(
        backbone,
        dataset,
        batch_size=c["batch_size"],
        dtype=getattr(torch, c["dtype"]),
        device=device,
        storage=c["storage"],
        path=path,
        num_workers=c["workers"],
        progress=not _QUIET,
        desc=f"features {split}",
    )
    return cache, c


# --------------------------------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------------------------------


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frozen backbone")
    g.add_argument(
        "--backbone",
        default="cifar_resnet56",
        help="cifar_resnet<depth> (20, 32, 44, 56: the pretrained CIFAR-10 ResNets), resnet18 or "
        "resnet50 (default cifar_resnet56)",
    )
    g.add_argument(
        "--backbone-run",
        help="a directory written by `calexnet train-backbone` (sets --backbone, "
        "--stem, --checkpoint and the normalisation)",
    )
    g.add_argument("--checkpoint", help="backbone weights: an akamaster .th file, or a .safetensors state dict")
    g.add_argument(
        "--pretrained-dir",
        help="folder holding pretrained/akamaster_resnet_cifar10/resnet<depth>-*.th (default "
        "$CALEXNET_PRETRAINED, then $CALEXNET_DATA)",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="use a randomly initialised backbone (smoke tests only: its features are meaningless)",
    )
    g.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar", help="torchvision ResNets: the stem")
    g.add_argument(
        "--branch-points",
        nargs="+",
        help="where branches read features, e.g. layer1 layer2 or layer1.4 layer2.2 layer3.1 "
        "(default: the backbone's, layer1 layer2 for CIFAR ResNets)",
    )
    g.add_argument("--n-branches", type=int, help="instead of --branch-points: this many points at equal FLOPs")


def _backbone_spec(args, n_classes: int):
    from .training import BackboneSpec

    arch, ckpt, stem = args.backbone, args.checkpoint, args.stem
    mean = std = None
    if args.backbone_run:
        meta_path = Path(args.backbone_run) / "backbone.json"
        if not meta_path.is_file():
            raise SystemExit(
                f"error: --backbone-run {args.backbone_run}: no backbone.json there "
                "(expected a directory written by `calexnet train-backbone`)"
            )
        meta = json.loads(meta_path.read_text())
        arch, stem = meta["arch"], meta.get("stem", "cifar")
        ckpt = str(Path(args.backbone_run) / "backbone.safetensors")
        mean, std = tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"])
        if meta["n_classes"] != n_classes:
            raise SystemExit(
                f"error: the backbone in {args.backbone_run} has {meta['n_classes']} classes, "
                f"the dataset has {n_classes}"
            )
    elif ckpt is None and not args.random_init:
        from .training import _cifar_depth

        depth = _cifar_depth(arch)
        root = args.pretrained_dir or os.environ.get("CALEXNET_PRETRAINED") or os.environ.get("CALEXNET_DATA")
        if depth is None or root is None:
            raise SystemExit(
                f"error: no weights for --backbone {arch}: pass --checkpoint FILE, --backbone-run DIR (from "
                "`calexnet train-backbone`), --pretrained-dir DIR (CIFAR ResNets; or set "
                "CALEXNET_PRETRAINED / CALEXNET_DATA), or --random-init for a smoke test"
            )
        from .backbones import find_pretrained_cifar_checkpoint

        try:
            ckpt = str(find_pretrained_cifar_checkpoint(depth, root))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    kw = {}
    if mean is not None:
        kw = {"mean": mean, "std": std}
    try:
        return BackboneSpec(
            arch=arch,
            n_classes=n_classes,
            checkpoint=str(Path(ckpt).resolve()) if ckpt else None,
            stem=stem,
            branch_points=args.branch_points,
            n_branches=args.n_branches,
            input_size=args.image_size,
            **kw,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _build_backbone(spec):
    from .training import build_backbone

    try:
        return build_backbone(spec)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: backbone {spec.arch}: {e}") from None


def _normalization(spec):
    from .data import Normalization

    return Normalization(tuple(spec.mean), tuple(spec.std), "backbone")


# --------------------------------------------------------------------------------------------------
# train-backbone
# --------------------------------------------------------------------------------------------------


def _train_backbone_args(p: argparse.ArgumentParser) -> None:
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
    _add_data_args(p)
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
    _add_run_args(p)


def _train_backbone_run(args) -> int:
    from .data import normalization_for
    from .training import (
        BackboneTrainConfig,
        evaluate_classifier,
        save_state_file,
        seed_everything,
        train_backbone,
        trainable_backbone,
    )

    info = _setup(args)
    seed_everything(args.seed)
    out = Path(args.out)
    try:
        norm = normalization_for(args.arch, args.normalization)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    splits, dinfo = _load_data(args, norm)
    try:
        model = trainable_backbone(args.arch, splits.n_classes, args.stem)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
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
    device = _device(args)
    log(
        f"training {args.arch} ({args.stem} stem) on {dinfo['name']}: {len(splits.train)} train / "
        f"{len(splits.val)} val images, {args.epochs} epochs, device {device}, {info.world_size} process(es)"
    )
    if info.is_main:
        _write_json(
            out / "config.json",
            {
                "command": "train-backbone",
                "argv": sys.argv,
                "dataset": dinfo,
                "arch": args.arch,
                "stem": args.stem,
                "train": asdict(cfg),
                "normalization": norm.to_json(),
                "versions": _versions(),
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
        progress=not _QUIET,
        run_config={"arch": args.arch, "stem": args.stem, "dataset": dinfo["name"]},
    )
    if not info.is_main:
        return 0
    test_acc = evaluate_classifier(model, splits.test, device=device, num_workers=args.workers)
    val_acc = result.history[-1].get("val_accuracy") if result.history else None
    state = model.state_dict()
    meta = {
        "arch": args.arch,
        "stem": args.stem,
        "n_classes": splits.n_classes,
        "normalization": norm.to_json(),
        "dataset": dinfo,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "epochs": args.epochs,
        "seconds": time.time() - t0,
    }
    save_state_file(
        out / "backbone.safetensors",
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
        meta,
    )
    _write_json(out / "train_log.json", {"history": result.history})
    log(f"done: val accuracy {val_acc}, test accuracy {test_acc:.4f}; weights in {out / 'backbone.safetensors'}")
    return 0


register_command(
    "train-backbone",
    "train a torchvision ResNet (or CIFAR ResNet) backbone on a dataset",
    _train_backbone_args,
    _train_backbone_run,
    description="Train the backbone that branches will later be attached to (SGD with Nesterov momentum, "
    "per-step cosine schedule, random crop + flip). A checkpoint is written after every epoch; "
    "running the same command again resumes. The result, OUT/backbone.safetensors, is what "
    "`calexnet train --backbone-run OUT` freezes.",
    epilog="example: calexnet train-backbone --arch resnet18 --dataset cifar10 --data-dir ../shared/data/"
    "cifar10-jpeg --out runs/r18 --epochs 200\n"
    "multi-GPU: torchrun --nproc_per_node 4 --no-python calexnet train-backbone ...",
)


# --------------------------------------------------------------------------------------------------
# train (branches)
# --------------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    from .recipes import RECIPE_NAMES

    p.add_argument("--out", required=True, help="run directory (every artefact of the run goes there)")
    _add_data_args(p)
    p.add_argument(
        "--train-subset",
        type=int,
        help="train on a stratified subset of this many training images (quick CPU runs)",
    )
    _add_backbone_args(p)
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
    g.add_argument(
        "--aligned",
        dest="aligned",
        action="store_true",
        default=None,
        help="cascade-aligned calibration (survivors of earlier branches)",
    )
    g.add_argument("--no-aligned", dest="aligned", action="store_false", help="calibrate each branch on all samples")
    g.add_argument("--m-train", type=float, help="margin of the thresholds behind the training weights (0.2)")
    g.add_argument("--margin-mode", choices=("additive", "relative"), help="CPM bar Pr-m or (1-m)Pr")
    g.add_argument("--min-support", type=int, help="CPM minimum exiting set per class (20)")
    g.add_argument("--bar-from", choices=("subset", "full_validation"), help="where Pr_c is measured")
    g.add_argument("--head-dim", type=int, help="prototype head projection width D (128)")
    g.add_argument("--n-prototypes", type=int, help="prototype head K (32)")
    g = p.add_argument_group("optimisation of each head (on cached features)")
    g.add_argument("--epochs", type=int, default=30, help="per branch (default 30)")
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
    _add_cache_args(p)
    _add_run_args(p)


def _recipe_from_args(args):
    from .recipes import recipe

    fields = (
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
        "head_dim",
        "n_prototypes",
    )
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    try:
        return recipe(args.recipe, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _train_run(args) -> int:
    from .data import stratified_split
    from .recipes import save_heads, train_branches
    from .training import FitConfig, seed_everything

    info = _setup(args)
    seed_everything(args.seed)
    out = Path(args.out)
    splits, dinfo = _load_data(args)
    spec = _backbone_spec(args, splits.n_classes)
    splits = splits.with_normalization(_normalization(spec))
    bb = _build_backbone(spec)
    spec.branch_points, spec.n_branches = list(bb.branch_points), None
    if bb.n_classes != splits.n_classes:
        raise SystemExit(
            f"error: the backbone has {bb.n_classes} classes, dataset {dinfo['name']} has {splits.n_classes}"
        )
    rec = _recipe_from_args(args)
    try:
        fit_cfg = FitConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    train_set = splits.train
    if args.train_subset:
        if not 0 < args.train_subset < len(train_set):
            raise SystemExit(f"error: --train-subset: expected 1..{len(train_set) - 1}, got {args.train_subset}")
        _, idx = stratified_split(train_set.labels, args.train_subset, seed=args.split_seed)
        train_set = train_set.subset(idx)
        dinfo["train_subset"] = args.train_subset
    device = _device(args)
    log(
        f"recipe {rec.name} on {bb.name} (branch points {bb.branch_points}), {dinfo['name']}: "
        f"{len(train_set)} train / {len(splits.val)} val images, device {device}, "
        f"{info.world_size} process(es)"
    )
    cache_cfg = {
        "storage": args.cache,
        "dir": str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
        "dtype": args.cache_dtype,
        "batch_size": args.feature_batch_size,
        "workers": args.workers,
    }
    config = {
        "command": "train",
        "argv": sys.argv,
        "dataset": dinfo,
        "backbone": spec.to_json(),
        "recipe": rec.to_json(),
        "fit": asdict(fit_cfg),
        "cache": cache_cfg,
        "versions": _versions(),
    }
    if info.is_main:
        _write_json(out / "config.json", config)
    t0 = time.time()
    tr, _ = _cache(
        args,
        cache_cfg,
        out,
        bb,
        train_set,
        "train" if not args.train_subset else f"train_subset{args.train_subset}",
        device,
    )
    va, _ = _cache(args, cache_cfg, out, bb, splits.val, "val", device)
    t_cache = time.time() - t0
    compared = {"backbone": spec.to_json(), "dataset": {k: v for k, v in dinfo.items() if k != "data_dir"}}
    res = train_branches(
        tr,
        va,
        rec,
        fit_cfg,
        out_dir=out / "branches",
        resume=not args.no_resume,
        device=device,
        progress=not _QUIET,
        run_config=compared,
        compile_model=args.compile,
    )
    if info.is_main:
        save_heads(
            out / "heads.safetensors",
            res.heads,
            {
                "recipe": rec.to_json(),
                "backbone": spec.to_json(),
                "branch_points": list(bb.branch_points),
                "n_classes": bb.n_classes,
                "fit": asdict(fit_cfg),
            },
        )
        _write_json(
            out / "train_log.json",
            {
                "history": res.history,
                "weight_stats": res.weight_stats,
                "train_thresholds": res.train_thresholds.tolist() if res.train_thresholds is not None else None,
                "seconds": {"features": t_cache, "heads": time.time() - t0 - t_cache},
            },
        )
        log(
            f"done in {time.time() - t0:.0f}s; heads in {out / 'heads.safetensors'}; "
            f"next: calexnet calibrate --run {out}"
        )
    return 0


register_command(
    "train",
    "train early-exit branches on a frozen backbone with a recipe",
    _train_args,
    _train_run,
    description="Freeze a backbone, cache its branch-point features once, and train one prototype-pooling "
    "head per branch point, one after the other, with the chosen recipe. Re-running the same "
    "command resumes (finished branches are kept, an interrupted one continues from its last "
    "epoch).",
    epilog="example (pretrained CIFAR ResNet-56 on CIFAR-10 JPEG, 3 branches placed by FLOPs):\n"
    "  calexnet train --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg --backbone cifar_resnet56 "
    "--pretrained-dir ../shared/data --n-branches 3 --recipe calexnet --out runs/calexnet_s0\n"
    "then: calexnet calibrate --run runs/calexnet_s0 && calexnet evaluate --run runs/calexnet_s0\n"
    "several processes: torchrun --nproc_per_node 2 --no-python calexnet train ...",
)


# --------------------------------------------------------------------------------------------------
# calibrate and evaluate
# --------------------------------------------------------------------------------------------------


def _load_run(args, need_thresholds: bool = False):
    from .recipes import load_heads
    from .training import BackboneSpec

    run = Path(args.run)
    cfg = _read_run_config(run)
    if cfg.get("command") != "train":
        raise SystemExit(
            f"error: --run {run}: expected a branch-training run (calexnet train), got {cfg.get('command')!r}"
        )
    heads_path = run / "heads.safetensors"
    if not heads_path.is_file():
        raise SystemExit(f"error: --run {run}: no heads.safetensors; finish `calexnet train --out {run}` first")
    spec = BackboneSpec.from_json(cfg["backbone"])
    bb = _build_backbone(spec)
    heads, _ = load_heads(heads_path)
    dataset = dict(cfg["dataset"])
    if getattr(args, "data_dir", None):
        dataset["data_dir"] = args.data_dir
    splits, _ = _load_data(args, _normalization(spec), dataset)
    return run, cfg, bb, heads, splits


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `calexnet train`")
    p.add_argument("--margins", help="START:STOP:COUNT or a comma list (default 0:0.5:51)")
    p.add_argument("--margin", type=float, help="a single margin instead of a sweep")
    p.add_argument(
        "--aligned",
        dest="aligned",
        action="store_true",
        default=None,
        help="aligned calibration (default: as the run's recipe)",
    )
    p.add_argument("--no-aligned", dest="aligned", action="store_false", help="unaligned calibration")
    p.add_argument("--margin-mode", choices=("additive", "relative"), help="default: as the recipe")
    p.add_argument("--min-support", type=int, help="default: as the recipe (20)")
    p.add_argument("--bar-from", choices=("subset", "full_validation"), help="default: as the recipe")
    p.add_argument("--data-dir", help="dataset directory if it moved since training")
    _add_run_args(p)


def _calibrate_run(args) -> int:
    from .calibration import calibrate_sweep
    from .recipes import head_logits

    _setup(args)
    run, cfg, bb, heads, splits = _load_run(args)
    rec = cfg["recipe"]
    device = _device(args)
    va, _ = _cache(args, cfg["cache"], run, bb, splits.val, "val", device)
    zv = [head_logits(h, va, k, device=device) for k, h in enumerate(heads)]
    m = _margins(args.margins, args.margin)
    opts = {
        "aligned": rec["aligned"] if args.aligned is None else args.aligned,
        "margin_mode": args.margin_mode or rec["margin_mode"],
        "min_support": args.min_support or rec["min_support"],
        "bar_from": args.bar_from or rec["bar_from"],
    }
    t0 = time.time()
    sweep = calibrate_sweep(zv, va.logits_tensor(), va.labels_tensor(), m, **opts)
    sweep.config.update({"run": str(run), "n_val": len(va)})
    sweep.save(run / "thresholds.safetensors")
    finite = [float((sweep.thresholds[i].isfinite()).float().mean()) for i in range(len(m))]
    log(
        f"{len(m)} margins x {len(heads)} branches calibrated on {len(va)} validation samples in "
        f"{time.time() - t0:.2f}s ({'aligned' if opts['aligned'] else 'unaligned'}); classes that can exit: "
        f"{finite[0]:.0%} at m={float(m[0]):.3g} .. {finite[-1]:.0%} at m={float(m[-1]):.3g}"
    )
    log(f"thresholds in {run / 'thresholds.safetensors'}; next: calexnet evaluate --run {run}")
    return 0


register_command(
    "calibrate",
    "fit CPM exit thresholds on the validation split for a sweep of margins",
    _calibrate_args,
    _calibrate_run,
    description="Class Precision Margin calibration: for every branch and class, the lowest confidence at "
    "which the branch's exits are at least as precise as the backbone minus a margin m. Sweeping "
    "m traces the accuracy-FLOPs curve. Writes RUN/thresholds.safetensors (+ .json).",
)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `calexnet train` (after `calexnet calibrate`)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="default test")
    p.add_argument("--data-dir", help="dataset directory if it moved since training")
    _add_run_args(p)


def evaluate_points(branch_logits, backbone_logits, labels, thresholds, margins, profile) -> list[dict]:
    """Accuracy, FLOPs reduction and exit fractions of the cascade for each margin's thresholds.

    Args:
        branch_logits: [K, N, C]; backbone_logits: [N, C]; labels: [N].
        thresholds: [M, K, C]; margins: [M]; profile: a ``FlopsProfile``.
    """
    from .cascade import apply_exit_rule
    from .flops import exit_histogram

    k = branch_logits.shape[0]
    points = []
    for i in range(thresholds.shape[0]):
        out = apply_exit_rule(branch_logits, backbone_logits, thresholds[i])
        hist = exit_histogram(out.exit_index, k)
        points.append(
            {
                "margin": float(margins[i]),
                "accuracy": float((out.logits.argmax(1) == labels).float().mean()),
                "flops_reduction": float(profile.flops_reduction(hist)),
                "exit_fractions": (hist.double() / max(int(hist.sum()), 1)).tolist(),
            }
        )
    return points


def _evaluate_run(args) -> int:
    import torch

    from .calibration import CalibrationSweep
    from .flops import profile_flops
    from .recipes import head_logits

    _setup(args)
    run, cfg, bb, heads, splits = _load_run(args)
    thr_path = run / "thresholds.safetensors"
    if not thr_path.is_file():
        raise SystemExit(f"error: --run {run}: no thresholds.safetensors; run `calexnet calibrate --run {run}` first")
    try:
        sweep = CalibrationSweep.load(thr_path)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    device = _device(args)
    ds = splits.test if args.split == "test" else splits.val
    te, _ = _cache(args, cfg["cache"], run, bb, ds, args.split, device)
    zt = torch.stack([head_logits(h, te, k, device=device) for k, h in enumerate(heads)])
    zb, y = te.logits_tensor(), te.labels_tensor()
    profile = profile_flops(bb, heads)
    points = evaluate_points(zt, zb, y, sweep.thresholds, sweep.margins, profile)
    bb_acc = float((zb.argmax(1) == y).float().mean())
    results = {
        "run": str(run),
        "split": args.split,
        "n": len(te),
        "recipe": cfg["recipe"]["name"],
        "seed": cfg["fit"]["seed"],
        "backbone": cfg["backbone"],
        "backbone_accuracy": bb_acc,
        "flops": {
            "segments": list(profile.segment_flops),
            "heads": list(profile.head_flops),
            "backbone": profile.backbone_flops,
        },
        "calibration": sweep.config,
        "points": points,
    }
    _write_json(run / "results.json", results)
    if not _QUIET:
        print(
            f"backbone accuracy {bb_acc:.4f} ({profile.backbone_flops / 1e6:.1f} MFLOPs/sample); "
            f"{cfg['recipe']['name']} on the {args.split} split:"
        )
        print(f"{'margin':>8} {'accuracy':>9} {'FLOPs red.':>10}  exits (branches 1..K, backbone)")
        for p in points:
            ex = " ".join(f"{v:.2f}" for v in p["exit_fractions"])
            print(f"{p['margin']:8.3f} {p['accuracy']:9.4f} {p['flops_reduction']:10.1%}  {ex}")
    log(f"results in {run / 'results.json'}")
    return 0


register_command(
    "evaluate",
    "accuracy and FLOPs reduction of the calibrated cascade on the test split",
    _evaluate_args,
    _evaluate_run,
    description="Apply every calibrated threshold set to the test split (thresholds come from validation "
    "only) and report accuracy, FLOPs reduction (FlopCounterMode counts; a failed head is still "
    "paid for) and where samples exit. Writes RUN/results.json.",
)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``calexnet`` argument parser with every registered subcommand."""
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="calexnet",
        description="Early-exit branches on frozen CNN backbones: train (CalexNet and the reference "
        "recipes), calibrate (CPM), evaluate (accuracy vs FLOPs). Typical order: train-backbone (optional) "
        "-> train -> calibrate -> evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, c in COMMANDS.items():
        sp = sub.add_parser(
            name,
            help=c.help,
            description=c.description or c.help,
            epilog=c.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.add_arguments(sp)
        sp.set_defaults(_run=c.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``calexnet`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        status = args._run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
