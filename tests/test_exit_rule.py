"""The exit rule (calexnet_fast.exit_rule): the test, the first exit, the cascade's output from simulated
logits, and the baselines' global-threshold rule as the same test with every class's threshold equal."""

from __future__ import annotations

import pytest
import torch

from calexnet_fast.exit_rule import (
    apply_exit_rule,
    exit_decision_reference,
    exit_test,
    first_exit,
    global_threshold_exit,
)

INF, NAN = float("inf"), float("nan")


def test_exit_test_ties_nan_and_infinities():
    score = torch.tensor([0.5, 0.5, NAN, 0.2, 0.9])
    pred = torch.tensor([0, 1, 0, 2, 2])
    thr = torch.tensor([0.5, torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item(), -INF])
    assert exit_test(score, pred, thr).tolist() == [True, False, False, True, True]  # NaN never, even at -inf
    assert not exit_test(score, pred, torch.full((3,), INF)).any()
    assert exit_test(score.double(), pred, thr.half()).dtype == torch.bool


def test_first_exit():
    hit = torch.tensor([[False, True, False, True], [True, True, False, False]])  # [K=2, N=4]
    assert first_exit(hit).tolist() == [2, 1, 3, 1]
    assert first_exit(torch.stack([hit, ~hit])).tolist() == [[2, 1, 3, 1], [1, 3, 1, 2]]
    assert first_exit(torch.zeros(0, 3, dtype=torch.bool)).tolist() == [1, 1, 1]


def test_apply_exit_rule_directly():
    z = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 0.0], [float("nan"), 1.0]],  # branch 1
            [[0.0, 5.0], [3.0, 0.0], [0.0, 4.0]],  # branch 2
        ]
    )
    zb = torch.tensor([[9.0, 0.0], [8.0, 0.0], [7.0, 0.0]])
    p_tie = torch.softmax(torch.tensor([0.0, 0.0]), 0)[0]  # 0.5 exactly
    thr = torch.tensor([[0.8, float("inf")], [float("inf"), 0.99]])
    out = apply_exit_rule(z, zb, thr)
    assert out.exit_index.tolist() == [1, 3, 3]
    torch.testing.assert_close(out.logits, torch.stack([z[0, 0], zb[1], zb[2]]))
    thr = torch.tensor([[0.5, 0.5], [0.9, 0.9]])
    assert float(p_tie) == 0.5
    out = apply_exit_rule(z, zb, thr)
    assert out.exit_index.tolist() == [1, 1, 2]  # row 1 ties at 0.5 and exits; row 2 has NaN at branch 1
    torch.testing.assert_close(out.logits, torch.stack([z[0, 0], z[0, 1], z[1, 2]]))
    none = apply_exit_rule(z[:0], zb.half(), thr[:0])  # no branch: the backbone, in the branches' dtype
    assert none.exit_index.tolist() == [1, 1, 1] and none.logits.dtype == torch.float32
    empty = apply_exit_rule(z[:, :0], zb[:0], thr)
    assert empty.logits.shape == (0, 2) and empty.exit_index.shape == (0,)


def test_apply_exit_rule_bad_shapes():
    with pytest.raises(ValueError, match=r"backbone_logits: expected shape \[4, 10\], got \[4, 9\]"):
        apply_exit_rule(torch.zeros(3, 4, 10), torch.zeros(4, 9), torch.zeros(3, 10))
    with pytest.raises(ValueError, match=r"thresholds: expected shape \[3, 10\], got \[10\]"):
        apply_exit_rule(torch.zeros(3, 4, 10), torch.zeros(4, 10), torch.zeros(10))
    with pytest.raises(ValueError, match=r"branch_logits: expected a 3-D tensor"):
        apply_exit_rule(torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(3, 10))


def test_global_threshold_is_the_per_class_rule_with_one_threshold():
    g = torch.Generator().manual_seed(0)
    z = torch.round(torch.randn(3, 200, 5, generator=g) * 4) / 4  # many exact confidence ties
    zb = torch.randn(200, 5, generator=g)
    conf = torch.stack([exit_decision_reference(z[k], torch.zeros(5))[2] for k in range(3)])  # [K, N]
    taus = [0.0, float(conf.median()), float(conf[1, 7]), 1.0, INF]
    many = global_threshold_exit(conf, torch.tensor(taus))
    for t, tau in enumerate(taus):
        want = apply_exit_rule(z, zb, torch.full((3, 5), tau)).exit_index
        assert torch.equal(global_threshold_exit(conf, tau), want)
        assert torch.equal(many[t], want)
