"""proto_head_exit: the fused prototype head + exit decision Triton kernel against fp64 and its reference twin,
the CPU path, registration, errors, launch configuration.

The ``kernel``-marked tests launch the kernel itself: natively on CUDA through the public op, or on CPU
tensors through the internal launcher in the interpreter worker that ``test_interpreter_run`` starts (see
tests/conftest.py). Grids stay tiny: the interpreter costs milliseconds per program instance.

Tolerance rule (docs/design.md §4): against an fp64 evaluation, the kernel's max error <= 2 x the error of PyTorch
computing the same thing in the input dtype + a small atol; discrete outputs (pred, exit) equal wherever the
fp64 reference is not within that tolerance of a tie (argmax margin, or conf vs its threshold).
"""

from __future__ import annotations

import os

import pytest
import torch

from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.kernels import exit_decision, proto_head_exit, proto_head_launch_config, proto_head_operand_dtypes
from calexnet_fast.kernels.proto_head import _launch_proto_head_exit
from calexnet_fast.reference import folded_head_reference, proto_head_exit_reference

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _fast_proto_head_exit(features, folded, thresholds):
    if features.is_cuda:
        return proto_head_exit(features, *folded.operands(), thresholds)
    return _launch_proto_head_exit(features, *folded.operands(), thresholds)


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


def _features(n, c, h, w, dtype, layout, seed, device):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn(n, c, 2 * h, w, generator=g)[:, :, ::2]
        assert x.stride(2) != w * x.stride(3)
    else:
        x = torch.randn(n, c, h, w, generator=g)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def _check_head_case(head, device, n, c, h, w, n_classes, dtype, layout, seed=0):
    folded = head.fold()
    x = _features(n, c, h, w, dtype, layout, seed + 1, device)
    g = torch.Generator().manual_seed(seed + 2)
    # fp64 reference, and PyTorch's own computation in the input dtype
    buf64 = [b.double() for b in folded.operands()]
    logits64 = folded_head_reference(x.cpu().double(), *buf64)
    same = folded_head_reference(x.cpu(), *folded.operands()).double()
    conf64 = torch.softmax(logits64, dim=1).max(dim=1).values if n else torch.zeros(0, dtype=torch.float64)
    # thresholds around the observed confidences, one class never exits
    lo, hi = (float(conf64.min()), float(conf64.max())) if n else (0.0, 1.0)
    thresholds = lo + (hi - lo) * torch.rand(n_classes, generator=g)
    thresholds[int(torch.randint(n_classes, (1,), generator=g))] = float("inf")
    pred64 = logits64.argmax(dim=1)
    conf64 = torch.softmax(logits64, dim=1).gather(1, pred64[:, None]).squeeze(1)
    ex64 = conf64 >= thresholds.double()[pred64]

    folded = folded.to(device)
    logits, ex, pred, conf = _fast_proto_head_exit(x, folded, thresholds.to(device))
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


@pytest.mark.kernel
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}cls-{c[5]}-{c[6]}")
def test_kernel_proto_head_exit(case, kernel_device, make_head):
    n, c, h, w, n_classes, dtype, layout, dim, k = case
    _check_head_case(make_head(c, n_classes, dim, k), kernel_device, n, c, h, w, n_classes, dtype, layout)


@pytest.mark.kernel
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_proto_head_exit_tiny_batches(n, kernel_device, make_head):
    head = make_head(20, 10, seed=3)
    _check_head_case(head, kernel_device, n, 20, 7, 7, 10, torch.float16, "contiguous", seed=3)


@pytest.mark.kernel
def test_kernel_proto_head_exit_threshold_extremes(kernel_device, make_head):
    folded = make_head(32, 10, seed=5).fold().to(kernel_device)
    x = _features(4, 32, 7, 7, torch.float32, "contiguous", 6, kernel_device)
    _, ex0, pred0, conf0 = _fast_proto_head_exit(x, folded, torch.zeros(10, device=kernel_device))
    assert ex0.all()
    _, ex1, pred1, _ = _fast_proto_head_exit(x, folded, torch.full((10,), float("inf"), device=kernel_device))
    assert not ex1.any()
    assert torch.equal(pred0, pred1)
    # thresholds exactly at the kernel's own confidences (the lowest per predicted class): >= exits
    thr = torch.full((10,), 2.0, device=kernel_device).scatter_reduce(0, pred0, conf0, reduce="amin")
    _, ex2, _, _ = _fast_proto_head_exit(x, folded, thr)
    assert ex2.all()
    at = conf0 == thr[pred0]  # the samples exactly at their threshold
    _, ex3, _, _ = _fast_proto_head_exit(x, folded, torch.nextafter(thr, torch.full_like(thr, 3.0)))
    assert at.any() and not ex3[at].any()


@pytest.mark.kernel
def test_kernel_proto_head_exit_ties_and_nan(kernel_device, make_head):
    """Classes 7 and 250 (different epilogue chunks) get identical classifier rows and a large bias, so their
    logits tie exactly at the maximum: the first must win, as in torch.argmax. A NaN feature never exits."""
    head = make_head(256, 300, seed=11)  # 4 channel chunks (runtime loop), 3 class chunks
    with torch.no_grad():
        head.classifier.weight[250] = head.classifier.weight[7]
        head.classifier.bias[7] = head.classifier.bias[250] = 50.0
    folded = head.fold().to(kernel_device)
    x = _features(3, 256, 7, 7, torch.bfloat16, "contiguous", 12, kernel_device)
    x[2, 5, 3, 4] = float("nan")
    logits, ex, pred, conf = _fast_proto_head_exit(x, folded, torch.zeros(300, device=kernel_device))
    assert torch.equal(logits[:2, 7], logits[:2, 250]), "identical classifier rows gave different logits"
    assert pred[:2].tolist() == [7, 7] and ex[:2].all()
    assert torch.isnan(logits[2]).all() and torch.isnan(conf[2]) and not ex[2] and pred[2] == 0
    ref = proto_head_exit_reference(x.cpu(), *[b.cpu() for b in folded.operands()], torch.zeros(300))
    assert ref[2][2] == 0 and not ref[1][2]  # the reference agrees on the NaN sample


@pytest.mark.kernel
def test_kernel_zero_projection_gives_finite_logits(kernel_device, make_head):
    """A projection that ReLU zeroes everywhere: similarity 0 (never NaN) in every feature dtype."""
    head = make_head(16, 5, dim=32, k=8, seed=16)
    with torch.no_grad():
        head.bn.bias.fill_(-1e4)
    folded = head.fold().to(kernel_device)
    thr = torch.zeros(5, device=kernel_device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = _features(2, 16, 4, 4, dtype, "contiguous", 17, kernel_device)
        logits, ex, _, _ = _fast_proto_head_exit(x, folded, thr)
        torch.testing.assert_close(logits, folded.cls_bias.float().expand(2, 5))
        assert ex.all()


@pytest.mark.kernel
def test_kernel_cast_operands_give_the_same_launch(kernel_device, make_head):
    """The head's buffers as given and cast once to the kernel's operand dtypes read the same values."""
    folded = make_head(40, 10, seed=13).fold().to(kernel_device)
    x = _features(2, 40, 7, 7, torch.bfloat16, "channels_last", 14, kernel_device)
    thr = torch.full((10,), 0.2, device=kernel_device)
    a = _fast_proto_head_exit(x, folded, thr)
    b = _launch_proto_head_exit(x, *folded.operands(proto_head_operand_dtypes(x.dtype)), thr)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.kernel
def test_kernel_non_contiguous_operands(kernel_device, make_head):
    """The head's tensors as strided views (vectors with stride 2 and NaN in the gaps, transposed matrices):
    the kernel reads the same values as from contiguous copies (its launcher makes every operand contiguous)."""
    folded = make_head(32, 10, seed=21).fold().to(kernel_device)

    def strided(t):
        if t.dim() == 1:
            return torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]
        return t.t().contiguous().t()

    views = [strided(t) for t in folded.operands()]
    assert not any(v.is_contiguous() for v in views)
    x = _features(2, 32, 7, 7, torch.float32, "contiguous", 22, kernel_device)
    thr = torch.full((10,), 0.2, device=kernel_device)
    launch = proto_head_exit if x.is_cuda else _launch_proto_head_exit
    got = launch(x, *views, thr)
    want = launch(x, *folded.operands(), thr)
    assert not torch.isnan(got[0]).any()
    for u, v in zip(got, want, strict=True):
        assert torch.equal(u, v)


@pytest.mark.needs_cuda
def test_eager_path_and_op_path_agree(make_head):
    """On CUDA the eager shortcut (no dispatcher) and the registered op run the same launch (on CPU both are the
    reference, fed differently cast operands, so the comparison means something only on CUDA)."""
    kernel_device = "cuda"
    folded = make_head(40, 10, seed=13).fold().to(kernel_device)
    x = _features(2, 40, 7, 7, torch.bfloat16, "channels_last", 14, kernel_device)
    thr = torch.full((10,), 0.2, device=kernel_device)
    a = proto_head_exit(x, *folded.operands(proto_head_operand_dtypes(x.dtype)), thr)
    b = torch.ops.calexnet_fast.proto_head_exit(x, *folded.operands(), thr)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_interpreter_run(run_kernel_tests_interpreted):
    """Every kernel test above, under TRITON_INTERPRET=1 on CPU tensors, in a fresh process."""
    run_kernel_tests_interpreted(__file__)


def test_public_op_on_cpu_uses_the_reference(make_head):
    head = make_head(24, 10, seed=7)
    folded = head.fold()
    x = torch.randn(5, 24, 6, 6)
    thr = torch.rand(10) * 0.4
    thr[2] = float("inf")
    out = proto_head_exit(x, *folded.operands(), thr)
    ref = proto_head_exit_reference(x, *folded.operands(), thr)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(out[0], head(x))
    for dtype in (torch.float16, torch.bfloat16):
        low = proto_head_exit(x.to(dtype), *folded.operands(), thr)
        assert low[0].dtype == torch.float32
        torch.testing.assert_close(low[0], proto_head_exit_reference(x.to(dtype), *folded.operands(), thr)[0])


def test_cast_operands_follow_the_buffers(make_head):
    folded = make_head(16, 5, dim=32, k=8, seed=15).fold()
    dtypes = proto_head_operand_dtypes(torch.bfloat16)
    ops = folded.operands(dtypes)
    assert [t.dtype for t in ops] == [torch.bfloat16, torch.float32, torch.float16, torch.float16, torch.float32]
    assert folded.operands(dtypes)[0] is ops[0]  # cached
    with torch.no_grad():
        folded.cls_bias.add_(1.0)  # in-place change: refreshed
    assert torch.equal(folded.operands(dtypes)[4], folded.cls_bias)
    folded.proj_weight = torch.zeros_like(folded.proj_weight)  # replaced buffer: refreshed
    assert not folded.operands(dtypes)[0].any()
    assert folded.operands(proto_head_operand_dtypes(torch.float16))[0].dtype == torch.float16
    assert proto_head_operand_dtypes(torch.float32) == (torch.float32,) * 5
    with pytest.raises(ValueError, match="dtypes: expected 5 dtypes"):
        folded.operands((torch.float16,))


def test_opcheck(make_head):
    f = make_head(16, 10, dim=32, k=8, seed=8).fold()
    thr = torch.rand(10)
    thr[0] = float("inf")
    for x in (torch.randn(3, 16, 5, 5), torch.randn(0, 16, 5, 5), torch.randn(2, 16, 4, 4).half()):
        torch.library.opcheck(torch.ops.calexnet_fast.proto_head_exit.default, (x, *f.operands(), thr))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, make_head):
    """Graph capture through the fake kernels (two batch sizes: recompiles with a dynamic N), and one
    inductor compile (its C++ build costs ~10-20 s on 2 cores, so one shape only)."""
    folded = make_head(16, 10, dim=32, k=8, seed=9).fold()
    operands = folded.operands()
    thr = torch.rand(10) * 0.3

    def branch(x):
        logits, ex, pred, conf = proto_head_exit(x, *operands, thr)
        ex2, pred2, conf2 = exit_decision(logits * 2.0, thr)
        return logits, ex & ex2, pred, conf + conf2

    compiled = torch.compile(branch, fullgraph=True, backend=backend)
    for n in (4, 3) if backend == "aot_eager" else (4,):
        x = torch.randn(n, 16, 5, 5)
        for a, b in zip(compiled(x), branch(x), strict=True):
            assert torch.equal(a, b)


def test_bad_inputs(make_head):
    head = make_head(16, 10, dim=32, k=8)
    f = head.fold()
    w, b, p, cw, cb = f.operands()
    thr = torch.rand(10)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"features: expected a 4-D tensor \[N, C, H, W\], got \[2, 16\]"):
        proto_head_exit(torch.randn(2, 16), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"features: expected 16 channels .* got 15"):
        proto_head_exit(torch.randn(2, 15, 4, 4), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"features: expected a dtype in .* got torch.float64"):
        proto_head_exit(x.double(), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match="non-empty H x W"):
        proto_head_exit(torch.randn(2, 16, 0, 4), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[10\] .* got \[9\]"):
        proto_head_exit(x, w, b, p, cw, cb, torch.rand(9))
    with pytest.raises(ValueError, match=r"thresholds: expected device cpu .* got meta"):
        proto_head_exit(x, w, b, p, cw, cb, torch.rand(10, device="meta"))
    with pytest.raises(ValueError, match="proj_weight: expected a torch.Tensor, got PrototypePoolingHead"):
        proto_head_exit(x, head, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"cls_bias: expected shape \[10\], got \[3\]"):
        proto_head_exit(x, w, b, p, cw, torch.zeros(3), thr)
    with pytest.raises(ValueError, match=r"prototypes: expected shape \[K, 32\], got \[8, 31\]"):
        proto_head_exit(x, w, b, p[:, :31], cw, cb, thr)
    # the op called directly checks its arguments too, on CPU and on meta tensors (its fake kernel)
    op = torch.ops.calexnet_fast.proto_head_exit
    with pytest.raises(ValueError, match=r"features: expected a dtype in .* got torch.float64"):
        op(x.double(), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"features: expected 16 channels .* got 15"):
        op(torch.randn(2, 15, 4, 4), w, b, p, cw, cb, thr)
    meta = [t.to("meta") for t in (x, w, b, p, cw, cb, thr)]
    with pytest.raises(ValueError, match=r"cls_bias: expected shape \[10\], got \[3\]"):
        op(*meta[:5], torch.zeros(3, device="meta"), meta[6])
    logits, exit_, _, _ = op(*meta)
    assert logits.shape == (2, 10) and exit_.shape == (2,) and logits.device.type == "meta"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            _launch_proto_head_exit(x, w, b, p, cw, cb, thr)


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
    assert (cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["C_STATIC"], cfg["D_PAD"], cfg["K_PAD"]) == (32, 16, False, 128, 16)
    assert (cfg["num_warps"], cfg["num_stages"], cfg["BLOCK_NC"]) == (8, 2, 16)
    assert proto_head_launch_config(16, 5, 16, 4, 3, torch.float16)["num_warps"] == 4
    # No spill for sm_90a (see the docstring): BLOCK_C divides C where it can, smaller tiles for masked
    # channels (C not a multiple of 16) and for wide heads (D > 128 or K > 32), 8 warps down to BLOCK_P = 32.
    cfg = proto_head_launch_config(96, 28 * 28, 128, 32, 100, torch.bfloat16)
    assert (cfg["BLOCK_C"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"], cfg["BLOCK_P"]) == (32, 3, False, 64)
    cfg = proto_head_launch_config(40, 14 * 14, 128, 32, 100, torch.bfloat16)
    assert (cfg["BLOCK_C"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"], cfg["BLOCK_P"]) == (16, 3, False, 64)
    cfg = proto_head_launch_config(20, 7 * 7, 128, 32, 10, torch.float16)
    assert (cfg["BLOCK_C"], cfg["NUM_C_CHUNKS"], cfg["C_STATIC"], cfg["BLOCK_P"]) == (16, 2, False, 64)
    cfg = proto_head_launch_config(24, 32 * 32, 128, 32, 10, torch.float32)
    assert (cfg["BLOCK_C"], cfg["BLOCK_P"], cfg["num_warps"]) == (16, 32, 8)
    cfg = proto_head_launch_config(64, 3136, 256, 32, 1000, torch.float16)
    assert (cfg["BLOCK_P"], cfg["C_STATIC"], cfg["D_PAD"], cfg["BLOCK_NC"], cfg["num_warps"]) == (32, False, 256, 64, 8)
    cfg = proto_head_launch_config(64, 14 * 14, 128, 128, 100, torch.bfloat16)
    assert (cfg["BLOCK_P"], cfg["C_STATIC"], cfg["K_PAD"], cfg["num_warps"]) == (32, False, 128, 8)


def test_tf32_is_off_for_the_tests():
    """The float32 comparisons with the references assume IEEE float32 (tests/conftest.py turns TF32 off; torch
    runs float32 convolutions through cuDNN in TF32 by default)."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.needs_cuda
def test_float32_convolutions_are_ieee_on_cuda():
    """A reference head's 1x1 convolution on CUDA is float32-exact here (TF32 would be ~1e-2 off at C = 256)."""
    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(8, 256, 14, 14, generator=g), torch.randn(128, 256, 1, 1, generator=g)
    got = torch.nn.functional.conv2d(x.cuda(), w.cuda()).cpu().double()
    assert float((got - torch.nn.functional.conv2d(x.double(), w.double())).abs().max()) < 1e-3


def test_exit_rule_is_the_reference_after_the_head(make_head):
    """proto_head_exit_reference = the folded head in float32, then the exit rule."""
    folded = make_head(16, 10, dim=32, k=8, seed=18).fold()
    x = torch.randn(4, 16, 5, 5).half()
    thr = torch.rand(10)
    logits, ex, pred, conf = proto_head_exit_reference(x, *folded.operands(), thr)
    assert torch.equal(logits, folded(x.float()))
    for a, b in zip((ex, pred, conf), exit_decision_reference(logits, thr), strict=True):
        assert torch.equal(a, b)
