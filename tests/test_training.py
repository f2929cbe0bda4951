"""The training engine: fit loop, batch sources, checkpoints and resume, backbone training, DDP on two CPU
processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import calexnet_fast
from calexnet_fast import training
from calexnet_fast.data import synthetic_dataset
from calexnet_fast.features import FeatureCache
from calexnet_fast.training import CacheSource, FitConfig


class Interrupt(Exception):
    pass


def make_cache(n=64, seed=0) -> FeatureCache:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    f0 = torch.randn(n, 6, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float() * 0.5
    f1 = torch.randn(n, 8, 2, 2, generator=g)
    z = torch.nn.functional.one_hot(y, 4).float() * 3 + torch.randn(n, 4, generator=g)
    return FeatureCache([f0.half(), f1.half()], z, y)


class Probe(nn.Module):
    """BN + dropout + linear on pooled branch-0 features: exercises buffers and RNG on resume."""

    def __init__(self, bn: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, 4)

    def forward(self, f):
        return self.fc(self.drop(self.bn(f).mean((2, 3))))


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch.features[0]), batch.labels)


def test_source_and_config_errors():
    with pytest.raises(ValueError, match="weights"):
        CacheSource(make_cache(), torch.ones(3))
    with pytest.raises(ValueError, match="branches"):
        CacheSource(make_cache(), branches=[2])
    for bad in ({"epochs": -1}, {"batch_size": 0}, {"optimizer": "lion"}, {"schedule": "step"}, {"lr": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FitConfig(**bad)


def test_fit_learns_and_is_deterministic():
    cache = make_cache()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Probe()
        r = training.fit(model, CacheSource(cache), ce, FitConfig(epochs=6, batch_size=16, lr=0.05), progress=False)
        results.append((model.state_dict(), r.history))
    assert results[0][1][-1]["loss"] < results[0][1][0]["loss"]
    for k, v in results[0][0].items():
        assert torch.equal(v, results[1][0][k]), k
    assert [h["epoch"] for h in results[0][1]] == list(range(1, 7))
    assert results[0][1][-1]["lr"] < 0.05 * 0.1  # cosine schedule decays to ~0


@pytest.mark.parametrize("where", ["between_epochs", "mid_epoch"])
def test_interrupt_and_resume_gives_the_uninterrupted_result(tmp_path, where):
    cache = make_cache()
    cfg = FitConfig(epochs=4, batch_size=16, lr=0.02)
    torch.manual_seed(0)
    ref = Probe()
    training.fit(ref, CacheSource(cache), ce, cfg, checkpoint_dir=tmp_path / "ref", progress=False)

    steps = {"n": 0}

    def flaky(model, batch):
        steps["n"] += 1
        if where == "mid_epoch" and steps["n"] == 10:  # epoch 3, second batch (4 batches per epoch)
            raise Interrupt
        return ce(model, batch)

    def stop(epoch, record):
        if where == "between_epochs" and epoch == 2:
            raise Interrupt

    torch.manual_seed(0)
    first = Probe()
    with pytest.raises(Interrupt):
        training.fit(
            first,
            CacheSource(cache),
            flaky,
            cfg,
            checkpoint_dir=tmp_path / "run",
            on_epoch_end=stop,
            progress=False,
        )
    ckpt = training.load_checkpoint(tmp_path / "run")
    assert ckpt[1]["epoch"] == 2  # at most the interrupted epoch is lost
    torch.manual_seed(123)  # a fresh process: other initial weights and RNG state
    resumed = Probe()
    r = training.fit(resumed, CacheSource(cache), ce, cfg, checkpoint_dir=tmp_path / "run", progress=False)
    assert r.resumed_from_epoch == 2 and r.epochs_run == 2 and len(r.history) == 4
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert (tmp_path / "run" / "checkpoint.json").is_file()
    # a finished run resumes to a no-op
    again = Probe()
    assert (
        training.fit(again, CacheSource(cache), ce, cfg, checkpoint_dir=tmp_path / "run", progress=False).epochs_run
        == 0
    )
    assert torch.equal(again.fc.weight, ref.fc.weight)


def test_compiled_forward_trains_like_eager(tmp_path):
    cache = make_cache()
    cfg = FitConfig(epochs=2, batch_size=16, lr=0.05)
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Probe(bn=False, dropout=0.0)
        training.fit(
            model,
            CacheSource(cache),
            ce,
            cfg,
            progress=False,
            compile_model=compiled,
            checkpoint_dir=tmp_path / str(compiled),
        )
        out.append(model.fc.weight.detach().clone())
        # the checkpoint holds the plain module's keys, not torch.compile's wrapper names
        tensors, _ = training.load_checkpoint(tmp_path / str(compiled))
        assert "model/fc.weight" in tensors
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_different_configuration(tmp_path):
    cache = make_cache()

    def fit(resume: bool = True, **config):
        cfg = FitConfig(epochs=1, batch_size=16, **config)
        return training.fit(
            Probe(), CacheSource(cache), ce, cfg, checkpoint_dir=tmp_path, resume=resume, progress=False
        )

    fit()
    with pytest.raises(RuntimeError, match=r"different configuration.*lr"):
        fit(lr=0.5)
    assert fit(resume=False, lr=0.5).epochs_run == 1


def test_nonfinite_loss_is_reported():
    with pytest.raises(RuntimeError, match="loss became nan"):
        training.fit(
            Probe(),
            CacheSource(make_cache()),
            lambda m, b: m(b.features[0]).sum() * float("nan"),
            FitConfig(epochs=1, batch_size=16),
            progress=False,
        )


def test_weights_and_branch_subset_reach_the_loss():
    cache = make_cache(n=19)
    w = torch.arange(19, dtype=torch.float32)
    seen = []

    def loss(model, batch):
        assert batch.features[1] is None and batch.features[0].dtype == torch.float32
        assert torch.equal(batch.weights, w[batch.index])
        assert torch.equal(batch.labels, cache.labels[batch.index])
        seen.append(batch.index)
        return ce(model, batch)

    training.fit(Probe(), CacheSource(cache, w, branches=[0]), loss, FitConfig(epochs=1, batch_size=6), progress=False)
    assert sorted(torch.cat(seen).tolist()) == list(range(19))
    assert [len(s) for s in seen] == [6, 6, 7]  # a last batch of one is merged (BatchNorm needs two)


def test_train_backbone_torchvision_resnet_and_resume(tmp_path, monkeypatch):
    import torchvision

    data = synthetic_dataset(32, 8, 8, n_classes=3, image_size=16, seed=1)
    cfg = training.BackboneTrainConfig(epochs=2, batch_size=16, lr=0.05, num_workers=0)

    def new():
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=3)

    ref = new()
    r = training.train_backbone(ref, data.train, data.val, cfg, out_dir=tmp_path / "ref", progress=False)
    assert len(r.history) == 2 and 0 <= r.history[-1]["val_accuracy"] <= 1

    def boom(*a, **k):
        raise Interrupt

    # the per-epoch validation runs right after the epoch's checkpoint: stop the run there
    with monkeypatch.context() as m:
        m.setattr(training.backbone, "evaluate_classifier", boom)
        with pytest.raises(Interrupt):
            training.train_backbone(new(), data.train, data.val, cfg, out_dir=tmp_path / "run", progress=False)
    torch.manual_seed(99)
    resumed = torchvision.models.resnet18(num_classes=3)
    r2 = training.train_backbone(resumed, data.train, data.val, cfg, out_dir=tmp_path / "run", progress=False)
    assert r2.resumed_from_epoch == 1 and r2.epochs_run == 1
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from calexnet_fast import distributed, features, training


    def main(out, batch_size, world_size):
        info = distributed.init_distributed()
        assert info.world_size == world_size, info
        g = torch.Generator().manual_seed(0)
        n = 64
        y = torch.randint(0, 4, (n,), generator=g)
        f0 = torch.randn(n, 6, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float()
        cache = features.FeatureCache([f0], torch.randn(n, 4, generator=g), y)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(96, 4))
        cfg = training.FitConfig(epochs=3, batch_size=batch_size, optimizer="sgd", lr=0.1)
        seen = []

        def loss(m, b):
            seen.append(b.index.clone())
            return nn.functional.cross_entropy(m(b.features[0]), b.labels)

        src = training.CacheSource(cache)
        training.fit(model, src, loss, cfg, checkpoint_dir=out + "/ckpt", progress=False)
        torch.save({"seen": torch.cat(seen)}, f"{out}/seen{info.rank}.pt")
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, f"{out}/rank{info.rank}.safetensors")


    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]), 2)
    """
)


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ)
    pkg_root = str(Path(calexnet_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
        "4",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas identical
    s0 = torch.load(tmp_path / "seen0.pt", weights_only=True)["seen"]
    s1 = torch.load(tmp_path / "seen1.pt", weights_only=True)["seen"]
    assert len(s0) == len(s1) == 96  # 32 samples per rank per epoch, 3 epochs
    assert sorted(torch.cat([s0[:32], s1[:32]]).tolist()) == list(range(64))  # the ranks split each epoch
    assert (tmp_path / "ckpt" / "checkpoint.safetensors").is_file()
    # one process with batch 8 = two ranks with batch 4 (DDP averages gradients over the same 8 samples)
    single = tmp_path / "single"
    single.mkdir()
    ns: dict = {"__name__": "ddp_twin"}
    exec(compile(DDP_SCRIPT, "ddp_twin", "exec"), ns)
    ns["main"](str(single), 8, 1)
    s = load_file(str(single / "rank0.safetensors"))
    for k in s:
        torch.testing.assert_close(s[k], r0[k], rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_the_best_epoch_and_a_resumed_run_ends_the_same(tmp_path):
    """A validation set whose labels disagree with training gets worse as training improves: the best
    epoch is the first, training stops ``patience`` epochs later, the model holds that epoch's weights, and
    a run resumed from the last checkpoint neither trains further nor ends differently."""
    cache, val = make_cache(), make_cache(seed=1)
    wrong = FeatureCache(list(val.features), val.logits_tensor(), (val.labels_tensor() + 1) % 4)
    src = CacheSource(wrong)

    def validate(m):
        return training.evaluate_loss(m, src, ce)

    cfg = FitConfig(epochs=12, batch_size=16, lr=0.05, patience=2)
    seen = []

    def hook(epoch, record):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})

    torch.manual_seed(0)
    model = Probe(dropout=0.0)
    r = training.fit(model, CacheSource(cache), ce, cfg, progress=False, validate=validate, on_epoch_end=hook,
                     checkpoint_dir=tmp_path)  # fmt: skip
    losses = [h["val_loss"] for h in r.history]
    best = 1 + losses.index(min(losses))
    assert r.stopped_early and r.best_epoch == best and len(r.history) == best + 2 < 12
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[best - 1][k]), k
    assert validate(model) == pytest.approx(min(losses))
    torch.manual_seed(0)
    again = Probe(dropout=0.0)
    r2 = training.fit(again, CacheSource(cache), ce, cfg, progress=False, validate=validate, checkpoint_dir=tmp_path)
    assert r2.epochs_run == 0 and r2.best_epoch == best and r2.stopped_early
    for k, v in again.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(ValueError, match="patience"):
        FitConfig(patience=-1)
