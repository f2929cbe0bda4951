"""The main job: end-to-end cascade throughput against the backbone, the causes separated.

    python bench/throughput.py [--quick] [--device cpu|cuda] [--model resnet18,resnet50] [--resolution R]
                               [--batch-size B] [--dtype float32|bfloat16|float16] [--[no-]fold] [--compile]
                               [--stream-batches N] [--threads T] [--head grid|prototype] [--json PATH]
                               [--plot PATH]

Runs on a fresh machine with no data and no GPU: the backbones are torchvision ResNet-18 / ResNet-50
(random weights, ImageNet stem) with three branch heads at layer1..layer3 (random weights; ``--head``: the
grid prototype-pooling head, the default, or the global one), and
the thresholds are set to give controlled exit profiles: every branch lets the same fraction q of its
survivors exit, with q found by bisection so that the cascade's FLOPs reduction r (per-sample FLOPs from
``calexnet_fast.flops``, a failed head still paid for) hits each target. Thresholds are fit on the
benchmark batch itself, and the reduction reported is the one realised on it.

For each model and profile, images/s measured in interleaved rounds (median) of:

- the backbone alone, ``calexnet_fast.Cascade`` per batch and ``Cascade`` streaming (``StreamingCascade``,
  stage batch = batch size) over ``--stream-batches`` copies of the batch (every stage on full batches,
  survivors re-batched across input batches), interleaved batch by batch in one pass a round
  (``BatchInterleaved``: each batch goes through the backbone and the cascade, in turn, then into the stream),
  so that all three meet the same stretches of the shared machine's speed (timed as whole streams back to
  back, the streaming ratio's 95 % interval was several times as wide);
- ``ReferenceCascade`` (plain PyTorch) per batch, one call a round, against one backbone call next to it;
- with ``--compile``: the ``torch.compile``d backbone and compiled streaming stages, interleaved the same way
  (compiled vs compiled).

The speedups (``x batch``, ``x stream``, ``x compiled``) are medians over the rounds of each round's ratio to
the backbone timed in the same round, so that a drift of the shared machine's speed between rounds cancels
out (the images/s columns are per-candidate medians and need not divide into them exactly); each comes with
its 95 % interval in brackets (``Rounds.paired_interval``: order statistics of the per-round ratios), which
says how much of a difference the machine's noise leaves open.

All run in the same form: with ``--fold`` (default) the frozen stages take their inference form
(``inference_form``: BatchNorm folded into the convolutions, max pools of contiguous CPU maps run by the C++
op ``max_pool2d``) for the backbone and the cascades alike. Against them, two ideals: the
FLOPs-ideal 1 / (1 - r) and the time-ideal, from each stage's and each head's measured time at a full
batch weighted by the fraction of samples reaching it (what the cascade would reach if nothing cost more
on fewer rows and nothing else cost anything), and achieved / ideal for both modes. Then the kernel
micro-benchmarks (bench/compact.py, scatter_rows.py, exit_decision.py, proto_head.py) in quick mode.
``--soak N`` also runs N consecutive batches of random sizes (0 and 1 included) and random exit patterns
through ``Cascade`` and reports the peak memory. Results: a table on stdout (with the seconds each model and
profile took, and the total), JSON (``--json``) and a plot (``--plot``, PNG). CPU runs use 2 threads unless
``--threads`` says otherwise; the default CPU run is sized for about 2 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compact as compact_bench  # noqa: E402
import exit_decision as exit_decision_bench  # noqa: E402
import proto_head as proto_head_bench  # noqa: E402
import scatter_rows as scatter_rows_bench  # noqa: E402
from common import write_json  # noqa: E402

from calexnet_fast import Cascade, ReferenceCascade, backbones  # noqa: E402
from calexnet_fast.backbones import inference_form  # noqa: E402
from calexnet_fast.cascades import StreamingCascade  # noqa: E402
from calexnet_fast.evaluation.measure_session import DTYPES  # noqa: E402
from calexnet_fast.evaluation.speed import stage_times, time_ideal  # noqa: E402
from calexnet_fast.evaluation.timing import BatchInterleaved, environment, interleaved_rounds  # noqa: E402
from calexnet_fast.flops import exit_histogram, flops_reduction, profile_flops  # noqa: E402
from calexnet_fast.heads import HEADS, make_branch_head  # noqa: E402


def build(model: str, resolution: int, n_classes: int, seed: int, head: str) -> tuple[ReferenceCascade, object]:
    """A frozen staged torchvision ResNet with three random branch heads of kind ``head`` (default D, K), and
    its FLOPs profile."""
    torch.manual_seed(seed)
    backbone = getattr(backbones, model)(n_classes, input_size=resolution)
    heads = [make_branch_head(head, c, n_classes).eval() for c in backbone.branch_channels]
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
    from calexnet_fast.exit_rule import apply_exit_rule

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
    t_model = time.perf_counter()
    ref, profile = build(model, args.resolution, args.classes, seed=0, head=args.head)
    ref = ref.to(device=device, dtype=dtype)
    if args.channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    if args.fold:
        ref = inference_form(ref)  # for the backbone and the cascades alike
    fast = Cascade.from_reference(ref)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, generator=gen).to(device, dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    backbone = torch.nn.Sequential(*ref.stages)
    stream = [x] * args.stream_batches
    streaming = StreamingCascade(fast, stage_batch=args.batch_size)
    if args.compile:
        backbone_compiled = torch.compile(backbone, dynamic=False)
        streaming_compiled = StreamingCascade(fast, stage_batch=args.batch_size, compile=True)
    stage_s, head_s = stage_times(fast, x, device, args.repeats)
    setup_s = time.perf_counter() - t_model
    rows = []
    for target in tqdm(args.profiles, desc=f"{model} profiles", disable=None):
        t_profile = time.perf_counter()
        thr = profile_thresholds(ref, profile, x, target)
        ref.set_thresholds(thr)
        fast.set_thresholds(thr)
        with torch.inference_mode():
            out = fast(x)
            agree = bool(torch.equal(out.exit_index, ref(x).exit_index))
            streamed = list(streaming.stream(stream))
            agree_streaming = all(torch.equal(o.exit_index, out.exit_index) for o in streamed)
            fns = {
                # the backbone, the cascade per batch and streaming, interleaved batch by batch over the stream
                "stream": BatchInterleaved(
                    stream, {"backbone": backbone, "cascade": fast}, ("streaming", streaming.stream), device
                ),
                "backbone_call": lambda: backbone(x),
                "reference": lambda: ref(x),
            }
            if args.compile:
                fns["compiled"] = BatchInterleaved(
                    stream,
                    {"backbone_compiled": backbone_compiled},
                    ("streaming_compiled", streaming_compiled.stream),
                    device,
                )
            rounds = interleaved_rounds(fns, device, repeats=args.repeats, warmup=2)
            times = rounds.medians()
        exits = out.exit_index.cpu()
        histogram = exit_histogram(exits, ref.n_branches)
        r = flops_reduction(profile, histogram)
        per_call = {n: 1 if n in ("backbone_call", "reference") else args.stream_batches for n in times}  # batches
        per_batch = {n: t / per_call[n] for n, t in times.items()}
        ips = {n: args.batch_size / t for n, t in per_batch.items() if n != "backbone_call"}
        reach = [float((exits > k).float().mean()) for k in range(ref.n_branches + 1)]
        ideal = {"flops": 1.0 / (1.0 - r), "time": time_ideal(stage_s, head_s, reach)}
        # speedups paired within each round (the machine's drift cancels), images/s as medians; the reference
        # (one call a round) against one call of the backbone next to it
        pairs = [("reference", "backbone_call"), ("cascade", "backbone"), ("streaming", "backbone")]
        pairs += [("streaming_compiled", "backbone_compiled")] * args.compile
        speedup, interval = {}, {}
        for name, base in pairs:
            mode = "compiled" if name == "streaming_compiled" else name
            pair = (base, name, per_call[name] / per_call[base])
            speedup[mode], interval[mode] = rounds.paired_ratio(*pair), rounds.paired_interval(*pair)
        rows.append(
            {
                "model": model,
                "target_reduction": target,
                "flops_reduction": r,
                "exit_histogram": histogram.tolist(),
                "images_per_s": ips,
                "speedup": speedup,
                "speedup_interval_95": interval,
                "ideal_speedup": ideal,
                "achieved_over_ideal": {
                    f"{mode}_over_{kind}": speedup[mode] / value
                    for mode in ("cascade", "streaming")
                    for kind, value in ideal.items()
                },
                "cascade_vs_reference": rounds.paired_ratio("reference", "cascade", per_call["cascade"]),
                "exits_agree_with_reference": agree,
                "streaming_agrees_with_cascade": agree_streaming,
                "seconds": time.perf_counter() - t_profile,
            }
        )
    rows[0]["setup_seconds"] = setup_s  # building, folding, full-batch stage times (compiling: in the 1st profile)
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
        ax.plot(red, [r["ideal_speedup"]["flops"] for r in mr], "k--", label="FLOPs-ideal 1/(1-r)")
        ax.plot(red, [r["ideal_speedup"]["time"] for r in mr], "k:", label="time-ideal (full-batch stage times)")
        for mode, marker, label in (("streaming", "o-", "Cascade, streaming"), ("cascade", "^-", "Cascade, per batch")):
            ys = [r["speedup"][mode] for r in mr]
            spans = [
                [y - r["speedup_interval_95"][mode][0] for y, r in zip(ys, mr)],
                [r["speedup_interval_95"][mode][1] - y for y, r in zip(ys, mr)],
            ]
            ax.errorbar(red, ys, yerr=spans, fmt=marker, capsize=3, label=f"{label} (95 % interval)")
        ax.plot(red, [r["speedup"]["reference"] for r in mr], "s-", label="ReferenceCascade")
        if "compiled" in mr[0]["speedup"]:
            ax.plot(red, [r["speedup"]["compiled"] for r in mr], "d-", label="compiled streaming / compiled backbone")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("throughput / backbone")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _speedup_cell(row: dict, mode: str) -> str:
    """The speedup and its 95 % interval (``Rounds.paired_interval``): how far the machine's noise leaves it open."""
    lo, hi = row["speedup_interval_95"][mode]
    return f"{row['speedup'][mode]:.2f}x [{lo:.2f}, {hi:.2f}]"


def table(rows: list[dict]) -> None:
    compiled = "compiled" in rows[0]["speedup"]
    head = ["model", "FLOPs red.", "backbone", "reference", "per batch", "streaming", "x batch", "x stream"]
    head += ["FLOPs-ideal", "time-ideal", "stream/time-ideal", "stream/FLOPs-ideal"]
    head += ["x compiled"] * compiled + ["exits ok", "run s"]
    print(" | ".join(head))
    for r in rows:
        ips, ideal, ach = r["images_per_s"], r["ideal_speedup"], r["achieved_over_ideal"]
        cells = [r["model"], f"{r['flops_reduction']:.1%}"]
        cells += [f"{ips[n]:.0f}" for n in ("backbone", "reference", "cascade", "streaming")]
        cells += [_speedup_cell(r, "cascade"), _speedup_cell(r, "streaming")]
        cells += [f"{ideal['flops']:.2f}x", f"{ideal['time']:.2f}x"]
        cells += [f"{ach['streaming_over_time']:.0%}", f"{ach['streaming_over_flops']:.0%}"]
        if compiled:
            cells.append(_speedup_cell(r, "compiled"))
        cells += [str(r["exits_agree_with_reference"] and r["streaming_agrees_with_cascade"])]
        cells += [f"{r['seconds']:.1f}" + (f" (+{r['setup_seconds']:.1f} set-up)" if "setup_seconds" in r else "")]
        print(" | ".join(cells))


KERNEL_BENCHES = (compact_bench, scatter_rows_bench, exit_decision_bench, proto_head_bench)


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
    parser.add_argument("--head", choices=tuple(HEADS), default="grid", help="branch heads (default grid)")
    parser.add_argument(
        "--profiles",
        default=None,
        help="comma-separated target FLOPs reductions (default 0,0.25,0.5,0.7; --quick: 0,0.5)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--stream-batches", type=int, default=None, help="input batches per timed stream (default 16; --quick: 4)"
    )
    parser.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the stages' inference form (BatchNorm folded, fast max pools), for the backbone and the cascades "
        "alike (default on)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the compiled backbone against compiled streaming stages"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2 on CPU)")
    parser.add_argument("--soak", type=int, default=0, help="also run N random batches through Cascade")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel micro-benchmarks")
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG of speedup vs FLOPs reduction here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 2)
    args.resolution = args.resolution or (224 if cuda else 32)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.classes = args.classes or (10 if args.resolution <= 64 else 1000)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    models = (args.model or ("resnet18" if args.quick else "resnet18,resnet50")).split(",")
    args.profiles = [float(p) for p in (args.profiles or ("0,0.5" if args.quick else "0,0.25,0.5,0.7")).split(",")]
    args.repeats = args.repeats or (5 if args.quick else (15 if not cuda else 50))
    args.stream_batches = args.stream_batches or (4 if args.quick else 16)

    t_start = time.perf_counter()
    rows = []
    for model in models:
        rows += bench_model(args, model.strip(), device, dtype)
    print(
        f"\nEnd-to-end, batch {args.batch_size}, {args.resolution}x{args.resolution}, {dtype}, {device}"
        f"{', channels_last' if args.channels_last else ''}, {torch.get_num_threads()} threads, stages "
        f"{'inference form' if args.fold else 'as trained'}; images/s (median of {args.repeats} interleaved rounds; "
        f"streaming: {args.stream_batches} batches per stream, stage batch = batch)"
    )
    table(rows)
    result = {
        "benchmark": "throughput",
        "environment": environment(device),
        "settings": {
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "dtype": str(dtype),
            "channels_last": args.channels_last,
            "classes": args.classes,
            "head": args.head,
            "repeats": args.repeats,
            "stream_batches": args.stream_batches,
            "fold_batchnorm": args.fold,
            "compile": args.compile,
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
        for bench in KERNEL_BENCHES:
            with torch.inference_mode():
                result[bench.__name__] = bench.main(["--device", args.device, "--quick"])
    if args.plot:
        plot(rows, args.plot)
    result["seconds"] = time.perf_counter() - t_start
    print(f"\ntotal {result['seconds']:.0f} s (run s: seconds per model and profile, set-up included once per model)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
