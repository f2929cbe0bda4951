"""ReferenceCascade: real skipping == simulation on every sample, exit-rule edge cases, TorchScript, errors.

Most tests use a tiny staged backbone whose heads and classifier round their logits to multiples of 1/8.
That makes exact confidence ties frequent (thresholds are drawn from the observed confidences, so many
samples sit exactly at a threshold) and makes "real == simulated" an exact statement: the rounding absorbs
the last-bit differences a convolution may show when the same sample runs in a batch of another size.
One test uses a CIFAR ResNet-20 with plain (unrounded) heads as well.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from calexnet_fast import backbones as B
from calexnet_fast.cascades import CascadeOutput, ReferenceCascade, SimulatedOutput
from calexnet_fast.exit_rule import check_cascade_thresholds, exit_decision_reference

N_CLASSES = 10


class Round8(nn.Module):
    """Round to multiples of 1/8 (exact in fp32 and bf16 for the magnitudes used here)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.round(z * 8.0) / 8.0


class QuantHead(nn.Module):
    """Global-average-pool + linear head with rounded logits, scaled to spread the confidences."""

    def __init__(self, channels: int, n_classes: int = N_CLASSES, scale: float = 2.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, n_classes)
        self.scale = scale
        self.round = Round8()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = torch.flatten(self.pool(f), 1)
        p = p - p.mean(1, keepdim=True)
        p = p / (p.pow(2).mean(1, keepdim=True).sqrt() + 1e-3)  # standardised per sample: varied predictions
        return self.round(self.linear(p) * self.scale)


class NaNHead(nn.Module):
    """A QuantHead that returns a NaN logit for samples whose feature mean is below ``cut`` (per sample)."""

    def __init__(self, channels: int, cut: float = 0.0) -> None:
        super().__init__()
        self.inner = QuantHead(channels)
        self.cut = cut

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = self.inner(f)
        bad = f.mean(dim=(1, 2, 3)) < self.cut
        return torch.where(bad.unsqueeze(1) & (torch.arange(z.shape[1]) == 0), torch.full_like(z, float("nan")), z)


class Recorder(nn.Module):
    """Records the batch size every call sees (eager only), to check that later stages really shrink."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        return self.inner(x)


def tiny_backbone(seed: int = 0) -> B.StagedBackbone:
    torch.manual_seed(seed)

    def block(cin, cout, stride):
        bn = nn.BatchNorm2d(cout)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), bn, nn.ReLU())

    stages = [block(3, 8, 1), block(8, 12, 2), block(12, 16, 1), block(16, 16, 2)]
    clf = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, N_CLASSES), Round8())
    return B.from_stages(stages, clf, in_channels=3, input_size=8, name="tiny")


def tiny_cascade(seed: int = 0, thresholds=None, head_cls=QuantHead) -> ReferenceCascade:
    bb = tiny_backbone(seed)
    heads = [head_cls(c) for c in bb.branch_channels]
    return ReferenceCascade(bb, heads, thresholds).eval()


def brute_force(sim: SimulatedOutput, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loop over branches, written independently of apply_exit_rule: (exit_index, logits)."""
    k_total, batch, _ = sim.branch_logits.shape
    index = torch.empty(batch, dtype=torch.int64)
    logits = torch.empty_like(sim.branch_logits[0])
    for i in range(batch):
        index[i], logits[i] = k_total + 1, sim.backbone_logits[i]
        for k in range(k_total):
            z = sim.branch_logits[k, i].float()
            conf = torch.softmax(z, dim=0).max()
            pred = int(torch.argmax(z))
            if bool(conf >= thresholds[k, pred]):  # a NaN confidence compares False
                index[i], logits[i] = k + 1, sim.branch_logits[k, i]
                break
    return index, logits


def assert_real_equals_simulated(c: ReferenceCascade, x: torch.Tensor, exact: bool = True) -> CascadeOutput:
    real = c(x)
    sim = c.simulate(x)
    decided = c.decide(sim)
    assert isinstance(real, CascadeOutput) and isinstance(real, tuple)
    assert real.exit_index.dtype == torch.int64 and real.exit_index.shape == (x.shape[0],)
    assert real.logits.shape == (x.shape[0], c.n_classes) and real.logits.dtype == sim.branch_logits.dtype
    assert torch.equal(real.exit_index, decided.exit_index)
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(real.logits, decided.logits, equal_nan=True, **tol)
    if x.shape[0]:
        assert torch.equal(
            real.logits.float().nan_to_num(-1e9).argmax(1), decided.logits.float().nan_to_num(-1e9).argmax(1)
        )
    index, logits = brute_force(sim, c.thresholds)
    assert torch.equal(decided.exit_index, index)
    torch.testing.assert_close(decided.logits, logits, equal_nan=True, rtol=0, atol=0)
    return real


def thresholds_from_observed(c: ReferenceCascade, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Per (branch, class) thresholds drawn from the confidences actually observed: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    sim = c.simulate(x)
    thr = torch.empty(c.n_branches, c.n_classes)
    for k in range(c.n_branches):
        _, pred, conf = exit_decision_reference(sim.branch_logits[k], torch.zeros(c.n_classes))
        for cls in range(c.n_classes):
            pool = conf[pred == cls] if bool((pred == cls).any()) else conf  # prefer this class's own values
            thr[k, cls] = pool[int(torch.randint(0, pool.numel(), (1,), generator=g))]
    thr[torch.rand(thr.shape, generator=g) < 0.1] = float("inf")
    return thr


# --------------------------------------------------------------------------------------------------
# Real == simulated
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_real_equals_simulated_random_inputs_and_thresholds(seed):
    c = tiny_cascade(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(61, 3, 8, 8, generator=g)
    c.set_thresholds(thresholds_from_observed(c, x, seed))
    real = assert_real_equals_simulated(c, x)
    counts = torch.bincount(real.exit_index, minlength=c.n_branches + 2)[1:]
    assert int((counts > 0).sum()) >= 2, f"degenerate exit histogram {counts.tolist()}"
    # samples that reach branch k sitting exactly at its threshold exist, and they exit there (>=)
    sim = c.simulate(x)
    n_ties = 0
    for k in range(c.n_branches):
        _, pred, conf = exit_decision_reference(sim.branch_logits[k], torch.zeros(c.n_classes))
        at = (conf == c.thresholds[k][pred]) & (real.exit_index >= k + 1)
        assert bool((real.exit_index[at] == k + 1).all())
        n_ties += int(at.sum())
    assert n_ties > 0


def test_exact_tie_exits_and_one_ulp_above_does_not():
    c = tiny_cascade(1)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sim = c.simulate(x)
    _, pred, conf = exit_decision_reference(sim.branch_logits[0], torch.zeros(c.n_classes))
    i = 5
    thr = torch.full((c.n_branches, c.n_classes), float("inf"))
    thr[0, pred[i]] = conf[i]
    c.set_thresholds(thr)
    real = assert_real_equals_simulated(c, x)
    assert int(real.exit_index[i]) == 1
    assert bool((real.exit_index[conf < conf[i]] == c.n_branches + 1).all())
    thr[0, pred[i]] = torch.nextafter(conf[i], torch.tensor(float("inf")))
    c.set_thresholds(thr)
    real = assert_real_equals_simulated(c, x)
    assert int(real.exit_index[i]) == c.n_branches + 1


def test_nan_logits_never_exit():
    # NaN input rows give NaN everywhere: they never exit and come out of the backbone with NaN logits.
    c = tiny_cascade(2, thresholds=torch.full((3, N_CLASSES), float("-inf")))
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x[[2, 7]] = float("nan")
    real = assert_real_equals_simulated(c, x)
    assert real.exit_index.tolist() == [4 if i in (2, 7) else 1 for i in range(12)]
    assert bool(real.logits[[2, 7]].isnan().all())
    # A NaN logit at branch 1 only: those samples skip branch 1 (even at -inf) and exit at branch 2.
    bb = tiny_backbone(3)
    heads = [NaNHead(bb.branch_channels[0])] + [QuantHead(ch) for ch in bb.branch_channels[1:]]
    c = ReferenceCascade(bb, heads, torch.full((3, N_CLASSES), float("-inf"))).eval()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    feats, _ = bb.features(x)
    heads[0].cut = float(feats[0].mean(dim=(1, 2, 3)).median())  # a fixed per-sample rule from here on
    bad = feats[0].mean(dim=(1, 2, 3)) < heads[0].cut
    assert 0 < int(bad.sum()) < 40
    real = assert_real_equals_simulated(c, x)
    assert torch.equal(real.exit_index, torch.where(bad, 2, 1))


def test_everything_exits_at_branch_1_and_later_stages_never_run():
    bb = tiny_backbone(4)
    stages = [Recorder(s) for s in bb.stages]
    heads = [QuantHead(ch) for ch in bb.branch_channels]
    c = ReferenceCascade(stages, heads, torch.zeros(3, N_CLASSES), in_channels=3, input_size=8).eval()
    x = torch.randn(9, 3, 8, 8)
    for s in stages:
        s.sizes.clear()
    c(x)
    assert [s.sizes for s in stages] == [[9], [], [], []]  # the real pass ran stage 0 and nothing else
    real = assert_real_equals_simulated(c, x)
    assert real.exit_index.tolist() == [1] * 9
    sim = c.simulate(x)
    torch.testing.assert_close(real.logits, sim.branch_logits[0], rtol=0, atol=0)


def test_nothing_exits_gives_the_backbone():
    c = tiny_cascade(5)  # default thresholds: +inf everywhere
    assert bool(torch.isinf(c.thresholds).all())
    x = torch.randn(11, 3, 8, 8)
    real = assert_real_equals_simulated(c, x)
    assert real.exit_index.tolist() == [4] * 11
    bb = tiny_backbone(5)
    torch.testing.assert_close(real.logits, bb(x), rtol=0, atol=0)


def test_later_stages_see_only_the_survivors():
    bb = tiny_backbone(6)
    stages = [Recorder(s) for s in bb.stages]
    heads = [QuantHead(ch) for ch in bb.branch_channels]
    c = ReferenceCascade(stages, heads, n_classes=N_CLASSES).eval()
    x = torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    c.set_thresholds(thresholds_from_observed(c, x, 6))
    for s in stages:
        s.sizes.clear()
    real = c(x)
    survivors = [int((real.exit_index > k).sum()) for k in range(c.n_branches + 1)]
    assert [s.sizes for s in stages] == [[50]] + [[n] if n else [] for n in survivors[1:]]
    assert survivors[1] < 50  # the test is not vacuous


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("fill", [0.0, float("inf")])
def test_batch_0_and_1(batch, fill):
    c = tiny_cascade(7, thresholds=torch.full((3, N_CLASSES), fill))
    x = torch.randn(batch, 3, 8, 8)
    real = assert_real_equals_simulated(c, x)
    assert real.logits.shape == (batch, N_CLASSES) and real.exit_index.shape == (batch,)
    if batch:
        assert int(real.exit_index[0]) == (1 if fill == 0.0 else 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    c = tiny_cascade(8).to(dtype)
    assert c.thresholds.dtype == torch.float32  # casting the model does not round the thresholds
    x = torch.randn(45, 3, 8, 8, generator=torch.Generator().manual_seed(8)).to(dtype)
    c.set_thresholds(thresholds_from_observed(c, x, 8))
    real = assert_real_equals_simulated(c, x)
    assert real.logits.dtype == dtype
    assert int((torch.bincount(real.exit_index, minlength=5)[1:] > 0).sum()) >= 2


def test_real_backbone_cifar_resnet20():
    torch.manual_seed(9)
    bb = B.cifar_resnet(20, placement="flops", n_branches=3)
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 10)) for ch in bb.branch_channels]
    for h in heads:
        h[2].weight.data.mul_(20)
    c = ReferenceCascade(bb, heads).eval()
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    sim = c.simulate(x)
    thr = torch.empty(3, 10)
    for k in range(3):
        _, _, conf = exit_decision_reference(sim.branch_logits[k], torch.zeros(10))
        thr[k] = torch.quantile(conf, 0.6)  # ~40 % of what reaches a branch exits there
    c.set_thresholds(thr)
    real = assert_real_equals_simulated(c, x, exact=False)
    assert int((torch.bincount(real.exit_index, minlength=5)[1:] > 0).sum()) >= 3
    # the stages given as a list behave the same as the backbone
    c2 = ReferenceCascade(list(bb.stages), heads, thr, in_channels=3).eval()
    out2 = c2(x)
    assert torch.equal(out2.exit_index, real.exit_index)
    torch.testing.assert_close(out2.logits, real.logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# TorchScript, state, thresholds
# --------------------------------------------------------------------------------------------------


def test_torchscript_forward_simulate_and_save_load():
    c = tiny_cascade(10)
    x = torch.randn(33, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    c.set_thresholds(thresholds_from_observed(c, x, 10))
    scripted = torch.jit.script(c)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    want = c(x)
    for m in (scripted, loaded):
        got = m(x)
        assert torch.equal(got.exit_index, want.exit_index)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        sim = m.simulate(x)
        dec = m.decide(sim)
        assert torch.equal(dec.exit_index, want.exit_index)
        assert got.logits.shape == (33, N_CLASSES)
        with pytest.raises(Exception, match=r"x: expected a 4-D tensor"):
            m(x[0])
        with pytest.raises(Exception, match=r"x: expected 3 channels"):
            m(x[:, :2])
    out0 = scripted(x[:0])
    assert out0.logits.shape == (0, N_CLASSES)


def test_thresholds_state_and_setter():
    c = tiny_cascade(11)
    thr = torch.rand(3, N_CLASSES, dtype=torch.float64)
    c.set_thresholds(thr)
    assert c.thresholds.dtype == torch.float32
    torch.testing.assert_close(c.thresholds, thr.float())
    c.set_thresholds(thr.tolist())  # array-likes are accepted
    sd = c.state_dict()
    assert "thresholds" in sd
    c2 = tiny_cascade(11)
    c2.load_state_dict(sd)
    assert torch.equal(c2.thresholds, c.thresholds)
    c.half()
    assert c.thresholds.dtype == torch.float32
    assert check_cascade_thresholds(torch.full((1, 2), float("-inf"), dtype=torch.float16), 1, 2).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thr", "msg"),
    [
        (torch.zeros(3), r"thresholds: expected shape \[3, 10\] \(K branches x n_classes\), got \[3\]"),
        (torch.zeros(3, 11), r"thresholds: expected shape \[3, 10\] .*got \[3, 11\]"),
        (torch.zeros(2, 10), r"thresholds: expected shape \[3, 10\] .*got \[2, 10\]"),
        (torch.zeros(3, 10, dtype=torch.int64), "thresholds: expected a floating dtype, got torch.int64"),
        (torch.full((3, 10), float("nan")), r"thresholds: expected no NaN \(use \+inf"),
        ("0.5", r"thresholds: expected a tensor of shape \[3, 10\], got str"),
    ],
)
def test_bad_thresholds(thr, msg):
    bb = tiny_backbone()
    heads = [QuantHead(ch) for ch in bb.branch_channels]
    with pytest.raises(ValueError, match=msg):
        ReferenceCascade(bb, heads, thr)
    c = ReferenceCascade(bb, heads)
    with pytest.raises(ValueError, match=msg):
        c.set_thresholds(thr)


def test_bad_inputs_and_construction():
    c = tiny_cascade()
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \[B, C, H, W\], got shape \[3, 8, 8\]"):
        c(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected 3 channels \(dimension 1\), got 4"):
        c(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        c.simulate(torch.zeros(2, 3, 8))
    bb = tiny_backbone()
    heads = [QuantHead(ch) for ch in bb.branch_channels]
    with pytest.raises(
        ValueError,
        match=r"heads: expected 3 heads \(one per branch point \['stage0', 'stage1', 'stage2'\]\), got 2",
    ):
        ReferenceCascade(bb, heads[:2])
    with pytest.raises(ValueError, match="heads: expected a sequence of 3 modules, got a single QuantHead"):
        ReferenceCascade(bb, heads[0])
    with pytest.raises(ValueError, match=r"heads\[1\]: expected logits \[B, 10\] .*'stage1', got \[B, 7\]"):
        ReferenceCascade(bb, [heads[0], QuantHead(bb.branch_channels[1], n_classes=7), heads[2]])
    with pytest.raises(ValueError, match=r"heads\[0\]: failed on the features of branch point 'stage0'"):
        ReferenceCascade(bb, [QuantHead(5), *heads[1:]])
    with pytest.raises(ValueError, match="n_classes: expected an int when stages"):
        ReferenceCascade(list(bb.stages), heads)
    with pytest.raises(ValueError, match=r"n_classes: expected 10 \(backbone.n_classes\), got 9"):
        ReferenceCascade(bb, heads, n_classes=9)
    with pytest.raises(ValueError, match="stages_or_backbone: expected a StagedBackbone or a sequence"):
        ReferenceCascade(nn.Linear(2, 2), heads)
    with pytest.raises(ValueError, match="stages_or_backbone: expected at least 2 stages"):
        ReferenceCascade([bb.stages[0]], [], n_classes=10)


def test_input_dtype_and_device_must_match_the_cascade():
    c = tiny_cascade()
    x = torch.randn(2, 3, 8, 8)
    for bad, msg in [
        (x.double(), r"x: expected dtype torch.float32 \(that of the cascade's parameters.*got torch.float64"),
        (x.to(torch.uint8), r"x: expected dtype torch.float32 .*got torch.uint8"),
        (torch.empty(2, 3, 8, 8, device="meta"), r"x: expected device cpu \(that of the cascade\), got meta"),
    ]:
        with pytest.raises(ValueError, match=msg):
            c(bad)
        with pytest.raises(ValueError, match=msg):
            c.simulate(bad)
    with pytest.raises(Exception, match=r"x: expected device cpu \(that of the cascade\), got meta"):
        torch.jit.script(c)(torch.empty(2, 3, 8, 8, device="meta"))
    half = tiny_cascade().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"x: expected dtype torch.bfloat16 .*got torch.float32"):
        half(x)


def test_non_tensor_input_empty_images_and_meta_thresholds_are_named():
    c = tiny_cascade()
    for run in (c, c.simulate):
        with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \[B, C, H, W\], got list"):
            run(torch.randn(2, 3, 8, 8).tolist())
        with pytest.raises(ValueError, match=r"x: expected a non-empty image size H x W, got shape \[2, 3, 0, 8\]"):
            run(torch.randn(2, 3, 0, 8))  # was a convolution's "Kernel size can't be greater than ..."
    before = c.thresholds.clone()
    with pytest.raises(ValueError, match="thresholds: expected a tensor with values .* got a meta tensor"):
        c.set_thresholds(torch.zeros(3, 10, device="meta"))
    assert torch.equal(c.thresholds, before)


def test_torch_export_of_simulate():
    c = tiny_cascade(12)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(12))

    class Simulate(nn.Module):
        def __init__(self, cascade: ReferenceCascade) -> None:
            super().__init__()
            self.cascade = cascade

        def forward(self, x: torch.Tensor) -> SimulatedOutput:
            return self.cascade.simulate(x)

    ep = torch.export.export(Simulate(c), (x,))
    got, want = ep.module()(x), c.simulate(x)
    torch.testing.assert_close(got[0], want.branch_logits, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want.backbone_logits, rtol=0, atol=0)


def test_with_prototype_pooling_heads_and_their_folded_form():
    heads_mod = pytest.importorskip("calexnet_fast.heads")
    torch.manual_seed(13)
    bb = B.cifar_resnet(20, branch_points=["layer1.2", "layer2.1", "layer3.0"])
    heads = [heads_mod.PrototypePoolingHead(ch, 10, dim=16, n_prototypes=8).eval() for ch in bb.branch_channels]
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    c = ReferenceCascade(bb, heads).eval()
    sim = c.simulate(x)
    thr = torch.empty(3, 10)
    for k in range(3):
        _, _, conf = exit_decision_reference(sim.branch_logits[k], torch.zeros(10))
        thr[k] = torch.quantile(conf, 0.5)
    c.set_thresholds(thr)
    real = assert_real_equals_simulated(c, x, exact=False)
    assert int((torch.bincount(real.exit_index, minlength=5)[1:] > 0).sum()) >= 2
    folded = ReferenceCascade(bb, [h.fold() for h in heads], thr).eval()
    out = folded(x)
    # folding changes the logits by float rounding only: the exits agree away from exact ties
    assert float((out.exit_index == real.exit_index).float().mean()) >= 0.95
    torch.testing.assert_close(folded.decide(folded.simulate(x)).exit_index, out.exit_index, rtol=0, atol=0)


@pytest.mark.needs_cuda
def test_cuda_real_equals_simulated():
    c = tiny_cascade(14).cuda()
    assert c.thresholds.is_cuda
    x = torch.randn(257, 3, 8, 8, generator=torch.Generator().manual_seed(14)).cuda()
    c.set_thresholds(thresholds_from_observed(c, x, 14).cuda())
    real = c(x)
    decided = c.decide(c.simulate(x))
    assert real.logits.is_cuda and real.exit_index.is_cuda
    assert torch.equal(real.exit_index, decided.exit_index)
    torch.testing.assert_close(real.logits, decided.logits, rtol=0, atol=0)
    cpu = tiny_cascade(14)
    cpu.set_thresholds(c.thresholds.cpu())
    # CUDA and CPU convolutions round differently, so compare exits where no confidence is near a threshold
    assert float((cpu(x.cpu()).exit_index == real.exit_index.cpu()).float().mean()) >= 0.9
