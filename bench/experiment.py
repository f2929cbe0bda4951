"""The real experiment of docs/results.md: frozen pretrained CIFAR ResNet-56 on CIFAR-10 (JPEG), CPU.

Step 1 (``extract``): compute the frozen backbone's branch-point features (fp16) and logits (fp32) ONCE for
the validation split, the test split and a stratified training subset, and cache them on disk (outside the
repository). Step 2 (``run``): train and evaluate every method x seed from that cache with
``calexnet_fast.evaluation`` and write the JSON, the figure and the table.

    python bench/experiment.py extract --cache /work/cache/r56_cifar10jpeg
    python bench/experiment.py run --cache /work/cache/r56_cifar10jpeg --out docs/results

Each split is written as ``<cache>/<split>.safetensors`` with tensors ``f1 .. fK`` [N, C_k, H_k, W_k] fp16,
``logits`` [N, n_classes] fp32, ``labels`` [N] int64 and ``index`` [N] int64 (position in the split), and a
``meta.json`` with the backbone, branch points, split sizes and seeds. Existing split files are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _backbone(data_root: Path, depth: int, n_branches: int):
    from calexnet_fast import backbones

    ckpt = backbones.find_pretrained_cifar_checkpoint(depth, data_root)
    return backbones.cifar_resnet(depth, checkpoint=ckpt, placement="flops", n_branches=n_branches)


def extract(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from calexnet_fast import data

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = data.load_dataset(
        "cifar10", Path(args.data_root) / "cifar10-jpeg", val_size=args.val_size, split_seed=args.split_seed
    )
    print(f"loaded data in {time.time() - t0:.1f}s: {splits.describe()['sizes']}", flush=True)
    bb = _backbone(Path(args.data_root), args.depth, args.n_branches).to(memory_format=torch.channels_last)
    _, train_sub = data.stratified_split(splits.train.labels, args.train_size, seed=args.subset_seed)
    plan = [("val", splits.val, None), ("test", splits.test, None), ("train", splits.train, train_sub)]
    meta = {
        "backbone": f"cifar_resnet{args.depth}",
        "branch_points": bb.branch_points,
        "branch_shapes": bb.branch_shapes,
        "dataset": "cifar10",
        "data_dir": str(Path(args.data_root) / "cifar10-jpeg"),
        "val_size": args.val_size,
        "split_seed": args.split_seed,
        "train_subset": args.train_size,
        "subset_seed": args.subset_seed,
        "dtype_features": "float16",
        "sizes": {},
        "seconds": {},
    }
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        meta["sizes"].update(old.get("sizes", {}))
        meta["seconds"].update(old.get("seconds", {}))
    for name, ds, idx in plan:
        path = cache / f"{name}.safetensors"
        if path.is_file():
            print(f"{path} exists, kept", flush=True)
            continue
        idx = torch.arange(len(ds)) if idx is None else idx
        feats = [[] for _ in range(bb.n_branches)]
        logits = []
        t1 = time.time()
        with torch.inference_mode():
            for s in tqdm(range(0, len(idx), args.batch_size), desc=f"extract {name}", mininterval=10):
                rows = idx[s : s + args.batch_size]
                x = torch.stack([ds[int(i)][0] for i in rows]).to(memory_format=torch.channels_last)
                fs, z = bb.features(x)
                for k, f in enumerate(fs):
                    feats[k].append(f.to(torch.float16).contiguous())
                logits.append(z.float())
        tensors = {f"f{k + 1}": torch.cat(feats[k]) for k in range(bb.n_branches)}
        tensors["logits"] = torch.cat(logits)
        tensors["labels"] = ds.labels[idx].clone()
        tensors["index"] = idx.clone()
        save_file(tensors, str(path))
        meta["sizes"][name] = len(idx)
        meta["seconds"][name] = round(time.time() - t1, 1)
        acc = float((tensors["logits"].argmax(1) == tensors["labels"]).float().mean())
        meta.setdefault("backbone_accuracy", {})[name] = acc
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: {len(idx)} samples in {time.time() - t1:.0f}s, backbone acc {acc:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="cache branch features + backbone logits once")
    e.add_argument("--cache", required=True, help="cache directory (outside the repository)")
    e.add_argument("--data-root", default=os.environ.get("CALEXNET_DATA", str(DEFAULT_DATA)))
    e.add_argument("--depth", type=int, default=56)
    e.add_argument("--n-branches", type=int, default=3)
    e.add_argument("--val-size", type=int, default=5000)
    e.add_argument("--split-seed", type=int, default=0)
    e.add_argument("--train-size", type=int, default=10000, help="stratified training subset to cache")
    e.add_argument("--subset-seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd == "extract":
        extract(args)


if __name__ == "__main__":
    sys.exit(main())
