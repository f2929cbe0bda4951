"""Evaluation: operating points, Pareto envelopes, interpolation, area, seed statistics, figure, table and
``calexnet compare`` end to end on synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calexnet_fast import cli
from calexnet_fast.calibration import calibrate
from calexnet_fast.evaluation import (
    SweepResult,
    aggregate,
    envelope_area,
    envelope_value,
    pareto_envelope,
    parse_margins,
    plot_envelopes,
    results_table,
    summarize,
    sweep_cpm,
    sweep_global_threshold,
    threshold_grid,
)
from calexnet_fast.evaluation.pareto import reduction_at_accuracy
from calexnet_fast.flops import FlopsProfile
from calexnet_fast.io import json_safe, write_json

PROFILE = FlopsProfile((1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # exit k costs k, the backbone 4


# many tiny ops: with two intra-op threads on a loaded 2-core machine every op waits for a descheduled thread
# (measured 20x slower); one thread keeps them fast
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# envelopes
# --------------------------------------------------------------------------------------------------

X = [0.1, 0.2, 0.3, 0.3, 0.5, 0.4, float("nan")]
Y = [0.9, 0.95, 0.8, 0.85, 0.7, 0.6, 0.99]


def test_pareto_envelope_hand_made():
    ex, ey = pareto_envelope(X, Y)
    assert ex.tolist() == [0.2, 0.3, 0.5] and ey.tolist() == [0.95, 0.85, 0.7]
    ex, ey = pareto_envelope([], [])
    assert ex.size == 0
    with pytest.raises(ValueError, match="accuracy"):
        pareto_envelope([0.1, 0.2], [0.5])


def test_envelope_value_interpolates_and_stops_at_the_end():
    ex, ey = pareto_envelope(X, Y)
    assert envelope_value(ex, ey, 0.25) == pytest.approx(0.9)
    assert envelope_value(ex, ey, 0.4) == pytest.approx(0.775)
    assert envelope_value(ex, ey, 0.1) == pytest.approx(0.95)  # a point saving more is at least as accurate
    assert envelope_value(ex, ey, 0.5) == pytest.approx(0.7)
    assert math.isnan(envelope_value(ex, ey, 0.6))  # the method cannot save 60 %
    v = envelope_value(ex, ey, np.array([0.2, 0.3, 0.55]))
    assert v[:2].tolist() == [0.95, 0.85] and math.isnan(v[2])


def test_envelope_area_by_hand():
    ex, ey = pareto_envelope(X, Y)
    assert envelope_area(ex, ey, 0.3, 0.5) == pytest.approx((0.85 + 0.7) / 2)
    # 0.2..0.3: mean .9; 0.3..0.4: mean (.85 + .775) / 2
    assert envelope_area(ex, ey, 0.2, 0.4) == pytest.approx((0.1 * 0.9 + 0.1 * 0.8125) / 0.2)
    assert envelope_area(ex, ey, 0.0, 0.2) == pytest.approx(0.95)
    assert math.isnan(envelope_area(ex, ey, 0.3, 0.7))
    with pytest.raises(ValueError, match="hi"):
        envelope_area(ex, ey, 0.5, 0.3)


def test_aggregate_mean_std_and_nan():
    a = aggregate([0.5, 0.7, 0.6])
    assert a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(0.1) and a["n"] == 3
    assert aggregate([0.4])["std"] == 0.0
    b = aggregate([0.5, float("nan")])
    assert math.isnan(b["mean"]) and b["n"] == 2


# --------------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------------


def test_sweep_global_threshold_by_hand():
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.1, 0.7, 0.4, 0.2], [0.0, 0.9, 0.6, 0.3]])
    preds = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1], [1, 0, 2, 2]])
    backbone = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 3]), 4).float()
    labels = torch.tensor([0, 1, 2, 3])
    sw = sweep_global_threshold(scores, preds, backbone, labels, PROFILE, [0.5, float("inf"), 0.0], method="m")
    # tau 0.5: exits [1, 2, 1, 4] -> preds [0, 1, 1, 3] -> 3 of 4 right; cost (1 + 2 + 1 + 4) / 4 = 2
    assert sw.accuracy[0] == pytest.approx(0.75) and sw.flops_reduction[0] == pytest.approx(0.5)
    assert sw.exit_fractions[0] == [0.5, 0.25, 0.0, 0.25]
    # tau inf: all on the backbone (right on 3 of 4): its accuracy, 0 reduction
    assert sw.accuracy[1] == pytest.approx(0.75) and sw.flops_reduction[1] == pytest.approx(0.0)
    # tau 0: all leave at exit 1 -> preds [0, 1, 1, 0]
    assert sw.accuracy[2] == pytest.approx(0.5) and sw.flops_reduction[2] == pytest.approx(0.75)
    assert sw.param_name == "threshold" and sw.method == "m"
    with pytest.raises(ValueError, match="test_preds"):
        sweep_global_threshold(scores, preds[:2], backbone, labels, PROFILE, [0.5])
    with pytest.raises(ValueError, match="test_labels"):
        sweep_global_threshold(scores, preds, backbone, labels[:3], PROFILE, [0.5])


def test_heads_are_paid_for_even_when_they_fail():
    profile = FlopsProfile((1.0, 1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    scores = torch.zeros(3, 2)
    preds = torch.zeros(3, 2, dtype=torch.long)
    sw = sweep_global_threshold(scores, preds, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), profile, [1.0])
    assert sw.flops_reduction[0] == pytest.approx(1 - 5.5 / 4)  # nobody exits: backbone + all three heads


def _exit_by_hand(branch_logits, backbone_logits, thr):
    """An independent per-sample loop of the exit rule (docs/design.md §1)."""
    p = torch.softmax(branch_logits, -1)
    preds, exits = [], []
    for i in range(branch_logits.shape[1]):
        for k in range(branch_logits.shape[0]):
            c = int(p[k, i].argmax())
            if float(p[k, i, c]) >= float(thr[k, c]):
                preds.append(c)
                exits.append(k + 1)
                break
        else:
            preds.append(int(backbone_logits[i].argmax()))
            exits.append(branch_logits.shape[0] + 1)
    return torch.tensor(preds), torch.tensor(exits)


@pytest.mark.parametrize("aligned", [True, False])
def test_sweep_cpm_points_match_a_hand_loop(aligned):
    g = torch.Generator().manual_seed(0)
    n, c = 300, 4
    y_val, y_test = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)

    def logits(y, scale):
        return scale * torch.nn.functional.one_hot(y, c).float() + torch.randn(3, n, c, generator=g) * 1.5

    zv, zt = logits(y_val, torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)), logits(y_test, 2.0)
    bv = 5 * torch.nn.functional.one_hot(y_val, c).float() + torch.randn(n, c, generator=g)
    bt = 5 * torch.nn.functional.one_hot(y_test, c).float() + torch.randn(n, c, generator=g)
    margins = [0.0, 0.1, 0.3, 1.0]
    sw = sweep_cpm(zv, bv, y_val, zt, bt, y_test, PROFILE, margins, aligned=aligned, min_support=5, method="x")
    thr = calibrate(zv, bv, y_val, torch.tensor(margins, dtype=torch.float64), aligned=aligned, min_support=5)
    for i in range(len(margins)):
        pred, ex = _exit_by_hand(zt, bt, thr[i])
        assert sw.accuracy[i] == pytest.approx(float((pred == y_test).double().mean()))
        cost = ex.double().clamp(max=4).mean()  # exit k costs k, the backbone (K + 1 = 4) costs 4
        assert sw.flops_reduction[i] == pytest.approx(1 - float(cost) / 4)
        assert sum(sw.exit_fractions[i]) == pytest.approx(1.0)
    assert sw.flops_reduction[-1] > sw.flops_reduction[0]  # a wider margin lets more samples out


def test_parse_margins():
    assert parse_margins("0:1:5").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_margins("0.2,-0.1").tolist() == [0.2, -0.1] and parse_margins("0.3").dtype == torch.float64
    for bad in ("0:1:0", "a,b", "0:1"):
        with pytest.raises(ValueError, match="margins: expected START:STOP:COUNT"):
            parse_margins(bad)


def test_threshold_grid():
    g = threshold_grid(torch.tensor([[0.99, 0.999, 0.9999], [0.5, 0.6, float("nan")]]), 11, 9)
    assert g[0] == 0.0 and torch.isinf(g[-1]) and 1.0 in g.tolist()
    assert bool((g[1:] > g[:-1]).all())
    assert (g > 0.999).sum() >= 2  # quantiles of the validation scores fill in near 1
    assert threshold_grid(None, 5, 0).tolist()[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------------------------------
# summaries, figure, table
# --------------------------------------------------------------------------------------------------


def _sweep(method, seed, x, y):
    return SweepResult(method, seed, "threshold", list(range(len(x))), list(y), list(x), [[1.0]] * len(x))


def test_summarize_seed_statistics_and_band():
    sweeps = {
        "a": [_sweep("a", 0, [0.0, 0.8], [0.9, 0.5]), _sweep("a", 1, [0.0, 0.8], [0.8, 0.4])],
        "b": [_sweep("b", 0, [0.0, 0.5], [0.9, 0.8]), _sweep("b", 1, [0.0, 0.65], [0.9, 0.8])],
    }
    s = summarize(sweeps, band_grid=np.array([0.0, 0.4, 0.6, 0.7]))
    a = s["a"]
    # seed 0 at 0.4: 0.7, seed 1: 0.6
    assert a["accuracy_at"]["0.4"]["mean"] == pytest.approx(0.65)
    assert a["accuracy_at"]["0.4"]["std"] == pytest.approx(np.std([0.7, 0.6], ddof=1))
    assert a["area"]["values"] == pytest.approx([0.65, 0.55])  # linear envelopes: their value at 50 %
    assert a["band"]["mean"] == pytest.approx([0.85, 0.65, 0.55, 0.5])
    b = s["b"]
    assert math.isnan(b["accuracy_at"]["0.6"]["mean"])  # seed 0 stops at 50 %
    assert b["accuracy_at"]["0.6"]["values"][1] == pytest.approx(0.9 - 0.06 / 0.65)
    assert math.isnan(b["band"]["mean"][2]) and b["band"]["mean"][1] == pytest.approx((0.82 + 0.9 - 0.04 / 0.65) / 2)
    assert b["max_reduction"]["mean"] == pytest.approx(0.575)
    table = results_table(json.loads(json.dumps(json_safe(s))))
    assert "| a |" in table and "| b |" in table and "**" in table and "n/a (1/2 seeds miss)" in table


def test_plot_and_json(tmp_path):
    sweeps = {
        m: [_sweep(m, s, [0.0, 0.3, 0.75], [0.9, 0.85 - 0.01 * s, 0.6]) for s in (0, 1)] for m in ("calexnet", "x")
    }
    s = summarize(sweeps)
    paths = [tmp_path / "f.png", tmp_path / "f.svg"]
    plot_envelopes(s, paths, backbone_accuracy=0.9, title="t")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()[:1000]
    write_json(tmp_path / "r.json", {"s": s, "v": float("nan")})
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["v"] is None and back["s"]["x"]["area"]["mean"] == pytest.approx(s["x"]["area"]["mean"])


# --------------------------------------------------------------------------------------------------
# calexnet compare
# --------------------------------------------------------------------------------------------------


def test_compare_end_to_end_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "compare", "--dataset", "synthetic", "--synthetic-size", "240", "120", "160", "--synthetic-classes", "4",
        "--image-size", "16", "--backbone", "cifar_resnet20", "--random-init", "--n-branches", "3",
        "--out", str(out), "--seeds", "0,1", "--epochs", "1", "--batch-size", "64", "--head-dim", "8",
        "--n-prototypes", "4", "--min-support", "5", "--margins", "0:1:11", "--thresholds", "11",
        "--threshold-quantiles", "9", "--ztw-ensemble-epochs", "1", "--quiet", "--threads", "1",
        "--methods", "calexnet,reference,reference+aligned,pteenet,ztw,boostnet",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    methods = ["calexnet", "reference", "reference+aligned", "pteenet", "ztw", "boostnet"]
    assert list(res["summary"]) == methods and res["config"]["seeds"] == [0, 1]
    for m in methods:
        runs = res["sweeps"][m]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert len(r["accuracy"]) == len(r["flops_reduction"]) == len(r["params"]) > 5
            assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert set(res["summary"][m]["accuracy_at"]) == {"0.3", "0.4", "0.5", "0.6", "0.7"}
    # reference+aligned trains exactly the reference heads (only its calibration differs)
    assert res["sweeps"]["reference+aligned"][0]["info"]["heads_trained_as"] == "reference"
    assert (
        res["sweeps"]["reference"][0]["info"]["head_flops"]
        == res["sweeps"]["reference+aligned"][0]["info"]["head_flops"]
    )
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "pareto.svg").is_file()
    assert "| calexnet |" in (out / "table.md").read_text()
    # a second run resumes from the work dir (nothing retrains) and reproduces the numbers
    capsys.readouterr()
    out2 = tmp_path / "out2"
    again_argv = argv[: argv.index("--out")] + ["--out", str(out2), "--work-dir", str(out / "work")]
    again_argv += argv[argv.index("--out") + 2 :]
    again_argv[again_argv.index("--seeds") + 1] = "1"
    again_argv[again_argv.index("--methods") + 1] = "calexnet,ztw"
    assert cli.main(again_argv) == 0
    again = json.loads((out2 / "results.json").read_text())
    assert again["sweeps"]["calexnet"][0]["accuracy"] == res["sweeps"]["calexnet"][1]["accuracy"]
    assert again["sweeps"]["ztw"][0]["accuracy"] == res["sweeps"]["ztw"][1]["accuracy"]


def test_compare_shares_branch_one_exactly(tmp_path):
    """reference+weights reuses reference's first head (branch 1 always trains with weight 1): the results
    equal those of a run that trains it on its own."""
    base = [
        "compare", "--dataset", "synthetic", "--synthetic-size", "160", "100", "100", "--synthetic-classes", "4",
        "--image-size", "16", "--backbone", "cifar_resnet20", "--random-init", "--n-branches", "3",
        "--seeds", "0", "--epochs", "1", "--batch-size", "64", "--head-dim", "8", "--n-prototypes", "4",
        "--min-support", "5", "--margins", "0:1:11", "--quiet", "--threads", "1",
    ]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--methods", "reference,reference+weights"]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--methods", "reference+weights"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())["sweeps"]["reference+weights"][0]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["sweeps"]["reference+weights"][0]
    shared = tmp_path / "a" / "work" / "runs" / "reference+weights_seed0" / "branch_1" / "head.json"
    assert "shared_from" in json.loads(shared.read_text())
    assert a["accuracy"] == b["accuracy"] and a["flops_reduction"] == b["flops_reduction"]


def test_compare_rejects_unknown_methods(tmp_path):
    argv = ["compare", "--dataset", "synthetic", "--random-init", "--out", str(tmp_path), "--methods", "calexnet,sdn"]
    with pytest.raises(SystemExit, match="sdn"):
        cli.main(argv)


def test_compare_cpm_with_sdn_heads(tmp_path):
    argv = [
        "compare", "--dataset", "synthetic", "--synthetic-size", "120", "80", "80", "--synthetic-classes", "4",
        "--image-size", "16", "--backbone", "cifar_resnet20", "--random-init", "--n-branches", "3",
        "--seeds", "0", "--epochs", "1", "--batch-size", "64", "--min-support", "5", "--margins", "0:1:11",
        "--quiet", "--threads", "1", "--methods", "reference", "--cpm-head", "sdn", "--out", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["cpm_head"] == "sdn"
    channels = [16, 32, 64]  # cifar_resnet20 at layer1.x, layer2.x, layer3.x: pooled 4x4 -> linear to 4 classes
    assert res["sweeps"]["reference"][0]["info"]["head_flops"] == [2 * c * 16 * 4 for c in channels]


def test_reduction_at_accuracy_by_hand():
    ex, ey = np.array([0.1, 0.4, 0.6]), np.array([0.90, 0.88, 0.80])
    assert reduction_at_accuracy(ex, ey, 0.89) == pytest.approx(0.25)  # halfway from 0.1 to 0.4
    assert reduction_at_accuracy(ex, ey, 0.88) == pytest.approx(0.4)
    assert reduction_at_accuracy(ex, ey, 0.70) == pytest.approx(0.6)  # the envelope's end
    assert reduction_at_accuracy(ex, ey, 0.95) == 0.0  # nothing reaches it: the backbone alone


def test_compare_full_budget_protocol(tmp_path):
    """Test-half calibration (disjoint stratified halves), flips, a pooled cache, early stopping, a CPM
    method with another head, per-exit accuracies and the reduction at <= 1 / 2 points of loss."""
    argv = [
        "compare", "--dataset", "synthetic", "--synthetic-size", "120", "80", "80", "--synthetic-classes", "4",
        "--image-size", "16", "--backbone", "cifar_resnet20", "--random-init", "--n-branches", "3",
        "--seeds", "0", "--epochs", "3", "--patience", "1", "--batch-size", "64", "--min-support", "5",
        "--margins", "0:1:11", "--quiet", "--threads", "1", "--flip", "--cache-pool", "4",
        "--methods", "calexnet,calexnet:sdn,ztw,boostnet,pteenet", "--out", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["protocol"] == {
        "calibration": "test-half", "calibration_seed": 0, "n_calibration": 40, "n_reported": 40,
    }  # fmt: skip
    assert res["config"]["dataset"]["flip"] and res["config"]["cache"]["pool"] == 4
    for m in ("calexnet", "calexnet:sdn", "ztw", "boostnet", "pteenet"):
        s = res["summary"][m]
        assert len(s["exit_accuracy"]) == 3 and set(s["reduction_at_loss"]) == {"0.01", "0.02"}
    assert res["sweeps"]["calexnet:sdn"][0]["info"]["heads_trained_as"] == "calexnet_sdn"
    table = (tmp_path / "table.md").read_text()
    assert "| exit 1 acc | exit 2 acc | exit 3 acc | reduction @ ≤ 1 pt loss |" in table and "| pteenet |" in table
    head = json.loads((tmp_path / "work" / "runs" / "calexnet_seed0" / "branch_2" / "head.json").read_text())
    assert all("val_loss" in r for r in head["history"]) and len(head["history"]) <= 3
    bad = [*argv[: argv.index("--methods")], "--methods", "reference:prototype", "--out", str(tmp_path / "b")]
    with pytest.raises(SystemExit, match="prototype head pools"):
        cli.main(bad)
