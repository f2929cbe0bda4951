"""``calexnet predict``: a calibrated run's cascade over a folder of images, streaming; predictions and exits."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..backbones import inference_form
from ..cascades import Cascade, StreamingCascade
from ..data import IMAGE_EXTENSIONS, PRELOAD_MAX_SIDE, ImageDataset
from ..data.images import open_rgb
from ..evaluation.measure_session import DTYPES
from ..io import write_json, write_text
from ..normalization import Normalization
from ..run import Run
from .common import add_execution_args, device_of, log, setup

NAME = "predict"
HELP = "run a calibrated cascade over a folder of images (streaming) and write predictions and exits"
DESCRIPTION = (
    "Classify every image under IMAGES (searched recursively, in sorted path order) with the run's cascade at "
    "one calibrated margin, in streaming mode: survivors are re-batched across input batches so every stage "
    "runs on full stage batches. Images are prepared as the run's test images were: small ones (sides up to "
    f"{PRELOAD_MAX_SIDE}) resized to the backbone's input size, larger ones resized and centre-cropped to it; "
    "then the backbone's normalisation. Writes one row per image: path (relative to IMAGES), predicted class "
    "index, exit (k for branch k, K + 1 for the backbone) and confidence (max softmax); CSV, or JSON with a "
    "summary when OUT ends in .json."
)
EPILOG = "example: calexnet predict --run runs/r56 --images photos/ --out predictions.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory of `calexnet train` (after `calexnet calibrate`)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="where to write the predictions: .csv, or .json (with a summary)")
    p.add_argument("--margin", type=float, default=0.2, help="CPM margin of the thresholds (default 0.2)")
    g = p.add_argument_group("streaming")
    g.add_argument("--batch-size", type=int, default=64, help="images per input batch (default 64)")
    g.add_argument("--stage-batch", type=int, help="rows per stage run (default: --batch-size)")
    g.add_argument(
        "--max-wait", type=int, help="latency cap: input batches an image may wait for its stage batches (default none)"
    )
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    g.add_argument("--channels-last", action="store_true", help="channels_last inputs and stages")
    g.add_argument("--compile", action="store_true", help="torch.compile every stage with its branch")
    g.add_argument(
        "--no-fold",
        action="store_true",
        help="run the stages as trained (default: their inference form, BatchNorm folded into the convolutions)",
    )
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    add_execution_args(p)


class _Images(Dataset):
    """Image files prepared as the run's test images: (pixels normalised [3, S, S], index)."""

    def __init__(self, paths: list[str], normalization: Normalization, image_size: int) -> None:
        labels = torch.zeros(len(paths), dtype=torch.int64)
        self.files = ImageDataset(labels, ["?"], paths=paths, normalization=normalization, image_size=image_size)
        self.normalization, self.image_size = normalization, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        path = self.files.paths[i]
        with Image.open(path) as im:  # reads the header only
            small = max(im.size) <= PRELOAD_MAX_SIDE
        if not small:
            return self.files[i][0]  # resized and centre-cropped, as lazily read test images are
        pixels = pil_to_tensor(open_rgb(path))[None]
        labels = torch.zeros(1, dtype=torch.int64)
        one = ImageDataset(labels, ["?"], images=pixels, normalization=self.normalization, image_size=self.image_size)
        return one[0][0]  # resized to the input size if it differs, as decoded test images are


def image_paths(folder: Path) -> list[str]:
    """Every image file under ``folder``, sorted."""
    if not folder.is_dir():
        raise ValueError(f"--images: expected a folder of images, {folder} is not a directory")
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths


def run(args: argparse.Namespace) -> int:
    setup(args)
    for name in ("batch_size", "stage_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out: expected a .csv or .json file name, got {out}")
    device, dtype = device_of(args), DTYPES[args.dtype]
    folder = Path(args.images)
    paths = image_paths(folder)
    run_dir = Run(args.run)
    backbone, heads, thresholds = run_dir.cascade_parts(args.margin)
    cascade = Cascade(backbone, list(heads), thresholds).to(device).eval()
    if not args.no_fold:
        cascade = inference_form(cascade)
    cascade = cascade.to(dtype)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        cascade = cascade.to(memory_format=layout)
    images = _Images(paths, run_dir.normalization(), backbone.input_size[0])
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    streaming = StreamingCascade(
        cascade, stage_batch=args.stage_batch or args.batch_size, max_wait=args.max_wait, compile=args.compile
    )
    batches = (x.to(device, dtype, non_blocking=True).contiguous(memory_format=layout) for x in loader)
    log.info(f"{len(paths)} images under {folder}; run {run_dir.path} at margin {args.margin}, on {device}")
    preds, exits, confs = [], [], []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="img", desc="predict", disable=args.quiet) as bar:
        for output in streaming.stream(batches):
            probs = torch.softmax(output.logits.float(), dim=1)
            conf, pred = probs.max(dim=1)
            preds.append(pred)
            exits.append(output.exit_index)
            confs.append(conf)
            bar.update(output.exit_index.shape[0])
    pred, exit_index, conf = (torch.cat(t).cpu() for t in (preds, exits, confs))
    seconds = time.perf_counter() - start
    names = [str(Path(p).relative_to(folder)) for p in paths]
    counts = torch.bincount(exit_index, minlength=cascade.n_branches + 2)[1:].tolist()
    if out.suffix.lower() == ".json":
        write_json(
            out,
            {
                "run": str(run_dir.path),
                "images": str(folder),
                "margin": args.margin,
                "n": len(paths),
                "exit_counts": counts,
                "seconds": seconds,
                "predictions": [
                    {"path": n, "prediction": int(p), "exit": int(e), "confidence": float(c)}
                    for n, p, e, c in zip(names, pred, exit_index, conf)
                ],
            },
        )
    else:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "prediction", "exit", "confidence"])
        for n, p, e, c in zip(names, pred.tolist(), exit_index.tolist(), conf.tolist()):
            writer.writerow([n, p, e, f"{c:.6f}"])
        write_text(out, text.getvalue())
    log.info(
        f"{len(paths)} images in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} images/s); exits per "
        f"branch 1..K and backbone: {counts}; predictions in {out}"
    )
    return 0
