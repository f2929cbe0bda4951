"""Recipes: hand-checked weights and losses, the 2^3 switches, the sequential chain, and end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calexnet_fast import branch_training, recipes, training
from calexnet_fast.backbones import CifarResNet, cifar_resnet
from calexnet_fast.calibration import calibrate
from calexnet_fast.cascades import ReferenceCascade
from calexnet_fast.data import synthetic_dataset
from calexnet_fast.exit_rule import apply_exit_rule, exit_decision_reference
from calexnet_fast.features import FeatureCache, branch_logits, build_feature_cache, head_logits
from calexnet_fast.recipes import Recipe, kd_loss, survivor_weights
from calexnet_fast.run import load_heads, save_heads
from calexnet_fast.training import CachedBatch, FitConfig

INF = math.inf


def softmax_max(logits: list[float]) -> float:
    e = [math.exp(v) for v in logits]
    return max(e) / sum(e)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def test_soft_weights_by_hand():
    z1 = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0], [0.0, 0.0]])
    z2 = torch.tensor([[0.0, 1.0], [4.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    tau = torch.tensor([[0.7, INF], [0.6, 0.9]])
    t = 0.05
    e1 = [
        sigmoid((softmax_max([2, 0]) - 0.7) / t),
        0.0,
        sigmoid((softmax_max([0.5, 0]) - 0.7) / t),
        sigmoid((0.5 - 0.7) / t),
    ]  # sample 2 predicts class 1 (τ = inf): never exits; sample 4 ties -> class 0
    e2 = [
        sigmoid((softmax_max([0, 1]) - 0.9) / t),
        sigmoid((softmax_max([4, 0]) - 0.6) / t),
        sigmoid((softmax_max([1, 0]) - 0.6) / t),
        sigmoid((softmax_max([0, 2]) - 0.9) / t),
    ]
    raw = [max((1 - a) * (1 - b), 1e-3) for a, b in zip(e1, e2, strict=True)]
    mean = sum(raw) / len(raw)
    expected = torch.tensor([r / mean for r in raw])
    w = survivor_weights([z1, z2], tau, "soft", temperature=t, floor=1e-3)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)
    # sample 2 exits at branch 2 with near certainty: floored, not zero
    assert raw[1] == 1e-3
    unnorm = survivor_weights([z1, z2], tau, "soft", normalize=False)
    torch.testing.assert_close(unnorm, torch.tensor(raw), rtol=1e-5, atol=1e-7)


def test_hard_and_none_weights_follow_the_exit_rule():
    z1 = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0], [float("nan"), 0.0]])
    tau = torch.tensor([[0.7, INF]])
    hard = survivor_weights([z1], tau, "hard", normalize=False)
    # exits: sample 1 only (0.88 ≥ 0.7); class 1 never exits; 0.62 < 0.7; NaN never exits
    torch.testing.assert_close(hard, torch.tensor([1e-3, 1.0, 1.0, 1.0]))
    soft = survivor_weights([z1], tau, "soft", normalize=False)
    assert soft[3] == 1.0 and soft[1] == 1.0  # NaN and +inf: e = 0
    assert torch.equal(survivor_weights([z1], tau, "none"), torch.ones(4))
    # a threshold exactly at the confidence exits (≥), the soft weight is exactly 1/2 there
    conf = exit_decision_reference(z1[:1], torch.tensor([INF, INF]))[2]
    exact = torch.tensor([[conf.item(), INF]])
    assert survivor_weights([z1[:1]], exact, "hard", normalize=False).item() == pytest.approx(1e-3)
    assert survivor_weights([z1[:1]], exact, "soft", normalize=False).item() == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ValueError, match="thresholds"):
        survivor_weights([z1, z1], tau)
    with pytest.raises(ValueError, match="mode"):
        survivor_weights([z1], tau, "boosted")


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def test_kd_loss_by_hand():
    s = [[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]
    t = [[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    T = 4.0

    def kl(ts, ss):
        pt = [math.exp(v / T) for v in ts]
        pt = [v / sum(pt) for v in pt]
        ls = [v / T for v in ss]
        lse = math.log(sum(math.exp(v) for v in ls))
        return sum(p * (math.log(p) - (q - lse)) for p, q in zip(pt, ls, strict=True))

    per = [kl(t[i], s[i]) for i in range(2)]
    got = kd_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(T * T * (per[0] + per[1]) / 2, rel=1e-5)
    w = torch.tensor([3.0, 1.0])
    got_w = kd_loss(torch.tensor(s), torch.tensor(t), T, w)
    assert got_w.item() == pytest.approx(T * T * (3 * per[0] + per[1]) / 4, rel=1e-5)
    # same as PyTorch's batchmean KL, times T²
    ref = F.kl_div(F.log_softmax(torch.tensor(s) / T, 1), F.softmax(torch.tensor(t) / T, 1), reduction="batchmean")
    assert got.item() == pytest.approx(T * T * ref.item(), rel=1e-5)
    # the teacher gets no gradient
    tt = torch.tensor(t, requires_grad=True)
    ss = torch.tensor(s, requires_grad=True)
    kd_loss(ss, tt).backward()
    assert tt.grad is None and ss.grad is not None


def test_branch_loss_follows_the_switches():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g)
    zb = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.rand(6, generator=g) + 0.5
    batch = CachedBatch([None], zb, y, w, torch.arange(6))

    def wce(target):
        return (w * F.cross_entropy(z, target, reduction="none")).sum() / w.sum()

    ref = recipes.recipe("reference")
    torch.testing.assert_close(recipes.branch_loss(z, batch, ref), wce(zb.argmax(1)))
    torch.testing.assert_close(recipes.branch_loss(z, batch, recipes.recipe("reference", ce_target="labels")), wce(y))
    kd = recipes.recipe("calexnet")
    torch.testing.assert_close(recipes.branch_loss(z, batch, kd), kd_loss(z, zb, 4.0, w))
    mix = recipes.recipe("calexnet", ce_weight=0.5)
    torch.testing.assert_close(recipes.branch_loss(z, batch, mix), kd_loss(z, zb, 4.0, w) + 0.5 * wce(zb.argmax(1)))


def test_recipe_names_and_switches():
    assert len(set(recipes.RECIPE_NAMES)) == 8
    c = recipes.recipe("calexnet")
    assert (
        c.weighting,
        c.distill,
        c.aligned,
        c.kd_temperature,
        c.weight_temperature,
        c.weight_floor,
        c.m_train,
    ) == ("soft", True, True, 4.0, 0.05, 1e-3, 0.0)
    r = recipes.recipe("reference")
    assert (r.weighting, r.distill, r.aligned, r.ce_target, r.ce_weight) == (
        "none",
        False,
        False,
        "backbone",
        0.0,
    )
    for name in recipes.RECIPE_NAMES:
        rr = recipes.recipe(name)
        assert rr.name == name
        assert recipes.ablation(**rr.fixes).to_json() == rr.to_json()
    assert recipes.recipe("reference+kd").fixes == {"weights": False, "kd": True, "aligned": False}
    assert recipes.recipe("calexnet-aligned").fixes == {"weights": True, "kd": True, "aligned": False}
    assert recipes.recipe("calexnet", weighting="hard").weighting == "hard"
    assert Recipe.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="recipe"):
        recipes.recipe("boostnet")
    for bad in (
        {"weighting": "x"},
        {"ce_target": "x"},
        {"weight_temperature": 0},
        {"kd_temperature": -1},
        {"ce_weight": -1},
        {"weight_floor": 2},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Recipe(**bad)
    with pytest.raises(ValueError, match="unknown"):
        Recipe.from_json({"nme": "x"})


# --------------------------------------------------------------------------------------------------
# the sequential chain, on hand-made caches
# --------------------------------------------------------------------------------------------------


def make_caches(n_train=160, n_val=120, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one(n):
        y = torch.randint(0, 3, (n,), generator=g)
        sig = F.one_hot(y, 3).float().view(n, 3, 1, 1)
        f0 = torch.cat([sig.expand(n, 3, 3, 3), torch.zeros(n, 3, 3, 3)], 1) + 0.8 * torch.randn(
            n, 6, 3, 3, generator=g
        )
        f1 = torch.cat([2 * sig.expand(n, 3, 2, 2), torch.zeros(n, 1, 2, 2)], 1) + 0.5 * torch.randn(
            n, 4, 2, 2, generator=g
        )
        zb = F.one_hot(y, 3).float() * 4 + torch.randn(n, 3, generator=g)
        return FeatureCache([f0.half(), f1.half()], zb, y)

    return one(n_train), one(n_val)


# tiny heads after a few epochs on synthetic features: a looser training margin than the default lets classes exit
SMALL = {"head_dim": 8, "n_prototypes": 4, "min_support": 5, "m_train": 0.2}


@pytest.mark.parametrize("name,weighting", [("calexnet", "soft"), ("calexnet", "hard"), ("reference", "none")])
def test_branch_weights_come_from_the_previous_branch_at_m_train(name, weighting):
    tr, va = make_caches()
    rec = recipes.recipe(name, weighting=weighting, **SMALL)
    res = branch_training.train_branches(tr, va, rec, FitConfig(epochs=3, batch_size=32, lr=1e-2), progress=False)
    assert len(res.heads) == 2 and res.weights[0] is None
    if weighting == "none":
        assert res.weights[1] is None and res.train_thresholds is None
        return
    z1_train = head_logits(res.heads[0], tr, 0)
    z1_val = head_logits(res.heads[0], va, 0)
    tau = calibrate([z1_val], va.backbone_logits, va.labels, rec.m_train, aligned=rec.aligned, min_support=5)
    torch.testing.assert_close(res.train_thresholds, tau)
    expected = survivor_weights([z1_train], tau, weighting, 0.05, 1e-3)
    torch.testing.assert_close(res.weights[1], expected)
    assert res.weights[1].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.isfinite(tau).any(), "branch 1 should let some classes out at m_train = 0.2"
    assert res.weight_stats[1]["effective_fraction"] < 1.0


def test_train_branches_resumes_inside_branch_two(tmp_path):
    tr, va = make_caches()
    rec = recipes.recipe("calexnet", **SMALL)
    cfg = FitConfig(epochs=3, batch_size=32, lr=1e-2)
    ref = branch_training.train_branches(tr, va, rec, cfg, out_dir=tmp_path / "ref", progress=False)

    class Stop(Exception):
        pass

    def hook(branch, epoch, record):
        if branch == 2 and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        branch_training.train_branches(tr, va, rec, cfg, out_dir=tmp_path / "run", progress=False, on_epoch_end=hook)
    assert (tmp_path / "run" / "branch_1" / "head.safetensors").is_file()
    assert not (tmp_path / "run" / "branch_2" / "head.safetensors").is_file()
    res = branch_training.train_branches(tr, va, rec, cfg, out_dir=tmp_path / "run", progress=False)
    for a, b in zip(ref.heads, res.heads, strict=True):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(RuntimeError, match="different"):
        branch_training.train_branches(
            tr, va, recipes.recipe("reference", **SMALL), cfg, out_dir=tmp_path / "run", progress=False
        )
    with pytest.raises(RuntimeError, match="different"):  # another training margin: other weights, other heads
        branch_training.train_branches(
            tr, va, recipes.recipe("calexnet", **{**SMALL, "m_train": 0.1}), cfg, out_dir=tmp_path / "run"
        )
    save_heads(tmp_path / "heads.safetensors", res.heads, {"recipe": rec.to_json()})
    back, cfg_back = load_heads(tmp_path / "heads.safetensors")
    assert cfg_back["recipe"]["name"] == "calexnet" and len(back) == 2
    torch.testing.assert_close(head_logits(back[1], va, 1), head_logits(res.heads[1], va, 1))


# --------------------------------------------------------------------------------------------------
# end to end on a real (tiny, trained) backbone
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    data = synthetic_dataset(768, 384, 384, n_classes=6, image_size=16, seed=3, noise=0.45)
    torch.manual_seed(0)
    net = CifarResNet(8, n_classes=6)
    training.train_backbone(
        net,
        data.train,
        None,
        training.BackboneTrainConfig(epochs=3, batch_size=64, lr=0.05, num_workers=0),
        progress=False,
    )
    bb = cifar_resnet(8, n_classes=6, checkpoint=net.state_dict(), input_size=16)
    caches = [build_feature_cache(bb, d, progress=False) for d in (data.train, data.val, data.test)]
    return data, bb, caches


def test_full_recipe_beats_chance_end_to_end(trained):
    data, bb, (tr, va, te) = trained
    bb_acc = (te.backbone_logits.argmax(1) == te.labels).float().mean().item()
    assert bb_acc > 0.6, f"the tiny backbone should learn the synthetic classes (got {bb_acc:.2f})"
    rec = recipes.recipe("calexnet", head_dim=32, n_prototypes=8, min_support=10)
    res = branch_training.train_branches(tr, va, rec, FitConfig(epochs=4, batch_size=64, lr=3e-3), progress=False)
    zv = branch_logits(res.heads, va)
    thr = calibrate(zv, va.backbone_logits, va.labels, 0.1, aligned=True, min_support=10)
    cascade = ReferenceCascade(bb, res.heads.eval(), thr)
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    out = cascade(x)
    acc = (out.logits.argmax(1) == data.test.labels).float().mean().item()
    early = (out.exit_index <= 2).float().mean().item()
    assert acc > 1 / 6 + 0.3, f"cascade accuracy {acc:.2f} should be far above chance (1/6)"
    assert early > 0.2, f"some samples should leave early (got {early:.2f})"
    # the cache-based simulation used for calibration and evaluation is the cascade's own
    with torch.no_grad():
        sim = cascade.simulate(x)
    zt = branch_logits(res.heads, te)
    torch.testing.assert_close(zt, sim.branch_logits, rtol=0, atol=2e-2)  # fp16 cached features
    decided = apply_exit_rule(sim.branch_logits, sim.backbone_logits, thr)
    assert torch.equal(decided.exit_index, out.exit_index)


def test_a_recipe_whose_weights_cannot_act_warns_and_records_it():
    """No class can exit at the training margin (min_support above the validation size): the survivor weights
    are all 1, so CalexNet would quietly train as reference + KD; it warns and records why."""
    tr, va = make_caches()
    rec = recipes.recipe("calexnet", **{**SMALL, "min_support": len(va) + 1})
    with pytest.warns(RuntimeWarning, match=r"branch 2: .* 0\.0% of the training samples exit"):
        res = branch_training.train_branches(tr, va, rec, FitConfig(epochs=1, batch_size=32, lr=1e-2), progress=False)
    stats = res.weight_stats[1]
    assert stats["exiting_classes"] == [0] and stats["train_exit_share"] == 0.0
    assert stats["effective_fraction"] == pytest.approx(1.0)
    assert torch.isinf(res.train_thresholds).all()


def test_a_recipe_whose_weights_act_records_the_exit_share(recwarn):
    tr, va = make_caches()
    res = branch_training.train_branches(
        tr, va, recipes.recipe("calexnet", **SMALL), FitConfig(epochs=3, batch_size=32, lr=1e-2), progress=False
    )
    stats = res.weight_stats[1]
    assert stats["exiting_classes"][0] > 0 and stats["train_exit_share"] >= branch_training.DEGENERATE_EXIT_SHARE
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "m_train" in str(w.message)]


def test_early_stopping_judges_a_weighted_branch_on_weighted_validation_survivors():
    """With patience, each head keeps its epoch of lowest validation loss; for a weighted branch that loss is
    the recipe's loss on the validation samples weighted as survivors, the way the training samples are."""
    tr, va = make_caches()
    rec = recipes.recipe("calexnet", **SMALL)
    fit_cfg = FitConfig(epochs=6, batch_size=32, lr=3e-2, patience=2)
    res = branch_training.train_branches(tr, va, rec, fit_cfg, progress=False)
    z1_val = head_logits(res.heads[0], va, 0)
    w_val = survivor_weights([z1_val], res.train_thresholds, "soft", 0.05, 1e-3)
    best = min(r["val_loss"] for r in res.history[1])
    feats, z, y = va.gather(torch.arange(len(va)), [1])
    batch = CachedBatch(feats, z, y, w_val, torch.arange(len(va)))
    with torch.no_grad():
        got = recipes.branch_loss(res.heads[1](feats[1].float()), batch, rec)
        plain = CachedBatch(feats, z, y, None, batch.index)
        unweighted = recipes.branch_loss(res.heads[1](feats[1].float()), plain, rec)
    assert float(got) == pytest.approx(best, rel=1e-4)
    assert float(unweighted) != pytest.approx(best, rel=1e-3)
    for hist in res.history:
        assert all("val_loss" in r for r in hist)


def test_unweighted_runs_resume_whatever_their_training_margin(tmp_path):
    """Options that do not shape a recipe's heads (the training margin without weights) do not block resuming."""
    tr, va = make_caches()
    cfg = FitConfig(epochs=1, batch_size=32, lr=1e-2)
    ref = recipes.recipe("reference", **SMALL)
    first = branch_training.train_branches(tr, va, ref, cfg, out_dir=tmp_path, progress=False)
    again = recipes.recipe("reference", **{**SMALL, "m_train": 0.0, "min_support": 9})
    res = branch_training.train_branches(tr, va, again, cfg, out_dir=tmp_path, progress=False)
    for a, b in zip(first.heads, res.heads, strict=True):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    assert again.training_json() == recipes.recipe("reference", **SMALL).training_json()
    assert "m_train" in recipes.recipe("calexnet").training_json()
    assert "kd_temperature" not in recipes.recipe("reference").training_json()
