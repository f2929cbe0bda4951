"""compact / scatter_rows: the C++ ops against their reference twins, registration, autograd, export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import calexnet_fast
from calexnet_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8]


def _rand(shape, dtype, device, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    return torch.randint(0, 100, shape, generator=gen).to(dtype=dtype, device=device)


def _mask(b, keep, device, gen):
    return (torch.rand(b, generator=gen) < keep).to(device)


def test_native_library_loaded():
    status = ops.library_status()
    assert status.cpu_path is not None, f"the C++ CPU library did not load: {status.cpu_error}"
    assert "cpu" not in status.fallbacks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (9, 5), (8, 3, 4, 5), (5, 2, 3, 2, 2)])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_compact_matches_reference(device, dtype, shape, keep):
    gen = torch.Generator().manual_seed(hash((shape, keep)) % 2**31)
    x = _rand(shape, dtype, device, gen)
    mask = _mask(shape[0], keep, device, gen)
    rows, index = ops.compact(x, mask)
    ref_rows, ref_index = ops.compact_reference(x, mask)
    assert torch.equal(rows, x[mask]) and torch.equal(rows, ref_rows)
    assert index.dtype == torch.int64 and torch.equal(index, ref_index)
    assert rows.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [0, 1])
def test_compact_empty_and_single(device, batch):
    x = torch.randn(batch, 4, 3, 3, device=device)
    for value in (True, False):
        mask = torch.full((batch,), value, dtype=torch.bool, device=device)
        rows, index = ops.compact(x, mask)
        assert rows.shape == (int(mask.sum()), 4, 3, 3) and torch.equal(rows, x[mask])
        assert torch.equal(index, mask.nonzero().view(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_layouts(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, 5, 4, generator=gen).to(device)
    mask = _mask(10, 0.5, device, gen)
    cl = x.contiguous(memory_format=torch.channels_last)
    rows, _ = ops.compact(cl, mask)
    assert rows.is_contiguous(memory_format=torch.channels_last) and torch.equal(rows, x[mask])
    for strided in (x[:, ::2], x.transpose(2, 3), x[::1, :, 1:], cl[:, :, ::2]):
        m = mask[: strided.shape[0]]
        rows, index = ops.compact(strided, m)
        assert torch.equal(rows, strided[m]) and torch.equal(index, m.nonzero().view(-1))
    every_other = x[::2]  # dense rows, batch stride of two rows
    rows, _ = ops.compact(every_other, mask[:5])
    assert torch.equal(rows, every_other[mask[:5]])


@pytest.mark.parametrize("device", DEVICES)
def test_compact_large_rows(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 256 * 32 * 33 + 3, generator=gen).to(device)  # odd row length: narrow vectors on GPU
    mask = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool, device=device)
    rows, index = ops.compact(x, mask)
    assert torch.equal(rows, x[mask]) and index.tolist() == [0, 3, 4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_scatter_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(2)
    out = _rand((12, 3, 4), dtype, device, gen)
    src = _rand((5, 3, 4), dtype, device, gen)
    index = torch.randperm(12, generator=gen)[:5].to(device)
    expect = out.clone()
    expect[index] = src
    assert torch.equal(ops.scatter_rows(out, src, index), expect)
    assert torch.equal(ops.scatter_rows_reference(out, src, index), expect)
    before = out.clone()
    assert torch.equal(ops.scatter_rows(out, src, index), expect) and torch.equal(out, before)
    result = ops.scatter_rows_(out, src, index)
    assert result.data_ptr() == out.data_ptr() and torch.equal(out, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_duplicates_last_wins(device):
    out = torch.zeros(4, 2, device=device)
    src = torch.arange(10.0, device=device).view(5, 2)
    index = torch.tensor([1, 3, 1, 0, 1], device=device)
    expect = torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0], [2.0, 3.0]], device=device)
    assert torch.equal(ops.scatter_rows(out, src, index), expect)
    assert torch.equal(ops.scatter_rows_reference(out, src, index), expect)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_out_of_range_raises_before_writing(device):
    out = torch.zeros(4, 3, device=device)
    src = torch.ones(3, 3, device=device)
    for bad in ([0, 4, 1], [0, -1, 2]):
        index = torch.tensor(bad, device=device)
        for fn in (ops.scatter_rows_, ops.scatter_rows__reference):
            with pytest.raises((ValueError, RuntimeError), match=r"index.*\[0, 4\).*index\[1\]"):
                fn(out, src, index)
            assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_layouts(device):
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(8, 4, 3, 5, generator=gen).to(device)
    src = torch.randn(3, 4, 3, 5, generator=gen).to(device)
    index = torch.tensor([6, 0, 3], device=device)
    expect = out.clone()
    expect[index] = src
    for o in (out.contiguous(memory_format=torch.channels_last), out.clone()):
        for s in (
            src,
            src.contiguous(memory_format=torch.channels_last),
            src.transpose(2, 3).contiguous().transpose(2, 3),
        ):
            target = o.clone(memory_format=torch.preserve_format)
            ops.scatter_rows_(target, s, index)
            assert torch.equal(target, expect)
    # an out whose rows are not dense is written through a dense copy
    wide = torch.zeros(8, 4, 3, 10, device=device)
    view = wide[..., ::2]
    ops.scatter_rows_(view, src, index)
    assert torch.equal(view[index], src) and torch.count_nonzero(wide[..., 1::2]) == 0


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 3)
    cases = [
        (lambda: ops.compact(x, torch.ones(4, dtype=torch.int32)), r"mask.*torch\.bool.*torch\.int32"),
        (lambda: ops.compact(x, torch.ones(5, dtype=torch.bool)), r"mask.*length 4.*got 5"),
        (lambda: ops.compact(x, torch.ones(4, 1, dtype=torch.bool)), r"mask.*1-D"),
        (lambda: ops.compact(torch.tensor(1.0), torch.ones(1, dtype=torch.bool)), r"x.*batch dimension"),
        (lambda: ops.scatter_rows(x, x[:2], torch.tensor([0, 1], dtype=torch.int32)), r"index.*torch\.int64"),
        (lambda: ops.scatter_rows(x, x[:2], torch.tensor([[0, 1]])), r"index.*1-D"),
        (lambda: ops.scatter_rows(x, x[:2], torch.tensor([0])), r"index.*length 2"),
        (lambda: ops.scatter_rows(x, torch.randn(2, 4), torch.tensor([0, 1])), r"out.*trailing shape"),
        (lambda: ops.scatter_rows(x, x[:2].double(), torch.tensor([0, 1])), r"src.*dtype"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: ops.compact(x.cuda(), torch.ones(4, dtype=torch.bool)), r"mask.*device"))
        cases.append((lambda: ops.scatter_rows(x.cuda(), x[:2], torch.tensor([0, 1])), r"src.*device"))
    for fn, pattern in cases:
        with pytest.raises((ValueError, RuntimeError), match=pattern):
            fn()


def test_reference_twins_raise_the_same_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"mask.*torch\.bool"):
        ops.compact_reference(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"index.*torch\.int64"):
        ops.scatter_rows_reference(x, x[:1], torch.tensor([0], dtype=torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 40),
    trailing=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    keep=st.floats(0.0, 1.0),
)
def test_roundtrip_property(batch, trailing, seed, keep):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *trailing), generator=gen)
    mask = torch.rand(batch, generator=gen) < keep
    rows, index = ops.compact(x, mask)
    back = ops.scatter_rows(torch.zeros_like(x), rows, index)
    assert torch.equal(back[mask], x[mask])
    assert torch.count_nonzero(back[~mask]) == 0
    assert torch.equal(rows, ops.compact_reference(x, mask)[0])


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 2, generator=gen, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    torch.library.opcheck(torch.ops.calexnet_fast.compact.default, (x, mask))
    out = torch.randn(6, 3, 2, generator=gen, requires_grad=True)
    src = torch.randn(3, 3, 2, generator=gen, requires_grad=True)
    index = torch.tensor([4, 0, 2])
    torch.library.opcheck(torch.ops.calexnet_fast.scatter_rows.default, (out, src, index))
    torch.library.opcheck(torch.ops.calexnet_fast.scatter_rows_.default, (out.detach().clone(), src.detach(), index))


def test_autograd():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    torch.autograd.gradcheck(lambda t: ops.compact(t, mask)[0], (x,))
    out = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    src = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([3, 0, 3, 1])  # a duplicate: only the last src row for row 3 gets a gradient
    torch.autograd.gradcheck(lambda o, s: ops.scatter_rows(o, s, index), (out, src))
    ops.scatter_rows(out, src, index).sum().backward()
    assert torch.equal(src.grad[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(src.grad[2], torch.ones(3, dtype=torch.float64))


def _compact_then_scatter(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows, index = torch.ops.calexnet_fast.compact(x, mask)
    return torch.ops.calexnet_fast.scatter_rows(torch.zeros_like(x), rows * 2, index)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    fn = torch.compile(_compact_then_scatter, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(8, 3)
    mask = torch.rand(8) < 0.5
    assert torch.equal(fn(x, mask), _compact_then_scatter(x, mask))


def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, x, mask):
            return _compact_then_scatter(x, mask)

    x = torch.randn(8, 3)
    mask = torch.rand(8) < 0.5
    ep = torch.export.export(M(), (x, mask))
    assert torch.equal(ep.module()(x, mask), _compact_then_scatter(x, mask))


def test_jit_script_save_load_fresh_process(tmp_path):
    scripted = torch.jit.script(_compact_then_scatter)
    path = tmp_path / "compact.pt"
    scripted.save(str(path))
    code = textwrap.dedent(
        f"""
        import torch, calexnet_fast
        f = torch.jit.load({str(path)!r})
        x = torch.arange(12.0).view(4, 3)
        mask = torch.tensor([True, False, True, False])
        y = f(x, mask)
        assert torch.equal(y[0], x[0] * 2) and torch.equal(y[1], torch.zeros(3)), y
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_fallback_without_library_warns_and_agrees(tmp_path):
    code = textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import calexnet_fast
        msgs = [str(w.message) for w in caught if "calexnet_fast" in str(w.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        from calexnet_fast import ops
        x = torch.randn(5, 2)
        mask = torch.tensor([True, False, True, True, False])
        rows, index = torch.ops.calexnet_fast.compact(x, mask)
        assert torch.equal(rows, x[mask]) and index.tolist() == [0, 2, 3]
        assert "cpu" in ops.library_status().fallbacks
        print("ok")
        """
    )
    env = dict(os.environ, CALEXNET_NO_EXTENSION="1")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_package_does_not_install_top_level_kernels():
    import importlib.util

    assert calexnet_fast.__file__ is not None
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "calexnet_fast" not in str(spec.origin or "")
