"""What the commands share: progress lines, execution set-up, the argument groups for data, backbone, feature
cache and execution, and turning those arguments into the library's records."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..data import DATASETS
from ..distributed import DistInfo, default_device, init_distributed
from ..evaluation import parse_margins
from ..run import CacheConfig, Run, SplitLogits, backbone_spec, dataset_record

__all__ = [
    "add_backbone_args",
    "add_cache_args",
    "add_data_args",
    "add_execution_args",
    "cache_of",
    "dataset_of",
    "device_of",
    "log",
    "margins_of",
    "setup",
    "spec_of",
    "split_logits",
]

log = logging.getLogger("calexnet_fast.cli")


class _StderrLines(logging.Handler):
    """``[calexnet] message`` lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"[calexnet] {record.getMessage()}", file=sys.stderr, flush=True)


def setup(args: argparse.Namespace) -> DistInfo:
    """Threads, the ``torchrun`` process group, and progress lines (rank 0 only, none with ``--quiet``)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    info = init_distributed()
    package = logging.getLogger("calexnet_fast")
    for h in [h for h in package.handlers if isinstance(h, _StderrLines)]:
        package.removeHandler(h)
    if not getattr(args, "quiet", False) and info.is_main:
        package.addHandler(_StderrLines())
    package.setLevel(logging.INFO)
    return info


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, or the GPU if there is one."""
    return torch.device(args.device) if getattr(args, "device", None) else default_device()


def margins_of(text: str | None, single: float | None = None) -> torch.Tensor:
    """``--margins`` (``START:STOP:COUNT`` or a comma list; default ``0:0.5:51``) or ``--margin``, as float64."""
    if single is not None:
        return torch.tensor([single], dtype=torch.float64)
    return parse_margins(text or "0:0.5:51")


# --------------------------------------------------------------------------------------------------
# argument groups
# --------------------------------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (nothing is downloaded)")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        required=True,
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


def add_backbone_args(p: argparse.ArgumentParser) -> None:
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


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature cache (the frozen backbone runs once per split)")
    g.add_argument(
        "--cache",
        choices=("memory", "disk"),
        default="memory",
        help="keep branch features in memory, or in RUN/cache/<split>.safetensors (memory-mapped, "
        "reused by later commands and by other runs given the same --cache-dir)",
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


def add_execution_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: GPU if available)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


# --------------------------------------------------------------------------------------------------
# arguments -> library records
# --------------------------------------------------------------------------------------------------


def dataset_of(args: argparse.Namespace) -> dict:
    """The run's ``dataset`` record from the data arguments."""
    return dataset_record(
        args.dataset,
        args.data_dir,
        val_size=args.val_size,
        split_seed=args.split_seed,
        image_size=args.image_size,
        synthetic_size=args.synthetic_size,
        synthetic_classes=args.synthetic_classes,
    )


def spec_of(args: argparse.Namespace, n_classes: int):
    """The ``BackboneSpec`` of the backbone arguments."""
    return backbone_spec(
        args.backbone,
        n_classes,
        checkpoint=args.checkpoint,
        backbone_run=args.backbone_run,
        pretrained_dir=args.pretrained_dir,
        random_init=args.random_init,
        stem=args.stem,
        branch_points=args.branch_points,
        n_branches=args.n_branches,
        input_size=args.image_size,
    )


def cache_of(args: argparse.Namespace) -> CacheConfig:
    """The feature-cache options."""
    return CacheConfig(args.cache, args.cache_dir, args.cache_dtype, args.feature_batch_size, args.workers)


def split_logits(run: Run, split: str, args: argparse.Namespace) -> SplitLogits:
    """The logits of a run's split: from the run, or computed once (the backbone runs over the split) and kept."""
    from ..recipes import head_logits

    logits = run.load_logits(split)
    if logits is not None:
        return logits
    log.info(
        "no %s logits in %s for its heads: computing them once (the backbone runs over the split)", split, run.path
    )
    config = run.config()
    heads, _ = run.load_heads()
    splits = run.load_data(getattr(args, "data_dir", None))
    dataset = splits.test if split == "test" else splits.val
    device = device_of(args)
    cache = CacheConfig.from_json(config.get("cache")).build(
        run.load_backbone(), dataset, split, run.path, device=device, progress=not args.quiet
    )
    z = torch.stack([head_logits(h, cache, k, device=device) for k, h in enumerate(heads)])
    logits = SplitLogits(z.cpu(), cache.logits_tensor(), cache.labels_tensor())
    run.save_logits(split, logits)
    return logits
