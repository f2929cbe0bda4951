"""The main job: end-to-end cascade throughput against the backbone, plus the kernel micro-benchmarks.

    python bench/throughput.py [--quick] [--device cpu|cuda] [--model resnet18,resnet50] [--resolution R]
                               [--batch-size B] [--dtype float32|bfloat16|float16] [--json PATH] [--plot PATH]

Runs on a fresh machine with no data and no GPU: the backbones are torchvision ResNet-18 / ResNet-50
(random weights, ImageNet stem) with three prototype-pooling heads at layer1..layer3 (random weights), and
the thresholds are set to give controlled exit profiles: every branch lets the same fraction q of its
survivors exit, with q found by bisection so that the cascade's FLOPs reduction r (per-sample FLOPs from
``calexnet_fast.flops``, a failed head still paid for) hits each target. Thresholds are fit on the
benchmark batch itself, and the reduction reported is the one realised on it.

For each model and profile: images/s of the full backbone, of ``ReferenceCascade`` (plain PyTorch) and of
``calexnet_fast.Cascade``, measured in interleaved rounds (median), the FLOPs reduction r, the ideal speedup
1 / (1 - r) and achieved / ideal. Then the kernel micro-benchmarks (bench/compact.py, bench/heads.py) in
quick mode. ``--soak N`` also runs N consecutive batches of random sizes (0 and 1 included) and random exit
patterns through ``Cascade`` and reports the peak memory. Results: a table on stdout, JSON (``--json``) and
a plot (``--plot``, PNG).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compact as compact_bench  # noqa: E402
import heads as heads_bench  # noqa: E402
from common import environment, interleaved_medians, write_json  # noqa: E402

from calexnet_fast import Cascade, ReferenceCascade, backbones  # noqa: E402
from calexnet_fast.flops import exit_histogram, flops_reduction, profile_flops  # noqa: E402
from calexnet_fast.heads import PrototypePoolingHead  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(model: str, resolution: int, n_classes: int, seed: int) -> tuple[ReferenceCascade, object]:
    """A frozen staged torchvision ResNet with three random prototype-pooling heads, and its FLOPs profile."""
    torch.manual_seed(seed)
    backbone = getattr(backbones, model)(n_classes, input_size=resolution)
    heads = [PrototypePoolingHead(c, n_classes).eval() for c in backbone.branch_channels]
    return ReferenceCascade(backbone, heads), profile_flops(backbone, heads, resolution)


def thresholds_for_fraction(conf: torch.Tensor, q: float, n_classes: int) -> torch.Tensor:
    """[K, C] thresholds under which each branch lets a fraction ``q`` of its survivors exit.

    Args:
        conf: [K, B] max-softmax confidence of every branch on every sample.
    """
    k_branches, batch = conf.shape
    thr = torch.full((k_branches, n_classes), float("inf"))
    alive = torch.ones(batch, dtype=torch.bool)
    for k in range(k_branches):
        c = conf[k][alive]
        n_exit = int(round(q * c.numel()))
        if n_exit > 0:
            ranked = torch.sort(c, descending=True).values
            # midway between the last sample in and the first one out: no sample sits on the threshold,
            # so the folded (Cascade) and unfolded (reference) heads make the same decisions
            t = (ranked[n_exit - 1] + ranked[n_exit]) / 2 if n_exit < c.numel() else ranked[-1] - 1e-4
            thr[k] = t
            alive &= ~(conf[k] >= t)
    return thr


def profile_thresholds(ref: ReferenceCascade, profile, x: torch.Tensor, target: float) -> torch.Tensor:
    """Thresholds whose FLOPs reduction on ``x`` is as close to ``target`` as bisection on q gets."""
    k = ref.n_branches
    if target <= 0:
        return torch.full((k, ref.n_classes), float("inf"))
    with torch.inference_mode():
        sim = ref.simulate(x)
    branch = sim.branch_logits.float().cpu()
    conf = torch.softmax(branch, dim=2).amax(dim=2)
    backbone_logits = sim.backbone_logits.float().cpu()
    lo, hi = 0.0, 1.0
    thr = torch.full((k, ref.n_classes), float("inf"))
    from calexnet_fast.cascade import apply_exit_rule

    for _ in range(30):
        q = (lo + hi) / 2
        thr = thresholds_for_fraction(conf, q, ref.n_classes)
        exits = apply_exit_rule(branch, backbone_logits, thr).exit_index
        r = flops_reduction(profile, exit_histogram(exits, k))
        if abs(r - target) < 0.005:
            break
        lo, hi = (q, hi) if r < target else (lo, q)
    return thr


def bench_model(args, model: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    ref, profile = build(model, args.resolution, args.classes, seed=0)
    ref = ref.to(device=device, dtype=dtype)
    fast = Cascade.from_reference(ref)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, generator=gen).to(device, dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
    backbone = torch.nn.Sequential(*ref.stages)
    rows = []
    for target in tqdm(args.profiles, desc=f"{model} profiles", disable=None):
        thr = profile_thresholds(ref, profile, x, target)
        ref.set_thresholds(thr)
        fast.set_thresholds(thr)
        with torch.inference_mode():
            out = fast(x)
            expect = ref(x)
            agree = bool(torch.equal(out.exit_index, expect.exit_index))
            r = flops_reduction(profile, exit_histogram(out.exit_index.cpu(), ref.n_branches))
            times = interleaved_medians(
                {"backbone": lambda: backbone(x), "reference": lambda: ref(x), "cascade": lambda: fast(x)},
                device,
                args.repeats,
            )
        ips = {name: args.batch_size / t for name, t in times.items()}
        ideal = 1.0 / (1.0 - r)
        speedup = ips["cascade"] / ips["backbone"]
        rows.append(
            {
                "model": model,
                "target_reduction": target,
                "flops_reduction": r,
                "exit_histogram": exit_histogram(out.exit_index.cpu(), ref.n_branches).tolist(),
                "images_per_s": ips,
                "speedup_cascade": speedup,
                "speedup_reference": ips["reference"] / ips["backbone"],
                "cascade_vs_reference": ips["cascade"] / ips["reference"],
                "ideal_speedup": ideal,
                "achieved_over_ideal": speedup / ideal,
                "exits_agree_with_reference": agree,
            }
        )
    return rows


def soak(args, device: torch.device, dtype: torch.dtype) -> dict:
    """``args.soak`` consecutive batches of random sizes and random exit patterns; peak memory."""
    ref, _ = build("resnet18", args.resolution, args.classes, seed=0)
    fast = Cascade.from_reference(ref.to(device=device, dtype=dtype))
    gen = torch.Generator().manual_seed(2)
    k = fast.n_branches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = []
    with torch.inference_mode():
        for i in tqdm(range(args.soak), desc="soak", disable=None):
            batch = int(torch.randint(0, args.batch_size + 1, (1,), generator=gen)) if i % 7 else i % 2
            x = torch.randn(batch, 3, args.resolution, args.resolution, generator=gen).to(device, dtype)
            thr = torch.rand(k, args.classes, generator=gen)
            thr[torch.rand(thr.shape, generator=gen) < 0.3] = float("inf")
            fast.set_thresholds(thr)
            out = fast(x)
            assert out.logits.shape == (batch, args.classes)
            if i % max(1, args.soak // 10) == 0:
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {"batches": args.soak, "peak_rss_MiB_samples": rss, "peak_rss_MiB": rss[-1] if rss else None}
    if device.type == "cuda":
        result["cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model]
        red = [100 * r["flops_reduction"] for r in mr]
        ax.plot(red, [r["ideal_speedup"] for r in mr], "k--", label="ideal 1/(1-r)")
        ax.plot(red, [r["speedup_cascade"] for r in mr], "o-", label="Cascade")
        ax.plot(red, [r["speedup_reference"] for r in mr], "s-", label="ReferenceCascade")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("throughput / backbone")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default=None, help="comma-separated: resnet18,resnet50 (default both; --quick: resnet18)"
    )
    parser.add_argument("--resolution", type=int, default=None, help="input size (default 32 on CPU, 224 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last inputs and backbone (default on for CUDA)",
    )
    parser.add_argument("--classes", type=int, default=None, help="default 10 at resolution <= 64, else 1000")
    parser.add_argument(
        "--profiles",
        default=None,
        help="comma-separated target FLOPs reductions (default 0,0.25,0.5,0.7; --quick: 0,0.5)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--soak", type=int, default=0, help="also run N random batches through Cascade")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel micro-benchmarks")
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG of speedup vs FLOPs reduction here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.resolution = args.resolution or (224 if cuda else 32)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.classes = args.classes or (10 if args.resolution <= 64 else 1000)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    models = (args.model or ("resnet18" if args.quick else "resnet18,resnet50")).split(",")
    args.profiles = [float(p) for p in (args.profiles or ("0,0.5" if args.quick else "0,0.25,0.5,0.7")).split(",")]
    args.repeats = args.repeats or (5 if args.quick else (15 if not cuda else 50))

    rows = []
    for model in models:
        rows += bench_model(args, model.strip(), device, dtype)
    print(
        f"\nEnd-to-end, batch {args.batch_size}, {args.resolution}x{args.resolution}, {dtype}, {device}"
        f"{', channels_last' if args.channels_last else ''}; images/s (median of {args.repeats} interleaved rounds)"
    )
    print(
        f"{'model':>9} {'FLOPs red.':>10} {'backbone':>9} {'reference':>10} {'Cascade':>9} {'speedup':>8} "
        f"{'ideal':>6} {'ach/ideal':>9} {'vs ref':>7} {'exits==ref':>10}"
    )
    for r in rows:
        ips = r["images_per_s"]
        print(
            f"{r['model']:>9} {100 * r['flops_reduction']:>9.1f}% {ips['backbone']:>9.0f} {ips['reference']:>10.0f} "
            f"{ips['cascade']:>9.0f} {r['speedup_cascade']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
            f"{100 * r['achieved_over_ideal']:>8.0f}% {r['cascade_vs_reference']:>6.2f}x "
            f"{str(r['exits_agree_with_reference']):>10}"
        )
    result = {
        "benchmark": "throughput",
        "environment": environment(device),
        "settings": {
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "dtype": str(dtype),
            "channels_last": args.channels_last,
            "classes": args.classes,
            "repeats": args.repeats,
        },
        "rows": rows,
    }
    if args.soak:
        result["soak"] = soak(args, device, dtype)
        print(
            f"soak: {args.soak} random batches, peak RSS samples (MiB): "
            f"{[round(v) for v in result['soak']['peak_rss_MiB_samples']]}"
        )
    if not args.no_kernels:
        print("\nKernel micro-benchmarks")
        with torch.inference_mode():
            result["compact"] = compact_bench.main(["--device", args.device, "--quick"])
        result["heads"] = heads_bench.main(["--device", args.device, "--quick"])
    if args.plot:
        plot(rows, args.plot)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
