"""``fold_batchnorm`` / ``inference_form``: frozen stages in inference form (BatchNorm folded into the
convolution before it, max pools run where the CPU kernel is fast) give the same outputs, for the plain backbone
and the cascades alike, and leave the original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calexnet_fast import backbones
from calexnet_fast.backbones import InferenceMaxPool2d, fold_batchnorm, inference_form
from calexnet_fast.cascades import Cascade
from calexnet_fast.heads import PrototypePoolingHead
from calexnet_fast.ops import library_status


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.5, 0.5, generator=g)


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "cifar_resnet20"])
def test_backbones_fold_completely_and_agree(arch):
    torch.manual_seed(0)
    bb = backbones.cifar_resnet(20) if arch == "cifar_resnet20" else getattr(backbones, arch)(10, input_size=32)
    _randomize_batchnorm(bb)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    folded = fold_batchnorm(bb)
    assert isinstance(folded, backbones.StagedBackbone) and _count_bn(folded) == 0 and _count_bn(bb) > 0
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        want = bb(x)
        torch.testing.assert_close(folded(x), want, atol=1e-4, rtol=1e-4)
    for k, v in bb.state_dict().items():  # the original is left as it was
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in folded.parameters())


def test_cascade_folds_stages_but_not_heads():
    torch.manual_seed(0)
    bb = backbones.resnet18(10, input_size=32)
    _randomize_batchnorm(bb)
    heads = [PrototypePoolingHead(c, 10, dim=16, n_prototypes=4).eval() for c in bb.branch_channels]
    cascade = Cascade(bb, heads)  # +inf thresholds: every sample takes the backbone's logits
    folded = fold_batchnorm(cascade)
    assert isinstance(folded, Cascade) and _count_bn(folded.stages) == 0
    assert all(isinstance(h.bn, nn.BatchNorm2d) for h in folded.heads)
    x = torch.randn(5, 3, 32, 32)
    a, b = cascade(x), folded(x)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, True), (torch.bfloat16, False)])
def test_dtype_and_memory_format_are_kept(dtype, channels_last):
    torch.manual_seed(1)
    stage = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    _randomize_batchnorm(stage)
    stage = stage.eval().to(dtype)
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    if channels_last:
        stage, x = stage.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    folded = fold_batchnorm(stage)
    conv = folded[0]
    assert conv.weight.dtype == conv.bias.dtype == dtype and isinstance(folded[1], nn.Identity)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    with torch.no_grad():
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(folded(x), stage(x), atol=tol, rtol=tol)


class _Branchy(nn.Module):
    """The convolution's output feeds the BatchNorm and a second path: folding would change the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    """Data-dependent control flow (``torch.fx`` cannot trace it) around a Sequential holding a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if bool(x.sum() > -1e9) else x


def test_only_safe_pairs_are_folded():
    torch.manual_seed(2)
    training = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # train mode: batch statistics
    shared_conv = nn.Conv2d(3, 3, 1)
    shared = nn.Sequential(shared_conv, nn.BatchNorm2d(3), shared_conv)  # one conv called twice
    for model, kept in [(training, 1), (_Branchy().eval(), 1), (shared.eval(), 1), (_Untraceable().eval(), 0)]:
        _randomize_batchnorm(model)
        folded = fold_batchnorm(model)
        assert _count_bn(folded) == kept, type(model).__name__
        if not model.training:
            x = torch.randn(2, 3, 5, 5)
            with torch.no_grad():
                torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="module"):
        fold_batchnorm([nn.Conv2d(3, 3, 1)])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_inference_form_pools_in_channels_last_with_the_same_values(arch):
    torch.manual_seed(3)
    bb = getattr(backbones, arch)(10, input_size=32)
    _randomize_batchnorm(bb)
    form = inference_form(bb)
    pools = [m for m in form.modules() if isinstance(m, InferenceMaxPool2d)]
    assert len(pools) == 1 and _count_bn(form) == 0  # the stem pool of a torchvision ResNet
    assert not any(isinstance(m, InferenceMaxPool2d) for m in bb.modules())  # the original is untouched
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(form(x), fold_batchnorm(bb)(x), rtol=0, atol=0)
        torch.testing.assert_close(form(x), bb(x), atol=1e-4, rtol=1e-4)
    cascade = inference_form(
        Cascade(bb, [PrototypePoolingHead(c, 10, dim=8, n_prototypes=2) for c in bb.branch_channels])
    )
    assert (
        isinstance(cascade, Cascade) and sum(isinstance(m, InferenceMaxPool2d) for m in cascade.stages.modules()) == 1
    )
    with torch.inference_mode():  # the inference form scripts too (Cascade.to_torchscript), with the same outputs
        torch.testing.assert_close(cascade.to_torchscript()(x).logits, cascade(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(
    "pool, dtype",
    [
        (nn.MaxPool2d(3, 2, 1), torch.float32),  # the C++ op on CPU
        (nn.MaxPool2d((3, 2), (1, 2), (1, 0)), torch.float64),
        (nn.MaxPool2d(3, 2, 1), torch.bfloat16),  # channels_last on CPU
        (nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.float32),
        (nn.MaxPool2d(2, dilation=2), torch.float32),
    ],
)
def test_inference_max_pool_equals_the_pool(layout, pool, dtype, device):
    wrapped = InferenceMaxPool2d(pool)
    loaded = library_status().cpu_path is not None
    assert wrapped._op == (loaded and not pool.ceil_mode and pool.dilation == 1)  # else channels_last (CPU)
    x = torch.randn(4, 6, 11, 9)
    x[0, 0, 0, 0] = float("nan")
    x[1, 2] = float("-inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(4, 6, 11, 18)[..., ::2]
    x = x.to(device, dtype)
    got, want = wrapped(x), pool(x)
    assert got.is_contiguous() == want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(wrapped(x[:0]), pool(x[:0]))
    with pytest.raises(ValueError, match="without return_indices"):
        InferenceMaxPool2d(nn.MaxPool2d(2, return_indices=True))
    assert isinstance(inference_form(nn.MaxPool2d(2)), InferenceMaxPool2d)
