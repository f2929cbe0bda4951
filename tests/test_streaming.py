"""Streaming inference: every input batch gets exactly the per-batch cascade's output, stages run on full
stage batches, samples wait at most ``max_wait`` input batches, and the queues stay bounded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calexnet_fast.cascades import Cascade, ReferenceCascade, ScoreCascade, StreamingCascade

N_CLASSES = 10
K = 3  # branches


class _CodedStage(nn.Module):
    """A conv stage that passes channel 0 (each sample's exit code) through unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels - 1, 3, padding=1), nn.BatchNorm2d(channels - 1))
        self.sizes: list[int] | None = []  # the batch size of every call (None: not recorded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sizes is not None:
            self.sizes.append(x.shape[0])
        return torch.cat([x[:, :1], torch.relu(self.body(x))], dim=1)


class _CodedHead(nn.Module):
    """Small logits from the features, plus a large margin on the argmax for samples coded ``k + 1``: those
    (and only those) exit at branch ``k + 1`` under thresholds of 0.9."""

    def __init__(self, k: int, channels: int) -> None:
        super().__init__()
        self.k = k
        self.linear = nn.Linear(channels - 1, N_CLASSES)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = 0.1 * self.linear(h[:, 1:].mean(dim=(2, 3)))
        code = h[:, 0].mean(dim=(1, 2)).round()
        onehot = nn.functional.one_hot(z.argmax(dim=1), N_CLASSES).to(z.dtype)
        return z + 30.0 * (code == self.k + 1).to(z.dtype)[:, None] * onehot


class _Last(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels - 1, N_CLASSES)
        self.sizes: list[int] | None = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.sizes is not None:
            self.sizes.append(h.shape[0])
        return self.linear(h[:, 1:].mean(dim=(2, 3)))


def _coded_cascade(kind=Cascade, channels: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    stages = [_CodedStage(channels) for _ in range(K)] + [_Last(channels)]
    for stage in stages[:K]:
        stage.body[1].running_mean.uniform_(-0.5, 0.5)
        stage.body[1].running_var.uniform_(0.5, 2.0)
    heads = [_CodedHead(k, channels) for k in range(K)]
    cascade = kind(stages, heads, torch.full((K, N_CLASSES), 0.9), in_channels=channels)
    return cascade.eval()


def _coded_batches(sizes, channels: int = 6, seed: int = 0, codes=None):
    """Random images whose channel 0 holds each sample's exit code (1..K a branch, 0 or K + 1 none)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        x = torch.randn(b, channels, 5, 5, generator=gen)
        code = torch.randint(0, K + 2, (b,), generator=gen) if codes is None else torch.full((b,), codes)
        x[:, 0] = code.float()[:, None, None]
        batches.append(x)
    return batches


def _expected_exits(x: torch.Tensor) -> torch.Tensor:
    code = x[:, 0, 0, 0].long()
    return torch.where((code >= 1) & (code <= K), code, torch.full_like(code, K + 1))


def _assert_same(outs, cascade, batches, atol=1e-5):
    assert len(outs) == len(batches)
    with torch.inference_mode():
        for i, (out, x) in enumerate(zip(outs, batches)):
            want = cascade(x)
            assert torch.equal(out.exit_index, want.exit_index), f"batch {i}"
            assert out.logits.dtype == want.logits.dtype and out.logits.shape == want.logits.shape
            torch.testing.assert_close(out.logits, want.logits, atol=atol, rtol=1e-3, msg=f"batch {i}")


@pytest.mark.parametrize("kind", [Cascade, ReferenceCascade])
@pytest.mark.parametrize(
    ("stage_batch", "sizes"),
    [
        (8, [8, 8, 8, 8]),
        (8, [5, 0, 13, 1, 8, 3]),  # ragged, an empty batch, a batch of one
        (1, [3, 1, 0, 2]),
        (16, [64, 7]),  # input batches larger than a stage batch
        (64, [1] * 20),  # a stage batch larger than the whole stream
        (5, [0, 0]),
    ],
)
def test_stream_matches_per_batch(kind, stage_batch, sizes):
    cascade = _coded_cascade(kind)
    batches = _coded_batches(sizes, seed=stage_batch + len(sizes))
    outs = list(StreamingCascade(cascade, stage_batch=stage_batch).stream(batches))
    _assert_same(outs, cascade, batches)
    for out, x in zip(outs, batches):
        assert torch.equal(out.exit_index, _expected_exits(x))  # the coded pattern really is the one taken


def test_random_exit_patterns_and_sizes():
    cascade = _coded_cascade()
    gen = torch.Generator().manual_seed(5)
    for trial in range(6):
        sizes = torch.randint(0, 20, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        batches = _coded_batches(sizes, seed=trial)
        stage_batch = int(torch.randint(1, 24, (1,), generator=gen))
        max_wait = [None, 0, 1, 3][trial % 4]
        outs = list(StreamingCascade(cascade, stage_batch, max_wait).stream(batches))
        _assert_same(outs, cascade, batches)


def test_empty_stream_yields_nothing():
    assert list(StreamingCascade(_coded_cascade()).stream([])) == []


def test_stages_run_on_full_stage_batches():
    cascade = _coded_cascade()
    batches = _coded_batches([10] * 30, seed=1)
    for stage in cascade.stages:
        stage.sizes.clear()
    stream = StreamingCascade(cascade, stage_batch=16).stream(batches)
    outs = list(stream)
    _assert_same(outs, cascade, batches)  # (adds per-batch sizes to the record: check the stream's first)
    for k, stage in enumerate(cascade.stages):
        runs = stage.sizes[: stream.stats.runs[k]]
        assert all(n == 16 for n in runs[:-1]), (k, runs)  # only the flush at the end is partial
        assert 0 < runs[-1] <= 16
        assert sum(runs) == stream.stats.rows[k]
    assert stream.stats.partial_runs == [int(r % 16 != 0) for r in stream.stats.rows]
    assert stream.stats.rows[0] == 300


def test_latency_cap():
    cascade = _coded_cascade()
    batches = _coded_batches([6] * 25, seed=2)
    for max_wait in [0, 1, 4]:
        read = []

        def source(read=read):
            for i, x in enumerate(batches):
                read.append(i)
                yield x

        outs = []
        for i, out in enumerate(StreamingCascade(cascade, stage_batch=32, max_wait=max_wait).stream(source())):
            assert len(read) <= i + max_wait + 1, (max_wait, i, len(read))
            outs.append(out)
        _assert_same(outs, cascade, batches)


def test_without_a_cap_samples_wait_for_full_stage_batches():
    cascade = _coded_cascade()
    batches = _coded_batches([4] * 40, seed=3, codes=K + 1)  # nobody exits: every sample reaches the end
    read = []

    def source():
        for i, x in enumerate(batches):
            read.append(i)
            yield x

    stream = StreamingCascade(cascade, stage_batch=32).stream(source())
    first = next(stream)
    assert len(read) == 8  # the first output needs the last stage to run: 32 samples = 8 batches
    _assert_same([first, *stream], cascade, batches)


@pytest.mark.parametrize("max_wait", [None, 2])
def test_queues_stay_bounded(max_wait):
    cascade = _coded_cascade()
    sizes = [3, 40, 1, 0, 25, 9, 64, 2, 17, 33] * 3
    batches = _coded_batches(sizes, seed=4)
    stage_batch = 12
    stream = StreamingCascade(cascade, stage_batch=stage_batch, max_wait=max_wait).stream(batches)
    for _ in stream:  # between input batches every queue holds less than one stage batch
        assert all(n < stage_batch for n in stream.queued()), stream.queued()
    peak = stream.stats.peak_queue
    assert peak[0] <= stage_batch - 1 + max(sizes)
    assert all(p <= 2 * stage_batch - 1 for p in peak[1:]), peak
    assert stream.queued() == [0] * (K + 1)


def test_caller_may_reuse_its_input_buffer():
    cascade = _coded_cascade()
    batches = _coded_batches([7] * 12, seed=6)
    buffer = torch.empty_like(batches[0])

    def source():
        for x in batches:
            buffer.copy_(x)
            yield buffer

    outs = list(StreamingCascade(cascade, stage_batch=16).stream(source()))
    _assert_same(outs, cascade, batches)


def test_consumer_code_runs_outside_inference_mode():
    cascade = _coded_cascade()
    for out in StreamingCascade(cascade, stage_batch=4).stream(_coded_batches([3, 5, 2])):
        assert not torch.is_inference_mode_enabled()
        assert out.logits.shape[1] == N_CLASSES


def test_stats_and_pending():
    cascade = _coded_cascade()
    stream = StreamingCascade(cascade, stage_batch=8, max_wait=1).stream(_coded_batches([4] * 10, seed=7))
    list(stream)
    assert stream.stats.peak_pending <= 2
    assert stream.stats.rows[0] == 40


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.bfloat16, False), (torch.float32, True)])
def test_16_bit_and_channels_last(dtype, channels_last):
    cascade = _coded_cascade().to(dtype)
    batches = [x.to(dtype) for x in _coded_batches([9, 16, 3, 11], seed=8)]
    if channels_last:
        cascade = cascade.to(memory_format=torch.channels_last)
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    outs = list(StreamingCascade(cascade, stage_batch=8).stream(batches))
    _assert_same(outs, cascade, batches, atol=1e-1 if dtype == torch.bfloat16 else 1e-5)
    assert all(o.logits.dtype == dtype for o in outs)


def test_real_backbone_and_prototype_heads(make_head):
    from calexnet_fast import backbones

    torch.manual_seed(0)
    backbone = backbones.resnet18(N_CLASSES, input_size=32)
    heads = [make_head(c, N_CLASSES, dim=32, k=8, seed=i) for i, c in enumerate(backbone.branch_channels)]
    cascade = Cascade(backbone, heads)
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randn(b, 3, 32, 32, generator=gen) for b in [20, 7, 20, 13]]
    with torch.inference_mode():
        sim = cascade.simulate(torch.cat(batches))
    conf = torch.softmax(sim.branch_logits.float(), dim=2).amax(dim=2)  # [K, N]
    thresholds = torch.empty(K, N_CLASSES)
    for k in range(K):  # keep every confidence clear of its threshold: rounding must not flip a decision
        t = float(torch.quantile(conf[k], 0.6))
        while bool(((conf[k] - t).abs() < 1e-3).any()):
            t += 2e-3
        thresholds[k] = t
    cascade.set_thresholds(thresholds)
    outs = list(StreamingCascade(cascade, stage_batch=16).stream(batches))
    _assert_same(outs, cascade, batches, atol=1e-4)
    exits = torch.cat([o.exit_index for o in outs])
    assert len(set(exits.tolist())) > 1  # the profile really exits at several places


@pytest.mark.parametrize("kind", [Cascade, ReferenceCascade])
def test_compiled_stages_match_and_compile_once(kind):
    from torch._dynamo.utils import counters

    cascade = _coded_cascade(kind)
    for stage in cascade.stages:
        stage.sizes = None  # no side effects in the compiled graphs
    batches = _coded_batches([5, 0, 13, 1, 8, 3, 20], seed=11)
    streaming = StreamingCascade(cascade, stage_batch=8, max_wait=1, compile=True)
    _assert_same(list(streaming.stream(batches)), cascade, batches)
    graphs = counters["stats"]["unique_graphs"]
    cascade.set_thresholds(torch.full((K, N_CLASSES), 0.95))  # an input of the graphs: no recompilation
    _assert_same(list(streaming.stream(batches[::-1])), cascade, batches[::-1])
    assert counters["stats"]["unique_graphs"] == graphs


def test_no_compaction_where_no_row_exits():
    """On CPU a stage run where no row exits hands its rows on as they are: ``_compact`` runs only where
    some row leaves (codes 2: every sample exits at branch 2; code 0 the backbone)."""
    cascade = _coded_cascade()
    assert cascade._none_exit(torch.zeros(6, dtype=torch.bool))
    assert not cascade._none_exit(torch.tensor([False, True]))
    compacted = []
    compact = cascade._compact
    cascade._compact = lambda h, stay: compacted.append(h.shape[0]) or compact(h, stay)
    for code, expected in [(2, [8, 8]), (0, [])]:
        compacted.clear()
        batches = _coded_batches([8, 8], codes=code)
        outs = list(StreamingCascade(cascade, stage_batch=8).stream(batches))
        assert compacted == expected
        _assert_same(outs, cascade, batches)


def test_errors():
    cascade = _coded_cascade()
    for bad in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="stage_batch"):
            StreamingCascade(cascade, stage_batch=bad)
    with pytest.raises(ValueError, match="max_wait"):
        StreamingCascade(cascade, max_wait=-1)
    with pytest.raises(ValueError, match="cascade"):
        StreamingCascade(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ScoreCascade"):
        StreamingCascade(ScoreCascade(list(cascade.stages), list(cascade.heads), cascade.thresholds))
    x = _coded_batches([4])[0]
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        list(StreamingCascade(cascade).stream([x, x[:, :, :4]]))
    with pytest.raises(ValueError, match=r"batches\[0\]"):
        list(StreamingCascade(cascade).stream([x.numpy()]))
    with pytest.raises(ValueError, match="channels"):
        list(StreamingCascade(cascade).stream([x[:, :3]]))


def test_cascade_stream_shortcut():
    cascade = _coded_cascade()
    batches = _coded_batches([5, 0, 13, 1, 8], seed=3)
    stream = cascade.stream(batches, stage_batch=8, max_wait=1)
    assert (stream.stage_batch, stream.max_wait) == (8, 1)
    outs = list(stream)
    _assert_same(outs, cascade, batches)
    assert stream.stats.partial_runs[0] >= 1  # the cap forced partial first-stage runs
    assert list(cascade.stream([])) == []
    score = ScoreCascade(list(cascade.stages), list(cascade.heads), cascade.thresholds)
    with pytest.raises(ValueError, match="ScoreCascade"):
        score.stream(batches)
    with pytest.raises(ValueError, match="stage_batch"):
        cascade.stream(batches, stage_batch=0)


@pytest.mark.needs_cuda
def test_cuda_matches_per_batch_without_extra_host_syncs():
    cascade = _coded_cascade().cuda()
    if cascade.plan("cuda").compaction != "c++":
        pytest.skip("the CUDA op library is not built: compaction falls back to boolean indexing (it syncs)")
    batches = [x.cuda() for x in _coded_batches([13, 0, 40, 1, 22, 64, 5], seed=10)]
    streaming = StreamingCascade(cascade, stage_batch=16, max_wait=2)
    list(streaming.stream(batches))  # warm up (Triton compiles its kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any torch-level sync raises; compact's own is in C++
    try:
        outs = list(streaming.stream(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same(outs, cascade, batches)
