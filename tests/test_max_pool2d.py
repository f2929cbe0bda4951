"""max_pool2d: the C++ CPU op (the inference form's max pool) against its twin, torch's own max pooling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calexnet_fast.ops import library_status, max_pool2d
from calexnet_fast.reference import max_pool2d_reference

needs_op = pytest.mark.skipif(library_status().cpu_path is None, reason="the CPU op library is not loaded")


def _same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((64, 8, 16, 16), 3, 2, 1),  # a ResNet stem's pool
        ((3, 5, 15, 17), 3, 2, 1),  # odd sizes: partial vectors and windows clipped on both sides
        ((2, 3, 9, 13), (3, 2), (1, 2), (1, 0)),
        ((2, 2, 6, 6), 2, 2, 0),
        ((1, 4, 7, 5), 5, 3, 2),  # stride 3: one output at a time
        ((2, 1, 1, 1), 1, 1, 0),
        ((0, 3, 8, 8), 3, 2, 1),
    ],
)
def test_op_matches_twin(dtype, shape, kernel, stride, padding):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if x.numel():
        x.view(-1)[:: max(1, x.numel() // 7)] = float("nan")  # NaNs propagate to every window holding one
        x.view(-1)[3 :: max(1, x.numel() // 5)] = float("-inf")
    _same(max_pool2d(x, kernel, stride, padding), torch.nn.functional.max_pool2d(x, kernel, stride, padding))


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    kernel=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    data=st.data(),
)
def test_op_matches_twin_on_random_geometries(h, w, kernel, stride, data):
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    if h + 2 * padding[0] < kernel[0] or w + 2 * padding[1] < kernel[1]:
        return
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(2, 3, h, w, dtype=dtype, generator=torch.Generator().manual_seed(h * 31 + w))
    row, col = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    x[data.draw(st.integers(0, 1)), 1, row, col] = float("nan")
    _same(max_pool2d(x, kernel, stride, padding), max_pool2d_reference(x, *kernel, *stride, *padding))


@needs_op
@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 3, 8, 8)[..., ::2], 3, 2, 1), r"x: expected a contiguous 4-D CPU tensor"),
        ((torch.randn(2, 3, 8, 8).half(), 3, 2, 1), r"x: expected torch.float32 or torch.float64, got torch.float16"),
        ((torch.randn(2, 3, 8, 8), 3, 2, 2), r"padding \(2, 2\) should be at most half of the kernel \(3, 3\)"),
        ((torch.randn(2, 3, 2, 2), 5, 1, 1), r"the 2x2 map \(padded by 1, 1\) is smaller than the kernel \(5, 5\)"),
        ((torch.randn(2, 3, 8, 8), 3, 0, 1), r"expected kernel and stride >= 1"),
    ],
)
def test_op_errors(args, message):
    with pytest.raises(RuntimeError, match=message):
        max_pool2d(*args)


def test_opcheck():
    x = torch.randn(2, 3, 9, 7)
    torch.library.opcheck(torch.ops.calexnet_fast.max_pool2d.default, (x, 3, 3, 2, 2, 1, 1))


@needs_op
def test_bench_script_times_the_op_against_torch(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_max_pool", Path(__file__).parents[1] / "bench" / "max_pool.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"] == "max_pool2d"
    (row,) = out["rows"]
    assert row["shape"] == [64, 64, 16, 16] and set(row["speedup"]) == {"nchw", "channels_last"} and row["GBps"] > 0
