"""compact: the C++ op against its reference twin, layouts, errors, autograd, torch.compile / export."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from calexnet_fast.ops import compact
from calexnet_fast.reference import compact_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8]


def _mask(b, keep, device, gen):
    return (torch.rand(b, generator=gen) < keep).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (9, 5), (8, 3, 4, 5), (5, 2, 3, 2, 2)])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_compact_matches_reference(device, dtype, shape, keep, random_tensor):
    gen = torch.Generator().manual_seed(hash((shape, keep)) % 2**31)
    x = random_tensor(shape, dtype, device, gen)
    mask = _mask(shape[0], keep, device, gen)
    rows, index = compact(x, mask)
    ref_rows, ref_index = compact_reference(x, mask)
    assert torch.equal(rows, x[mask]) and torch.equal(rows, ref_rows)
    assert index.dtype == torch.int64 and torch.equal(index, ref_index)
    assert rows.is_contiguous()


@pytest.mark.parametrize("batch", [0, 1])
def test_compact_empty_and_single(device, batch):
    x = torch.randn(batch, 4, 3, 3, device=device)
    for value in (True, False):
        mask = torch.full((batch,), value, dtype=torch.bool, device=device)
        rows, index = compact(x, mask)
        assert rows.shape == (int(mask.sum()), 4, 3, 3) and torch.equal(rows, x[mask])
        assert torch.equal(index, mask.nonzero().view(-1))


def test_compact_layouts(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, 5, 4, generator=gen).to(device)
    mask = _mask(10, 0.5, device, gen)
    cl = x.contiguous(memory_format=torch.channels_last)
    rows, _ = compact(cl, mask)
    assert rows.is_contiguous(memory_format=torch.channels_last) and torch.equal(rows, x[mask])
    for strided in (x[:, ::2], x.transpose(2, 3), x[::1, :, 1:], cl[:, :, ::2]):
        m = mask[: strided.shape[0]]
        rows, index = compact(strided, m)
        assert torch.equal(rows, strided[m]) and torch.equal(index, m.nonzero().view(-1))
    every_other = x[::2]  # dense rows, batch stride of two rows
    rows, _ = compact(every_other, mask[:5])
    assert torch.equal(rows, every_other[mask[:5]])


@pytest.mark.parametrize("shape", [(6, 1, 3, 1), (6, 4, 1, 1), (6, 1, 1, 1), (6, 2, 3, 1), (6, 3, 2, 2), (6, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compact_strides_are_pytorchs(device, shape, channels_last):
    """The rows get the strides ``torch.empty`` gives their shape in x's layout (size-1 dims
    included; a map both contiguous and channels_last counts as contiguous)."""
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    out = torch.contiguous_format if x.is_contiguous() else fmt
    for mask in (torch.tensor([1, 0, 1, 1, 0, 1]), torch.zeros(6), torch.ones(6)):
        rows, _ = compact(x, mask.bool().to(device))
        assert rows.stride() == torch.empty(rows.shape, memory_format=out).stride()
        assert torch.equal(rows, x[mask.bool().to(device)])


def test_compact_large_rows(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 256 * 32 * 33 + 3, generator=gen).to(device)  # odd row length: narrow vectors on GPU
    mask = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool, device=device)
    rows, index = compact(x, mask)
    assert torch.equal(rows, x[mask]) and index.tolist() == [0, 3, 4]


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 3)
    cases = [
        (lambda: compact(x, torch.ones(4, dtype=torch.int32)), r"mask.*torch\.bool.*torch\.int32"),
        (lambda: compact(x, torch.ones(5, dtype=torch.bool)), r"mask.*length 4.*got 5"),
        (lambda: compact(x, torch.ones(4, 1, dtype=torch.bool)), r"mask.*1-D"),
        (lambda: compact(torch.tensor(1.0), torch.ones(1, dtype=torch.bool)), r"x.*batch dimension"),
    ]
    for fn, pattern in cases:
        with pytest.raises((ValueError, RuntimeError), match=pattern):
            fn()
    with pytest.raises(ValueError, match=r"mask.*torch\.bool"):
        compact_reference(x, torch.ones(4))


def test_meta_and_non_tensor_arguments_are_named():
    """compact's row count depends on the mask's values: meta tensors are refused by the op and its twin alike;
    a list instead of a tensor is named too."""
    x, mask = torch.randn(4, 3), torch.ones(4, dtype=torch.bool)
    for fn in (compact, compact_reference):
        with pytest.raises(ValueError, match="compact: x: expected a tensor with data .* got a meta tensor"):
            fn(x.to("meta"), mask.to("meta"))
        with pytest.raises(ValueError, match=r"compact: mask: expected device meta \(that of x\), got cpu"):
            fn(x.to("meta"), mask)
    with pytest.raises(ValueError, match="compact: x: expected a torch.Tensor, got list"):
        compact_reference(x.tolist(), mask)
    with pytest.raises(ValueError, match="compact: mask: expected a torch.Tensor, got list"):
        compact_reference(x, mask.tolist())
    with pytest.raises(RuntimeError, match="argument 'mask'"):  # the op's schema names it
        compact(x, mask.tolist())


@pytest.mark.needs_cuda
def test_mask_on_another_device_is_named():
    with pytest.raises((ValueError, RuntimeError), match=r"mask.*device"):
        compact(torch.randn(4, 3, device="cuda"), torch.ones(4, dtype=torch.bool))


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 2, generator=gen, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    torch.library.opcheck(torch.ops.calexnet_fast.compact.default, (x, mask))


def test_autograd():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    torch.autograd.gradcheck(lambda t: compact(t, mask)[0], (x,))


def compact_then_scatter(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a cascade stage does with the ops: gather the survivors, work on them, write them back."""
    rows, index = torch.ops.calexnet_fast.compact(x, mask)
    return torch.ops.calexnet_fast.scatter_rows(torch.zeros_like(x), rows * 2, index)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    fn = torch.compile(compact_then_scatter, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(8, 3)
    mask = torch.rand(8) < 0.5
    assert torch.equal(fn(x, mask), compact_then_scatter(x, mask))


def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, x, mask):
            return compact_then_scatter(x, mask)

    x = torch.randn(8, 3)
    mask = torch.rand(8) < 0.5
    ep = torch.export.export(M(), (x, mask))
    assert torch.equal(ep.module()(x, mask), compact_then_scatter(x, mask))


def test_jit_script_save_load_fresh_process(tmp_path, package_env):
    """A TorchScript graph calling the ops runs in a fresh process once calexnet_fast is imported."""
    scripted = torch.jit.script(compact_then_scatter)
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
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=package_env, timeout=240, cwd=tmp_path
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
