"""``calexnet measure``: the real cascade's accuracy equals the simulated evaluation's at every operating point
(CPM runs and the baselines' exit rules), per batch and streaming, end to end on tiny synthetic data; the
inference form (folded BatchNorm); the time-ideal and headline numbers by hand."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import save_file

from calexnet_fast import backbones, cli
from calexnet_fast.baselines import ZTW, BoostNet, PTEEnet, baseline_exit_heads, exit_outputs
from calexnet_fast.cascades import ScoreCascade
from calexnet_fast.evaluation import (
    MeasureConfig,
    PowerMeter,
    TimingConfig,
    baseline_decisions,
    headline,
    measure_points,
    speed_table,
)
from calexnet_fast.evaluation.measure_session import Session
from calexnet_fast.evaluation.speed import mode_key, stage_times, time_ideal
from calexnet_fast.features import backbone_features
from calexnet_fast.flops import FlopsProfile
from calexnet_fast.run import Run

SYN = ["--dataset", "synthetic", "--synthetic-size", "300", "160", "200", "--synthetic-classes", "4"]
SYN += ["--image-size", "16", "--backbone", "cifar_resnet20", "--random-init", "--n-branches", "3"]
FAST = ["--batch-size", "64", "--head-dim", "8", "--n-prototypes", "4", "--min-support", "5", "--lr", "3e-3"]
TIMING = ["--batch-size", "48", "--repeats", "2", "--warmup", "0", "--threads", "1", "--quiet"]


# tiny tensors: one thread is fastest, and immune to OpenMP spin-waits on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_run_equals_evaluate_at_every_margin(tmp_path):
    """train -> calibrate -> evaluate (simulated, on a float32 feature cache) -> measure (the real Cascade on
    the decoded images): the same accuracy and FLOPs reduction at every margin, no sample differs."""
    run, ckpt = tmp_path / "run", tmp_path / "r20.safetensors"
    torch.manual_seed(0)
    save_file(backbones.CifarResNet(20, 4).state_dict(), str(ckpt))  # one fixed backbone for every command
    syn = [*SYN[: SYN.index("--random-init")], "--checkpoint", str(ckpt), *SYN[SYN.index("--random-init") + 1 :]]
    argv = ["train", *syn, "--recipe", "calexnet", *FAST, "--epochs", "2", "--cache-dtype", "float32"]
    assert cli.main([*argv, "--out", str(run), "--quiet"]) == 0
    assert cli.main(["calibrate", "--run", str(run), "--margins", "0:0.6:7", "--quiet"]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--quiet"]) == 0
    assert cli.main(["measure", "--run", str(run), "--margins", "all", *TIMING, "--stage-batch", "32"]) == 0
    evaluated = json.loads((run / "results.json").read_text())["points"]
    speed = json.loads((run / "speed.json").read_text())
    assert speed["modes"] == ["batch", "stream"] and speed["stage_batch"] == 32 and speed["fold_batchnorm"]
    points = speed["runs"][0]["points"]
    assert [p["param"] for p in points] == [p["margin"] for p in evaluated]
    for p, e in zip(points, evaluated, strict=True):
        assert p["modes"] == ["batch", "stream"]
        assert p["mismatches"] == 0 and p["mismatches_streaming"] == 0  # every image, in both modes
        assert p["accuracy"] == e["accuracy"] == p["simulated"]["accuracy"]
        assert p["flops_reduction"] == pytest.approx(e["flops_reduction"], abs=1e-12)
        assert p["exit_fractions"] == pytest.approx(e["exit_fractions"], abs=1e-12)
        assert p["ideal_speedup"] == pytest.approx(1 / (1 - p["timed_flops_reduction"]))
        assert set(p["images_per_s"]) == {"backbone", "cascade", "streaming"}
        for mode in ("batch", "stream"):
            sp = p[mode_key(mode, "speedup")]
            assert sp > 0 and 2 <= len(p[mode_key(mode, "speedup_rounds")]) <= 6
            lo, hi = p[mode_key(mode, "speedup_interval_95")]
            assert lo <= sp <= hi
            assert p[mode_key(mode, "achieved_over_ideal")] == pytest.approx(sp / p["ideal_speedup"])
            assert p[mode_key(mode, "achieved_over_time_ideal")] == pytest.approx(sp / p["time_ideal_speedup"])
        assert p["time_ideal_speedup"] > 0 and len(p["full_batch_seconds"]["stages"]) == 4
        assert p["energy_j_per_image"] is None
    # the sweep really exercises the cascade: some points let samples leave early, some do not
    assert max(sum(p["exit_fractions"][:-1]) for p in points) > 0.3
    assert speed["energy"].startswith("energy not measured on CPU")
    assert speed["backbone"]["test_accuracy"] == json.loads((run / "results.json").read_text())["backbone_accuracy"]
    assert (run / "speed.png").stat().st_size > 1000 and (run / "speed.svg").is_file()
    table = (run / "speed_table.md").read_text()
    assert "| calexnet |" in table and "speedup streaming" in table and "time-ideal" in table
    assert set(speed["summary"]["calexnet"]) >= {"max_speedup_within_loss", "max_speedup_within_loss_streaming"}
    assert set(speed["frontiers"]["calexnet"][0]) >= {"accuracy_vs_speedup", "accuracy_vs_speedup_streaming"}

    # one mode only, the stages as trained: the other mode's values are absent, not made up
    argv = ["measure", "--run", str(run), "--margins", "0.3", *TIMING, "--out", str(tmp_path / "s")]
    assert cli.main([*argv, "--modes", "stream", "--no-fold"]) == 0
    stream_only = json.loads((tmp_path / "s" / "speed.json").read_text())
    assert stream_only["modes"] == ["stream"] and not stream_only["fold_batchnorm"]
    for p in stream_only["runs"][0]["points"]:
        assert p["mismatches_streaming"] == 0 and "speedup" not in p and "mismatches" not in p
        assert set(p["images_per_s"]) == {"backbone", "streaming"}
    assert set(stream_only["summary"]["calexnet"]) >= {"max_speedup_within_loss_streaming"}
    assert "max_speedup_within_loss" not in stream_only["summary"]["calexnet"]
    # --resume measures again when the modes differ
    assert cli.main([*argv, "--modes", "batch,stream", "--no-fold", "--resume"]) == 0
    both = json.loads((tmp_path / "s" / "speed.json").read_text())
    assert both["runs"][0]["points"][0]["modes"] == ["batch", "stream"]
    with pytest.raises(SystemExit, match="modes"):
        cli.main([*argv, "--modes", "batch,fast"])

    # the inference form: BatchNorm folded into the timed backbone (and so the cascade's stages), not the trained one
    session = Session(
        MeasureConfig(run=str(run), batch_size=48, quiet=True), Run(run).load_backbone(), Run(run).load_data()
    )
    bns = [m for m in session.bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not bns and any(isinstance(m, torch.nn.BatchNorm2d) for m in session.trained.modules())
    assert session.images.is_contiguous(memory_format=torch.channels_last)


def _midpoints(scores: torch.Tensor, qs) -> list[float]:
    """Thresholds halfway between two neighbouring scores (no sample sits on one: the folded BoostNet heads
    in the cascade round differently from the unfolded ones of the simulation)."""
    s = torch.sort(scores.flatten().float()).values
    out = []
    for q in qs:
        i = min(max(int(q * (s.numel() - 1)), 0), s.numel() - 2)
        out.append(float((s[i] + s[i + 1]) / 2))
    return out


@pytest.mark.parametrize("name", ["pteenet", "ztw", "boostnet"])
def test_score_cascade_equals_the_baselines_simulated_exit_rule(name):
    torch.manual_seed(0)
    bb = backbones.cifar_resnet(20, n_classes=5, placement="flops", n_branches=3, input_size=16).eval()
    chans = bb.branch_channels
    model = {
        "pteenet": lambda: PTEEnet(chans, 5),
        "ztw": lambda: ZTW(chans, 5),
        "boostnet": lambda: BoostNet(chans, 5, head_dim=8, n_prototypes=4),
    }[name]()
    with torch.no_grad():  # non-trivial BN statistics and ensemble weights
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        # make the last exit the most confident one for some samples
        if name == "pteenet":
            model.heads[2].confidence.bias.add_(1.0)
        elif name == "ztw":
            model.ensembles.bias[2, 0] += 3.0
        else:
            model.heads[2].classifier.bias[0] += 3.0
        if name == "ztw":
            for w in model.ensembles.weights:
                w.normal_(0, 0.5)
    model.eval()
    x = torch.randn(100, 3, 16, 16)
    cache = backbone_features(bb, x, batch_size=64)
    scores = exit_outputs(model, cache).scores
    # one threshold that lets some samples leave at branch 3 exactly: between max(s1, s2) and s3 of the sample
    # with the widest such gap
    gap = scores[2] - scores[:2].max(0).values
    i = int(gap.argmax())
    assert gap[i] > 0
    taus = [*_midpoints(scores, [0.05, 0.5, 0.9]), float((scores[:2, i].max() + scores[2, i]) / 2), math.inf, 0.0]
    expected = baseline_decisions(model, cache, taus)
    cascade = ScoreCascade(
        list(bb.stages), baseline_exit_heads(model), torch.full((3, 5), taus[0]), n_classes=5, in_channels=3
    )
    exits_seen = set()
    for tau, (e_pred, e_exit) in zip(taus, expected, strict=True):
        cascade.set_thresholds(torch.full((3, 5), tau))
        for batch in (64, 7) if tau != taus[3] else (64, 7, 1):  # survivors compacted in other groups
            preds, exits = [], []
            for i in range(0, x.shape[0], batch):
                out = cascade(x[i : i + batch])
                preds.append(out.logits.argmax(1))
                exits.append(out.exit_index)
            assert torch.equal(torch.cat(exits), e_exit), (tau, batch)
            assert torch.equal(torch.cat(preds), e_pred), (tau, batch)
        exits_seen |= set(e_exit.tolist())
    assert exits_seen == {1, 2, 3, 4}  # every branch and the backbone were exercised
    assert cascade(x[:0]).logits.shape == (0, 5)


def test_measure_compare_equals_the_compare_results(tmp_path):
    """``measure --compare``: for CPM methods and every baseline the real cascade reproduces the accuracy and
    FLOPs reduction ``calexnet compare`` computed (float32 cache: the very same features), point by point."""
    out = tmp_path / "cmp"
    argv = ["compare", *SYN, *FAST, "--out", str(out), "--seeds", "0", "--epochs", "1", "--margins", "0:1:11"]
    argv += ["--thresholds", "11", "--threshold-quantiles", "9", "--ztw-ensemble-epochs", "1", "--quiet"]
    argv += ["--methods", "calexnet,reference+aligned,pteenet,ztw,boostnet", "--cache-dtype", "float32"]
    assert cli.main(argv) == 0
    pick = ["--baseline-reductions", "0.1,0.6", "--losses", "0.02"]
    assert cli.main(["measure", "--compare", str(out), "--margins=-0.02,0.2,0.5", *pick, *TIMING]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert [(r["method"], r["seed"]) for r in speed["runs"]] == [
        ("calexnet", 0), ("reference+aligned", 0), ("pteenet", 0), ("ztw", 0), ("boostnet", 0)
    ]  # fmt: skip
    for r in speed["runs"]:
        assert r["points"], r["method"]
        for p in r["points"]:
            assert p["mismatches"] == 0, (r["method"], p["param"])
            assert p["accuracy"] == p["simulated"]["accuracy"], (r["method"], p["param"])
            if p["param"] < 0:  # beyond the compare's margin grid: no compare point to check against
                assert "compare" not in p
                continue
            assert p["accuracy"] == p["compare"]["accuracy"], (r["method"], p["param"])
            assert p["flops_reduction"] == pytest.approx(p["compare"]["flops_reduction"], abs=1e-12)
        assert max(sum(p["exit_fractions"][:-1]) for p in r["points"]) > 0.2, r["method"]  # samples leave early
    res = json.loads((out / "results.json").read_text())
    bar = res["backbone"]["test_accuracy"] - 0.02
    sw = res["sweeps"]["calexnet"][0]
    within = [(red, a, -i) for i, (red, a) in enumerate(zip(sw["flops_reduction"], sw["accuracy"])) if a >= bar]
    loss_margin = sw["params"][-max(within)[2]]  # largest reduction, then accuracy, then the first such
    # the margins asked for (a negative one works too) and the one reaching furthest within 2 pt
    assert [p["param"] for p in speed["runs"][0]["points"]] == sorted({-0.02, 0.2, 0.5, loss_margin})
    for r in speed["runs"][2:]:  # baselines: the envelope points asked for, in threshold order
        assert 1 <= len(r["points"]) <= 3 and [p["param"] for p in r["points"]] == sorted(
            p["param"] for p in r["points"]
        )
        sw = res["sweeps"][r["method"]][0]
        bar = res["backbone"]["test_accuracy"] - 0.02
        within = [red for red, a in zip(sw["flops_reduction"], sw["accuracy"], strict=True) if a >= bar]
        if within:  # the point with the largest reduction within 2 pt was measured
            best = max(within)
            assert any(p["compare"]["flops_reduction"] == best for p in r["points"]), r["method"]
    for r in speed["runs"]:  # CPM cascades stream; the baselines' score cascades run per batch only
        stream = r["method"] in ("calexnet", "reference+aligned")
        for p in r["points"]:
            assert p["modes"] == (["batch", "stream"] if stream else ["batch"]), r["method"]
            assert (p.get("mismatches_streaming") == 0) if stream else ("speedup_streaming" not in p)
    assert set(speed["summary"]) == {"calexnet", "reference+aligned", "pteenet", "ztw", "boostnet"}
    assert "speedup_at_m0.2" in speed["summary"]["calexnet"] and "speedup_at_m0.2" not in speed["summary"]["ztw"]
    assert "speedup_at_m0.2_streaming" in speed["summary"]["calexnet"]
    assert "max_speedup_within_loss_streaming" not in speed["summary"]["ztw"]
    within = speed["summary"]["calexnet"]["max_speedup_within_streaming"]["0.02"]
    floor = speed["backbone"]["test_accuracy"] - 0.02
    best = max(p["speedup_streaming"] for p in speed["runs"][0]["points"] if p["accuracy"] >= floor)
    assert within["values"] == [best] and "1.5" in speed["summary"]["ztw"]["accuracy_at_speedup"]
    assert "| calexnet | streaming |" in (out / "speed_table.md").read_text()
    # --resume keeps what was measured with the same settings (and the other methods' runs), re-measures the rest
    again = ["measure", "--compare", str(out), "--margins=-0.02,0.5", *pick]
    assert cli.main([*again, *TIMING, "--resume", "--methods", "calexnet,ztw"]) == 0
    kept = json.loads((out / "speed.json").read_text())
    assert [(r["method"], r["seed"]) for r in kept["runs"]] == [(r["method"], r["seed"]) for r in speed["runs"]]
    assert kept["runs"][1:] == speed["runs"][1:]  # ztw kept as it was, the others untouched
    assert [p["param"] for p in kept["runs"][0]["points"]] == sorted({-0.02, 0.5, loss_margin})  # re-measured
    acc = {p["param"]: p["accuracy"] for p in speed["runs"][0]["points"]}
    assert all(p["accuracy"] == acc[p["param"]] for p in kept["runs"][0]["points"])
    # a run with a disturbed point (slowest round > 1.2x the fastest, extra rounds not all used) is measured again
    kept["runs"][3]["points"][0]["seconds_per_round"] = {"backbone": [1.0, 5.0], "cascade": [1.0, 1.0]}
    (out / "speed.json").write_text(json.dumps(kept))
    assert cli.main([*again, *TIMING, "--resume", "--methods", "ztw"]) == 0
    remeasured = json.loads((out / "speed.json").read_text())
    assert remeasured["runs"][3]["method"] == "ztw"
    assert remeasured["runs"][3]["points"][0]["seconds_per_round"]["backbone"] != [1.0, 5.0]
    assert remeasured["runs"][:3] == kept["runs"][:3] and remeasured["runs"][4] == kept["runs"][4]
    kept = remeasured
    # --render re-derives summary, frontiers, figure and table from speed.json alone
    (out / "speed.png").unlink()
    assert cli.main(["measure", "--compare", str(out), "--render", "--max-loss", "0.5", "--quiet"]) == 0
    rendered = json.loads((out / "speed.json").read_text())
    assert rendered["runs"] == kept["runs"] and (out / "speed.png").is_file()
    assert rendered["summary"]["calexnet"]["max_loss"] == 0.5
    env = rendered["frontiers"]["calexnet"][0]["accuracy_vs_speedup"]
    assert env["speedup"] == sorted(env["speedup"]) and env["accuracy"] == sorted(env["accuracy"], reverse=True)


class _Sleepy(torch.nn.Module):
    """Sleeps ``seconds``, then passes its input on (``n_classes``: as logits of the channel means)."""

    def __init__(self, seconds: float, n_classes: int | None = None) -> None:
        super().__init__()
        self.seconds, self.n_classes = seconds, n_classes

    def forward(self, x):
        time.sleep(self.seconds)
        return x if self.n_classes is None else x.mean(dim=(2, 3))[:, : self.n_classes]


def test_stage_times_and_time_ideal():
    from calexnet_fast import Cascade

    stages = [_Sleepy(0.002), _Sleepy(0.02), _Sleepy(0.004, n_classes=3)]
    heads = [_Sleepy(0.006, n_classes=3), _Sleepy(0.0, n_classes=3)]
    cascade = Cascade(stages, heads, torch.zeros(2, 3), in_channels=3)
    stage_s, head_s = stage_times(cascade, torch.randn(4, 3, 2, 2), torch.device("cpu"), repeats=3)
    assert 0.002 <= stage_s[0] < stage_s[2] < stage_s[1] and 0.02 <= stage_s[1] < 0.2
    assert 0.006 <= head_s[0] and head_s[1] < head_s[0]
    assert torch.equal(cascade.thresholds, torch.zeros(2, 3))  # restored after the passes
    # the backbone costs 1 + 2 + 1; every sample pays stage 0 and head 0 (0.5), half go on (2 + 0.5), a quarter
    # reach the last stage (1)
    assert time_ideal([1.0, 2.0, 1.0], [0.5, 0.5], [1.0, 0.5, 0.25]) == pytest.approx(4 / (1.5 + 1.25 + 0.25))
    assert time_ideal([1.0, 1.0], [0.0], [1.0, 1.0]) == 1.0  # nothing exits, free heads: the backbone
    with pytest.raises(ValueError, match="reach"):
        time_ideal([1.0, 1.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="mode"):
        mode_key("fast", "speedup")


def test_throughput_bench_tiny_run(tmp_path, capsys):
    """``bench/throughput.py`` end to end at toy sizes: every column, the ideals, the agreement checks, the
    seconds per configuration, JSON and plot."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--model", "resnet18", "--batch-size", "8", "--profiles", "0,0.5", "--repeats", "1"]
    argv += ["--stream-batches", "2", "--threads", "1", "--no-kernels"]
    result = bench.main([*argv, "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")])
    rows = result["rows"]
    assert [r["target_reduction"] for r in rows] == [0.0, 0.5] and result["seconds"] > 0
    for r in rows:
        assert set(r["images_per_s"]) == {"backbone", "reference", "cascade", "streaming"}
        assert r["exits_agree_with_reference"] and r["streaming_agrees_with_cascade"]
        assert r["ideal_speedup"]["time"] > 0 and r["seconds"] > 0
        for mode, (lo, hi) in r["speedup_interval_95"].items():
            assert lo <= r["speedup"][mode] <= hi  # one round: the interval is that round's ratio
    assert rows[0]["ideal_speedup"]["flops"] < 1 < rows[1]["ideal_speedup"]["flops"]  # no exits: heads cost
    assert "setup_seconds" in rows[0]
    assert json.loads((tmp_path / "t.json").read_text())["settings"]["stream_batches"] == 2
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert "run s" in capsys.readouterr().out


def test_headline_by_hand():
    def pt(param, acc, sp, stream=None):
        p = {"param": param, "accuracy": acc, "speedup": sp, "flops_reduction": 0.5, "ideal_speedup": 2.0}
        return p if stream is None else {**p, "speedup_streaming": stream}

    runs = [
        {"method": "a", "seed": 0, "param_name": "margin", "points": [pt(0.0, 0.90, 1.1, 1.0),
                                                                       pt(0.2, 0.89, 1.6, 1.9),
                                                                       pt(0.3, 0.85, 2.5, 3.0)]},
        {"method": "a", "seed": 1, "param_name": "margin", "points": [pt(0.0, 0.90, 1.2, 1.3),
                                                                       pt(0.2, 0.886, 1.4, 1.7)]},
        {"method": "b", "seed": 0, "param_name": "threshold", "points": [pt(0.5, 0.7, 3.0)]},
    ]  # fmt: skip
    s = headline(runs, backbone_accuracy=0.895, max_loss=0.01)
    assert s["a"]["max_speedup_within_loss"]["values"] == [1.6, 1.4]
    assert s["a"]["max_speedup_within_loss"]["mean"] == pytest.approx(1.5)
    assert s["a"]["max_speedup_within_loss"]["std"] == pytest.approx(math.sqrt(0.02))
    assert s["a"]["speedup_at_m0.2"]["values"] == [1.6, 1.4]
    assert s["a"]["max_speedup_points"][0]["param"] == 0.2
    assert math.isnan(s["b"]["max_speedup_within_loss"]["mean"]) and "speedup_at_m0.2" not in s["b"]
    assert s["a"]["max_speedup_within_loss_streaming"]["values"] == [1.9, 1.7]  # the point within 1 pt, streaming
    assert s["a"]["speedup_at_m0.2_streaming"]["mean"] == pytest.approx(1.8)
    assert "max_speedup_within_loss_streaming" not in s["b"]  # b was measured per batch only
    table = speed_table(s)
    assert "| a | 1.50× ± 0.14 | 1.80× ± 0.14 | 1.50× ± 0.14 | 1.80× ± 0.14 | 88.80 ± 0.28 | 2 |" in table
    assert "| b | n/a (1/1 seeds have none) | – | – | – | n/a | 1 |" in table


def test_measure_points_checks_and_cpu_energy():
    with pytest.raises(ValueError, match="repeats"):
        TimingConfig(repeats=0)
    with pytest.raises(ValueError, match="batch_size"):
        TimingConfig(batch_size=0)
    bb = backbones.cifar_resnet(20, n_classes=3, n_branches=2, placement="flops", input_size=8).eval()
    from calexnet_fast import Cascade
    from calexnet_fast.heads import PrototypePoolingHead

    cascade = Cascade(bb, [PrototypePoolingHead(c, 3, dim=4, n_prototypes=2).eval() for c in bb.branch_channels])
    x = torch.randn(10, 3, 8, 8)
    prof = FlopsProfile((1.0, 1.0, 1.0), (0.1, 0.1))
    with pytest.raises(ValueError, match="labels"):
        measure_points(cascade, bb, x, torch.zeros(9, dtype=torch.long), [torch.zeros(2, 3)], prof)
    with pytest.raises(ValueError, match="params"):
        measure_points(cascade, bb, x, torch.zeros(10, dtype=torch.long), [torch.zeros(2, 3)], prof, params=[0.1, 0.2])
    with pytest.raises(ValueError, match="modes"):
        measure_points(cascade, bb, x, torch.zeros(10, dtype=torch.long), [torch.zeros(2, 3)], prof, modes=["fast"])
    cascade.set_thresholds(torch.full((2, 3), -math.inf))
    with torch.inference_mode():
        pred = cascade(x).logits.argmax(1)
    wrong_exit = torch.ones(10, dtype=torch.long)
    wrong_exit[[0, 4, 9]] = 3  # the "simulated" decisions differ from the real cascade on three images
    rows = measure_points(
        cascade,
        bb,
        x,
        torch.zeros(10, dtype=torch.long),
        [torch.full((2, 3), -math.inf)],  # everything leaves at branch 1
        prof,
        expected=[(pred, wrong_exit)],
        config=TimingConfig(batch_size=4, repeats=1, warmup=0, timing_images=6),
        stage_batch=3,
    )
    assert rows[0]["exit_fractions"] == [1.0, 0.0, 0.0] and rows[0]["timed_images"] == 6
    assert rows[0]["flops_reduction"] == pytest.approx(1 - 1.1 / 3)
    assert rows[0]["mismatches"] == rows[0]["mismatches_streaming"] == 3  # checked in each mode on every image
    assert rows[0]["modes"] == ["batch", "stream"] and rows[0]["time_ideal_speedup"] > 1

    # a round disturbed by another job triggers extra rounds (here: the backbone's first timed call sleeps)
    class Disturbed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.5)
            return self.inner(x)

    cfg = TimingConfig(batch_size=10, repeats=3, warmup=0, max_extra_rounds=2)
    rows = measure_points(
        cascade, Disturbed(bb), x, torch.zeros(10, dtype=torch.long), [torch.zeros(2, 3)], prof, config=cfg
    )
    assert len(rows[0]["seconds_per_round"]["backbone"]) == 5 and max(rows[0]["seconds_per_round"]["backbone"]) > 0.5
    assert rows[0]["images_per_s"]["backbone"] > 10 / 0.5  # the median is not the disturbed round
    with pytest.raises(ValueError, match="noise_tolerance"):
        TimingConfig(noise_tolerance=0.5)
    meter = PowerMeter(torch.device("cpu"))
    assert not meter.available and "CPU" in meter.reason
    with pytest.raises(SystemExit, match="results.json"):
        cli.main(["measure", "--compare", "/nonexistent/dir", "--quiet"])


def test_paired_interval_order_statistics():
    """15 rounds: the 4th and the 12th of the sorted per-round ratios (a Binomial(15, 1/2) is at most 3 with
    probability 0.018, at most 4 with 0.059); 6 rounds: the range, which covers 1 - 2/64 >= 0.95; 5: the range,
    covering less; 1: the one ratio; the interval holds the median."""
    from calexnet_fast.evaluation.timing import Rounds

    ratios = [1.0 + 0.01 * i for i in (7, 3, 11, 0, 14, 5, 9, 1, 12, 2, 8, 13, 4, 10, 6)]
    rounds = Rounds({"base": ratios, "fast": [1.0] * 15})
    lo, hi = rounds.paired_interval("base", "fast")
    assert (lo, hi) == (pytest.approx(1.03), pytest.approx(1.11))
    assert lo <= rounds.paired_ratio("base", "fast") <= hi
    assert rounds.paired_interval("base", "fast", scale=2.0) == (pytest.approx(2.06), pytest.approx(2.22))
    assert rounds.paired_interval("base", "fast", level=0.5)[0] > lo  # a lower level: a narrower interval
    for n in (6, 5):
        few = Rounds({"base": ratios[:n], "fast": [1.0] * n})
        assert few.paired_interval("base", "fast") == (min(ratios[:n]), max(ratios[:n]))
    assert Rounds({"a": [3.0], "b": [2.0]}).paired_interval("a", "b") == (1.5, 1.5)
    with pytest.raises(ValueError, match="level"):
        rounds.paired_interval("base", "fast", level=1.0)
    with pytest.raises(ValueError, match="rounds"):
        Rounds({"a": [1.0, 2.0], "b": [1.0]}).paired_interval("a", "b")


def test_paired_ratio_cancels_a_drift_that_medians_do_not():
    """A candidate twice as fast as the baseline, timed in the same rounds while the machine slows down 3x,
    with one noisy call each: the median of the per-round ratios is 2, the ratio of the medians is not."""
    from calexnet_fast.evaluation.timing import Rounds

    drift = [1.0, 1.0, 2.0, 3.0, 3.0]
    base = [2 * d * e for d, e in zip(drift, [1, 1.1, 1, 1, 1], strict=True)]
    fast = [d * e for d, e in zip(drift, [1, 1, 1.1, 1, 1], strict=True)]
    rounds = Rounds({"base": base, "fast": fast})
    assert rounds.paired_ratio("base", "fast") == pytest.approx(2.0)
    medians = rounds.medians()
    assert medians["base"] / medians["fast"] == pytest.approx(4.0 / 2.2)
    assert rounds.paired_ratio("base", "fast", scale=16) == pytest.approx(32.0)
    with pytest.raises(ValueError, match="rounds"):
        Rounds({"a": [1.0, 2.0], "b": [1.0]}).paired_ratio("a", "b")


def test_batch_interleaved_times_each_candidate_batch_by_batch(monkeypatch):
    """On a fake clock that only the candidates move: every batch goes through the per-batch candidates (order
    reversed from batch to batch), then into the stream, which reads the batches as it goes; each name's
    seconds over the pass are its own, the stream's the total less the per-batch calls'; in
    ``interleaved_rounds`` the pass is recorded under its candidates' names next to a plain candidate."""
    from calexnet_fast.evaluation import timing
    from calexnet_fast.evaluation.timing import BatchInterleaved, interleaved_rounds

    clock, log = [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def work(name, seconds):
        def fn(batch):
            log.append((name, int(batch)))
            clock[0] += seconds

        return fn

    def stream(batches):
        for b in batches:
            log.append(("stream", int(b)))
            clock[0] += 3.0
            yield b

    batches = [torch.tensor(i) for i in range(4)]
    both = BatchInterleaved(
        batches, {"backbone": work("backbone", 2.0), "cascade": work("cascade", 0.5)}, ("streaming", stream)
    )
    assert both.names == ("backbone", "cascade", "streaming")
    assert both() == {"backbone": 8.0, "cascade": 2.0, "streaming": 12.0}
    first = [("backbone", 0), ("cascade", 0), ("stream", 0), ("cascade", 1), ("backbone", 1), ("stream", 1)]
    assert log[:6] == first and len(log) == 12
    assert BatchInterleaved(batches, {"backbone": work("backbone", 1.0)})() == {"backbone": 4.0}

    log.clear()
    rounds = interleaved_rounds(
        {"pass": both, "single": lambda: work("single", 7.0)(torch.tensor(-1))},
        torch.device("cpu"),
        repeats=2,
        warmup=0,
    )
    assert rounds.seconds == {"backbone": [8.0] * 2, "cascade": [2.0] * 2, "streaming": [12.0] * 2, "single": [7.0] * 2}
    assert log[12] == ("single", -1) and log[13] == ("single", -1)  # the second round runs in reverse order
    for bad in ({"a": work("a", 1.0)}, {}):
        with pytest.raises(ValueError, match="distinct candidate names"):
            BatchInterleaved(batches, bad, ("a", stream) if bad else None)
    with pytest.raises(ValueError, match="at least one batch"):
        BatchInterleaved([], {"backbone": work("backbone", 1.0)})
