"""Triton kernels (calexnet_fast.kernels) against their PyTorch reference twins.

The ``test_kernel_*`` tests launch the Triton kernels themselves. They run
- natively on CUDA when a GPU and a working Triton are present (through the public custom ops);
- on CPU under ``TRITON_INTERPRET=1``, which must be set before triton is imported: ``test_interpreter_run``
  re-runs this very file in a subprocess with that variable and ``CALEXNET_KERNELS_INTERP_WORKER=1``; the
  worker calls the internal launchers (``_launch_*``) on CPU tensors, because the public ops send CPU tensors
  to the reference. Grids stay tiny: the interpreter costs milliseconds per program instance.
The other tests (CPU reference path, opcheck, torch.compile, bad inputs, availability) run in the main
process.

Tolerance rule (DESIGN.md §4): against an fp64 evaluation, the kernel's max error <= 2 x the error of PyTorch
computing the same thing in the input dtype + a small atol; discrete outputs (pred, exit) equal wherever the
fp64 reference is not within that tolerance of a tie (argmax margin, or conf vs its threshold).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calexnet_fast.kernels import (
    exit_decision,
    exit_decision_launch_config,
    proto_head_exit,
    proto_head_exit_reference,
    proto_head_launch_config,
    triton_status,
)
from calexnet_fast.kernels.exit_decision import _launch_exit_decision
from calexnet_fast.kernels.proto_head import _cached_operands, _launch_proto_head_exit

import calexnet_fast
from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.heads import FoldedPrototypeHead, PrototypePoolingHead, folded_head_reference

WORKER = os.environ.get("CALEXNET_KERNELS_INTERP_WORKER") == "1"
if WORKER:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the interpreter worker needs TRITON_INTERPRET=1"
    KERNEL_DEVICE: str | None = "cpu"
elif torch.cuda.is_available() and triton_status()[0]:
    KERNEL_DEVICE = "cuda"
else:
    KERNEL_DEVICE = None

kernel_test = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="no usable GPU: the test_kernel_* tests run under TRITON_INTERPRET=1 in test_interpreter_run",
)
main_process_only = pytest.mark.skipif(WORKER, reason="runs in the main test process")

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _fast_exit_decision(logits, thresholds):
    if KERNEL_DEVICE == "cuda":
        return exit_decision(logits, thresholds)
    return _launch_exit_decision(logits, thresholds)


def _fast_proto_head_exit(features, folded, thresholds):
    if KERNEL_DEVICE == "cuda":
        return proto_head_exit(features, folded, thresholds)
    buffers = (folded.proj_weight, folded.proj_bias, folded.prototypes, folded.cls_weight, folded.cls_bias)
    return _launch_proto_head_exit(features, *buffers, thresholds)


def _head(c: int, n_classes: int, dim: int = 128, k: int = 32, seed: int = 0) -> PrototypePoolingHead:
    """A head with non-trivial BN statistics (train-mode passes first), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = PrototypePoolingHead(c, n_classes, dim=dim, n_prototypes=k)
    with torch.no_grad():
        head.bn.weight.uniform_(0.5, 1.5, generator=g)
        head.bn.bias.uniform_(-0.3, 0.3, generator=g)
        head.classifier.weight.mul_(4.0)  # spread the logits so argmax margins are mostly clear
        head.train()
        for _ in range(2):
            head(torch.randn(8, c, 5, 5, generator=g) + 0.5)
    return head.eval()


def _assert_discrete(fast, ref64, thresholds, tol):
    """pred/exit/conf of the fast path against the fp64 reference, away from ties (see module docstring)."""
    logits64, exit64, pred64, conf64 = ref64
    exit_f, pred_f, conf_f = fast
    top2 = logits64.topk(min(2, logits64.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 2 * tol) if logits64.shape[1] > 1 else torch.ones_like(exit64)
    assert torch.equal(pred_f[clear], pred64[clear]), "argmax differs away from ties"
    conf_tol = 2 * tol + 1e-6
    assert ((conf_f.double() - conf64).abs() <= conf_tol).all(), (conf_f.double() - conf64).abs().max()
    thr = thresholds.double()[pred64]
    clear_exit = clear & ((conf64 - thr).abs() > conf_tol)
    assert torch.equal(exit_f[clear_exit], exit64[clear_exit]), "exit decision differs away from ties"
    return int(clear_exit.sum())


# ---------------------------------------------------------------------------------------------------------
# Fused head + exit decision: the Triton kernel against fp64 and same-dtype PyTorch.

HEAD_CASES = [
    # (N, C, H, W, n_classes, dtype, layout, dim, K)
    (3, 48, 7, 7, 10, torch.float32, "contiguous", 128, 32),
    (2, 64, 8, 8, 20, torch.float16, "channels_last", 128, 32),
    (2, 40, 14, 14, 100, torch.bfloat16, "contiguous", 128, 32),
    (1, 24, 32, 32, 10, torch.float32, "channels_last", 128, 32),
    (1, 200, 7, 7, 20, torch.bfloat16, "channels_last", 128, 32),  # 4 channel chunks, unrolled
    (2, 600, 7, 7, 10, torch.float16, "contiguous", 128, 32),  # 10 channel chunks, runtime loop
    (2, 36, 8, 8, 10, torch.float32, "contiguous", 96, 10),  # D, K not powers of two
    (2, 32, 7, 7, 20, torch.float16, "strided", 128, 32),  # H, W do not flatten: copied to contiguous
    (1, 16, 1, 5, 10, torch.float32, "contiguous", 128, 32),  # H == 1
    (2, 64, 8, 8, 300, torch.float32, "channels_last", 128, 32),  # 3 class chunks in the epilogue
]


def _features(n, c, h, w, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn(n, c, 2 * h, w, generator=g)[:, :, ::2]
        assert x.stride(2) != w * x.stride(3)
    else:
        x = torch.randn(n, c, h, w, generator=g)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(KERNEL_DEVICE)


def _check_head_case(n, c, h, w, n_classes, dtype, layout, dim, k, seed=0):
    head = _head(c, n_classes, dim, k, seed)
    folded = head.fold()
    x = _features(n, c, h, w, dtype, layout, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    # fp64 reference, and PyTorch's own computation in the input dtype
    buf64 = [b.double() for b in folded.buffers()]
    logits64 = folded_head_reference(x.cpu().double(), *buf64)
    same = folded_head_reference(x.cpu(), *folded.buffers()).double()
    conf64 = torch.softmax(logits64, dim=1).max(dim=1).values if n else torch.zeros(0, dtype=torch.float64)
    # thresholds around the observed confidences, one class never exits
    lo, hi = (float(conf64.min()), float(conf64.max())) if n else (0.0, 1.0)
    thresholds = lo + (hi - lo) * torch.rand(n_classes, generator=g)
    thresholds[int(torch.randint(n_classes, (1,), generator=g))] = float("inf")
    pred64 = logits64.argmax(dim=1)
    conf64 = torch.softmax(logits64, dim=1).gather(1, pred64[:, None]).squeeze(1)
    ex64 = conf64 >= thresholds.double()[pred64]

    folded = folded.to(KERNEL_DEVICE)
    logits, ex, pred, conf = _fast_proto_head_exit(x, folded, thresholds.to(KERNEL_DEVICE))
    assert logits.shape == (n, n_classes) and logits.dtype == torch.float32
    assert ex.shape == pred.shape == conf.shape == (n,)
    assert (ex.dtype, pred.dtype, conf.dtype) == (torch.bool, torch.int64, torch.float32)
    if n == 0:
        return
    scale = max(1.0, float(logits64.abs().max()))
    torch_err = float((same - logits64).abs().max())
    tol = 2 * torch_err + ATOL[dtype] * scale
    fast_err = float((logits.cpu().double() - logits64).abs().max())
    assert fast_err <= tol, f"fast error {fast_err:.3g} > 2 x torch {dtype} error {torch_err:.3g} + atol"
    _assert_discrete((ex.cpu(), pred.cpu(), conf.cpu()), (logits64, ex64, pred64, conf64), thresholds, tol)


@kernel_test
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}cls-{c[5]}-{c[6]}")
def test_kernel_proto_head_exit(case):
    _check_head_case(*case)


@kernel_test
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_proto_head_exit_tiny_batches(n):
    _check_head_case(n, 20, 7, 7, 10, torch.float16, "contiguous", 128, 32, seed=3)


@kernel_test
def test_kernel_proto_head_exit_threshold_extremes():
    head = _head(32, 10, seed=5)
    folded = head.fold().to(KERNEL_DEVICE)
    x = _features(4, 32, 7, 7, torch.float32, "contiguous", 6)
    _, ex0, pred0, conf0 = _fast_proto_head_exit(x, folded, torch.zeros(10, device=KERNEL_DEVICE))
    assert ex0.all()
    _, ex1, pred1, _ = _fast_proto_head_exit(x, folded, torch.full((10,), float("inf"), device=KERNEL_DEVICE))
    assert not ex1.any()
    assert torch.equal(pred0, pred1)
    # thresholds exactly at the kernel's own confidences (the lowest per predicted class): >= exits
    thr = torch.full((10,), 2.0, device=KERNEL_DEVICE).scatter_reduce(0, pred0, conf0, reduce="amin")
    _, ex2, _, _ = _fast_proto_head_exit(x, folded, thr)
    assert ex2.all()
    at = conf0 == thr[pred0]  # the samples exactly at their threshold
    _, ex3, _, _ = _fast_proto_head_exit(x, folded, torch.nextafter(thr, torch.full_like(thr, 3.0)))
    assert at.any() and not ex3[at].any()


@kernel_test
def test_kernel_proto_head_exit_ties_and_nan():
    """Classes 7 and 250 (different epilogue chunks) get identical classifier rows and a large bias, so their
    logits tie exactly at the maximum: the first must win, as in torch.argmax. A NaN feature never exits."""
    head = _head(256, 300, seed=11)  # 4 channel chunks (runtime loop), 3 class chunks
    with torch.no_grad():
        head.classifier.weight[250] = head.classifier.weight[7]
        head.classifier.bias[7] = head.classifier.bias[250] = 50.0
    folded = head.fold().to(KERNEL_DEVICE)
    x = _features(3, 256, 7, 7, torch.bfloat16, "contiguous", 12)
    x[2, 5, 3, 4] = float("nan")
    logits, ex, pred, conf = _fast_proto_head_exit(x, folded, torch.zeros(300, device=KERNEL_DEVICE))
    assert torch.equal(logits[:2, 7], logits[:2, 250]), "identical classifier rows gave different logits"
    assert pred[:2].tolist() == [7, 7] and ex[:2].all()
    assert torch.isnan(logits[2]).all() and torch.isnan(conf[2]) and not ex[2] and pred[2] == 0
    ref = proto_head_exit_reference(x.cpu(), *[b.cpu() for b in folded.buffers()], torch.zeros(300))
    assert ref[2][2] == 0 and not ref[1][2]  # the reference agrees on the NaN sample


@kernel_test
def test_kernel_eager_path_and_op_path_agree():
    """The eager CUDA shortcut (cached operands, no dispatcher) and the registered op run the same launch."""
    folded = _head(40, 10, seed=13).fold().to(KERNEL_DEVICE)
    x = _features(2, 40, 7, 7, torch.bfloat16, "channels_last", 14)
    thr = torch.full((10,), 0.2, device=KERNEL_DEVICE)
    a = _fast_proto_head_exit(x, folded, thr)
    b = _launch_proto_head_exit(x, *_cached_operands(folded, x.dtype), thr)
    outs = [b]
    if KERNEL_DEVICE == "cuda":
        outs.append(torch.ops.calexnet_fast.proto_head_exit(x, *folded.buffers(), thr))
        z = a[0] * 3
        for u, v in zip(exit_decision(z, thr), torch.ops.calexnet_fast.exit_decision(z, thr), strict=True):
            assert torch.equal(u, v)
    for other in outs:
        for u, v in zip(a, other, strict=True):
            assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------------------
# Standalone exit decision.


def _special_logits(n, c, dtype, seed):
    """Random logits with NaN, +inf, all -inf rows and exact (integer) ties, some across class chunks."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    if n >= 8:
        z[0, c // 2] = float("nan")
        z[1, c - 1] = float("inf")
        z[2] = float("-inf")
        z[3] = torch.randint(-2, 3, (c,), generator=g).float()  # many exact ties
        z[4, 0] = z[4, c - 1] = 50.0  # tie between the first and the last class (different chunks when c > 256)
        z[5, :] = 0.0
        z[6, -1] = float("nan")
        z[6, 1] = float("nan")
        z[7, c // 3] = float("-inf")
    return z.to(dtype)


EXIT_CASES = [
    (100, 10, torch.float32),
    (37, 20, torch.float16),
    (40, 100, torch.bfloat16),
    (33, 1000, torch.float32),
]


@kernel_test
@pytest.mark.parametrize("n,c,dtype", EXIT_CASES, ids=lambda v: str(v))
def test_kernel_exit_decision(n, c, dtype):
    z = _special_logits(n, c, dtype, seed=c).to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(1)
    thr = torch.rand(c, generator=g) * 0.6
    thr[:3] = torch.tensor([float("inf"), 0.0, 1.0])
    thr = thr.to(KERNEL_DEVICE)
    ex, pred, conf = _fast_exit_decision(z, thr)
    ex_r, pred_r, conf_r = exit_decision_reference(z, thr)
    # Same float32 inputs: argmax (ties, NaN, inf included) must be identical.
    assert torch.equal(pred, pred_r)
    assert torch.equal(torch.isnan(conf), torch.isnan(conf_r))
    ok = ~torch.isnan(conf_r)
    torch.testing.assert_close(conf[ok], conf_r[ok], rtol=2e-6, atol=1e-7)
    away = ~ok | ((conf_r - thr[pred_r]).abs() > 1e-5)
    assert torch.equal(ex[away], ex_r[away])
    assert not ex[~ok].any()
    assert ex.any() and not ex.all()
    # thresholds exactly at the kernel's own confidences (lowest per predicted class): >= exits
    thr_at = torch.full_like(thr, 2.0).scatter_reduce(0, pred[ok], conf[ok], reduce="amin")
    ex_at = _fast_exit_decision(z, thr_at)[0]
    assert ex_at[ok].all() and not ex_at[~ok].any()
    # the same logits as a non-contiguous view
    zt = z.t().contiguous().t()
    assert torch.equal(_fast_exit_decision(zt, thr)[1], pred_r)


@kernel_test
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_exit_decision_tiny_batches(n):
    z = torch.randn(n, 10).to(KERNEL_DEVICE)
    thr = torch.full((10,), 0.05, device=KERNEL_DEVICE)
    ex, pred, conf = _fast_exit_decision(z, thr)
    assert ex.shape == pred.shape == conf.shape == (n,)
    assert (ex.dtype, pred.dtype, conf.dtype) == (torch.bool, torch.int64, torch.float32)
    ex_r, pred_r, conf_r = exit_decision_reference(z, thr)
    assert torch.equal(pred, pred_r) and torch.equal(ex, ex_r)
    torch.testing.assert_close(conf, conf_r)


# ---------------------------------------------------------------------------------------------------------
# Main process: the interpreter run, the CPU path of the public ops, registration, errors, availability.


@main_process_only
def test_interpreter_run():
    """Run every test_kernel_* test above under TRITON_INTERPRET=1 on CPU tensors, in a fresh process."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the kernels cannot be interpreted here")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["CALEXNET_KERNELS_INTERP_WORKER"] = "1"
    # the worker must import the very calexnet_fast this process imported (installed wheel or source tree)
    pkg_root = str(Path(calexnet_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_kernel_", "-p", "no:cacheprovider"]
    cmd += ["-W", "ignore::RuntimeWarning"]  # numpy's inf - inf warnings inside the interpreter
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter run failed (rc={proc.returncode}):\n{out[-8000:]}"
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, out[-3000:]


@main_process_only
def test_public_ops_on_cpu_use_the_reference():
    head = _head(24, 10, seed=7)
    folded = head.fold()
    x = torch.randn(5, 24, 6, 6)
    thr = torch.rand(10) * 0.4
    thr[2] = float("inf")
    out = proto_head_exit(x, folded, thr)
    ref = proto_head_exit_reference(x, *folded.buffers(), thr)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(out[0], head(x))
    for dtype in (torch.float16, torch.bfloat16):
        low = proto_head_exit(x.to(dtype), folded, thr)
        assert low[0].dtype == torch.float32
        torch.testing.assert_close(low[0], proto_head_exit_reference(x.to(dtype), *folded.buffers(), thr)[0])
    z = torch.randn(7, 10)
    for a, b in zip(exit_decision(z, thr), exit_decision_reference(z, thr), strict=True):
        assert torch.equal(a, b)


@main_process_only
def test_cached_operands_follow_the_buffers():
    folded = _head(16, 5, dim=32, k=8, seed=15).fold()
    ops = _cached_operands(folded, torch.bfloat16)
    assert [t.dtype for t in ops] == [torch.bfloat16, torch.float32, torch.float16, torch.float16, torch.float32]
    assert _cached_operands(folded, torch.bfloat16)[0] is ops[0]  # cached
    with torch.no_grad():
        folded.cls_bias.add_(1.0)  # in-place change: refreshed
    assert torch.equal(_cached_operands(folded, torch.bfloat16)[4], folded.cls_bias)
    folded.proj_weight = torch.zeros_like(folded.proj_weight)  # replaced buffer: refreshed
    assert not _cached_operands(folded, torch.bfloat16)[0].any()
    assert _cached_operands(folded, torch.float16)[0].dtype == torch.float16


@main_process_only
def test_opcheck():
    head = _head(16, 10, dim=32, k=8, seed=8)
    f = head.fold()
    thr = torch.rand(10)
    thr[0] = float("inf")
    for x in (torch.randn(3, 16, 5, 5), torch.randn(0, 16, 5, 5), torch.randn(2, 16, 4, 4).half()):
        torch.library.opcheck(
            torch.ops.calexnet_fast.proto_head_exit.default,
            (x, f.proj_weight, f.proj_bias, f.prototypes, f.cls_weight, f.cls_bias, thr),
        )
    for z in (torch.randn(6, 10), torch.randn(0, 10), torch.randn(4, 10).bfloat16()):
        torch.library.opcheck(torch.ops.calexnet_fast.exit_decision.default, (z, thr))


@main_process_only
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """Graph capture through the fake kernels (two batch sizes: recompiles with a dynamic N), and one
    inductor compile (its C++ build costs ~10-20 s on 2 cores, so one shape only)."""
    head = _head(16, 10, dim=32, k=8, seed=9)
    folded = head.fold()
    thr = torch.rand(10) * 0.3

    def branch(x):
        logits, ex, pred, conf = proto_head_exit(x, folded, thr)
        ex2, pred2, conf2 = exit_decision(logits * 2.0, thr)
        return logits, ex & ex2, pred, conf + conf2

    compiled = torch.compile(branch, fullgraph=True, backend=backend)
    for n in (4, 3) if backend == "aot_eager" else (4,):
        x = torch.randn(n, 16, 5, 5)
        for a, b in zip(compiled(x), branch(x), strict=True):
            assert torch.equal(a, b)


@main_process_only
def test_bad_inputs():
    head = _head(16, 10, dim=32, k=8)
    f = head.fold()
    thr = torch.rand(10)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"features: expected a 4-D tensor \[N, C, H, W\], got \[2, 16\]"):
        proto_head_exit(torch.randn(2, 16), f, thr)
    with pytest.raises(ValueError, match=r"features: expected 16 channels .* got 15"):
        proto_head_exit(torch.randn(2, 15, 4, 4), f, thr)
    with pytest.raises(ValueError, match=r"features: expected a dtype in .* got torch.float64"):
        proto_head_exit(x.double(), f, thr)
    with pytest.raises(ValueError, match="non-empty H x W"):
        proto_head_exit(torch.randn(2, 16, 0, 4), f, thr)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[10\] .* got \[9\]"):
        proto_head_exit(x, f, torch.rand(9))
    with pytest.raises(ValueError, match=r"thresholds: expected device cpu .* got meta"):
        proto_head_exit(x, f, torch.rand(10, device="meta"))
    with pytest.raises(ValueError, match="folded: expected a calexnet_fast.heads.FoldedPrototypeHead"):
        proto_head_exit(x, head, thr)
    bad = FoldedPrototypeHead(f.proj_weight, f.proj_bias, f.prototypes, f.cls_weight, f.cls_bias)
    bad.cls_bias = torch.zeros(3)
    with pytest.raises(ValueError, match=r"cls_bias: expected shape \[10\], got \[3\]"):
        proto_head_exit(x, bad, thr)
    with pytest.raises(ValueError, match=r"logits: expected a 2-D tensor \[N, C\], got \[10\]"):
        exit_decision(torch.randn(10), thr)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[10\]"):
        exit_decision(torch.randn(3, 10), torch.rand(1, 10))
    with pytest.raises(ValueError, match="logits: expected a dtype in"):
        exit_decision(torch.ones(3, 10, dtype=torch.int64), thr)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            _launch_exit_decision(torch.randn(3, 10), thr)
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            _launch_proto_head_exit(x, *f.buffers(), thr)


@main_process_only
def test_launch_configs():
    # Hopper choice for the bench shapes (see proto_head_launch_config's docstring)
    cfg = proto_head_launch_config(64, 56 * 56, 128, 32, 1000, torch.float16)
    assert (cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"]) == (128, 64, 1, True)
    assert (cfg["num_warps"], cfg["num_stages"], cfg["D_PAD"], cfg["K_PAD"]) == (8, 3, 128, 32)
    assert cfg["BLOCK_NC"] == 128
    cfg = proto_head_launch_config(128, 28 * 28, 128, 32, 1000, torch.bfloat16)
    assert (cfg["BLOCK_P"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"]) == (128, 2, True)
    cfg = proto_head_launch_config(512, 28 * 28, 128, 32, 100, torch.bfloat16)
    assert (cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"]) == (64, 64, 8, False)
    assert (cfg["BLOCK_NC"], cfg["num_warps"]) == (128, 8)
    cfg = proto_head_launch_config(600, 7 * 7, 96, 10, 10, torch.float32)
    assert (cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["C_STATIC"], cfg["D_PAD"], cfg["K_PAD"]) == (64, 32, False, 128, 16)
    assert (cfg["num_warps"], cfg["num_stages"], cfg["BLOCK_NC"]) == (8, 2, 16)
    cfg = proto_head_launch_config(64, 3136, 256, 32, 1000, torch.float16)
    assert (cfg["BLOCK_P"], cfg["D_PAD"], cfg["BLOCK_NC"]) == (64, 256, 64)
    assert proto_head_launch_config(16, 5, 16, 4, 3, torch.float16)["num_warps"] == 4
    for c in (1, 10, 100, 1000, 5000):
        e = exit_decision_launch_config(300, c)
        assert e["BLOCK_C"] * e["BLOCK_N"] <= 4096 and e["BLOCK_C"] >= min(256, c)
        assert e["grid"] == (-(-300 // e["BLOCK_N"]),)


@main_process_only
def test_triton_status_here():
    usable, how = triton_status()
    assert isinstance(usable, bool) and how
    if torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert usable and "interpreter" in how
    else:
        assert not usable and "reference" in how


@main_process_only
def test_import_and_cpu_ops_without_triton():
    """With triton unimportable, calexnet_fast.kernels imports, says why, and the CPU ops still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from calexnet_fast.kernels import triton_status, exit_decision\n"
        "ok, how = triton_status(); assert not ok and 'not installed' in how, how\n"
        "ex, pred, conf = exit_decision(torch.tensor([[0.0, 5.0]]), torch.tensor([0.5, 0.5]))\n"
        "assert ex.tolist() == [True] and pred.tolist() == [1]\n"
        "print('OK', how)\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    pkg_root = str(Path(calexnet_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
