"""CPM calibration: hand-checked cases, a brute-force twin, the precision guarantee, aligned subsets."""

from __future__ import annotations

import math

import pytest
import torch

from calexnet_fast.calibration import (
    CalibrationSweep,
    backbone_precision,
    bars_from_precision,
    calibrate,
    calibrate_sweep,
    cpm_thresholds,
    margin_grid,
)
from calexnet_fast.exit_rule import exit_decision_reference

INF = math.inf


def brute_force(conf, pred, labels, bars, min_support, mask=None):
    """Literal reading of docs/design.md §1: lowest τ among the set's confidences with precision ≥ bar, support."""
    c_count = bars.shape[0]
    mask = torch.ones_like(pred, dtype=torch.bool) if mask is None else mask
    out = torch.full((c_count,), INF)
    for c in range(c_count):
        sel = (pred == c) & mask & ~torch.isnan(conf)
        cs, ok = conf[sel], labels[sel] == c
        for t in sorted(cs.unique().tolist()):
            s = cs >= t
            if s.sum() >= min_support and ok[s].double().mean().item() >= bars[c].item() - 1e-12:
                out[c] = t
                break
    return out


def logits_from(conf_pred: list[tuple[float, int]], n_classes: int) -> torch.Tensor:
    """Logits whose softmax has max probability ``conf`` at class ``pred`` (rest uniform)."""
    rows = []
    for conf, pred in conf_pred:
        rest = (1 - conf) / (n_classes - 1)
        p = torch.full((n_classes,), rest, dtype=torch.float64)
        p[pred] = conf
        rows.append(p.log())
    return torch.stack(rows).float()


def test_hand_checked_case():
    # class 0, confidences descending: correct, correct, wrong, correct, wrong, correct
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    pred = torch.zeros(6, dtype=torch.long)
    labels = torch.tensor([0, 0, 1, 0, 1, 0])

    # prefix precisions: 1, 1, 2/3, 3/4, 3/5, 4/6
    def thr(bar, support):
        return cpm_thresholds(conf, pred, labels, torch.tensor([bar, 0.0], dtype=torch.float64), min_support=support)

    assert thr(1.0, 1)[0] == pytest.approx(0.8)  # largest all-correct prefix
    assert thr(0.75, 1)[0] == pytest.approx(0.6)  # 3/4 qualifies, 3/5 and 4/6 do not
    assert thr(0.6, 1)[0] == pytest.approx(0.4)  # 4/6 ≥ 0.6: the lowest confidence
    assert thr(0.7, 1)[0] == pytest.approx(0.6)  # non-monotone precision: 3/4 ok, 4/6 not
    assert thr(0.75, 5)[0] == INF  # support 5 needs a 5-prefix: 3/5 < 0.75
    assert thr(0.6, 5)[0] == pytest.approx(0.4)  # 4/6 ≥ 0.6 with support 6
    # 3/5 = 0.6 meets a bar of exactly 0.6 (≥)
    t5 = cpm_thresholds(conf[:5], pred[:5], labels[:5], torch.tensor([0.6], dtype=torch.float64), min_support=5)
    assert t5[0] == pytest.approx(0.5)
    assert thr(0.0, 7)[0] == INF  # only 6 samples
    assert thr(0.0, 1)[1] == INF  # class 1 is never predicted


def test_ties_are_taken_whole():
    # two samples at 0.8, one right one wrong: the prefix ending inside the tie is not a candidate
    conf = torch.tensor([0.9, 0.8, 0.8, 0.7])
    pred = torch.zeros(4, dtype=torch.long)
    labels = torch.tensor([0, 0, 1, 0])
    t = cpm_thresholds(conf, pred, labels, torch.tensor([0.7]), min_support=2)
    # {≥0.8} has precision 2/3 < 0.7, {≥0.7} has 3/4 ≥ 0.7
    assert t[0] == pytest.approx(0.7)
    t = cpm_thresholds(conf, pred, labels, torch.tensor([0.9]), min_support=2)
    assert t[0] == INF


def test_nan_confidence_never_counts():
    conf = torch.tensor([0.9, float("nan"), 0.8])
    pred = torch.zeros(3, dtype=torch.long)
    labels = torch.tensor([0, 1, 0])
    t = cpm_thresholds(conf, pred, labels, torch.tensor([1.0]), min_support=2)
    assert t[0] == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(25):
        n = int(torch.randint(1, 60, (1,), generator=g))
        c = int(torch.randint(1, 5, (1,), generator=g))
        conf = torch.randint(0, 6, (n,), generator=g) / 5.0  # many ties
        conf[torch.rand(n, generator=g) < 0.05] = float("nan")
        pred = torch.randint(0, c, (n,), generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.6, pred, torch.randint(0, c, (n,), generator=g))
        bars = torch.rand(3, c, generator=g, dtype=torch.float64)
        mask = torch.rand(3, n, generator=g) < 0.8
        support = int(torch.randint(1, 6, (1,), generator=g))
        got = cpm_thresholds(conf, pred, labels, bars, min_support=support, mask=mask)
        for m in range(3):
            torch.testing.assert_close(got[m], brute_force(conf, pred, labels, bars[m], support, mask[m]).float())


def make_problem(n=3000, c=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, c).float()
    bb = torch.randn(n, c, generator=g) * 1.5 + 3 * onehot
    branches = [torch.randn(n, c, generator=g) * 1.5 + (1.0 + k_) * onehot for k_ in range(k)]
    return branches, bb, y


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("mode", ["additive", "relative"])
def test_thresholds_meet_the_bar_on_their_calibration_set(aligned, mode):
    branches, bb, y = make_problem()
    margins = [0.0, 0.05, 0.2]
    thr = calibrate(branches, bb, y, margins, aligned=aligned, margin_mode=mode, min_support=20)
    bb_pred = bb.argmax(1)
    for mi, m in enumerate(margins):
        alive = torch.ones(len(y), dtype=torch.bool)
        for k, z in enumerate(branches):
            ex, pred, _ = exit_decision_reference(z, thr[mi, k])
            subset = alive if aligned else torch.ones_like(alive)
            for c in range(10):
                out = ex & subset & (pred == c)
                if torch.isinf(thr[mi, k, c]):
                    continue
                sel = subset & (bb_pred == c)
                pr = (y[sel] == c).double().mean().item()
                bar = pr - m if mode == "additive" else (1 - m) * pr
                assert out.sum() >= 20
                assert (y[out] == c).double().mean().item() >= bar - 1e-9
            alive &= ~ex
    assert torch.isfinite(thr).any() and torch.isinf(thr).any()


def test_aligned_uses_exactly_the_survivor_subset():
    branches, bb, y = make_problem(n=2000, seed=1)
    thr = calibrate(branches, bb, y, 0.1, aligned=True)
    ex1, _, _ = exit_decision_reference(branches[0], thr[0])
    surv = ~ex1
    assert 0 < surv.sum() < len(y)
    # branch 2 alone, calibrated on the survivors sliced out: the same thresholds
    sub = calibrate([branches[1][surv]], bb[surv], y[surv], 0.1, aligned=True)
    torch.testing.assert_close(thr[1], sub[0])
    # what the exited samples look like at branch 2 cannot matter
    scrambled = branches[1].clone()
    scrambled[ex1] = torch.randn(int(ex1.sum()), 10) * 5
    thr2 = calibrate([branches[0], scrambled, branches[2]], bb, y, 0.1, aligned=True)
    torch.testing.assert_close(thr2, thr)
    # unaligned: each branch alone on the whole set
    un = calibrate(branches, bb, y, 0.1, aligned=False)
    for k in range(3):
        torch.testing.assert_close(un[k], calibrate([branches[k]], bb, y, 0.1, aligned=False)[0])
    assert not torch.equal(un[1], thr[1])


def test_bar_from_full_validation_and_precision_fallback():
    branches, bb, y = make_problem(n=2000, seed=2)
    bb_pred = bb.argmax(1)
    full = calibrate(branches, bb, y, 0.1, aligned=True, bar_from="full_validation")
    prec, acc = backbone_precision(bb_pred, y, 10)
    bars = bars_from_precision(prec, acc, torch.tensor([0.1], dtype=torch.float64))
    ex1, _, _ = exit_decision_reference(branches[0], full[0])
    _, pred2, conf2 = exit_decision_reference(branches[1], full[1])
    # branch 2: survivors of branch 1 as the set, but the bars of the whole validation set
    expect2 = cpm_thresholds(conf2, pred2, y, bars[0], mask=~ex1)
    torch.testing.assert_close(full[1], expect2)
    # a class the backbone never predicts falls back to the backbone accuracy
    p, a = backbone_precision(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 3)
    assert torch.isnan(p[0, 2]) and a.item() == pytest.approx(0.75)
    b = bars_from_precision(p, a, torch.tensor([0.1], dtype=torch.float64), "relative")
    torch.testing.assert_close(b[0], torch.tensor([0.45, 0.9, 0.675], dtype=torch.float64))


def test_unaligned_thresholds_fall_with_the_margin():
    branches, bb, y = make_problem(n=2000, seed=3)
    thr = calibrate(branches, bb, y, margin_grid(0, 0.5, 11), aligned=False)
    # a lower bar can only admit more candidate sets, so τ never rises with m
    assert (thr[1:] <= thr[:-1]).all()
    assert torch.isinf(thr[0]).sum() > torch.isinf(thr[-1]).sum()


def test_shapes_and_errors(tmp_path):
    branches, bb, y = make_problem(n=200, c=5, k=2)
    assert calibrate(branches, bb, y, 0.1).shape == (2, 5)
    assert calibrate(torch.stack(branches), bb, y, [0.1, 0.2]).shape == (2, 2, 5)
    with pytest.raises(ValueError, match="branch_logits\\[1\\]"):
        calibrate([branches[0], branches[1][:, :3]], bb, y, 0.1)
    with pytest.raises(ValueError, match="labels"):
        calibrate(branches, bb, y[:-1], 0.1)
    with pytest.raises(ValueError, match="margin_mode"):
        calibrate(branches, bb, y, 0.1, margin_mode="multiplicative")
    with pytest.raises(ValueError, match="bar_from"):
        calibrate(branches, bb, y, 0.1, bar_from="test")
    with pytest.raises(ValueError, match="min_support"):
        cpm_thresholds(
            torch.rand(3),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(1),
            min_support=0,
        )
    sweep = calibrate_sweep(branches, bb, y, [0.0, 0.3], aligned=False, min_support=5)
    sweep.save(tmp_path / "thr.safetensors")
    back = CalibrationSweep.load(tmp_path / "thr.safetensors")
    assert torch.equal(back.thresholds, sweep.thresholds) and back.config["min_support"] == 5
    assert (tmp_path / "thr.json").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        CalibrationSweep.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="bad.safetensors"):
        CalibrationSweep.load(tmp_path / "bad.safetensors")


def test_refuses_float_labels_float_masks_and_flat_masks():
    branches, bb, y = make_problem(n=60, c=3, k=2)
    g = torch.Generator().manual_seed(4)
    conf, pred = torch.rand(60, generator=g), torch.randint(0, 3, (60,), generator=g)
    bars = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match="labels: expected an integer tensor of class indices, got dtype torch.float32"
    ):
        calibrate(branches, bb, y.float() + 0.5, 0.1)  # 2.5 would have been truncated to 2
    with pytest.raises(ValueError, match="labels: expected an integer tensor .*torch.float64"):
        cpm_thresholds(conf, pred, y.double(), bars)
    with pytest.raises(ValueError, match="labels: expected an integer tensor .*torch.bool"):
        backbone_precision(pred, y > 0, 3)
    with pytest.raises(
        ValueError, match=r"mask: expected a bool tensor \(True = in the subset\), got dtype torch.float32"
    ):
        cpm_thresholds(conf, pred, y, bars, mask=torch.ones(2, 60))  # nonzero would have meant True
    with pytest.raises(ValueError, match="mask: expected a bool tensor .*torch.int64"):
        backbone_precision(pred, y, 3, torch.ones(2, 60, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"mask: expected shape \[60\] or \[2, 60\] \(one row per subset\), got \[120\]"
    ):
        cpm_thresholds(conf, pred, y, bars, mask=torch.ones(120, dtype=torch.bool))  # would have been reshaped
    with pytest.raises(ValueError, match=r"mask: expected shape \[60\] or \[M, 60\] .*got \[120\]"):
        backbone_precision(pred, y, 3, torch.ones(120, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected shape \[60\] or \[2, 60\] .*got \[3, 60\]"):
        cpm_thresholds(conf, pred, y, bars, mask=torch.ones(3, 60, dtype=torch.bool))
    # the accepted forms still agree: [N] is one subset for every bar
    mask = torch.rand(60, generator=torch.Generator().manual_seed(0)) < 0.7
    torch.testing.assert_close(
        cpm_thresholds(conf, pred, y, bars, mask=mask, min_support=2),
        cpm_thresholds(conf, pred, y, bars, mask=mask.expand(2, 60), min_support=2),
    )


def test_zero_samples_give_never_exit():
    branches, bb, y = torch.zeros(2, 0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    for aligned in (True, False):
        for bar_from in ("subset", "full_validation"):
            thr = calibrate(branches, bb, y, [0.0, 0.1], aligned=aligned, bar_from=bar_from)
            assert thr.shape == (2, 2, 4) and bool(torch.isinf(thr).all())
        assert calibrate(branches, bb, y, 0.1, aligned=aligned).shape == (2, 4)
    empty = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    got = cpm_thresholds(*empty, torch.zeros(3, 4), mask=torch.zeros(3, 0, dtype=torch.bool))
    assert got.shape == (3, 4) and bool(torch.isinf(got).all())
    got = cpm_thresholds(*empty, torch.zeros(4), mask=torch.zeros(0, dtype=torch.bool))
    assert got.shape == (4,) and bool(torch.isinf(got).all())


def test_bad_margins_and_predictions_are_named():
    branches, bb, y = make_problem(n=60, c=3, k=2)
    for margins, got in [(None, "NoneType"), ("0.1", "str"), (["0.1"], "list"), ([[0.1, 0.2]], r"shape \[1, 2\]")]:
        with pytest.raises(ValueError, match=f"margins: expected a float or a 1-D sequence of floats, got {got}"):
            calibrate(branches, bb, y, margins)
    with pytest.raises(ValueError, match="margins: expected a float or a 1-D sequence of floats, got str"):
        calibrate_sweep(branches, bb, y, "0.1")
    with pytest.raises(ValueError, match="margins: expected finite numbers, got NaN"):
        calibrate(branches, bb, y, [0.1, math.nan])
    assert calibrate_sweep(branches, bb, y).thresholds.shape == (51, 2, 3)  # None: the default grid
    g = torch.Generator().manual_seed(4)
    conf, pred = torch.rand(60, generator=g), torch.randint(0, 3, (60,), generator=g)
    with pytest.raises(ValueError, match=r"pred: expected values in \[0, 2\], got \[3, 5\]"):
        cpm_thresholds(conf, pred + 3, y, torch.zeros(3))
    with pytest.raises(ValueError, match=r"pred: expected values in \[0, 2\], got \[-1, 1\]"):
        cpm_thresholds(conf, pred - 1, y, torch.zeros(3))
    with pytest.raises(ValueError, match="pred: expected an integer tensor .*torch.float32"):
        cpm_thresholds(conf, pred.float(), y, torch.zeros(3))
    with pytest.raises(ValueError, match=r"backbone_pred: expected values in \[0, 2\], got \[3, 5\]"):
        backbone_precision(pred + 3, y, 3)
    with pytest.raises(ValueError, match=r"bars: expected a floating tensor \[C\] or \[M, C\]"):
        cpm_thresholds(conf, pred, y, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="conf: expected a floating tensor"):
        cpm_thresholds(pred, pred, y, torch.zeros(3))


def test_non_tensors_meta_tensors_and_bad_min_support_are_named():
    branches, bb, y = make_problem(n=20, c=3, k=2)
    conf, pred = torch.rand(20), y.clone()
    meta = torch.device("meta")
    cpm_cases = [
        ((conf.tolist(), pred, y, torch.zeros(3)), {}, "conf: expected a floating tensor .*got list"),
        ((conf, pred.tolist(), y, torch.zeros(3)), {}, "pred: expected an integer tensor .*got list"),
        ((conf.to(meta), pred, y, torch.zeros(3)), {}, "conf: expected .* with data .*got a meta tensor"),
        ((conf, pred, y.to(meta), torch.zeros(3)), {}, "labels: expected .* with data .*got a meta tensor"),
        ((conf, pred, y, torch.zeros(3, device=meta)), {}, "bars: expected .* with data .*got a meta tensor"),
        ((conf, pred, y, torch.zeros(3)), {"mask": torch.ones(20, dtype=torch.bool, device=meta)}, "mask: .*meta"),
        ((conf, pred, y, torch.zeros(3)), {"min_support": None}, "min_support: expected a positive integer, got None"),
        ((conf, pred, y, torch.zeros(3)), {"min_support": 2.5}, "min_support: expected a positive integer, got 2.5"),
    ]
    for args, kwargs, msg in cpm_cases:
        with pytest.raises(ValueError, match=msg):
            cpm_thresholds(*args, **kwargs)
    calibrate_cases = [
        ((None, bb, y, 0.1), {}, "branch_logits: expected K tensors .*got NoneType"),
        (
            ([z.tolist() for z in branches], bb, y, 0.1),
            {},
            r"branch_logits\[0\]: expected a tensor \[20, 3\], got list",
        ),
        ((branches, bb.tolist(), y, 0.1), {}, r"backbone_logits: expected a tensor \[N, C\], got list"),
        ((branches, bb.to(meta), y, 0.1), {}, "backbone_logits: expected .* with data .*got a meta tensor"),
        (([z.to(meta) for z in branches], bb, y, 0.1), {}, r"branch_logits\[0\]: .*got a meta tensor"),
        ((branches, bb, y.to(meta), 0.1), {}, "labels: expected .* with data .*got a meta tensor"),
        (([z[:, :0] for z in branches], bb[:, :0], y, 0.1), {}, r"backbone_logits: expected \[N, C\] with C >= 1"),
        ((branches, bb, y, 0.1), {"min_support": 0}, "min_support: expected a positive integer, got 0"),
    ]
    for args, kwargs, msg in calibrate_cases:
        for fn in (calibrate, calibrate_sweep):
            with pytest.raises(ValueError, match=msg):
                fn(*args, **kwargs)
