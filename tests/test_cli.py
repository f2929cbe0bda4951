"""The ``calexnet`` command line on synthetic data: help, the whole pipeline, resume after a kill, errors (one
``error:`` line, never a traceback), the exact backbone of a ``--random-init`` run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calexnet_fast import branch_training, cli
from calexnet_fast.run import Run, load_heads

SYN = [
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "600",
    "240",
    "240",
    "--synthetic-classes",
    "5",
    "--image-size",
    "16",
]
SMALL = ["--head-dim", "16", "--n-prototypes", "4", "--min-support", "8", "--batch-size", "64", "--lr", "3e-3"]


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


# Children run in a neutral directory: `python -m` puts the current directory first on sys.path, and from the
# repository root that would be the source tree (no compiled ops, no calexnet_fast.kernels).
NEUTRAL_CWD = Path(__file__).resolve().anchor


def test_help_for_every_command(capsys, package_env):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train-backbone", "train", "calibrate", "evaluate", "compare", "measure"):
        assert name in out
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage: calexnet " + name in text
    assert cli.main([]) == 2  # no command: help, non-zero
    # the module runs as a program too (what the console script calls)
    p = subprocess.run(
        [sys.executable, "-m", "calexnet_fast.cli", "train", "--help"],
        env=package_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=NEUTRAL_CWD,
    )
    assert p.returncode == 0 and "--recipe" in p.stdout and "calexnet calibrate" in p.stdout


def test_pipeline_train_backbone_train_calibrate_evaluate(tmp_path):
    bb_dir, run = tmp_path / "bb", tmp_path / "run"
    assert (
        run_cli(
            "train-backbone",
            "--arch",
            "cifar_resnet8",
            *SYN,
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--workers",
            "0",
            "--out",
            bb_dir,
            "--quiet",
        )
        == 0
    )
    meta = json.loads((bb_dir / "backbone.json").read_text())
    assert meta["n_classes"] == 5 and meta["test_accuracy"] > 0.4

    def train_on_bb(recipe: str, epochs: int, out: Path, *more) -> int:
        argv = ["train", *SYN, "--backbone-run", bb_dir, "--recipe", recipe, *SMALL, "--epochs", epochs]
        return run_cli(*argv, "--cache", "disk", *more, "--out", out, "--quiet")

    assert train_on_bb("calexnet", 3, run) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"]["name"] == "calexnet" and cfg["backbone"]["arch"] == "cifar_resnet8"
    assert cfg["backbone"]["branch_points"] == ["layer1", "layer2"]
    for f in (
        "heads.safetensors",
        "heads.json",
        "train_log.json",
        "cache/train.safetensors",
        "cache/val.safetensors",
        "branches/branch_1/head.safetensors",
        "branches/branch_2/checkpoint.safetensors",
        "logits/val.safetensors",
        "logits/test.safetensors",
        "sha256.json",
    ):
        assert (run / f).is_file(), f
    log = json.loads((run / "train_log.json").read_text())
    assert log["weight_stats"][1]["effective_fraction"] < 1.0  # soft weights were used for branch 2
    assert run_cli("calibrate", "--run", run, "--margins", "0:0.3:4", "--quiet") == 0
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["margins"] == pytest.approx([0, 0.1, 0.2, 0.3]) and thr["aligned"] is True
    assert run_cli("evaluate", "--run", run, "--quiet") == 0
    res = json.loads((run / "results.json").read_text())
    assert res["n"] == 240 and len(res["points"]) == 4 and res["recipe"] == "calexnet"
    first, last = res["points"][0], res["points"][-1]
    assert first["accuracy"] > 0.4, "far above chance (0.2)"
    assert last["flops_reduction"] > first["flops_reduction"] > -0.5
    assert sum(first["exit_fractions"]) == pytest.approx(1.0)
    # the fast cascade loads straight from the run directory and agrees with the simulated decisions
    from calexnet_fast import Cascade

    cascade = Cascade.from_run(run, margin=0.2)
    x = torch.randn_like(Run(run).load_backbone().example_input(32))
    expect = cascade.decide(cascade.simulate(x))
    assert torch.equal(cascade(x).exit_index, expect.exit_index)
    from calexnet_fast.calibration import CalibrationSweep

    assert torch.equal(cascade.thresholds, CalibrationSweep.load(run / "thresholds.safetensors").at(2))
    with pytest.raises(ValueError, match="margin"):
        Cascade.from_run(run, margin=0.9)
    with pytest.raises(ValueError, match="run: expected .*safetensors"):
        Cascade.from_run(tmp_path / "bb")
    # the reference recipe in the same cache directory reuses the cached features
    ref = tmp_path / "ref"
    mtime = (run / "cache" / "train.safetensors").stat().st_mtime_ns
    assert train_on_bb("reference", 1, ref, "--cache-dir", run / "cache") == 0
    assert (run / "cache" / "train.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((ref / "config.json").read_text())["recipe"]["aligned"] is False


TRAIN_RANDOM = ["train", *SYN, "--backbone", "cifar_resnet8", "--random-init", *SMALL, "--threads", "1", "--quiet"]


def test_interrupted_train_resumes_to_the_same_heads(tmp_path, monkeypatch, capsys):
    # uninterrupted
    assert run_cli(*TRAIN_RANDOM, "--epochs", "3", "--out", tmp_path / "a") == 0
    # interrupted (Ctrl-C) in the middle of branch 2, then the same command again
    calls = {"n": 0}
    real = branch_training.branch_loss

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3 * 10 + 14:  # 10 steps per epoch: branch 2, epoch 2, step 4
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(branch_training, "branch_loss", flaky)
        assert run_cli(*TRAIN_RANDOM, "--epochs", "3", "--out", tmp_path / "b") == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    ck = json.loads((tmp_path / "b" / "branches" / "branch_2" / "checkpoint.json").read_text())
    assert ck["epoch"] == 1
    assert run_cli(*TRAIN_RANDOM, "--epochs", "3", "--out", tmp_path / "b") == 0
    a, _ = load_heads(tmp_path / "a" / "heads.safetensors")
    b, _ = load_heads(tmp_path / "b" / "heads.safetensors")
    for ha, hb in zip(a, b, strict=True):
        for k, v in ha.state_dict().items():
            assert torch.equal(v, hb.state_dict()[k]), k
    torch.set_num_threads(os.cpu_count() or 1)


def test_killed_process_resumes(tmp_path, package_env):
    """SIGKILL a real `calexnet train` process mid-run; the same command then finishes from its checkpoint."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "calexnet_fast.cli", *TRAIN_RANDOM, "--epochs", "40", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=package_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    ckpt = out / "branches" / "branch_1" / "checkpoint.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file() and json.loads(ckpt.read_text())["epoch"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    done_at_kill = json.loads(ckpt.read_text())["epoch"]
    assert 2 <= done_at_kill < 40
    p = subprocess.run(
        [*cmd, "--epochs", "40"], env=package_env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    hist = json.loads((out / "branches" / "branch_1" / "head.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 41))  # no epoch lost, none repeated in the record
    assert (out / "heads.safetensors").is_file()


def test_errors_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no weights for --backbone resnet18"):
        run_cli("train", *SYN, "--backbone", "resnet18", "--out", tmp_path / "x", "--quiet")
    with pytest.raises(SystemExit, match="no config.json"):
        run_cli("calibrate", "--run", tmp_path)
    with pytest.raises(SystemExit, match="--data-dir"):
        run_cli("train", "--dataset", "cifar10", "--random-init", "--out", tmp_path / "y", "--quiet")
    with pytest.raises(SystemExit, match="arch"):
        run_cli("train-backbone", "--arch", "vgg16", *SYN, "--out", tmp_path / "z", "--quiet")
    with pytest.raises(SystemExit, match="classes"):
        run_cli(
            "train",
            *SYN,
            "--backbone",
            "cifar_resnet8",
            "--checkpoint",
            _cifar8_checkpoint(tmp_path, n_classes=3),
            "--out",
            tmp_path / "w",
            "--quiet",
        )
    run = tmp_path / "tiny"
    assert run_cli(*TRAIN_RANDOM, "--epochs", "1", "--out", run) == 0
    with pytest.raises(SystemExit, match="calexnet calibrate"):
        run_cli("evaluate", "--run", run, "--quiet")
    with pytest.raises(SystemExit, match="margins"):
        run_cli("calibrate", "--run", run, "--margins", "0:1", "--quiet")
    with pytest.raises(SystemExit, match="backbone run"):
        run_cli("calibrate", "--run", _backbone_run_dir(tmp_path), "--quiet")
    torch.set_num_threads(os.cpu_count() or 1)


def _cifar8_checkpoint(tmp_path: Path, n_classes: int) -> Path:
    from safetensors.torch import save_file

    from calexnet_fast.backbones import CifarResNet

    path = tmp_path / f"r8_{n_classes}.safetensors"
    save_file({k: v.contiguous() for k, v in CifarResNet(8, n_classes).state_dict().items()}, str(path))
    return path


def _backbone_run_dir(tmp_path: Path) -> Path:
    """What `calexnet train-backbone` leaves before its backbone is done: its config.json."""
    out = tmp_path / "bb_run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"command": "train-backbone", "arch": "cifar_resnet8"}))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished `calexnet train` run on a --random-init backbone (copy it before changing it)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert run_cli(*TRAIN_RANDOM, "--epochs", "2", "--out", run) == 0
    torch.set_num_threads(os.cpu_count() or 1)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_random_init_run_rebuilds_the_backbone_it_was_trained_on(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    assert json.loads((run / "config.json").read_text())["backbone"]["checkpoint"] == "backbone.safetensors"
    kept = Run(run).load_logits("val")
    assert run_cli("calibrate", "--run", run, "--margins", "0:0.3:4", "--quiet") == 0
    first = (run / "thresholds.safetensors").read_bytes()
    # without the kept logits, calibrate rebuilds the backbone from the run and computes them again: the same
    shutil.rmtree(run / "logits")
    torch.manual_seed(123)  # whatever the global RNG holds, the backbone is the one trained on
    assert run_cli("calibrate", "--run", run, "--margins", "0:0.3:4", "--quiet", "--threads", "1") == 0
    again = Run(run).load_logits("val")
    assert torch.equal(again.branch, kept.branch) and torch.equal(again.backbone, kept.backbone)
    assert (run / "thresholds.safetensors").read_bytes() == first
    torch.set_num_threads(os.cpu_count() or 1)


def test_missing_logits_are_computed_once_and_said_so(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    (run / "logits" / "test.safetensors").unlink()
    assert run_cli("calibrate", "--run", run, "--margins", "0:0.3:4", "--quiet") == 0
    assert run_cli("evaluate", "--run", run, "--threads", "1") == 0
    assert "no test logits" in capsys.readouterr().err
    assert (run / "logits" / "test.safetensors").is_file()
    assert run_cli("evaluate", "--run", run, "--threads", "1") == 0
    assert "no test logits" not in capsys.readouterr().err
    torch.set_num_threads(os.cpu_count() or 1)


def _error_line(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_failures_end_in_one_error_line(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    assert run_cli("calibrate", "--run", run, "--margins", "0:0.3:4", "--quiet") == 0
    # a damaged heads file (detected by its SHA-256), then one that is not safetensors at all
    data = bytearray((run / "heads.safetensors").read_bytes())
    data[-3] ^= 0x10
    (run / "heads.safetensors").write_bytes(bytes(data))
    assert "damaged" in _error_line("evaluate", "--run", run, "--quiet")
    (run / "sha256.json").unlink()
    (run / "heads.safetensors").write_bytes(b"not a safetensors file")
    assert "heads.safetensors" in _error_line("evaluate", "--run", run, "--quiet")
    # a damaged checkpoint of a finished branch, met when the same command runs again
    rerun = tmp_path / "rerun"
    shutil.copytree(tiny_run, rerun)
    (rerun / "branches" / "branch_1" / "head.safetensors").write_bytes(b"\0" * 64)
    assert "head.safetensors" in _error_line(*TRAIN_RANDOM, "--epochs", "2", "--out", rerun)
    # a corrupt config.json is named
    (rerun / "config.json").write_text("{not json")
    assert "config.json" in _error_line("calibrate", "--run", rerun, "--quiet")
    # a full disk
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        msg = _error_line(*TRAIN_RANDOM, "--epochs", "1", "--out", tmp_path / "full")
    assert "disk is full" in msg and str(tmp_path / "full") in msg
    assert os.fsync is real_fsync
    assert not list((tmp_path / "full").glob("*.tmp"))
    # a read-only --out (root may write anywhere: then only the rest is checked)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "ro" in _error_line(*TRAIN_RANDOM, "--epochs", "1", "--out", ro / "run")
    torch.set_num_threads(os.cpu_count() or 1)


def test_out_that_is_a_file_is_one_error_line_without_traceback(tmp_path, package_env):
    out = tmp_path / "a_file"
    out.write_text("x")
    p = subprocess.run(
        [sys.executable, "-m", "calexnet_fast.cli", *TRAIN_RANDOM, "--epochs", "1", "--out", str(out)],
        env=package_env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=NEUTRAL_CWD,
    )
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], p.stderr
