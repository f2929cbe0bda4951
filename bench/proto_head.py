"""Micro-benchmark of the fused prototype head + exit decision Triton kernel (``proto_head_exit``).

    python bench/proto_head.py [--device cpu|cuda] [--quick] [--batch N] [--dtype bfloat16|float16|float32]
                               [--channels-last] [--classes 1000] [--sweep] [--sass] [--json PATH]

Head (docs/design.md §1, D = 128, K = 32) on the branch-point feature maps of a 224x224 input: ResNet18 layer1 /
layer2 (64x56x56, 128x28x28) and ResNet50 layer1 / layer2 (256x56x56, 512x28x28), N = 256 on CUDA.
Methods, all producing (logits, exit, pred, conf):
  fused    calexnet_fast.kernels.proto_head_exit (one Triton kernel; CUDA only)
  eager    the reference head in eager PyTorch in the features' dtype (folded head + exit rule)
  compile  torch.compile of that same reference function
GB/s counts the features read once (the roofline floor: nothing else the head does needs to touch memory);
``%bw`` is that rate over the measured device copy bandwidth.

On CUDA times come from ``triton.testing.do_bench`` (median, L2 flushed between runs). Without a GPU,
Triton cannot run: the script says so, benchmarks the eager reference and torch.compile only (median wall
time of a few runs) at a tiny batch (default N = 4), and the numbers are for CPU, not the GPU targets.
``--sweep`` (CUDA) times neighbouring launch configurations of the fused kernel against the rule's choice;
``--sass`` (no GPU needed) compiles the kernel for a GPU target and reports its machine code.
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from kernel_timing import (  # noqa: E402
    bench_parser,
    cell,
    compile_for_target,
    compile_static,
    kernel_result,
    kernel_row,
    timer_and_bandwidth,
)

from calexnet_fast.evaluation.timing import environment  # noqa: E402
from calexnet_fast.exit_rule import exit_decision_reference  # noqa: E402
from calexnet_fast.heads import PrototypePoolingHead  # noqa: E402
from calexnet_fast.kernels import (  # noqa: E402
    proto_head_exit,
    proto_head_launch_config,
    proto_head_operand_dtypes,
    triton_status,
)
from calexnet_fast.reference import folded_head_reference  # noqa: E402

SHAPES = [
    ("resnet18.layer1", 64, 56, 56),
    ("resnet18.layer2", 128, 28, 28),
    ("resnet50.layer1", 256, 56, 56),
    ("resnet50.layer2", 512, 28, 28),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference_head_exit(x, w, b, p, cw, cb, thr):
    """The eager reference head in the features' dtype, then the exit rule."""
    logits = folded_head_reference(x, w, b, p, cw, cb)
    ex, pred, conf = exit_decision_reference(logits, thr)
    return logits, ex, pred, conf


def bench_heads(args, device, timer, fused_ok, peak_bw, n_batch, dtype) -> list[dict]:
    rows = []
    shapes = SHAPES[:2] if args.quick and device.type == "cpu" else SHAPES
    for name, c, h, w in tqdm(shapes, desc="heads", disable=None):
        torch.manual_seed(0)
        head = PrototypePoolingHead(c, args.classes).eval()
        folded = head.fold().to(device)
        x = torch.randn(n_batch, c, h, w, device=device).relu_().to(dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        thr = torch.full((args.classes,), 0.5, device=device)
        bufs = [t.to(dtype) for t in folded.operands()]
        eager = partial(reference_head_exit, x, *bufs, thr)
        compiled = partial(compile_static(reference_head_exit), x, *bufs, thr)
        compiled()  # compile outside the timing
        times = {"eager": timer(eager), "compile": timer(compiled)}
        check = {}
        if fused_ok:
            fused = partial(proto_head_exit, x, *folded.operands(proto_head_operand_dtypes(dtype)), thr)
            out = fused()
            ref = reference_head_exit(x.float(), *[t.float() for t in folded.operands()], thr)
            check = {
                "max_abs_err_vs_fp32": float((out[0] - ref[0]).abs().max()),
                "pred_agree": float((out[2] == ref[2]).float().mean()),
            }
            times["fused"] = timer(fused)
        nbytes = x.numel() * x.element_size()
        case = {"shape": name, "N": n_batch, "C": c, "H": h, "W": w, "dtype": str(dtype).replace("torch.", "")}
        case.update(channels_last=bool(args.channels_last), feature_bytes=nbytes)
        rows.append(kernel_row(case, times, nbytes, peak_bw, check))
    return rows


def sweep(args, device, timer, n_batch, dtype) -> list[dict]:
    """Fused-kernel times of neighbouring launch configurations (not used on tested paths)."""
    from calexnet_fast.kernels.proto_head import _launch_proto_head_exit

    out = []
    for name, c, h, w in SHAPES:
        torch.manual_seed(0)
        folded = PrototypePoolingHead(c, args.classes).eval().fold().to(device)
        x = torch.randn(n_batch, c, h, w, device=device).relu_().to(dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        thr = torch.full((args.classes,), 0.5, device=device)
        bufs = folded.operands(proto_head_operand_dtypes(dtype))
        rule = proto_head_launch_config(c, h * w, 128, 32, args.classes, dtype)
        results = []
        grid = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])
        for bp, bc, nw, ns in tqdm(list(grid), desc=f"sweep {name}", disable=None):
            cfg = {"BLOCK_P": bp, "BLOCK_C": bc, "num_warps": nw, "num_stages": ns}
            try:
                t = timer(partial(_launch_proto_head_exit, x, *bufs, thr, config=cfg))
            except Exception as e:  # out of shared memory / registers: not a valid configuration
                results.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            results.append({**cfg, "ms": t * 1e3})
        ok = [r for r in results if "ms" in r]
        rule_cfg = {k: rule[k] for k in ("BLOCK_P", "BLOCK_C", "num_warps", "num_stages")}
        chosen = next((r for r in ok if all(r[k] == v for k, v in rule_cfg.items())), None)
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        rule_ms = chosen["ms"] if chosen else None
        out.append({"shape": name, "rule": rule_cfg, "rule_ms": rule_ms, "best": best, "all": results})
        if best:
            rule_txt = f"{rule_ms:.3f}" if rule_ms else "n/a"
            print(f"sweep {name}: rule {rule_cfg} {rule_txt} ms, best {best['ms']:.3f} ms with {best}")
    return out


def print_table(head_rows, fused_ok) -> None:
    print()
    hdr = f"{'head shape':<17}{'N':>5}{'dtype':>10}  {'eager ms':>9}{'compile ms':>11}{'fused ms':>9}"
    hdr += f"{'fused GB/s':>11}{'%copy bw':>9}{'x eager':>8}{'x compile':>10}"
    print(hdr)
    for r in head_rows:
        ms, gb = r["ms"], r["GBps"]
        pct = r.get("pct_of_copy_bw", {})
        line = f"{r['shape']:<17}{r['N']:>5}{r['dtype']:>10}  {ms['eager']:>9.3f}{ms['compile']:>11.3f}"
        line += f"{cell(ms, 'fused'):>9}{cell(gb, 'fused', '.0f'):>11}{cell(pct, 'fused', '.0f'):>9}"
        line += f"{cell(r, 'speedup_vs_eager', '.2f'):>8}{cell(r, 'speedup_vs_compile', '.2f'):>10}"
        print(line)
    if fused_ok:
        print("\ntargets (H200, N >= 256): fused head >= 4x eager, >= 1.5x compile, >= 70 % of copy bandwidth")


# ---------------------------------------------------------------------------------------------------------
# --sass: compile the fused kernel for a GPU target without a GPU and look at the machine code.


def _sass_loops(cubin: Path, nvdisasm: str) -> list[tuple[int, int, int]]:
    """(first, last, n_instructions) of every loop (a backward branch) in the SASS, in address order."""
    import re
    import subprocess

    text = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    labels, insts = {}, []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            insts.append(m.group(1))
    loops = []
    for i, ins in enumerate(insts):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i - 8:  # skip the trailing `BRA self` trap
            loops.append((labels[m.group(1)], i, i - labels[m.group(1)] + 1))
    return sorted(loops)


def sass_report(args) -> list[dict]:
    """Registers, spills, shared memory, tensor-core and async-copy use, and SASS instructions per pixel of
    the fused kernel compiled for sm_<arch> (default 90a, Hopper) for the benchmark shapes. Rough issue
    model: a Hopper SM issues ~4 warp-instructions per clock (~7.9 G/s at 1.98 GHz) and gets ~36 GB/s of an
    H200's 4.8 TB/s; so the hot loop stays under the memory time while it needs < ~0.22 warp-instructions
    per byte of features."""
    import re
    import subprocess
    import tempfile

    import triton

    from calexnet_fast.kernels import _proto_head_kernel
    from calexnet_fast.kernels.proto_head import _kernel_arguments

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas, nvdisasm = str(bindir / "ptxas"), str(bindir / "nvdisasm")
    rows = []
    dtypes = [DTYPES[args.dtype]] if args.dtype else [torch.bfloat16, torch.float32]
    for (name, c, h, w), dtype, cl in itertools.product(SHAPES, dtypes, [False, True]):
        folded = PrototypePoolingHead(c, args.classes).eval().fold()
        x = torch.zeros(2, c, h, w, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        kargs, kwargs, _ = _kernel_arguments(x, *folded.operands(), torch.zeros(args.classes))
        ck = compile_for_target(_proto_head_kernel.proto_head_exit_kernel, kargs, kwargs, args.sass_arch)
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
            ptx.write_text(ck.asm["ptx"])
            arch = f"sm_{args.sass_arch}a" if args.sass_arch == 90 else f"sm_{args.sass_arch}"
            out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(ptx), "-o", str(cubin)],
                                 capture_output=True, text=True, check=True).stderr  # fmt: skip
            loops = _sass_loops(cubin, nvdisasm)
        top = [lp for lp in loops if not any(o[0] <= lp[0] and lp[1] <= o[1] and o != lp for o in loops)]
        pixel, classes = (top[0], top[-1]) if len(top) >= 2 else (None, None)
        # dynamic channel loop nested in the pixel loop: it runs NUM_C_CHUNKS times per pixel tile
        inner = [lp for lp in loops if pixel and pixel[0] <= lp[0] and lp[1] <= pixel[1] and lp != pixel]
        per_tile = pixel[2] + sum(lp[2] for lp in inner) * (kwargs["NUM_C_CHUNKS"] - 1) if pixel else None
        warps = kwargs["num_warps"]
        bytes_px = c * x.element_size()
        row = {
            "shape": name,
            "dtype": str(dtype).replace("torch.", ""),
            "channels_last": cl,
            "config": {k: kwargs[k] for k in ("BLOCK_P", "BLOCK_C", "C_STATIC", "BLOCK_NC", "num_warps", "num_stages")},
            "registers": int(re.search(r"Used (\d+) registers", out).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", out).group(1)),
            "shared_bytes": ck.metadata.shared,
            "wgmma": ck.asm["ptx"].count("wgmma.mma_async"),
            "cp_async": ck.asm["ptx"].count("cp.async"),
            "warp_instr_per_pixel": per_tile * warps / kwargs["BLOCK_P"] if per_tile else None,
            "warp_instr_per_class": classes[2] * warps / kwargs["BLOCK_NC"] if classes else None,
        }
        if per_tile:
            row["warp_instr_per_byte"] = row["warp_instr_per_pixel"] / bytes_px
        rows.append(row)
        print(
            f"{name:<16} {row['dtype']:<9} {'NHWC' if cl else 'NCHW'} regs={row['registers']:<3} "
            f"spill={row['spill_bytes']:<4} smem={row['shared_bytes'] // 1024:>3}KB wgmma={row['wgmma']:<3} "
            f"cp.async={row['cp_async']:<3} warp-instr/px={cell(row, 'warp_instr_per_pixel', '.1f'):>5} "
            f"/byte={cell(row, 'warp_instr_per_byte', '.3f')} /class={cell(row, 'warp_instr_per_class', '.1f')} "
            f"{row['config']}"
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, quick="fewer shapes/sizes and repeats", repeats="CPU timing repeats")
    parser.add_argument("--batch", type=int, default=None, help="N (default 256 on CUDA, 4 on CPU)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--channels-last", action="store_true", help="features in channels_last")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sweep", action="store_true", help="CUDA: time neighbouring fused-kernel configurations")
    parser.add_argument(
        "--sass",
        action="store_true",
        help="no GPU needed: compile the fused kernel for --sass-arch and report registers, spills, "
        "shared memory and SASS instructions per pixel for the benchmark shapes, then exit",
    )
    parser.add_argument("--sass-arch", type=int, default=90, help="compute capability for --sass (90 = Hopper)")
    args = parser.parse_args(argv)
    if args.sass:
        result = {"sass": sass_report(args), "arch": args.sass_arch, "environment": environment(torch.device("cpu"))}
        write_json(args.json, result)
        return result
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    usable, how = triton_status()
    fused_ok = cuda and usable
    if not cuda:
        print("Triton needs a GPU here; benchmarking the eager reference and torch.compile only "
              "(CPU numbers at a tiny batch, not the GPU targets).")  # fmt: skip
    elif not usable:
        print(f"Triton cannot run on this GPU ({how}); benchmarking the eager reference and torch.compile only.")
    print(f"triton: {how}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    n_batch = args.batch or (256 if cuda else (2 if args.quick else 4))
    if not cuda:
        print(f"CPU: N = {n_batch} (tiny on purpose; pass --batch to change)")
    timer, peak_bw = timer_and_bandwidth(device, args.repeats or (3 if args.quick else 5))
    head_rows = bench_heads(args, device, timer, fused_ok, peak_bw, n_batch, dtype)
    print_table(head_rows, fused_ok)
    result = kernel_result("bench/proto_head.py", argv, device, how, fused_ok, peak_bw, heads=head_rows)
    if args.sweep:
        if fused_ok:
            result["sweep"] = sweep(args, device, timer, n_batch, dtype)
        else:
            print("--sweep needs a GPU with a working Triton; skipped")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
