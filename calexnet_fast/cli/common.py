"""What the commands share: progress lines, execution set-up, and the argument groups for data, backbone,
feature cache and execution. Their options keep the names the library reads them by
(``calexnet_fast.run.data_and_backbone``, ``calexnet_fast.run.CacheConfig.of_options``)."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..calibration import BAR_SOURCES, MARGIN_MODES
from ..data import DATASETS
from ..distributed import DistInfo, default_device, init_distributed
from ..evaluation import parse_margins

__all__ = [
    "add_backbone_args",
    "add_cache_args",
    "add_calibration_args",
    "add_data_args",
    "add_execution_args",
    "device_of",
    "log",
    "margins_of",
    "setup",
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
        help="validation images carved out of train when the dataset has no valid split: a count, "
        "or a fraction < 1 (default 5000, or 20%% of the training split when it has fewer than 25,000 images)",
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
    g = p.add_argument_group("frozen backbone (any classifier: built-in, torchvision, timm, or your own file)")
    g.add_argument(
        "--backbone",
        default="cifar_resnet56",
        help="cifar_resnet<depth> (20, 32, 44, 56: the pretrained CIFAR-10 ResNets; cifar_resnet<depth>_b: "
        "option-B 1x1 conv shortcuts), resnet18 or resnet50; or any model: torchvision:<name> (e.g. "
        "torchvision:mobilenet_v3_small), timm:<name> (needs timm), path/to/file.py:factory (a function "
        "returning the nn.Module; called with n_classes= or num_classes= if it takes one). Default cifar_resnet56",
    )
    g.add_argument(
        "--backbone-run",
        help="a directory written by `calexnet train-backbone` (sets --backbone, "
        "--stem, --checkpoint and the normalisation)",
    )
    g.add_argument(
        "--checkpoint",
        help="backbone weights: a state dict in a .safetensors file or a torch.save file (read with "
        "weights_only=True; 'module.'/'model.' prefixes and {'state_dict': ...} wrappers are handled)",
    )
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
    g.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar", help="resnet18/resnet50: the stem")
    g.add_argument(
        "--branch-points",
        nargs="+",
        help="module names after which branches read features, e.g. layer1 layer2, layer1.4 layer2.2 layer3.1, "
        "features.4 features.9 (default: the backbone's, layer1 layer2 for CIFAR ResNets; 3 placed by FLOPs "
        "for other models). A wrong name lists the valid ones",
    )
    g.add_argument("--n-branches", type=int, help="instead of --branch-points: this many points at equal FLOPs")
    g.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="per-channel input mean the backbone was trained with (default: the model's own, e.g. timm's; "
        "else ImageNet's 0.485 0.456 0.406); recorded in the run",
    )
    g.add_argument(
        "--std", type=float, nargs="+", help="per-channel input std, as --mean (ImageNet: 0.229 0.224 0.225)"
    )
    g.add_argument(
        "--class-map",
        help="when the backbone's classes are finer than the labels: 'dataset' (the dataset's own fine -> label "
        "map, e.g. CIFAR-100 fine -> coarse) or a JSON file with one label per backbone class; a label's "
        "probability is the sum over its classes",
    )


def add_patience_arg(g) -> None:
    """``--patience``: early stopping of each head on its validation loss (``FitConfig.patience``)."""
    g.add_argument(
        "--patience",
        type=int,
        default=0,
        help="early stopping: stop a head when its validation loss has not improved for this many epochs and "
        "keep its best epoch (default 0: off)",
    )


def add_calibration_args(g, default: str) -> None:
    """The CPM calibration options on the parser or group ``g``; each is ``None`` unless given, and then
    ``default`` holds (its words end each help line)."""
    d = f" (default: {default})"
    g.add_argument(
        "--aligned",
        dest="aligned",
        action="store_true",
        default=None,
        help="cascade-aligned calibration (survivors of earlier branches)" + d,
    )
    g.add_argument("--no-aligned", dest="aligned", action="store_false", help="calibrate each branch on all samples")
    g.add_argument("--margin-mode", choices=MARGIN_MODES, help="CPM bar Pr-m or (1-m)Pr" + d)
    g.add_argument("--min-support", type=int, help="CPM minimum exiting set per class" + d)
    g.add_argument("--bar-from", choices=BAR_SOURCES, help="where Pr_c is measured" + d)


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
