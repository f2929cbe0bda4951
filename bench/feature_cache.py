"""Per-epoch time of training branch heads from the feature cache vs recomputing the frozen backbone.

    python bench/feature_cache.py [--data-root ../shared/data] [--depth 56] [--n-branches 3] [--n 2000]
                                  [--repeat 2] [--threads N] [--json PATH]

Both paths run the same loop (``calexnet_fast.training.fit``), the same CalexNet head and loss and the same
batches; the only difference is where the branch features come from: the cache (fp16 rows gathered and
upcast) or a forward pass of the frozen backbone up to the branch point for every batch of every epoch.
The one-off cost of building the cache is reported separately. Without the pretrained checkpoint or the
CIFAR-10 JPEG folder it falls back to a random-init ResNet and synthetic images (same shapes, same cost).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from calexnet_fast import backbones, data, io, recipes, training
from calexnet_fast.distributed import default_device
from calexnet_fast.features import build_feature_cache

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class RecomputeSource(training.BatchSource):
    """Batches whose branch features come from running the frozen backbone on the images each time."""

    def __init__(self, backbone, images: torch.Tensor, labels: torch.Tensor, branch: int) -> None:
        self.backbone, self.images, self.labels, self.branch = backbone, images, labels, branch

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order, batch_size, device):
        stages = self.backbone.stages
        for idx in training.split_batches(order, batch_size):
            with torch.no_grad():
                h = self.images[idx].to(device)
                for s in range(self.branch + 1):
                    h = stages[s](h)
                # the KD target needs the backbone logits too: finish the pass
                z = h
                for s in range(self.branch + 1, len(stages)):
                    z = stages[s](z)
            feats = [None] * self.backbone.n_branches
            feats[self.branch] = h
            yield training.CachedBatch(feats, z.float(), self.labels[idx].to(device), None, idx.to(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--depth", type=int, default=56)
    p.add_argument(
        "--backbone",
        default="cifar_resnet",
        choices=("cifar_resnet", "resnet18"),
        help="cifar_resnet (pretrained ResNet-<depth> when found) or resnet18 (CIFAR stem, random "
        "weights: the timing does not depend on them)",
    )
    p.add_argument("--disk", help="also time epochs from a memory-mapped disk cache written to this file")
    p.add_argument("--n-branches", type=int, default=3)
    p.add_argument("--n", type=int, default=2000, help="training images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="epochs timed per path (the minimum is reported)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the head in both paths")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else default_device()
    root = Path(a.data_root)
    try:
        ckpt = backbones.find_pretrained_cifar_checkpoint(a.depth, root)
        splits = data.load_dataset("cifar10", root / "cifar10-jpeg")
        source = f"pretrained ResNet-{a.depth}, cifar10-jpeg"
    except ValueError as e:
        print(f"(real data unavailable: {e}; using random weights and synthetic images)")
        ckpt = None
        splits = data.synthetic_dataset(a.n, 16, 16, n_classes=10, image_size=32)
        source = f"random ResNet-{a.depth}, synthetic"
    if a.backbone == "resnet18":
        bb = backbones.resnet18(10, stem="cifar", placement="flops", n_branches=a.n_branches).to(device)
        source = source.replace(f"pretrained ResNet-{a.depth}", "random ResNet-18 (CIFAR stem)")
    else:
        bb = backbones.cifar_resnet(a.depth, checkpoint=ckpt, placement="flops", n_branches=a.n_branches).to(device)
    _, idx = data.stratified_split(splits.train.labels, a.n, seed=0) if a.n < len(splits.train) else (None, None)
    ds = splits.train.subset(idx) if idx is not None else splits.train
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = ds.labels.clone()

    t0 = time.perf_counter()
    cache = build_feature_cache(bb, ds, batch_size=a.batch_size, device=device, progress=False)
    t_cache = time.perf_counter() - t0
    disk = None
    if a.disk:
        disk = build_feature_cache(
            bb, ds, batch_size=a.batch_size, device=device, progress=False, storage="disk", path=a.disk
        )
    rec = recipes.recipe("calexnet")
    # with --compile the first timed epoch of each path pays the compile; the minimum is reported
    cfg = training.FitConfig(epochs=1, batch_size=a.batch_size, lr=1e-3)
    rows = []
    print(
        f"{source}; branch points {bb.branch_points}; {len(ds)} images; device {device}; "
        f"{torch.get_num_threads()} threads"
    )
    print(f"building the cache (one backbone pass, all branches): {t_cache:.2f}s")
    for k in range(bb.n_branches):
        paths = ("cache", "recompute") + (("disk",) if disk is not None else ())
        times = {name: [] for name in paths}
        for _ in range(a.repeat):
            for name in paths:
                head = recipes.make_head(bb.branch_channels[k], bb.n_classes, rec, seed=0).to(device)
                if name == "recompute":
                    src = RecomputeSource(bb, images, labels, k)
                else:
                    src = training.CacheSource(cache if name == "cache" else disk, branches=[k])
                t = time.perf_counter()
                training.fit(
                    head,
                    src,
                    lambda m, b, _k=k: recipes.branch_loss(m(b.features[_k]), b, rec),
                    cfg,
                    device=device,
                    progress=False,
                    compile_model=a.compile,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
        c, r = min(times["cache"]), min(times["recompute"])
        row = {"branch": k + 1, "cache_s": c, "recompute_s": r, "speedup": r / c}
        extra = ""
        if disk is not None:
            row["disk_s"] = min(times["disk"])
            extra = f"; from the disk cache {row['disk_s']:.2f}s -> {r / row['disk_s']:.1f}x"
        rows.append(row)
        print(f"branch {k + 1}: epoch from cache {c:.2f}s, recomputing the backbone {r:.2f}s -> {r / c:.1f}x{extra}")
    tc, tr = sum(r["cache_s"] for r in rows), sum(r["recompute_s"] for r in rows)
    print(
        f"all {bb.n_branches} heads, one epoch each: cache {tc:.2f}s, recompute {tr:.2f}s -> {tr / tc:.1f}x "
        f"(cache built once in {t_cache:.2f}s)"
    )
    if a.json:
        io.write_json(
            a.json,
            {
                "source": source,
                "n": len(ds),
                "device": str(device),
                "threads": torch.get_num_threads(),
                "cache_build_s": t_cache,
                "branches": rows,
                "total_speedup": tr / tc,
            },
        )


if __name__ == "__main__":
    main()
