"""Run directories written from Python: every command and ``Cascade.from_run`` accept them; damaged files
are reported, never used."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from calexnet_fast import Cascade, backbones, cli
from calexnet_fast.branch_training import train_branches
from calexnet_fast.calibration import calibrate_sweep
from calexnet_fast.evaluation import CompareConfig
from calexnet_fast.features import build_feature_cache
from calexnet_fast.normalization import Normalization
from calexnet_fast.recipes import recipe
from calexnet_fast.run import Run, RunError, SplitLogits, data_and_backbone, dataset_record, load_splits
from calexnet_fast.training import FitConfig

N_CLASSES = 4
DATASET = dataset_record(
    "synthetic", image_size=16, synthetic_size=(240, 160, 160), synthetic_classes=N_CLASSES, split_seed=0
)


def _backbone() -> backbones.StagedBackbone:
    torch.manual_seed(0)
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()),
    ]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, N_CLASSES))
    return backbones.from_stages(stages, classifier, in_channels=3, input_size=16, name="tiny")


@pytest.fixture(scope="module")
def api_run(tmp_path_factory) -> Path:
    """A run trained through the Python API on a ``from_stages`` backbone, saved as a run directory."""
    torch.set_num_threads(1)
    bb = _backbone()
    splits = load_splits(dict(DATASET), Normalization(bb.mean, bb.std))
    rec = recipe("calexnet", head_dim=8, n_prototypes=4, min_support=4)
    fit = FitConfig(epochs=2, batch_size=64, lr=3e-3, seed=0)
    caches = {
        name: build_feature_cache(bb, ds, batch_size=64, device="cpu", progress=False)
        for name, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    res = train_branches(caches["train"], caches["val"], rec, fit, device="cpu", progress=False)
    path = tmp_path_factory.mktemp("api") / "run"
    run = Run.create(path, bb, dataset=DATASET, recipe=rec.to_json(), fit=asdict(fit))
    run.save_heads(res.heads, bb)
    for split in ("val", "test"):
        run.save_logits(split, SplitLogits.of_heads(res.heads, caches[split]))
    return path


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_commands_and_cascade_work_on_a_run_saved_from_python(api_run, tmp_path):
    run = _copy(api_run, tmp_path)
    assert json.loads((run / "config.json").read_text())["backbone"]["exported"]
    assert cli.main(["calibrate", "--run", str(run), "--margins", "0:0.3:4", "--quiet"]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--quiet"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["n"] == 160 and len(res["points"]) == 4
    assert res["points"][-1]["flops_reduction"] >= res["points"][0]["flops_reduction"]
    out = tmp_path / "speed"
    measure = ["measure", "--run", str(run), "--out", str(out), "--margins", "0,0.3", "--repeats", "1"]
    assert cli.main([*measure, "--warmup", "0", "--batch-size", "64", "--threads", "1", "--quiet"]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert [p["mismatches"] for p in speed["runs"][0]["points"]] == [0, 0]
    # the cascade: the very backbone trained on (exported), heads and thresholds of the run
    cascade = Cascade.from_run(run, margin=0.2)
    x = torch.randn(32, 3, 16, 16)
    assert torch.equal(cascade(x).exit_index, cascade.decide(cascade.simulate(x)).exit_index)
    torch.testing.assert_close(Run(run).load_backbone()(x), _backbone()(x), rtol=0, atol=1e-5)
    torch.set_num_threads(1)


def test_a_run_calibrated_from_python_gives_its_cascade(api_run, tmp_path):
    run = Run(_copy(api_run, tmp_path))
    val = run.load_logits("val")
    run.save_thresholds(calibrate_sweep(val.branch, val.backbone, val.labels, [0.0, 0.1, 0.2], min_support=4))
    cascade = Cascade.from_run(run.path, margin=0.1)
    assert torch.equal(cascade.thresholds, run.load_thresholds().at(1))
    with pytest.raises(ValueError, match="margin"):
        Cascade.from_run(run.path, margin=0.5)


def test_damaged_or_missing_files_are_reported(api_run, tmp_path):
    run = Run(_copy(api_run, tmp_path))
    val = run.load_logits("val")
    run.save_thresholds(calibrate_sweep(val.branch, val.backbone, val.labels, [0.0, 0.2], min_support=4))
    for rel in ("heads.safetensors", "logits/val.safetensors", "thresholds.safetensors", "backbone/stage1.pt2"):
        path = run.path / rel
        good = path.read_bytes()
        bad = bytearray(good)
        bad[-5] ^= 0x01  # one flipped bit in the data
        path.write_bytes(bytes(bad))
        with pytest.raises(RunError, match="damaged"):
            if rel.startswith("logits"):
                run.load_logits("val")
            else:
                Cascade.from_run(run.path)
        path.write_bytes(good)
    Cascade.from_run(run.path)
    (run.path / "thresholds.safetensors").unlink()
    with pytest.raises(RunError, match=r"run: expected .*thresholds.safetensors .*calexnet calibrate"):
        Cascade.from_run(run.path)
    (run.path / "config.json").write_text("[1, 2")
    with pytest.raises(RunError, match=r"config\.json is not readable JSON \(JSONDecodeError"):
        run.config()
    (run.path / "config.json").write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(RunError, match=r"config\.json: expected a JSON object, got list"):
        run.config()
    with pytest.raises(RunError, match="no config.json"):
        Run(tmp_path / "nowhere").config()


def test_a_run_computes_its_missing_logits_once(api_run, tmp_path):
    run = Run(_copy(api_run, tmp_path))
    kept = run.load_logits("test")
    assert run.split_logits("test") is not None  # kept ones are returned as they are
    (run.path / "logits" / "test.safetensors").unlink()
    again = run.split_logits("test", device="cpu")
    torch.testing.assert_close(again.branch, kept.branch)
    assert torch.equal(again.labels, kept.labels)
    assert torch.equal(run.load_logits("test").branch, again.branch)  # and kept for the next command
    with pytest.raises(RunError, match="split: expected 'val' or 'test', got 'train'"):
        run.split_logits("train")


def test_logits_of_other_heads_are_not_used(api_run, tmp_path):
    run = Run(_copy(api_run, tmp_path))
    heads, _ = run.load_heads()
    with torch.no_grad():
        next(heads[0].parameters()).add_(0.1)
    run.save_heads(heads, run.load_backbone())
    assert run.load_logits("val") is None


def test_train_and_compare_options_give_the_same_data_and_backbone():
    data = ["--dataset", "synthetic", "--synthetic-size", "60", "30", "30", "--synthetic-classes", "3"]
    args = cli.build_parser().parse_args(["train", "--out", "x", *data, "--random-init", "--backbone", "cifar_resnet8"])
    args.n_branches = 2
    kw = dict(synthetic_size=(60, 30, 30), synthetic_classes=3, random_init=True, n_branches=2)
    cfg = CompareConfig(out="x", dataset="synthetic", backbone="cifar_resnet8", **kw)
    torch.manual_seed(0)
    splits, dataset, spec, bb = data_and_backbone(args)
    torch.manual_seed(0)
    again = data_and_backbone(cfg)
    assert dataset == again.dataset and dataset["synthetic"]["n_train"] == 60 and splits.n_classes == 3
    assert spec == again.spec and spec.n_branches is None and spec.branch_points == list(bb.branch_points)
    assert len(spec.branch_points) == 2 and splits.val.normalization.mean == tuple(spec.mean)
    with pytest.raises(RunError, match="backbone cifar_resnet9: "):
        data_and_backbone(CompareConfig(out="x", dataset="synthetic", backbone="cifar_resnet9", **kw))


def test_spec_backbones_without_a_checkpoint_are_saved_with_the_run(tmp_path):
    torch.manual_seed(1)
    spec = backbones.BackboneSpec(arch="cifar_resnet8", n_classes=N_CLASSES, input_size=16)
    bb = backbones.build_backbone(spec)
    run = Run.create(tmp_path / "run", bb, spec=spec)
    torch.manual_seed(2)
    again = run.load_backbone()
    for (k, v), w in zip(bb.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert run.normalization().mean == tuple(spec.mean)
