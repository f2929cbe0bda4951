"""Baselines (PTEEnet, ZTW, BoostNet): exit rule and loss arithmetic on hand-made cases, FLOPs of every head,
learning on synthetic cached features, resume, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calexnet_fast import baselines
from calexnet_fast.baselines import (
    ZTW,
    BaselineConfig,
    BoostNet,
    GeometricEnsembles,
    PTEEnet,
    PTEEnetExit,
    boosted_predictions,
    cumulative_eenet,
)
from calexnet_fast.exit_rule import global_threshold_exit
from calexnet_fast.features import FeatureCache
from calexnet_fast.heads import PrototypePoolingHead
from calexnet_fast.training import CachedBatch, FitConfig

NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops: with two intra-op threads on a loaded 2-core machine every op waits for a
    descheduled thread (measured 20x slower); one thread keeps them fast. Restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------------------
# the global-threshold exit rule
# --------------------------------------------------------------------------------------------------


def test_global_threshold_exit_hand_made():
    scores = torch.tensor(
        [
            [0.9, 0.2, 0.5, NAN, 0.1],
            [0.1, 0.7, 0.4, 0.9, 0.2],
            [0.0, 0.9, 0.6, 0.1, 0.3],
        ]
    )
    # first exit with score >= 0.5 (exactly at the threshold exits, NaN never), else K + 1 = 4
    assert global_threshold_exit(scores, 0.5).tolist() == [1, 2, 1, 2, 4]
    assert global_threshold_exit(scores, 0.0).tolist() == [1, 1, 1, 2, 1]  # NaN at exit 1 passes on
    assert global_threshold_exit(scores, float("inf")).tolist() == [4] * 5
    assert global_threshold_exit(scores, 0.95).tolist() == [4] * 5
    many = global_threshold_exit(scores, torch.tensor([0.5, 0.0, 0.95]))
    assert many.shape == (3, 5) and many.dtype == torch.int64
    assert many[0].tolist() == [1, 2, 1, 2, 4] and many[2].tolist() == [4] * 5


def test_global_threshold_exit_bad_inputs():
    with pytest.raises(ValueError, match="scores"):
        global_threshold_exit(torch.zeros(5), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        global_threshold_exit(torch.zeros(2, 5), NAN)


# --------------------------------------------------------------------------------------------------
# PTEEnet: EENet cumulative prediction and cost
# --------------------------------------------------------------------------------------------------


def test_cumulative_eenet_by_hand():
    probs = torch.tensor([[[0.8, 0.2]], [[0.6, 0.4]]])  # [K=2, B=1, C=2]
    conf = torch.tensor([[0.5], [0.25]])
    final = torch.tensor([[0.1, 0.9]])
    p1, c1 = cumulative_eenet(probs, conf, final, [0.3, 0.6, 1.0])
    # P2 = .25 [.6 .4] + .75 [.1 .9] = [.225 .775];  P1 = .5 [.8 .2] + .5 P2 = [.5125 .4875]
    # C2 = .25 * .6 + .75 * 1 = .9;  C1 = .5 * .3 + .5 * .9 = .6
    assert torch.allclose(p1, torch.tensor([[0.5125, 0.4875]]))
    assert torch.allclose(c1, torch.tensor([0.6]))
    with pytest.raises(ValueError, match="costs"):
        cumulative_eenet(probs, conf, final, [0.3, 1.0])


def _batch(backbone_logits, labels):
    n = backbone_logits.shape[0]
    return CachedBatch([None], backbone_logits, labels, None, torch.arange(n))


def test_pteenet_loss_is_nll_of_cumulative_prediction_plus_cost():
    model = PTEEnet([4, 4], n_classes=2, exit_costs=[0.3, 0.6, 1.0], cost_weight=1.0)
    logits = torch.log(torch.tensor([[[0.8, 0.2]], [[0.6, 0.4]]]))
    conf = torch.tensor([[0.5], [0.25]])
    zb = torch.log(torch.tensor([[0.1, 0.9]]))  # backbone predicts class 1: the target
    loss = model.loss((logits, conf), _batch(zb, torch.tensor([0])))
    assert loss.item() == pytest.approx(-math.log(0.4875) + 0.6, rel=1e-5)
    model.target = "labels"  # ground-truth label 0 instead
    loss = model.loss((logits, conf), _batch(zb, torch.tensor([0])))
    assert loss.item() == pytest.approx(-math.log(0.5125) + 0.6, rel=1e-5)


def test_pteenet_exit_block_shapes_and_rule():
    torch.manual_seed(0)
    head = PTEEnetExit(8, 5, n_convs=2)
    z, c = head(torch.randn(3, 8, 6, 6))
    assert z.shape == (3, 5) and c.shape == (3,) and bool(((c > 0) & (c < 1)).all())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == 2
    model = PTEEnet([8, 8], 5)
    logits = torch.randn(2, 4, 5)
    conf = torch.rand(2, 4)
    eo = model.exit_outputs((logits, conf))
    assert torch.equal(eo.scores, conf) and torch.equal(eo.preds, logits.argmax(-1))
    with pytest.raises(ValueError, match="n_convs"):
        PTEEnetExit(8, 5, n_convs=4)
    with pytest.raises(ValueError, match="exit_costs"):
        model.set_exit_costs([0.1, 1.0])
    with pytest.raises(ValueError, match="target"):
        PTEEnet([8], 5, target="teacher")


# --------------------------------------------------------------------------------------------------
# BoostNet: additive predictions and the residual loss
# --------------------------------------------------------------------------------------------------


def test_boosted_predictions_and_detach():
    o = torch.randn(3, 2, 4, requires_grad=True)
    f = boosted_predictions(o, r=0.5)
    assert torch.allclose(f[0], o[0])
    assert torch.allclose(f[1], o[1] + 0.5 * o[0])
    assert torch.allclose(f[2], o[2] + 0.5 * o[1] + 0.25 * o[0])
    f[2].sum().backward()
    assert torch.allclose(o.grad[0], torch.full((2, 4), 0.25)) and torch.allclose(o.grad[1], torch.full((2, 4), 0.5))
    o.grad = None
    fd = boosted_predictions(o, r=0.5, detach_prefix=True)
    assert torch.allclose(fd, f.detach())  # same values...
    fd[2].sum().backward()
    assert torch.equal(o.grad[0], torch.zeros(2, 4)) and torch.equal(o.grad[1], torch.zeros(2, 4))  # ...no grad back


def test_boostnet_loss_by_hand_and_exit_rule():
    torch.manual_seed(0)
    model = BoostNet([4, 4], n_classes=3, r=0.5, head_dim=8, n_prototypes=4)
    out = torch.randn(2, 5, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    loss = model.loss(out, _batch(torch.zeros(5, 3), y))
    f2 = out[1] + 0.5 * out[0].detach()
    expected = F.cross_entropy(out[0], y) + F.cross_entropy(f2, y)  # summed over heads
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    g0 = torch.autograd.grad(F.cross_entropy(out[0], y), out)[0][0]
    assert torch.allclose(out.grad[0], g0, atol=1e-7)  # head 1 gets only its own term
    eo = model.exit_outputs(out.detach())
    p = torch.softmax(torch.stack([out[0], out[1] + 0.5 * out[0]]).detach(), -1)
    assert torch.allclose(eo.scores, p.max(-1).values) and torch.equal(eo.preds, p.argmax(-1))


# --------------------------------------------------------------------------------------------------
# ZTW: cascading heads and geometric ensembles
# --------------------------------------------------------------------------------------------------


def test_geometric_ensembles_by_hand():
    ens = GeometricEnsembles(2, 3)
    z = torch.randn(2, 4, 3)
    with torch.no_grad():
        ens.weights[0].zero_()
        ens.weights[1].copy_(torch.tensor([math.log(2.0), 0.0]))
        ens.bias.zero_()
        ens.bias[1] = torch.tensor([1.0, 0.0, -1.0])
    logq = ens(z)
    lp = F.log_softmax(z, -1)
    assert torch.allclose(logq[0], lp[0], atol=1e-6)  # one classifier: its own distribution
    mix = (2.0 * lp[0] + 1.0 * lp[1]) / 2 + torch.tensor([1.0, 0.0, -1.0])
    assert torch.allclose(logq[1], F.log_softmax(mix, -1), atol=1e-6)
    assert torch.allclose(logq.exp().sum(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits"):
        ens(torch.randn(3, 4, 3))


def test_ztw_cascade_is_detached_and_exit_on_ensemble():
    torch.manual_seed(0)
    model = ZTW([4, 6], n_classes=3)
    assert model.heads[0].norm is None and model.heads[1].norm is not None
    feats = [torch.randn(5, 4, 8, 8), torch.randn(5, 6, 4, 4)]
    z = model(feats)
    assert z.shape == (2, 5, 3)
    F.cross_entropy(z[1], torch.zeros(5, dtype=torch.long)).backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.heads[0].parameters())
    assert model.heads[1].linear.weight.grad is not None
    # the previous logits do enter head 2: changing head 1 changes head 2's output
    with torch.no_grad():
        before = model(feats)[1].clone()
        model.heads[0].linear.bias.add_(torch.tensor([3.0, 0.0, -3.0]))  # LayerNorm ignores shifts
        assert not torch.allclose(model(feats)[1], before)
    eo = model.exit_outputs(z.detach())
    q = model.ensembles(z.detach()).exp()
    assert torch.allclose(eo.scores, q.max(-1).values) and torch.equal(eo.preds, q.argmax(-1))
    # SDN pooling mixes max and mean with a learned weight (sigmoid(0) = 1/2 at the start)
    f = torch.randn(2, 3, 8, 8)
    mix = model.heads[0].pool(f)
    ref = 0.5 * F.adaptive_max_pool2d(f, 4) + 0.5 * F.adaptive_avg_pool2d(f, 4)
    assert torch.allclose(mix, ref, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# FLOPs of every head
# --------------------------------------------------------------------------------------------------


def test_baseline_head_flops_match_hand_counts():
    shapes = [(8, 8, 8), (16, 4, 4)]
    n = 5
    pte = PTEEnet([8, 16], n)
    got = baselines.baseline_head_flops(pte, shapes)
    for (c, h, w), g in zip(shapes, got):
        assert g == 2 * (2 * c * c * 9 * h * w) + 2 * c * n + 2 * c  # 2 convs, classifier, confidence
    ztw = ZTW([8, 16], n)
    got = baselines.baseline_head_flops(ztw, shapes)
    assert got == [2 * (8 * 16) * n, 2 * (16 * 16 + n) * n]  # pooled 4x4 (+ previous logits), linear
    boost = BoostNet([8, 16], n, head_dim=12, n_prototypes=3, head=PrototypePoolingHead)
    got = baselines.baseline_head_flops(boost, shapes)
    for (c, h, w), g in zip(shapes, got):
        assert g == 2 * c * 12 * h * w + 2 * 12 * 3 * h * w + 2 * (2 * 3 + 12) * n
    with pytest.raises(ValueError, match="branch_shapes"):
        baselines.baseline_head_flops(boost, shapes[:1])


# --------------------------------------------------------------------------------------------------
# learning on synthetic cached features
# --------------------------------------------------------------------------------------------------

SHAPES = [(6, 8, 8), (8, 4, 4), (8, 2, 2)]
N_CLASSES = 4


def synthetic_cache(n: int, seed: int) -> FeatureCache:
    """Class-conditional feature maps whose signal grows with depth; the 'backbone' is right 90 % of the time."""
    g = torch.Generator().manual_seed(1234)
    templates = [torch.randn(N_CLASSES, *s, generator=g) for s in SHAPES]
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    feats = []
    for k, t in enumerate(templates):
        noise = (2.0 - 0.5 * k) * torch.randn(n, *SHAPES[k], generator=g)
        feats.append((t[y] + noise).to(torch.float16))
    pred = torch.where(torch.rand(n, generator=g) < 0.9, y, torch.randint(0, N_CLASSES, (n,), generator=g))
    logits = 4.0 * F.one_hot(pred, N_CLASSES).float() + 0.3 * torch.randn(n, N_CLASSES, generator=g)
    return FeatureCache(feats, logits, y)


SEGMENTS = [1e6, 1e6, 1e6, 1e6]


@pytest.mark.parametrize("name", ["pteenet", "ztw", "boostnet"])
def test_each_baseline_learns_above_chance(name):
    train, test = synthetic_cache(384, 0), synthetic_cache(256, 1)
    cfg = BaselineConfig(head_dim=8, n_prototypes=4, ztw_ensemble_epochs=4)
    tb = baselines.train_baseline(
        name,
        train,
        FitConfig(epochs=6, batch_size=64, lr=1e-2, seed=0),
        segment_flops=SEGMENTS,
        config=cfg,
        progress=False,
    )
    eo = tb.exit_outputs(test)
    assert eo.scores.shape == (3, 256) and eo.preds.shape == (3, 256)
    acc = (eo.preds == test.labels_tensor()).float().mean(1)
    assert float(acc.max()) > 0.6, acc  # chance is 0.25
    assert float(acc[-1]) > 0.5, acc
    assert bool(torch.isfinite(eo.scores).all()) and bool(((eo.scores >= 0) & (eo.scores <= 1)).all())
    assert len(tb.head_flops) == 3 and all(f > 0 for f in tb.head_flops)
    if name == "pteenet":  # its cost term uses the real FLOPs of exiting at k, failed heads included
        costs = tb.model.exit_costs.tolist()
        assert costs[0] == pytest.approx((1e6 + tb.head_flops[0]) / 4e6)
        assert costs[-1] == pytest.approx((4e6 + sum(tb.head_flops)) / 4e6)
    if name == "ztw":
        assert "stage2" in tb.history and len(tb.history["stage2"]) == 4


def test_train_baseline_resumes_and_seeds(tmp_path):
    train = synthetic_cache(128, 0)
    fc = FitConfig(epochs=2, batch_size=64, lr=1e-2, seed=3)
    cfg = BaselineConfig(ztw_ensemble_epochs=2)
    a = baselines.train_baseline("ztw", train, fc, segment_flops=SEGMENTS, config=cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / "model.safetensors").is_file()
    b = baselines.train_baseline("ztw", train, fc, segment_flops=SEGMENTS, config=cfg, out_dir=tmp_path, progress=False)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(v, w), k
    c = baselines.train_baseline("ztw", train, fc, segment_flops=SEGMENTS, config=cfg, progress=False)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(v, w), k  # same seed, same result without any checkpoint
    d = baselines.train_baseline(
        "ztw",
        train,
        FitConfig(epochs=2, batch_size=64, lr=1e-2, seed=4),
        segment_flops=SEGMENTS,
        config=cfg,
        progress=False,
    )
    assert not torch.equal(a.model.heads[0].linear.weight, d.model.heads[0].linear.weight)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="name"):
        baselines.make_baseline("sdn", [4], 3)
    with pytest.raises(ValueError, match="segment_flops"):
        baselines.train_baseline("ztw", synthetic_cache(32, 0), FitConfig(epochs=1), segment_flops=[1.0, 2.0])
    with pytest.raises(ValueError, match="target"):
        BoostNet([4], 3, target="soft")


def test_heads_with_max_size_read_the_pooled_map_first():
    """ZTW's SDN head and PTEEnet's exit block given ``max_size`` equal themselves on the pooled map, so
    they train exactly on a feature cache pooled the same way."""
    from calexnet_fast.baselines import PTEEnetExit, ZTWHead
    from calexnet_fast.reference import working_map

    torch.manual_seed(0)
    f = torch.randn(3, 8, 16, 16)
    for head in (ZTWHead(8, 5, cascading=False, max_size=8), PTEEnetExit(8, 5, max_size=8).eval()):
        a, b = head(f), head(working_map(f, 8))
        torch.testing.assert_close(a, b)
    assert not torch.allclose(ZTWHead(8, 5, cascading=False)(f), ZTWHead(8, 5, cascading=False, max_size=4)(f))
    with pytest.raises(ValueError, match="max_size"):
        ZTWHead(8, 5, cascading=False, max_size=0)
