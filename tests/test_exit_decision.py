"""exit_decision: the Triton kernel against its reference twin (the exit rule), the CPU path, registration,
errors, launch configuration.

The ``kernel``-marked tests launch the kernel itself: natively on CUDA through the public op, or on CPU
tensors through the internal launcher in the interpreter worker that ``test_interpreter_run`` starts (see
tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.kernels import exit_decision, exit_decision_launch_config
from calexnet_fast.kernels.exit_decision import _launch_exit_decision


def _fast_exit_decision(logits, thresholds):
    if logits.is_cuda:
        return exit_decision(logits, thresholds)
    return _launch_exit_decision(logits, thresholds)


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


@pytest.mark.kernel
@pytest.mark.parametrize("n,c,dtype", EXIT_CASES, ids=lambda v: str(v))
def test_kernel_exit_decision(n, c, dtype, kernel_device):
    z = _special_logits(n, c, dtype, seed=c).to(kernel_device)
    g = torch.Generator().manual_seed(1)
    thr = torch.rand(c, generator=g) * 0.6
    thr[:3] = torch.tensor([float("inf"), 0.0, 1.0])
    thr = thr.to(kernel_device)
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


@pytest.mark.kernel
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_exit_decision_tiny_batches(n, kernel_device):
    z = torch.randn(n, 10).to(kernel_device)
    thr = torch.full((10,), 0.05, device=kernel_device)
    ex, pred, conf = _fast_exit_decision(z, thr)
    assert ex.shape == pred.shape == conf.shape == (n,)
    assert (ex.dtype, pred.dtype, conf.dtype) == (torch.bool, torch.int64, torch.float32)
    ex_r, pred_r, conf_r = exit_decision_reference(z, thr)
    assert torch.equal(pred, pred_r) and torch.equal(ex, ex_r)
    torch.testing.assert_close(conf, conf_r)


@pytest.mark.kernel
def test_kernel_exit_decision_column_offsets_past_int32(kernel_device):
    """Logits as a column view of a buffer of over 2**31 elements: the class stride fits in int32 but
    (C - 1) * stride does not, so the kernel must form the column offsets in int64 (a wrapped offset reads
    outside the buffer). 4 GiB of address space; only the few touched pages are real on CPU."""
    n, c, stride = 3, 3, 2**30 + 8
    try:
        base = torch.empty((c - 1) * stride + n, dtype=torch.float16, device=kernel_device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    z = base.as_strided((n, c), (1, stride))
    z.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 5.0, 1.0]]))
    thr = torch.tensor([0.9, 0.5, 0.5], device=kernel_device)
    ex, pred, conf = _fast_exit_decision(z, thr)
    ex_r, pred_r, conf_r = exit_decision_reference(z, thr)
    assert pred.tolist() == pred_r.tolist() == [2, 0, 1]
    assert torch.equal(ex, ex_r) and ex.tolist() == [True, False, True]
    torch.testing.assert_close(conf, conf_r)


@pytest.mark.needs_cuda
def test_eager_path_and_op_path_agree():
    """On CUDA the eager shortcut (no dispatcher) and the registered op run the same launch."""
    kernel_device = "cuda"
    z = torch.randn(20, 10, device=kernel_device) * 3
    thr = torch.full((10,), 0.2, device=kernel_device)
    for u, v in zip(exit_decision(z, thr), torch.ops.calexnet_fast.exit_decision(z, thr), strict=True):
        assert torch.equal(u, v)


def test_interpreter_run(run_kernel_tests_interpreted):
    """Every kernel test above, under TRITON_INTERPRET=1 on CPU tensors, in a fresh process."""
    run_kernel_tests_interpreted(__file__)


def test_public_op_on_cpu_uses_the_reference():
    z = torch.randn(7, 10)
    thr = torch.rand(10) * 0.4
    thr[2] = float("inf")
    for a, b in zip(exit_decision(z, thr), exit_decision_reference(z, thr), strict=True):
        assert torch.equal(a, b)


def test_opcheck():
    thr = torch.rand(10)
    thr[0] = float("inf")
    for z in (torch.randn(6, 10), torch.randn(0, 10), torch.randn(4, 10).bfloat16()):
        torch.library.opcheck(torch.ops.calexnet_fast.exit_decision.default, (z, thr))


def test_bad_inputs():
    thr = torch.rand(10)
    with pytest.raises(ValueError, match=r"logits: expected a 2-D tensor \[N, C\], got \[10\]"):
        exit_decision(torch.randn(10), thr)
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[10\]"):
        exit_decision(torch.randn(3, 10), torch.rand(1, 10))
    with pytest.raises(ValueError, match="logits: expected a dtype in"):
        exit_decision(torch.ones(3, 10, dtype=torch.int64), thr)
    # the op called directly checks its arguments too, on CPU and on meta tensors (its fake kernel)
    op = torch.ops.calexnet_fast.exit_decision
    with pytest.raises(ValueError, match="logits: expected a dtype in"):
        op(torch.ones(3, 10, dtype=torch.int64), thr)
    with pytest.raises(ValueError, match=r"logits: expected at least one class, got shape \[3, 0\]"):
        op(torch.randn(3, 0), thr[:0])
    with pytest.raises(ValueError, match=r"logits: expected a 2-D tensor \[N, C\], got \[10\]"):
        op(torch.randn(10, device="meta"), thr.to("meta"))
    exit_, pred, conf = op(torch.randn(3, 10, device="meta"), thr.to("meta"))
    assert exit_.shape == pred.shape == conf.shape == (3,) and conf.device.type == "meta"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            _launch_exit_decision(torch.randn(3, 10), thr)


def test_launch_config():
    for c in (1, 10, 100, 1000, 5000):
        e = exit_decision_launch_config(300, c)
        assert e["BLOCK_C"] * e["BLOCK_N"] <= 4096 and e["BLOCK_C"] >= min(256, c)
        assert e["grid"] == (-(-300 // e["BLOCK_N"]),)
        assert e["num_warps"] == 8  # 4 warps spill up to ~950 bytes for sm_90a (see the docstring)
