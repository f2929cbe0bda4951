"""CPU cost of the grid prototype-pooling head (``GridPrototypeHead``) against the frozen CIFAR ResNet-56, and
its fused Triton kernel (``grid_head_exit``) on CUDA.

    python bench/grid_head.py [--backbone cifar_resnet56|resnet18] [--batch 64] [--repeats 20] [--threads 1]
                              [--contiguous] [--json PATH]
    python bench/grid_head.py --device cuda [--quick] [--batch 256] [--dtype bfloat16] [--json PATH]
    python bench/grid_head.py --sass [--sass-arch 90] [--json PATH]       # no GPU needed

At the three default branch points (``cifar_resnet(56, placement="flops", n_branches=3)``: layer1.6,
layer2.3, layer3.1; random weights, only the shapes matter; ``--backbone resnet18``: torchvision's ResNet-18 at
32 x 32 with branches after layer1..layer3, as ``bench/throughput.py``, whose 8x8 / 4x4 / 2x2 maps the
plans fold) it reports, per branch, the FLOPs of the
default grid head and of today's ``PrototypePoolingHead`` (D = 128, K = 32) as a share of the backbone's,
and the median CPU time of each head's folded form on a batch of branch features (for the grid head also its
twin ``grid_head_reference``, the plain eager form its plans replace: ``grid-twin``; with the exit decision,
the plan followed by the reference exit rule, ``grid+rule``, and on CPU in float32 the plan's C++ op
``grid_plan_exit``, the whole head with the decision in it, ``grid-exit``, what ``Cascade`` runs) next to the time of
the whole backbone in its inference form (BatchNorm folded), in interleaved rounds; channels_last as
``calexnet measure`` runs by default (``--contiguous``: NCHW). The issue's bar:
at most 0.5 % of the backbone's FLOPs and 1 % of its time per head.

``--device cuda``: the default grid head (10 and 100 classes) on the same three branch maps at N = 256, with
``triton.testing.do_bench`` (median, L2 flushed): ``fused`` (``grid_head_exit``, one Triton kernel), ``eager``
(the folded head in the features' dtype + the fused ``exit_decision`` kernel, what ``Cascade`` ran before) and
``compile`` (torch.compile of the folded head + the reference exit rule; not with ``--quick``, which times the
first and last map at 10 classes: the check bench/gpu_check.sh runs). ``--sass`` compiles the fused kernel
for sm_<arch> (default 90a, Hopper) on those maps and reports registers, spills and shared memory
(``grid_head_launch_config``'s docstring quotes them).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from calexnet_fast import backbones  # noqa: E402
from calexnet_fast.backbones import cifar_resnet, inference_form  # noqa: E402
from calexnet_fast.evaluation.timing import environment, interleaved_medians  # noqa: E402
from calexnet_fast.exit_rule import exit_decision_reference  # noqa: E402
from calexnet_fast.flops import head_flops, segment_flops  # noqa: E402
from calexnet_fast.heads import GridPrototypeHead, PrototypePoolingHead  # noqa: E402
from calexnet_fast.reference import grid_head_reference  # noqa: E402

MAPS = [("layer1.6", 16, 32), ("layer2.3", 32, 16), ("layer3.1", 64, 8)]  # ResNet-56's branch maps (C, H = W)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kernel_cases(args):
    """(name, folded default grid head, features, thresholds, n_classes) on ``args.device``."""
    maps, classes = (MAPS[::2], [10]) if args.quick else (MAPS, [10, 100])
    for (name, c, h), nc in itertools.product(maps, classes):
        torch.manual_seed(0)
        folded = GridPrototypeHead(c, nc).eval().fold().to(args.device)
        x = torch.randn(args.batch or 256, c, h, h, device=args.device).relu_().to(DTYPES[args.dtype])
        if not args.contiguous:
            x = x.contiguous(memory_format=torch.channels_last)
        yield name, folded, x, torch.full((nc,), 0.5, device=args.device), nc


def kernel_bench(args) -> dict:
    """CUDA: the fused kernel against the folded head + exit_decision and against torch.compile."""
    from kernel_timing import cell, compile_static, kernel_result, timer_and_bandwidth

    from calexnet_fast.exit_rule import exit_decision_reference
    from calexnet_fast.kernels import exit_decision, grid_head_exit, grid_head_operand_dtypes, triton_status

    usable, how = triton_status()
    print(f"triton: {how}")
    timer, peak = timer_and_bandwidth(torch.device(args.device), args.repeats or 5)

    def folded_exit(f, x, thr, decide):
        logits = f(x)
        return (logits, *decide(logits, thr))

    rows = []
    for name, folded, x, thr, nc in _kernel_cases(args):
        f = folded.to(x.dtype)
        times = {"eager": timer(partial(folded_exit, f, x, thr, exit_decision))}
        if not args.quick:
            compiled = compile_static(partial(folded_exit, decide=exit_decision_reference))
            compiled(f, x, thr)  # compile outside the timing
            times["compile"] = timer(partial(compiled, f, x, thr))
        check = {}
        if usable:
            cast = [
                b.to(d).contiguous() for b, d in zip(folded.buffers(), grid_head_operand_dtypes(x.dtype), strict=True)
            ]
            fused = partial(grid_head_exit, x, *cast, thr, folded.grid, folded.feature_grid, folded.max_size)
            out, ref = fused(), folded_exit(folded, x.float(), thr, exit_decision_reference)
            check = {
                "max_abs_err_vs_fp32": float((out[0] - ref[0]).abs().max()),
                "pred_agree": float((out[2] == ref[2]).float().mean()),
            }
            times["fused"] = timer(fused)
        case = {"shape": name, "N": x.shape[0], "C": x.shape[1], "H": x.shape[2], "classes": nc, "dtype": args.dtype}
        nbytes = x.numel() * x.element_size()
        r = {
            **case,
            "ms": {k: v * 1e3 for k, v in times.items()},
            "GBps": {k: nbytes / v / 1e9 for k, v in times.items()},
        }
        r.update(
            check,
            **{f"speedup_vs_{k}": v / times["fused"] for k, v in times.items() if "fused" in times and k != "fused"},
        )
        rows.append(r)
        print(
            f"{name:<10}{nc:>5} cls  eager {r['ms']['eager']:.3f} ms  compile {cell(r['ms'], 'compile')} ms  "
            f"fused {cell(r['ms'], 'fused')} ms  x eager {cell(r, 'speedup_vs_eager', '.2f')}  "
            f"x compile {cell(r, 'speedup_vs_compile', '.2f')}"
        )
    result = kernel_result("bench/grid_head.py", None, torch.device(args.device), how, usable, peak, heads=rows)
    write_json(args.json, result)
    return result


def sass_report(args) -> dict:
    """Registers, spills and shared memory of the fused kernel compiled for sm_<arch> (no GPU needed)."""
    import re
    import subprocess
    import tempfile

    import triton
    from kernel_timing import compile_for_target

    from calexnet_fast.kernels import _grid_head_kernel
    from calexnet_fast.kernels.grid_head import _kernel_arguments

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{args.sass_arch}a" if args.sass_arch == 90 else f"sm_{args.sass_arch}"
    rows = []
    for (name, c, h), nc, dtype, cl in itertools.product(MAPS, [10, 100], ["bfloat16", "float32"], [True, False]):
        folded = GridPrototypeHead(c, nc).eval().fold()
        x = torch.zeros(2, c, h, h, dtype=DTYPES[dtype])
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        kargs, kwargs, _ = _kernel_arguments(x, *folded.buffers(), torch.zeros(nc), 2, 4, 8)
        ck = compile_for_target(_grid_head_kernel.grid_head_exit_kernel, kargs, kwargs, args.sass_arch)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(ck.asm["ptx"])
            cmd = [str(ptxas), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "k.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        row = {
            "shape": name, "classes": nc, "dtype": dtype, "channels_last": cl,
            "config": {k: kwargs[k] for k in ("P_PAD", "BLOCK_C", "BLOCK_NC", "num_warps", "num_stages")},
            "registers": int(re.search(r"Used (\d+) registers", out).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", out).group(1)),
            "shared_bytes": ck.metadata.shared,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:<10}{nc:>4} cls {dtype:<9}{'NHWC' if cl else 'NCHW'} regs={row['registers']:<4}"
            f"spill={row['spill_bytes']:<5}smem={row['shared_bytes'] // 1024}KB {row['config']}"
        )
    result = {"sass": rows, "arch": args.sass_arch, "environment": environment(torch.device("cpu"))}
    write_json(args.json, result)
    return result


def _plan_and_rule(folded, features: torch.Tensor, thresholds: torch.Tensor):
    """The folded grid head's plan, then the reference exit rule."""
    return exit_decision_reference(folded(features), thresholds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu: head cost against the backbone; cuda: the fused kernel")
    ap.add_argument(
        "--backbone", choices=("cifar_resnet56", "resnet18"), default="cifar_resnet56", help="cpu: whose maps"
    )
    ap.add_argument(
        "--quick", action="store_true", help="cuda: the first and last map, 10 classes, no torch.compile (a check)"
    )
    ap.add_argument("--batch", type=int, default=None, help="N (default 64 on CPU, 256 on CUDA)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="cuda: the features' dtype")
    ap.add_argument("--repeats", type=int, default=None, help="default 20 on CPU")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--sass", action="store_true", help="no GPU needed: registers / spills of the fused kernel")
    ap.add_argument("--sass-arch", type=int, default=90, help="compute capability for --sass (90 = Hopper)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.sass:
        return sass_report(args)
    if args.device != "cpu":
        return kernel_bench(args)
    args.batch, args.repeats = args.batch or 64, args.repeats or 20
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.backbone == "resnet18":
        bb = backbones.resnet18(10, input_size=32).eval()
    else:
        bb = cifar_resnet(56, placement="flops", n_branches=3).eval()
    backbone_flops = sum(segment_flops(bb))
    heads = {
        "grid": [GridPrototypeHead(c, 10).eval() for c in bb.branch_channels],
        "prototype": [PrototypePoolingHead(c, 10).eval() for c in bb.branch_channels],
    }
    flops = {name: head_flops(hs, bb) for name, hs in heads.items()}
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    folded_bb = inference_form(bb).to(memory_format=fmt)
    with torch.inference_mode():
        feats, _ = folded_bb.features(x)
        fns = {"backbone": lambda: folded_bb(x)}
        for name, hs in heads.items():
            for k, (h, f) in enumerate(zip(hs, feats, strict=True)):
                fns[f"{name}.{k + 1}"] = partial(h.fold(), f)
                if name == "grid":  # the folded head's twin, the plain eager form its plans replace
                    g = h.fold()
                    sizes = (g.grid, g.feature_grid, g.max_size)
                    fns[f"grid-twin.{k + 1}"] = partial(grid_head_reference, f, *g.operands(), *sizes)
                    thr = torch.full((10,), 0.5)  # with the exit decision: the plan + the exit rule, and
                    fns[f"grid+rule.{k + 1}"] = partial(_plan_and_rule, g, f, thr)
                    if g.plan(f).fused:  # the C++ op (what Cascade runs on CPU)
                        fns[f"grid-exit.{k + 1}"] = partial(g.plan(f).exit, f, thr)
        times = interleaved_medians(fns, torch.device("cpu"), repeats=args.repeats)
    for name in ("grid-twin", "grid+rule", "grid-exit"):
        if f"{name}.1" in times:
            heads[name], flops[name] = heads["grid"], flops["grid"]
    rows = []
    layout = "NCHW" if args.contiguous else "channels_last"
    print(
        f"{args.backbone}: {backbone_flops / 1e6:.1f} MFLOPs/sample, {times['backbone'] * 1e3:.2f} ms/batch "
        f"{args.batch} ({layout}, {torch.get_num_threads()} thread(s))"
    )
    print(f"{'head':<15}{'branch':<10}{'MFLOPs':>8}{'% FLOPs':>9}{'ms':>8}{'% time':>8}")
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
                f"{name:<15}{row['branch']:<10}{row['flops'] / 1e6:>8.3f}{row['flops_pct']:>9.3f}"
                f"{t * 1e3:>8.3f}{row['time_pct']:>8.2f}"
            )
    payload = {
        "backbone": args.backbone,
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
