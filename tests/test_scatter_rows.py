"""scatter_rows_ / scatter_rows: the C++ ops against their reference twins, duplicates, index range, layouts,
errors, autograd, and the round trip with compact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calexnet_fast.ops import compact, scatter_rows, scatter_rows_
from calexnet_fast.reference import compact_reference, scatter_rows__reference, scatter_rows_reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_scatter_matches_reference(device, dtype, random_tensor):
    gen = torch.Generator().manual_seed(2)
    out = random_tensor((12, 3, 4), dtype, device, gen)
    src = random_tensor((5, 3, 4), dtype, device, gen)
    index = torch.randperm(12, generator=gen)[:5].to(device)
    expect = out.clone()
    expect[index] = src
    assert torch.equal(scatter_rows(out, src, index), expect)
    assert torch.equal(scatter_rows_reference(out, src, index), expect)
    before = out.clone()
    assert torch.equal(scatter_rows(out, src, index), expect) and torch.equal(out, before)
    result = scatter_rows_(out, src, index)
    assert result.data_ptr() == out.data_ptr() and torch.equal(out, expect)


def test_scatter_duplicates_last_wins(device):
    out = torch.zeros(4, 2, device=device)
    src = torch.arange(10.0, device=device).view(5, 2)
    index = torch.tensor([1, 3, 1, 0, 1], device=device)
    expect = torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0], [2.0, 3.0]], device=device)
    assert torch.equal(scatter_rows(out, src, index), expect)
    assert torch.equal(scatter_rows_reference(out, src, index), expect)


def test_scatter_out_of_range_raises_before_writing(device):
    out = torch.zeros(4, 3, device=device)
    src = torch.ones(3, 3, device=device)
    for bad in ([0, 4, 1], [0, -1, 2]):
        index = torch.tensor(bad, device=device)
        for fn in (scatter_rows_, scatter_rows__reference):
            with pytest.raises((ValueError, RuntimeError), match=r"index.*\[0, 4\).*index\[1\]"):
                fn(out, src, index)
            assert torch.count_nonzero(out) == 0


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
            scatter_rows_(target, s, index)
            assert torch.equal(target, expect)
    # an out whose rows are not dense is written through a dense copy
    wide = torch.zeros(8, 4, 3, 10, device=device)
    view = wide[..., ::2]
    scatter_rows_(view, src, index)
    assert torch.equal(view[index], src) and torch.count_nonzero(wide[..., 1::2]) == 0


def _scatter_expected(out, src, index):
    """out[index[j]] = src[j] in order (last duplicate wins), everything read before anything is written."""
    expect, src, index = out.clone(), src.clone(), index.clone()
    for j in range(index.shape[0]):
        expect[index[j]] = src[j]
    return expect


def test_scatter_src_overlapping_out(device):
    """src (or index) sharing memory with out is read as it was before the call, by the op and its twin."""

    def rows(n, width=2, dtype=torch.float32):
        return torch.arange(float(n), device=device).view(n, 1).repeat(1, width).to(dtype)

    cases = [
        (lambda x: x[0:3], [1, 2, 3]),  # the rows are shifted down: each is read after the one above is written
        (lambda x: x[2:5], [0, 1, 2]),  # shifted up
        (lambda x: x.flip(0), [0, 1, 2, 3, 4]),  # the whole batch, reversed, in place
        (lambda x: x[1:4], [3, 1, 3]),  # with a duplicate
        (lambda x: x[0:4:2], [1, 3]),  # a strided view of out
    ]
    for make_src, idx in cases:
        for fn in (scatter_rows_, scatter_rows__reference):
            x = rows(5)
            index = torch.tensor(idx, device=device)
            expect = _scatter_expected(x, make_src(x), index)
            fn(x, make_src(x), index)
            assert torch.equal(x, expect), (fn.__name__, idx, x[:, 0].tolist(), expect[:, 0].tolist())
    # the fuzz reproducer: x[:, 0] = [0, 0, 1, 2, 4]
    x = rows(5)
    scatter_rows_(x, x[0:3], torch.tensor([1, 2, 3], device=device))
    assert x[:, 0].tolist() == [0.0, 0.0, 1.0, 2.0, 4.0]
    # channels_last rows, src a shifted view of out
    for fn in (scatter_rows_, scatter_rows__reference):
        y = torch.arange(6 * 8 * 2 * 2.0, device=device).view(6, 8, 2, 2).contiguous(memory_format=torch.channels_last)
        index = torch.tensor([2, 3, 4, 5], device=device)
        expect = _scatter_expected(y, y[0:4], index)
        fn(y, y[0:4], index)
        assert torch.equal(y, expect), fn.__name__
    # index sharing memory with out (a 1-D int64 out)
    for fn in (scatter_rows_, scatter_rows__reference):
        z = torch.tensor([3, 0, 1, 2], device=device)
        expect = _scatter_expected(z, z.flip(0), z)
        fn(z, z.flip(0), z)
        assert torch.equal(z, expect), fn.__name__


def test_scatter_out_sharing_memory_raises(device):
    """An out whose elements share memory is refused by the op and its twin alike, before anything is written
    (even with an empty index); scatter_rows (out of place) writes a dense copy and accepts it."""
    base = torch.zeros(12, device=device)
    outs = [
        base[:3].view(1, 3).expand(4, 3),  # rows share memory
        base[:4].view(4, 1).expand(4, 3),  # elements within a row share memory
        base.as_strided((4, 3), (1, 1)),  # overlapping rows
        base.as_strided((3, 2, 2), (2, 1, 1)),
    ]
    src = torch.ones(2, 3, device=device)
    for out in outs:
        s = src[:, : out.shape[1]].expand(2, *out.shape[1:]).contiguous()
        for index in (torch.tensor([0, 2], device=device), torch.tensor([], dtype=torch.int64, device=device)):
            s_ = s[: index.shape[0]]
            for fn in (scatter_rows_, scatter_rows__reference):
                with pytest.raises((ValueError, RuntimeError), match=r"scatter_rows_: out: .*do not share memory"):
                    fn(out, s_, index)
                assert torch.count_nonzero(base) == 0
        index = torch.tensor([0, 2], device=device)
        assert torch.equal(scatter_rows(out, s, index), scatter_rows_reference(out, s, index))
    # strided but not overlapping: accepted, and the same as the twin
    wide = torch.zeros(4, 6, device=device)
    for fn in (scatter_rows_, scatter_rows__reference):
        view = wide.clone()[:, ::2]
        fn(view, src, torch.tensor([3, 1], device=device))
        assert torch.equal(view, _scatter_expected(torch.zeros(4, 3, device=device), src, torch.tensor([3, 1])))


@pytest.mark.needs_cuda
def test_out_of_range_index_named_from_a_side_stream():
    """The bad index value is read back on the current stream (here a side stream, busy until just before),
    not on the legacy default stream, and nothing is written."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        big = torch.randn(2048, 2048, device="cuda")
        for _ in range(4):
            big = torch.tanh(big @ big)  # keep the stream busy while the index is made behind it
        index = torch.tensor([0, 7, 2], device="cuda") + (big[0, :3] * 0).long()
        out = torch.zeros(4, 3, device="cuda")
        with pytest.raises((ValueError, RuntimeError), match=r"index\[1\] = 7"):
            scatter_rows_(out, torch.ones(3, 3, device="cuda"), index)
        assert torch.count_nonzero(out) == 0


def test_elements_may_share_memory_is_sound():
    """The overlap test shared by the op and its twin never calls an overlapping layout free of overlap, and the
    op and the twin agree (same answer, or both refuse) on random strided views, src a view of the same
    storage."""
    from calexnet_fast.reference import elements_may_share_memory

    gen = torch.Generator().manual_seed(7)
    for _ in range(300):
        ndim = int(torch.randint(1, 4, (1,), generator=gen))
        size = torch.randint(1, 4, (ndim,), generator=gen).tolist()
        stride = torch.randint(0, 7, (ndim,), generator=gen).tolist()
        span = sum((n - 1) * s for n, s in zip(size, stride)) + 1
        base = torch.arange(float(span + 40))
        offsets = torch.zeros(1, dtype=torch.int64)
        for n, s in zip(size, stride):
            offsets = (offsets[:, None] + torch.arange(n) * s).reshape(-1)
        if len(set(offsets.tolist())) < offsets.numel():
            assert elements_may_share_memory(base.as_strided(size, stride)), (size, stride)
        n_src = int(torch.randint(0, size[0] + 1, (1,), generator=gen))
        start = int(torch.randint(0, 8, (1,), generator=gen))  # src: dense rows somewhere in the same storage
        src_shape = (n_src, *size[1:])
        index = torch.randint(0, size[0], (n_src,), generator=gen)
        results = []
        for fn in (scatter_rows_, scatter_rows__reference):
            b = base.clone()
            o = b.as_strided(size, stride)
            s = b[start:].as_strided(src_shape, torch.empty(src_shape).stride())
            try:
                fn(o, s, index)
                results.append(b)
            except (ValueError, RuntimeError) as e:
                assert "do not share memory" in str(e)
                results.append(None)
        assert (results[0] is None) == (results[1] is None), (size, stride)
        if results[0] is not None:
            assert torch.equal(results[0], results[1]), (size, stride, index)


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 3)
    cases = [
        (lambda: scatter_rows(x, x[:2], torch.tensor([0, 1], dtype=torch.int32)), r"index.*torch\.int64"),
        (lambda: scatter_rows(x, x[:2], torch.tensor([[0, 1]])), r"index.*1-D"),
        (lambda: scatter_rows(x, x[:2], torch.tensor([0])), r"index.*length 2"),
        (lambda: scatter_rows(x, torch.randn(2, 4), torch.tensor([0, 1])), r"out.*trailing shape"),
        (lambda: scatter_rows(x, x[:2].double(), torch.tensor([0, 1])), r"src.*dtype"),
    ]
    for fn, pattern in cases:
        with pytest.raises((ValueError, RuntimeError), match=pattern):
            fn()
    with pytest.raises(ValueError, match=r"index.*torch\.int64"):
        scatter_rows_reference(x, x[:1], torch.tensor([0], dtype=torch.int32))


def test_meta_tensors_and_non_tensor_arguments():
    """On meta tensors the op (its fake kernel) and the twins check the arguments and write nothing; a list
    instead of a tensor is named by the twins (and by the op's schema)."""
    out, src, index = torch.empty(4, 3, device="meta"), torch.empty(2, 3, device="meta"), torch.tensor([0, 9])
    for fn in (scatter_rows_, scatter_rows__reference):
        assert fn(out, src, index.to("meta")) is out
        with pytest.raises(ValueError, match="scatter_rows: src: expected dtype torch.float32"):
            fn(out, src.double(), index.to("meta"))
    for fn in (scatter_rows, scatter_rows_reference):
        result = fn(out, src, index.to("meta"))
        assert result.device.type == "meta" and result.shape == (4, 3)
    x = torch.zeros(4, 3)
    for fn in (scatter_rows__reference, scatter_rows_reference):
        with pytest.raises(ValueError, match="scatter_rows: src: expected a torch.Tensor, got list"):
            fn(x, [[1.0, 2.0, 3.0]], torch.tensor([0]))
        with pytest.raises(ValueError, match="scatter_rows: index: expected a torch.Tensor, got list"):
            fn(x, x[:1], [0])
    with pytest.raises(RuntimeError, match="argument 'index'"):
        scatter_rows_(x, x[:1], [0])
    assert torch.count_nonzero(x) == 0


@pytest.mark.needs_cuda
def test_src_on_another_device_is_named():
    with pytest.raises((ValueError, RuntimeError), match=r"src.*device"):
        scatter_rows(torch.randn(4, 3, device="cuda"), torch.randn(2, 3), torch.tensor([0, 1]))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 40),
    trailing=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    keep=st.floats(0.0, 1.0),
)
def test_roundtrip_with_compact_property(batch, trailing, seed, keep):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *trailing), generator=gen)
    mask = torch.rand(batch, generator=gen) < keep
    rows, index = compact(x, mask)
    back = scatter_rows(torch.zeros_like(x), rows, index)
    assert torch.equal(back[mask], x[mask])
    assert torch.count_nonzero(back[~mask]) == 0
    assert torch.equal(rows, compact_reference(x, mask)[0])


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(6, 3, 2, generator=gen, requires_grad=True)
    src = torch.randn(3, 3, 2, generator=gen, requires_grad=True)
    index = torch.tensor([4, 0, 2])
    torch.library.opcheck(torch.ops.calexnet_fast.scatter_rows.default, (out, src, index))
    torch.library.opcheck(torch.ops.calexnet_fast.scatter_rows_.default, (out.detach().clone(), src.detach(), index))


def test_autograd():
    out = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    src = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([3, 0, 3, 1])  # a duplicate: only the last src row for row 3 gets a gradient
    torch.autograd.gradcheck(lambda o, s: scatter_rows(o, s, index), (out, src))
    scatter_rows(out, src, index).sum().backward()
    assert torch.equal(src.grad[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(src.grad[2], torch.ones(3, dtype=torch.float64))
