"""``calexnet predict``: a calibrated run over a folder of images, streaming, gives the per-batch cascade's
predictions and exits for every image, as CSV or JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from calexnet_fast import cli
from calexnet_fast.backbones import BackboneSpec, build_backbone
from calexnet_fast.calibration import CalibrationSweep
from calexnet_fast.cascades import Cascade, ReferenceCascade
from calexnet_fast.cli.predict import _Images, image_paths
from calexnet_fast.heads import PrototypePoolingHead
from calexnet_fast.run import Run

N_CLASSES = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, images):
    """A run on a random CIFAR ResNet-8 (16 x 16 inputs) with random heads and thresholds set on the images."""
    torch.manual_seed(1)
    spec = BackboneSpec(arch="cifar_resnet8", n_classes=N_CLASSES, input_size=16)
    backbone = build_backbone(spec)
    heads = [PrototypePoolingHead(c, N_CLASSES, dim=8, n_prototypes=4).eval() for c in backbone.branch_channels]
    run = Run.create(tmp_path_factory.mktemp("predict") / "run", backbone, spec=spec)
    run.save_heads(heads, backbone)
    data = _Images(image_paths(images), run.normalization(), 16)
    with torch.no_grad():
        sim = ReferenceCascade(backbone, heads).simulate(torch.stack([data[i] for i in range(len(data))]))
    conf = torch.softmax(sim.branch_logits, dim=2).amax(dim=2)  # [K, N]
    thresholds = torch.empty(2, conf.shape[0], N_CLASSES)
    for i, quantile in enumerate([0.5, 0.75]):  # margins 0.0 and 0.2: about half, then a quarter exit at each
        for k in range(conf.shape[0]):
            t = float(torch.quantile(conf[k], quantile))
            while bool(((conf[k] - t).abs() < 1e-3).any()):  # clear of every confidence: rounding cannot flip
                t += 2e-3
            thresholds[i, k] = t
    run.save_thresholds(CalibrationSweep(torch.tensor([0.0, 0.2], dtype=torch.float64), thresholds))
    return run.path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """23 images: 16 x 16 PNGs in two sub-folders, one 20 x 24 JPEG, and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(22):
        folder = root / "a" if i % 2 else root / "b" / "deeper"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "odd.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _per_batch(run_dir, images, margin=0.2):
    run = Run(run_dir)
    backbone, heads, thresholds = run.cascade_parts(margin)
    cascade = Cascade(backbone, list(heads), thresholds).eval()
    data = _Images(image_paths(images), run.normalization(), 16)
    x = torch.stack([data[i] for i in range(len(data))])
    return cascade(x)


@pytest.mark.parametrize("fold", [True, False])
def test_predict_csv_matches_the_cascade(run_dir, images, tmp_path, fold):
    out = tmp_path / "pred.csv"
    argv = ["predict", "--run", str(run_dir), "--images", str(images), "--out", str(out), "--quiet"]
    argv += ["--batch-size", "5", "--stage-batch", "4", "--threads", "1", *([] if fold else ["--no-fold"])]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == 23 and rows[-1]["path"] == "odd.jpg" and rows[0]["path"].startswith("a/")
    want = _per_batch(run_dir, images)
    assert [int(r["exit"]) for r in rows] == want.exit_index.tolist()
    assert len(set(want.exit_index.tolist())) > 1  # several exits are taken
    assert [int(r["prediction"]) for r in rows] == want.logits.argmax(dim=1).tolist()
    conf = torch.softmax(want.logits, dim=1).amax(dim=1)
    torch.testing.assert_close(torch.tensor([float(r["confidence"]) for r in rows]), conf, atol=1e-4, rtol=0)


def test_predict_json_with_a_latency_cap(run_dir, images, tmp_path):
    out = tmp_path / "pred.json"
    argv = ["predict", "--run", str(run_dir), "--images", str(images), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--batch-size", "3", "--max-wait", "1", "--margin", "0.0", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    want = _per_batch(run_dir, images, margin=0.0)
    assert result["n"] == 23 and sum(result["exit_counts"]) == 23
    assert [p["exit"] for p in result["predictions"]] == want.exit_index.tolist()
    assert result["exit_counts"] == torch.bincount(want.exit_index, minlength=4)[1:].tolist()


def test_predict_errors(run_dir, images, tmp_path):
    base = ["predict", "--run", str(run_dir), "--quiet"]
    with pytest.raises(SystemExit, match="--out"):
        cli.main([*base, "--images", str(images), "--out", str(tmp_path / "p.txt")])
    with pytest.raises(SystemExit, match="no image files"):
        cli.main([*base, "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit, match="margin"):
        cli.main([*base, "--images", str(images), "--out", str(tmp_path / "p.csv"), "--margin", "0.9"])
