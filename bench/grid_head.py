"""CPU cost of the grid prototype-pooling head (``GridPrototypeHead``) against the frozen CIFAR ResNet-56.

    python bench/grid_head.py [--batch 64] [--repeats 20] [--threads 1] [--contiguous] [--json PATH]

At the three default branch points (``cifar_resnet(56, placement="flops", n_branches=3)``: layer1.6,
layer2.3, layer3.1; random weights, only the shapes matter) it reports, per branch, the FLOPs of the
default grid head and of today's ``PrototypePoolingHead`` (D = 128, K = 32) as a share of the backbone's,
and the median CPU time of each head's folded form on a batch of branch features next to the time of
the whole backbone in its inference form (BatchNorm folded), in interleaved rounds; channels_last as
``calexnet measure`` runs by default (``--contiguous``: NCHW). The issue's bar:
at most 0.5 % of the backbone's FLOPs and 1 % of its time per head.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from calexnet_fast.backbones import cifar_resnet  # noqa: E402
from calexnet_fast.backbones.inference import fold_batchnorm  # noqa: E402
from calexnet_fast.evaluation.timing import environment, interleaved_medians  # noqa: E402
from calexnet_fast.flops import head_flops, segment_flops  # noqa: E402
from calexnet_fast.heads import GridPrototypeHead, PrototypePoolingHead  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bb = cifar_resnet(56, placement="flops", n_branches=3).eval()
    backbone_flops = sum(segment_flops(bb))
    heads = {
        "grid": [GridPrototypeHead(c, 10).eval() for c in bb.branch_channels],
        "prototype": [PrototypePoolingHead(c, 10).eval() for c in bb.branch_channels],
    }
    flops = {name: head_flops(hs, bb) for name, hs in heads.items()}
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    folded_bb = fold_batchnorm(bb).to(memory_format=fmt)
    with torch.inference_mode():
        feats, _ = folded_bb.features(x)
        fns = {"backbone": lambda: folded_bb(x)}
        for name, hs in heads.items():
            for k, (h, f) in enumerate(zip(hs, feats, strict=True)):
                fns[f"{name}.{k + 1}"] = partial(h.fold(), f)
        times = interleaved_medians(fns, torch.device("cpu"), repeats=args.repeats)
    rows = []
    layout = "NCHW" if args.contiguous else "channels_last"
    print(
        f"backbone: {backbone_flops / 1e6:.1f} MFLOPs/sample, {times['backbone'] * 1e3:.2f} ms/batch {args.batch} "
        f"({layout}, {torch.get_num_threads()} thread(s))"
    )
    print(f"{'head':<12}{'branch':<10}{'MFLOPs':>8}{'% FLOPs':>9}{'ms':>8}{'% time':>8}")
    for name, hs in heads.items():
        for k in range(len(hs)):
            t = times[f"{name}.{k + 1}"]
            row = {
                "head": name,
                "branch": bb.branch_points[k],
                "flops": flops[name][k],
                "flops_pct": 100 * flops[name][k] / backbone_flops,
                "seconds": t,
                "time_pct": 100 * t / times["backbone"],
            }
            rows.append(row)
            print(
                f"{name:<12}{row['branch']:<10}{row['flops'] / 1e6:>8.3f}{row['flops_pct']:>9.3f}"
                f"{t * 1e3:>8.3f}{row['time_pct']:>8.2f}"
            )
    payload = {
        "batch": args.batch,
        "channels_last": not args.contiguous,
        "backbone_flops": backbone_flops,
        "backbone_seconds": times["backbone"],
        "heads": rows,
        "environment": environment(torch.device("cpu")),
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
