"""FLOPs accounting: per-sample segment/head FLOPs (FlopCounterMode), cost model, FLOPs reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calexnet_fast import backbones as B
from calexnet_fast import flops as F


def _linear_heads(bb, n_classes=None):
    n_classes = n_classes or bb.n_classes
    return [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes)) for c in bb.branch_channels]


@pytest.mark.parametrize(
    "make",
    [
        lambda: B.cifar_resnet(20, placement="flops", n_branches=4),
        lambda: B.resnet18(10, stem="cifar", branch_points=["layer1.0", "layer2", "layer3.1"]),
        lambda: B.resnet50(10, input_size=64, branch_points=["layer1", "layer3.3"]),
    ],
    ids=["cifar_resnet20", "resnet18_cifar", "resnet50_64px"],
)
def test_segment_flops_sum_to_whole_backbone(make):
    bb = make()
    seg = F.segment_flops(bb)
    assert len(seg) == bb.n_branches + 1 and all(s > 0 for s in seg)
    whole, _ = F.count_flops(bb, bb.example_input(3))
    assert sum(seg) == pytest.approx(whole / 3, rel=1e-12)


def test_per_sample_counts_match_known_layer_sizes():
    # 2 FLOPs per multiply-add, per sample, whatever batch was used to count.
    lin = nn.Linear(64, 10)
    f, _ = F.count_flops(lin, torch.zeros(5, 64))
    assert f == 5 * 2 * 64 * 10
    stages = [nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 8, 1, bias=False)]
    clf = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10, bias=False))
    bb = B.from_stages(stages, clf, in_channels=3, input_size=(6, 5))
    assert F.segment_flops(bb) == [2 * 3 * 9 * 4 * 30, 2 * 4 * 8 * 30 + 2 * 8 * 10]
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(4 * 30, 10))]
    assert F.head_flops(heads, bb) == [2 * 120 * 10]
    # at another input size the counts scale with the pixels
    assert F.segment_flops(bb, input_size=(12, 10))[0] == 4 * 2 * 3 * 9 * 4 * 30


def test_resnet56_total_matches_its_published_size():
    # ResNet-56 on 32x32: ~125 M multiply-adds, i.e. ~0.25 GFLOPs (BUILD_NOTES.md).
    bb = B.cifar_resnet(56)
    assert 0.24e9 < sum(F.segment_flops(bb)) < 0.26e9


def test_cost_model_by_hand():
    prof = F.FlopsProfile(segment_flops=(10.0, 20.0, 30.0), head_flops=(1.0, 2.0))
    assert prof.n_branches == 2 and prof.backbone_flops == 60.0
    assert prof.exit_costs() == [11.0, 33.0, 63.0]
    assert prof.expected_cost([1, 1, 2]) == pytest.approx((11 + 33 + 2 * 63) / 4)
    assert prof.flops_reduction([1, 1, 2]) == pytest.approx(1 - 42.5 / 60)
    assert F.expected_cost(prof, torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(5.5 + 8.25 + 15.75)
    # everything exits at branch 1 / nothing exits (the heads make it cost more than the backbone)
    assert prof.flops_reduction([7, 0, 0]) == pytest.approx(1 - 11 / 60)
    assert prof.flops_reduction([0, 0, 3]) == pytest.approx(-3 / 60)
    assert F.FlopsProfile.from_json(prof.to_json()) == prof


def test_profile_of_real_cascade_and_exit_histogram():
    bb = B.cifar_resnet(20, branch_points=["layer1", "layer2.1"])
    heads = _linear_heads(bb)
    heads[0].eval()
    heads[1].train()
    prof = F.profile_flops(bb, heads)
    assert not heads[0].training and heads[1].training  # each head's mode is restored after the probe
    assert prof.head_flops == (2 * 16 * 10, 2 * 32 * 10)
    assert prof.segment_flops == tuple(F.segment_flops(bb))
    exit_index = torch.tensor([1, 1, 3, 2, 3, 3], dtype=torch.int64)
    hist = F.exit_histogram(exit_index, 2)
    assert hist.tolist() == [2, 1, 3]
    costs = prof.exit_costs()
    assert prof.expected_cost(hist) == pytest.approx((2 * costs[0] + costs[1] + 3 * costs[2]) / 6)
    assert F.exit_histogram(torch.zeros(0, dtype=torch.int64), 2).tolist() == [0, 0, 0]


def test_bad_inputs():
    prof = F.FlopsProfile((10.0, 20.0), (1.0,))
    with pytest.raises(ValueError, match=r"exit_counts: expected K \+ 1 = 2 values"):
        prof.expected_cost([1, 2, 3])
    with pytest.raises(ValueError, match="exit_counts: expected finite non-negative counts"):
        prof.expected_cost([1, -1])
    with pytest.raises(ValueError, match="exit_counts: expected a positive total"):
        prof.flops_reduction([0, 0])
    with pytest.raises(ValueError, match=r"segment_flops: expected K \+ 1 = 2 values"):
        F.FlopsProfile((1.0,), (1.0,))
    with pytest.raises(ValueError, match=r"exit_index: expected values in 1\.\.3"):
        F.exit_histogram(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="exit_index: expected a 1-D integer tensor"):
        F.exit_histogram(torch.tensor([1.0]), 2)
    bb = B.cifar_resnet(20)
    with pytest.raises(
        ValueError, match=r"heads: expected 2 heads \(one per branch point \['layer1', 'layer2'\]\), got 1"
    ):
        F.head_flops(_linear_heads(bb)[:1], bb)
