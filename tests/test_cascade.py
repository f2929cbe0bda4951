"""calexnet_fast.Cascade (and ScoreCascade, DeployableCascade) against ReferenceCascade: same exits and
predictions on every sample."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch
from torch import nn

from calexnet_fast import Cascade, ReferenceCascade
from calexnet_fast.backbones import from_stages
from calexnet_fast.cascades import ScoreCascade
from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.heads import PrototypePoolingHead

N_CLASSES = 10


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU()),
        nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU()),
    ]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, N_CLASSES))
    return from_stages(stages, classifier, in_channels=3, input_size=16)


def _heads(backbone, seed: int = 0):
    torch.manual_seed(seed)
    heads = []
    for c in backbone.branch_channels:
        head = PrototypePoolingHead(c, N_CLASSES, dim=16, n_prototypes=8)
        with torch.no_grad():  # non-trivial BN statistics, so folding matters
            head.bn.running_mean.uniform_(-0.5, 0.5)
            head.bn.running_var.uniform_(0.5, 2.0)
            head.classifier.weight.mul_(3)
        heads.append(head.eval())
    return heads


def _thresholds_away_from_ties(ref: ReferenceCascade, x: torch.Tensor, quantile: float, gen) -> torch.Tensor:
    """Per-class thresholds near the given confidence quantile, but never within 1e-3 of a sample's
    confidence: folding the head changes logits by float rounding, so exact ties are excluded."""
    sim = ref.simulate(x)
    conf = torch.softmax(sim.branch_logits.float(), dim=2).amax(dim=2)  # [K, B]
    thr = torch.quantile(conf, quantile, dim=1, keepdim=True).repeat(1, N_CLASSES)
    thr = thr + 0.02 * torch.rand(thr.shape, generator=gen) - 0.01
    for k in range(thr.shape[0]):
        for c in range(N_CLASSES):
            while bool(((conf[k] - thr[k, c]).abs() < 1e-3).any()):
                thr[k, c] += 2e-3
    return thr


def _pair(device, seed=0):
    bb = _backbone(seed)
    heads = _heads(bb, seed)
    ref = ReferenceCascade(bb, heads).to(device)
    return ref, Cascade.from_reference(ref)


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("batch", [1, 2, 37])
def test_cascade_matches_reference(device, quantile, batch):
    gen = torch.Generator().manual_seed(batch * 7 + int(quantile * 10))
    ref, fast = _pair(device)
    x = torch.randn(batch, 3, 16, 16, generator=gen).to(device)
    thr = _thresholds_away_from_ties(ref, x, quantile, gen)
    if quantile > 0.5:
        thr[0, :3] = float("inf")  # some classes never exit at branch 1
    ref.set_thresholds(thr)
    fast.set_thresholds(thr)
    a, b = ref(x), fast(x)
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.logits.argmax(1), b.logits.argmax(1))
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)


def test_edge_profiles(device):
    ref, fast = _pair(device)
    x = torch.randn(9, 3, 16, 16).to(device)
    k = ref.n_branches
    for fill, expected in [(float("-inf"), 1), (float("inf"), k + 1), (0.0, 1)]:
        thr = torch.full((k, N_CLASSES), fill)
        ref.set_thresholds(thr)
        fast.set_thresholds(thr)
        a, b = ref(x), fast(x)
        assert torch.equal(b.exit_index, torch.full((9,), expected, device=device))
        assert torch.equal(a.exit_index, b.exit_index)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    empty = fast(torch.randn(0, 3, 16, 16, device=device))
    assert empty.logits.shape == (0, N_CLASSES) and empty.exit_index.shape == (0,)


def test_stage_where_no_row_exits(device):
    """No row leaves at branch 1, every row at branch 2: on CPU the loop hands branch 1's rows on without
    compacting them (and keeps no output for them); the outputs equal the reference's either way."""
    ref, fast = _pair(device)
    x = torch.randn(7, 3, 16, 16).to(device)
    thr = torch.full((ref.n_branches, N_CLASSES), float("inf"))
    thr[1] = 0.0
    ref.set_thresholds(thr)
    fast.set_thresholds(thr)
    compacted = []
    compact = fast._compact
    fast._compact = lambda h, stay: compacted.append(h.shape[0]) or compact(h, stay)
    a, b = ref(x), fast(x)
    assert torch.equal(b.exit_index, torch.full((7,), 2, device=device))
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    assert compacted == ([7] if device == "cpu" else [7, 7])  # on CUDA asking would cost a host sync


def test_nan_never_exits(device):
    ref, fast = _pair(device)
    x = torch.randn(6, 3, 16, 16).to(device)
    x[2] = float("nan")
    thr = torch.zeros(ref.n_branches, N_CLASSES)
    ref.set_thresholds(thr)
    fast.set_thresholds(thr)
    a, b = ref(x), fast(x)
    assert torch.equal(a.exit_index, b.exit_index) and int(b.exit_index[2]) == ref.n_branches + 1


def test_bf16_and_channels_last(device):
    ref, fast = _pair(device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, 16, 16, generator=gen).to(device)
    thr = _thresholds_away_from_ties(ref, x, 0.5, gen)
    ref.set_thresholds(thr)
    fast.set_thresholds(thr)
    expect = ref(x)
    cl = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(cl.exit_index, expect.exit_index)
    ref16 = ReferenceCascade(ref.stages, ref.heads, thr).to(device, torch.bfloat16)
    fast16 = Cascade.from_reference(ref16)
    a, b = ref16(x.bfloat16()), fast16(x.bfloat16())
    assert b.logits.dtype == torch.bfloat16
    # bf16 rounding moves confidences by ~1e-2: compare where the reference is clearly away from a threshold
    conf = torch.softmax(ref16.simulate(x.bfloat16()).branch_logits.float(), 2).amax(2)
    clear = ((conf - thr.to(device).gather(1, ref16.simulate(x.bfloat16()).branch_logits.argmax(2))).abs() > 0.05).all(
        0
    )
    assert torch.equal(a.exit_index[clear], b.exit_index[clear])


def test_heads_are_refolded_after_an_update():
    ref, fast = _pair("cpu")
    x = torch.randn(5, 3, 16, 16)
    thr = torch.full((ref.n_branches, N_CLASSES), float("inf"))
    thr[0] = 0.0
    fast.set_thresholds(thr)
    ref.set_thresholds(thr)
    first = fast(x).logits.clone()
    with torch.no_grad():
        fast.heads[0].classifier.bias.add_(1.0)
    second = fast(x).logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, ref(x).logits, rtol=1e-4, atol=1e-4)


def test_plan_and_from_reference_errors():
    _, fast = _pair("cpu")
    assert fast.plan("cpu").compaction == "c++"
    with pytest.raises(ValueError, match="reference"):
        Cascade.from_reference(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        fast(torch.randn(3, 16, 16))


def test_random_batches_soak_flat_memory():
    """Many consecutive batches of random sizes (0 and 1 included) and random exit patterns: no error,
    and Python-side memory does not grow (the bench's soak run measures the full 10,000 batches)."""
    ref, fast = _pair("cpu")
    gen = torch.Generator().manual_seed(11)
    tracemalloc.start()
    peaks = []
    for i in range(300):
        batch = int(torch.randint(0, 9, (1,), generator=gen))
        x = torch.randn(batch, 3, 16, 16, generator=gen)
        thr = torch.rand(ref.n_branches, N_CLASSES, generator=gen)
        thr[torch.rand(thr.shape, generator=gen) < 0.2] = float("inf")
        fast.set_thresholds(thr)
        out = fast(x)
        assert out.logits.shape == (batch, N_CLASSES)
        if i % 100 == 99:
            peaks.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert peaks[-1] < peaks[0] + 256 * 1024, peaks


def test_torchscript_export_fresh_process(tmp_path, package_env):
    ref, fast = _pair("cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    thr = _thresholds_away_from_ties(ref, x, 0.4, gen)
    fast.set_thresholds(thr)
    scripted = fast.to_torchscript()
    expect = fast(x)
    got = scripted(x)
    assert torch.equal(got.exit_index, expect.exit_index)
    torch.testing.assert_close(got.logits, expect.logits, rtol=1e-5, atol=1e-5)
    assert "calexnet_fast::compact" in str(scripted.inlined_graph)
    path = tmp_path / "cascade.pt"
    scripted.save(str(path))
    torch.save({"x": x, "exit_index": expect.exit_index, "logits": expect.logits}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import torch, calexnet_fast
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        out = m(io["x"])
        assert torch.equal(out[1], io["exit_index"])
        torch.testing.assert_close(out[0], io["logits"], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=package_env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


class SoftmaxExitHead(nn.Module):
    """An exit head (score, pred) = the max softmax probability and argmax of a plain head: as a ScoreCascade
    it must behave exactly as the per-class rule of the other cascades."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor, state: torch.Tensor | None = None):
        logits = self.head(h)
        _, pred, conf = exit_decision_reference(logits, torch.zeros(logits.shape[1], device=logits.device))
        return logits, conf, pred, None


def test_score_cascade_with_the_softmax_score_is_the_reference(device):
    ref, _ = _pair(device)
    folded = ReferenceCascade(ref.stages, [h.fold() for h in ref.heads], n_classes=N_CLASSES).to(device)
    score = ScoreCascade(list(ref.stages), [SoftmaxExitHead(h) for h in folded.heads], n_classes=N_CLASSES)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, 3, 16, 16, generator=gen).to(device)
    thr = _thresholds_away_from_ties(folded, x, 0.5, gen)
    folded.set_thresholds(thr)
    score.set_thresholds(thr)
    a, b = folded(x), score(x)
    assert torch.equal(a.exit_index, b.exit_index)
    assert len(set(b.exit_index.tolist())) >= 3
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)


def test_input_dtype_and_device_errors():
    ref, fast = _pair("cpu")
    x = torch.randn(2, 3, 16, 16)
    for bad, msg in [
        (x.double(), r"x: expected dtype torch.float32 \(that of the cascade's parameters.*got torch.float64"),
        (torch.empty(2, 3, 16, 16, device="meta"), r"x: expected device cpu \(that of the cascade\), got meta"),
    ]:
        for cascade in (ref, fast):
            with pytest.raises(ValueError, match=msg):
                cascade(bad)
