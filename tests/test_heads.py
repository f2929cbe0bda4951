"""PrototypePoolingHead (docs/design.md §1 steps 1-5) and its folded inference form."""

import pytest
import torch
import torch.nn.functional as F

from calexnet_fast.heads import FoldedPrototypeHead, GridPrototypeHead, PrototypePoolingHead
from calexnet_fast.reference import folded_head_reference


def _naive_pooled(head: PrototypePoolingHead, f: torch.Tensor) -> torch.Tensor:
    """Steps 1-4 written out per pixel and prototype with F.cosine_similarity (independent of the module)."""
    u = torch.relu(head.bn(head.proj(f)))  # eval-mode BN
    n, d, h, w = u.shape
    rows = []
    for i in range(n):
        pix = u[i].reshape(d, h * w).t()  # [HW, D]
        s = torch.stack(
            [head.gamma * F.cosine_similarity(pix, p.expand_as(pix), dim=1, eps=1e-8) for p in head.prototypes]
        )  # [K, HW]
        rows.append(torch.cat([s.max(dim=1).values, s.mean(dim=1), pix.mean(dim=0)]))
    return torch.stack(rows)


def test_forward_matches_definition(make_head):
    head = make_head(c=12, n_classes=5, dim=16, k=6)
    f = torch.randn(3, 12, 5, 4)
    with torch.no_grad():
        pooled = head.pooled_features(f)
        naive = _naive_pooled(head, f)
        assert pooled.shape == (3, 2 * 6 + 16)
        torch.testing.assert_close(pooled, naive, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(f), head.classifier(naive), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "c,n_classes,dim,k,h,w", [(64, 10, 128, 32, 7, 7), (48, 100, 96, 10, 8, 8), (3, 2, 16, 1, 1, 5)]
)
def test_fold_matches_unfolded(c, n_classes, dim, k, h, w, make_head):
    head = make_head(c, n_classes, dim, k)
    assert not torch.allclose(head.bn.running_mean, torch.zeros(dim))
    assert not torch.allclose(head.bn.running_var, torch.ones(dim))
    folded = head.fold()
    f = torch.randn(5, c, h, w) * 2.0 + 0.5
    with torch.no_grad():
        expect = head(f)
        got = folded(f)
        got_cl = folded(f.to(memory_format=torch.channels_last))
    assert got.shape == (5, n_classes)
    torch.testing.assert_close(got, expect, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_cl, expect, rtol=2e-5, atol=2e-5)
    # and against an fp64 evaluation of the unfolded head: the fold loses nothing beyond fp32 rounding
    with torch.no_grad():
        exact = head.double()(f.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_fold_buffers(make_head):
    head = make_head(c=20, n_classes=7, dim=32, k=4)
    folded = head.fold()
    assert isinstance(folded, FoldedPrototypeHead)
    shapes = {name: list(b.shape) for name, b in folded.named_buffers()}
    assert shapes == {
        "proj_weight": [32, 20],
        "proj_bias": [32],
        "prototypes": [4, 32],
        "cls_weight": [7, 2 * 4 + 32],
        "cls_bias": [7],
    }
    assert list(folded.parameters()) == []
    # prototypes are normalised and scaled by gamma
    torch.testing.assert_close(folded.prototypes.norm(dim=1), torch.full((4,), 7.5))
    assert (folded.in_channels, folded.n_classes, folded.dim, folded.n_prototypes) == (20, 7, 32, 4)
    # the fold is a snapshot: it does not alias the trainable parameters
    with torch.no_grad():
        head.classifier.weight.add_(1.0)
    assert not torch.equal(folded.cls_weight, head.classifier.weight)


def test_parameter_count():
    c, n_classes, d, k = 64, 10, 128, 32
    head = PrototypePoolingHead(c, n_classes)
    expect = c * d + 2 * d + k * d + 1 + (2 * k + d + 1) * n_classes
    assert sum(p.numel() for p in head.parameters()) == expect
    assert head.feature_dim == 2 * k + d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_projection_gives_zero_similarity_not_nan(dtype):
    """Also in float16, where the cosine's 1e-8 floor would round to zero (0 / 0 = NaN)."""
    head = PrototypePoolingHead(8, 3, dim=16, n_prototypes=4).eval()
    with torch.no_grad():
        head.bn.bias.fill_(-1e4)  # ReLU kills every channel: u == 0
        head.prototypes[1] = 0.0  # a zero prototype: similarity 0 too
    head = head.to(dtype)
    f = torch.randn(2, 8, 3, 3, dtype=dtype)
    with torch.no_grad():
        pooled = head.pooled_features(f)
        assert torch.equal(pooled, torch.zeros_like(pooled))
        module_out = head(f)
        folded = head.fold()
        folded_out = folded(f)
    reference_out = folded_head_reference(f, *folded.buffers())
    for out in (module_out, folded_out, reference_out):
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out, head.classifier.bias.detach().expand(2, 3))
    assert torch.isfinite(folded.prototypes).all()


def test_folded_head_on_another_device_raises():
    """Meta-device features against CPU buffers: a clear error, not uninitialised CPU memory."""
    folded = PrototypePoolingHead(8, 3, dim=16, n_prototypes=4).eval().fold()
    meta = torch.randn(2, 8, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"features: expected device cpu \(that of the head's weights\), got meta"):
        folded(meta)
    with pytest.raises(ValueError, match="features: expected device cpu"):
        PrototypePoolingHead(8, 3, dim=16, n_prototypes=4)(meta)
    out = folded.to("meta")(meta)  # both on meta: shape inference
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_gradients_reach_every_parameter():
    head = PrototypePoolingHead(6, 4, dim=8, n_prototypes=3)
    head(torch.randn(4, 6, 5, 5)).logsumexp(dim=1).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_reference_computes_in_input_dtype(dtype, make_head):
    head = make_head(c=16, n_classes=5, dim=32, k=8)
    folded = head.fold()
    f = torch.randn(3, 16, 4, 4)
    out = folded(f.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), folded(f), rtol=0.05, atol=0.05)
    out64 = folded_head_reference(f.double(), *[b.double() for b in folded.buffers()])
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("cls", [PrototypePoolingHead, GridPrototypeHead])
def test_bad_features_are_named_by_every_head(cls):
    head = cls(16, 4, dim=8, n_prototypes=2)
    for module in (head, head.fold()):
        with pytest.raises(ValueError, match=r"features: expected a 4-D tensor \[N, C, H, W\], got shape \[2, 16\]"):
            module(torch.randn(2, 16))
        with pytest.raises(ValueError, match=r"features: expected 16 channels \(dim 1\), got 15"):
            module(torch.randn(2, 15, 3, 3))
        with pytest.raises(ValueError, match="non-empty spatial size"):
            module(torch.randn(2, 16, 0, 3))
        with pytest.raises(ValueError, match="floating dtype"):
            module(torch.ones(2, 16, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="features: expected dtype torch.float32"):
        head(torch.randn(2, 16, 3, 3, dtype=torch.float64))


def test_bad_inputs():
    for kwargs, name in [
        (dict(in_channels=0, n_classes=3), "in_channels"),
        (dict(in_channels=4, n_classes=0), "n_classes"),
        (dict(in_channels=4, n_classes=3, dim=-1), "dim"),
        (dict(in_channels=4, n_classes=3, n_prototypes=0), "n_prototypes"),
    ]:
        with pytest.raises(ValueError, match=name):
            PrototypePoolingHead(**kwargs)
    with pytest.raises(ValueError, match=r"cls_weight: expected shape \[3, 12\], got \[3, 11\]"):
        FoldedPrototypeHead(torch.zeros(8, 4), torch.zeros(8), torch.zeros(2, 8), torch.zeros(3, 11), torch.zeros(3))
    buffers = [torch.zeros(8, 4), torch.zeros(8), torch.zeros(2, 8), torch.zeros(3, 12), torch.zeros(3)]
    with pytest.raises(ValueError, match=r"proj_weight: expected a 2-D tensor, got shape \[32\]"):
        FoldedPrototypeHead(buffers[0].reshape(-1), *buffers[1:])
    with pytest.raises(ValueError, match="prototypes: expected a floating torch.Tensor, got list"):
        FoldedPrototypeHead(*buffers[:2], buffers[2].tolist(), *buffers[3:])
    with pytest.raises(ValueError, match="cls_bias: expected a floating torch.Tensor, got dtype torch.int64"):
        FoldedPrototypeHead(*buffers[:4], torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_module_head_names_a_dtype_mismatch_and_the_folded_head_computes_in_the_features_dtype(dtype):
    head = PrototypePoolingHead(4, 3, dim=8, n_prototypes=2).eval()
    f = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=f"features: expected dtype torch.float32 .* got {dtype}"):
        head(f.to(dtype))  # was torch's "expected scalar type ... but found Float"
    out = head.fold()(f.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), head(f).detach(), rtol=1e-2, atol=1e-2)
