"""On a machine with a GPU, the fast paths are what runs: the C++/CUDA op library is loaded and dispatched to, and
Triton runs natively. Without these checks a missing or unloadable CUDA library would silently test the reference
twins registered in its place, and a Triton that cannot run would skip its tests.

Skipped without a CUDA device; failed instead under CALEXNET_REQUIRE_GPU=1, as ``bench/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.kernels import proto_head_operand_dtypes, triton_status
from calexnet_fast.kernels._triton import interpreting
from calexnet_fast.kernels.exit_decision import _launch_exit_decision
from calexnet_fast.kernels.proto_head import _launch_proto_head_exit
from calexnet_fast.ops import compact, library_status, scatter_rows_
from calexnet_fast.reference import proto_head_exit_reference

pytestmark = pytest.mark.needs_cuda


def test_cuda_op_library_is_loaded_and_dispatched_to():
    status = library_status()
    assert status.cpu_path is not None, f"the CPU op library is not loaded: {status.cpu_error}"
    assert status.cuda_path is not None, f"the CUDA op library is not loaded: {status.cuda_error}"
    assert not status.fallbacks, f"reference twins are registered for {status.fallbacks}"
    assert status.build_info.get("cuda_built") == "ON", status.build_info
    for op in ("compact", "scatter_rows_", "scatter_rows"):
        dump = torch._C._dispatch_dump(f"calexnet_fast::{op}")
        assert re.search(r"^CUDA: registered at .*ops_cuda\.cu", dump, re.M), dump
    # and they give the reference's answers on CUDA
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, 4, generator=g).cuda()
    mask = (torch.rand(300, generator=g) < 0.4).cuda()
    rows, index = compact(x, mask)
    assert torch.equal(rows, x[mask]) and torch.equal(index, mask.nonzero().view(-1))
    out = torch.zeros_like(x)
    scatter_rows_(out, rows, index)
    assert torch.equal(out[mask], x[mask]) and torch.count_nonzero(out[~mask]) == 0


def test_triton_runs_natively(make_head):
    usable, how = triton_status()
    assert usable and not interpreting(), how
    assert "native" in how, how
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 100, generator=g) * 3).cuda()
    thr = torch.full((100,), 0.3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the reference
        ex, pred, conf = _launch_exit_decision(z, thr)
        ex_r, pred_r, conf_r = exit_decision_reference(z, thr)
        assert torch.equal(pred, pred_r) and torch.equal(ex, ex_r)
        torch.testing.assert_close(conf, conf_r)
        folded = make_head(64, 10, seed=2).fold().cuda()
        x = torch.randn(4, 64, 8, 8, generator=g).cuda().to(torch.bfloat16)
        thr = torch.full((10,), 0.2, device="cuda")
        logits = _launch_proto_head_exit(x, *folded.operands(proto_head_operand_dtypes(x.dtype)), thr)[0]
        ref = proto_head_exit_reference(x, *folded.operands(), thr)[0]
        torch.testing.assert_close(logits, ref, rtol=2e-2, atol=2e-2)
