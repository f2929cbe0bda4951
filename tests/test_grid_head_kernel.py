"""grid_head_exit: the fused grid prototype head + exit decision Triton kernel against fp64 and its reference twin,
the CPU path, registration, errors, launch configuration, and the Cascade's dispatch to it.

The ``kernel``-marked tests launch the kernel itself: natively on CUDA through the public op, or on CPU tensors
through the internal launcher in the interpreter worker that ``test_interpreter_run`` starts (see
tests/conftest.py). Grids stay tiny: the interpreter costs ~0.1-0.5 s per program instance here.

Tolerance rule (docs/design.md §5, as tests/test_proto_head.py): against an fp64 evaluation, the kernel's max
logit error <= 2 x the error of PyTorch computing the same head in the input dtype + a small atol; discrete
outputs (pred, exit) equal wherever the fp64 reference is not within that tolerance of a tie.
"""

from __future__ import annotations

import os

import pytest
import torch

from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.heads import GridPrototypeHead
from calexnet_fast.kernels import grid_head_exit, grid_head_launch_config, grid_head_operand_dtypes
from calexnet_fast.kernels.grid_head import _launch_grid_head_exit
from calexnet_fast.reference import grid_head_exit_reference, grid_head_reference

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _buffers(folded) -> tuple[torch.Tensor, ...]:
    return folded.proj_weight, folded.proj_bias, folded.prototypes, folded.cls_weight, folded.cls_bias


def _sizes(folded) -> tuple[int, int, int]:
    return folded.grid, folded.feature_grid, folded.max_size


def _fast(features, folded, thresholds, buffers=None):
    launch = grid_head_exit if features.is_cuda else _launch_grid_head_exit
    return launch(features, *(buffers or _buffers(folded)), thresholds, *_sizes(folded))


def _features(n, c, h, w, dtype, layout, seed, device):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn(n, c, 2 * h, w, generator=g)[:, :, ::2]
    else:
        x = torch.randn(n, c, h, w, generator=g)
    x = (x * 2.0 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def _grid_head(make_head, c, n_classes, seed=0, dim=32, k=32, **sizes):
    return make_head(c, n_classes, dim=dim, k=k, seed=seed, cls=GridPrototypeHead, **sizes)


CASES = [
    # (N, C, H, W, n_classes, dtype, layout): the ResNet-56 branch maps, odd sizes, C not a multiple of 16
    (2, 16, 32, 32, 10, torch.float32, "channels_last"),
    (2, 32, 16, 16, 100, torch.bfloat16, "contiguous"),
    (2, 64, 8, 8, 100, torch.float16, "channels_last"),
    (2, 64, 8, 8, 10, torch.bfloat16, "channels_last"),
    (2, 16, 32, 32, 10, torch.float16, "contiguous"),
    (3, 20, 7, 7, 10, torch.bfloat16, "channels_last"),  # a working map the grids do not divide
    (2, 24, 5, 9, 100, torch.float32, "contiguous"),  # 9 -> 8: overlapping adaptive windows
    (2, 40, 12, 17, 10, torch.float16, "strided"),  # neither H nor W flattens; 17 -> 8
    (2, 8, 1, 3, 10, torch.float32, "contiguous"),  # a map smaller than both grids
]


def _check_case(head, device, n, c, h, w, n_classes, dtype, layout, seed=0):
    folded = head.fold()
    sizes = _sizes(folded)
    x = _features(n, c, h, w, dtype, layout, seed + 1, device)
    g = torch.Generator().manual_seed(seed + 2)
    if n == 0:  # nothing to compare: the shapes and dtypes of the outputs
        out = _fast(x, folded.to(device), torch.zeros(n_classes, device=device))
        assert [tuple(t.shape) for t in out] == [(0, n_classes), (0,), (0,), (0,)]
        assert [t.dtype for t in out] == [torch.float32, torch.bool, torch.int64, torch.float32]
        return
    logits64 = grid_head_reference(x.cpu().double(), *(b.double() for b in _buffers(folded)), *sizes)
    same = grid_head_reference(x.cpu(), *_buffers(folded), *sizes).double()  # PyTorch in the input dtype
    conf64 = torch.softmax(logits64, dim=1).max(dim=1).values
    lo, hi = float(conf64.min()), float(conf64.max())
    thresholds = lo + (hi - lo) * torch.rand(n_classes, generator=g)
    thresholds[int(torch.randint(n_classes, (1,), generator=g))] = float("inf")
    pred64 = logits64.argmax(dim=1)
    ex64 = conf64 >= thresholds.double()[pred64]

    folded = folded.to(device)
    logits, ex, pred, conf = _fast(x, folded, thresholds.to(device))
    assert logits.shape == (n, n_classes) and logits.dtype == torch.float32
    assert ex.shape == pred.shape == conf.shape == (n,)
    assert (ex.dtype, pred.dtype, conf.dtype) == (torch.bool, torch.int64, torch.float32)
    scale = max(1.0, float(logits64.abs().max()))
    torch_err = float((same - logits64).abs().max())
    tol = 2 * torch_err + ATOL[dtype] * scale
    fast_err = float((logits.cpu().double() - logits64).abs().max())
    assert fast_err <= tol, f"fast error {fast_err:.3g} > 2 x torch {dtype} error {torch_err:.3g} + atol"
    # discrete outputs away from ties (the margins of tests/test_proto_head.py)
    top2 = logits64.topk(min(2, n_classes), dim=1).values
    clear = top2[:, 0] - top2[:, -1] > 2 * tol
    assert torch.equal(pred.cpu()[clear], pred64[clear]), "argmax differs away from ties"
    conf_tol = 2 * tol + 1e-6
    assert ((conf.cpu().double() - conf64).abs() <= conf_tol).all()
    clear_exit = clear & ((conf64 - thresholds.double()[pred64]).abs() > conf_tol)
    assert torch.equal(ex.cpu()[clear_exit], ex64[clear_exit]), "exit decision differs away from ties"


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}cls-{c[5]}-{c[6]}")
def test_kernel_grid_head_exit(case, kernel_device, make_head):
    n, c, h, w, n_classes, dtype, layout = case
    _check_case(_grid_head(make_head, c, n_classes), kernel_device, n, c, h, w, n_classes, dtype, layout)


@pytest.mark.kernel
def test_kernel_other_grid_sizes_and_wide_heads(kernel_device, make_head):
    """G = 3, F = 2, S = 5 (no grid divides the 5x5 working map), D and K not powers of two, 2 channel chunks."""
    head = _grid_head(make_head, 96, 10, seed=4, dim=20, k=10, grid=3, feature_grid=2, max_size=5)
    _check_case(head, kernel_device, 2, 96, 11, 10, 10, torch.bfloat16, "channels_last", seed=4)


@pytest.mark.kernel
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_tiny_batches(n, kernel_device, make_head):
    _check_case(_grid_head(make_head, 16, 10, seed=3), kernel_device, n, 16, 8, 8, 10, torch.float16, "contiguous")


@pytest.mark.kernel
def test_kernel_thresholds_ties_and_nan(kernel_device, make_head):
    """Thresholds 0 / +inf / exactly at the kernel's own confidences (>= exits); classes 3 and 35 (different
    class chunks, the same slot) with identical classifier rows tie at the maximum: the first wins, as
    torch.argmax; a NaN feature never exits (and the reference agrees)."""
    head = _grid_head(make_head, 16, 50, seed=11)
    with torch.no_grad():
        head.classifier.weight[35] = head.classifier.weight[3]
        head.classifier.bias[3] = head.classifier.bias[35] = 50.0
    folded = head.fold().to(kernel_device)
    x = _features(3, 16, 8, 8, torch.float32, "contiguous", 12, kernel_device)
    logits, ex0, pred0, conf0 = _fast(x, folded, torch.zeros(50, device=kernel_device))
    assert torch.equal(logits[:, 3], logits[:, 35]) and pred0.tolist() == [3, 3, 3] and ex0.all()
    _, ex1, pred1, _ = _fast(x, folded, torch.full((50,), float("inf"), device=kernel_device))
    assert not ex1.any() and torch.equal(pred0, pred1)
    thr = torch.full((50,), 2.0, device=kernel_device).scatter_reduce(0, pred0, conf0, reduce="amin")
    assert _fast(x, folded, thr)[1].all()
    at = conf0 == thr[pred0]
    assert at.any() and not _fast(x, folded, torch.nextafter(thr, torch.full_like(thr, 3.0)))[1][at].any()
    x[2, 5, 3, 4] = float("nan")
    logits, ex, pred, conf = _fast(x, folded, torch.zeros(50, device=kernel_device))
    assert torch.isnan(logits[2]).all() and torch.isnan(conf[2]) and not ex[2] and pred[2] == 0 and ex[:2].all()
    ref = grid_head_exit_reference(x.cpu(), *(b.cpu() for b in _buffers(folded)), torch.zeros(50))
    assert ref[2][2] == 0 and not ref[1][2]


@pytest.mark.kernel
def test_kernel_zero_projection_gives_finite_logits(kernel_device, make_head):
    """A projection that ReLU zeroes everywhere: similarity 0 (never NaN) in every feature dtype; the logits
    are then the bias plus the pooled working map's share, as in the reference."""
    head = _grid_head(make_head, 16, 5, seed=16, dim=16, k=8)
    with torch.no_grad():
        head.bn.bias.fill_(-1e4)
    folded = head.fold().to(kernel_device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = _features(2, 16, 4, 4, dtype, "contiguous", 17, kernel_device)
        logits = _fast(x, folded, torch.zeros(5, device=kernel_device))[0]
        assert torch.isfinite(logits).all()
        ref = grid_head_exit_reference(x.cpu(), *(b.cpu() for b in _buffers(folded)), torch.zeros(5), 2, 4, 8)[0]
        torch.testing.assert_close(logits.cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.kernel
def test_kernel_cast_and_strided_operands_give_the_same_launch(kernel_device, make_head):
    """The buffers as given, cast once to the kernel's operand dtypes, and as strided views (NaN in the gaps)
    read the same values (the launcher casts and makes every operand contiguous)."""
    folded = _grid_head(make_head, 32, 10, seed=13).fold().to(kernel_device)
    x = _features(2, 32, 8, 8, torch.bfloat16, "channels_last", 14, kernel_device)
    thr = torch.full((10,), 0.2, device=kernel_device)
    cast = tuple(b.to(d).contiguous() for b, d in zip(_buffers(folded), grid_head_operand_dtypes(x.dtype), strict=True))

    def strided(t):
        if t.dim() == 1:
            return torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]
        return t.t().contiguous().t()

    want = _fast(x, folded, thr)
    for buffers in (cast, tuple(strided(b) for b in _buffers(folded))):
        for u, v in zip(_fast(x, folded, thr, buffers), want, strict=True):
            assert torch.equal(u, v)


def test_interpreter_run(run_kernel_tests_interpreted):
    """Every kernel test above, under TRITON_INTERPRET=1 on CPU tensors, in a fresh process."""
    run_kernel_tests_interpreted(__file__)


@pytest.mark.needs_cuda
def test_cascade_dispatches_the_grid_head_to_the_kernel(make_head, monkeypatch):
    """On CUDA with Triton, Cascade runs a grid head as grid_head_exit (and matches the reference cascade)."""
    from calexnet_fast.backbones import cifar_resnet
    from calexnet_fast.cascades import Cascade, ReferenceCascade, fast

    if fast.cascade_plan("cuda").heads != "triton":
        pytest.skip("Triton cannot run on this GPU")
    torch.manual_seed(0)
    bb = cifar_resnet(20, placement="flops", n_branches=2)
    heads = [_grid_head(make_head, c, 10, seed=i) for i, c in enumerate(bb.branch_channels)]
    ref = ReferenceCascade(bb, heads).cuda()
    ref.set_thresholds(torch.full((2, 10), 0.3, device="cuda"))
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return grid_head_exit(*args)

    monkeypatch.setattr(fast, "grid_head_exit", spy)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    got, want = Cascade.from_reference(ref)(x), ref(x)
    assert len(calls) == 2
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_public_op_on_cpu_uses_the_reference(make_head):
    head = _grid_head(make_head, 24, 10, seed=7)
    folded = head.fold()
    x = torch.randn(5, 24, 9, 9)
    thr = torch.rand(10) * 0.4
    thr[2] = float("inf")
    out = grid_head_exit(x, *_buffers(folded), thr, *_sizes(folded))
    ref = grid_head_exit_reference(x, *_buffers(folded), thr, *_sizes(folded))
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(out[0], head(x))
    low = grid_head_exit(x.half(), *_buffers(folded), thr)
    assert low[0].dtype == torch.float32
    torch.testing.assert_close(low[0], grid_head_exit_reference(x.half(), *_buffers(folded), thr)[0])


def test_exit_rule_is_the_reference_after_the_head(make_head):
    """grid_head_exit_reference = the folded grid head's maths (grid_head_reference) in float32, then the exit
    rule; the folded head's own eager form (its plan) agrees to rounding."""
    folded = _grid_head(make_head, 16, 10, seed=18).fold()
    x = torch.randn(4, 16, 12, 12).bfloat16()
    thr = torch.rand(10)
    logits, ex, pred, conf = grid_head_exit_reference(x, *_buffers(folded), thr)
    assert torch.equal(logits, grid_head_reference(x.float(), *_buffers(folded)))
    torch.testing.assert_close(logits, folded(x.float()), rtol=1e-5, atol=1e-5)
    for a, b in zip((ex, pred, conf), exit_decision_reference(logits, thr), strict=True):
        assert torch.equal(a, b)


def test_opcheck(make_head):
    f = _grid_head(make_head, 16, 10, dim=16, k=8, seed=8).fold()
    thr = torch.rand(10)
    thr[0] = float("inf")
    for x in (torch.randn(3, 16, 9, 9), torch.randn(0, 16, 5, 5), torch.randn(2, 16, 4, 4).half()):
        torch.library.opcheck(torch.ops.calexnet_fast.grid_head_exit.default, (x, *_buffers(f), thr, 2, 4, 8))


def test_torch_compile_fullgraph(make_head):
    """Graph capture through the fake kernel (two batch sizes: a recompile with a dynamic N)."""
    f = _grid_head(make_head, 16, 10, dim=16, k=8, seed=9).fold()
    buffers, thr = _buffers(f), torch.rand(10) * 0.3
    branch = lambda x: grid_head_exit(x, *buffers, thr, 2, 4, 8)  # noqa: E731
    compiled = torch.compile(branch, fullgraph=True, backend="aot_eager")
    for n in (4, 3):
        x = torch.randn(n, 16, 8, 8)
        for a, b in zip(compiled(x), branch(x), strict=True):
            assert torch.equal(a, b)


def test_bad_inputs(make_head):
    head = _grid_head(make_head, 16, 10, dim=16, k=8)
    w, b, p, cw, cb = _buffers(head.fold())
    thr = torch.rand(10)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"features: expected a 4-D tensor \[N, C, H, W\], got \[2, 16\]"):
        grid_head_exit(torch.randn(2, 16), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"features: expected 16 channels .* got 15"):
        grid_head_exit(torch.randn(2, 15, 4, 4), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"features: expected a dtype in .* got torch.float64"):
        grid_head_exit(x.double(), w, b, p, cw, cb, thr)
    with pytest.raises(ValueError, match=r"cls_weight: expected shape \[n_classes, 656\] \(2 K G\^2 .* G = 3"):
        grid_head_exit(x, w, b, p, cw, cb, thr, 3)
    with pytest.raises(ValueError, match="feature_grid: expected a positive int, got 0"):
        grid_head_exit(x, w, b, p, cw, cb, thr, 2, 0)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[10\] .* got \[9\]"):
        grid_head_exit(x, w, b, p, cw, cb, torch.rand(9))
    with pytest.raises(ValueError, match="proj_weight: expected a torch.Tensor, got GridPrototypeHead"):
        grid_head_exit(x, head, b, p, cw, cb, thr)
    op = torch.ops.calexnet_fast.grid_head_exit
    with pytest.raises(ValueError, match=r"features: expected 16 channels .* got 15"):
        op(torch.randn(2, 15, 4, 4), w, b, p, cw, cb, thr, 2, 4, 8)
    meta = [t.to("meta") for t in (x, w, b, p, cw, cb, thr)]
    with pytest.raises(ValueError, match=r"cls_bias: expected shape \[10\], got \[3\]"):
        op(*meta[:5], torch.zeros(3, device="meta"), meta[6], 2, 4, 8)
    logits, exit_, _, _ = op(*meta, 2, 4, 8)
    assert logits.shape == (2, 10) and exit_.shape == (2,) and logits.device.type == "meta"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            _launch_grid_head_exit(x, w, b, p, cw, cb, thr)


def test_launch_configs():
    # the ResNet-56 branch maps (see grid_head_launch_config's docstring): 8 x 8 working maps, one channel chunk
    for c, warps in ((16, 4), (32, 4), (64, 8)):
        cfg = grid_head_launch_config(c, 64, 32, 32, 10, torch.bfloat16)
        assert (cfg["P_PAD"], cfg["BLOCK_C"], cfg["D_PAD"], cfg["K_PAD"], cfg["BLOCK_NC"]) == (64, c, 32, 32, 16)
        assert (cfg["num_warps"], cfg["num_stages"]) == (warps, 2)
    cfg = grid_head_launch_config(64, 64, 32, 32, 100, torch.float32)
    assert (cfg["BLOCK_C"], cfg["BLOCK_NC"], cfg["num_warps"]) == (32, 32, 8)
    assert grid_head_launch_config(16, 64, 32, 32, 100, torch.bfloat16)["num_warps"] == 4
    cfg = grid_head_launch_config(20, 49, 20, 10, 3, torch.float16)
    assert (cfg["P_PAD"], cfg["BLOCK_C"], cfg["D_PAD"], cfg["K_PAD"], cfg["BLOCK_NC"]) == (64, 16, 32, 16, 16)
    cfg = grid_head_launch_config(256, 256, 32, 32, 1000, torch.bfloat16)  # max_size 16: a larger working map
    assert (cfg["P_PAD"], cfg["BLOCK_C"], cfg["num_warps"]) == (256, 16, 8)
    assert grid_head_launch_config(8, 3, 8, 1, 2, torch.float32)["P_PAD"] == 16
