"""GridPrototypeHead (calexnet_fast.heads.grid): module == folded form == reference, cost, cascades, recipe."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calexnet_fast import branch_training, recipes
from calexnet_fast.backbones import cifar_resnet
from calexnet_fast.cascades import Cascade, ReferenceCascade
from calexnet_fast.features import FeatureCache, head_logits
from calexnet_fast.flops import head_flops, segment_flops
from calexnet_fast.heads import FoldedGridPrototypeHead, GridPrototypeHead
from calexnet_fast.ops import library_status
from calexnet_fast.recipes import Recipe, make_head
from calexnet_fast.reference import grid_head_reference
from calexnet_fast.run import load_heads, save_heads
from calexnet_fast.training import FitConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def grid_head(make_head):
    """``grid_head(c, n_classes=5, dim=16, k=6, grid=2, feature_grid=4, max_size=8, seed=0)``: a trained-looking
    ``GridPrototypeHead`` (conftest's ``make_head``)."""

    def make(c, n_classes=5, dim=16, k=6, grid=2, feature_grid=4, max_size=8, seed=0) -> GridPrototypeHead:
        kw = dict(grid=grid, feature_grid=feature_grid, max_size=max_size)
        return make_head(c, n_classes, dim, k, seed, cls=GridPrototypeHead, **kw)

    return make


def _naive(head: GridPrototypeHead, f: torch.Tensor) -> torch.Tensor:
    """The definition written out cell by cell with explicit slicing (square maps whose sides the grids
    divide), independent of the adaptive pools and of the reference."""
    n, c, h, w = f.shape
    s_, g, fg = min(h, head.max_size), head.grid, head.feature_grid
    x = f.reshape(n, c, s_, h // s_, s_, w // s_).mean(dim=(3, 5))
    u = torch.relu(head.bn(head.proj(x)))
    s = head.gamma * F.cosine_similarity(u[:, None], head.prototypes[None, :, :, None, None], dim=2, eps=1e-8)

    def cells(t: torch.Tensor, grid: int, op) -> torch.Tensor:
        side = t.shape[2] // grid
        cut = [slice(i * side, (i + 1) * side) for i in range(grid)]
        return torch.stack([op(t[:, :, a, b]) for a in cut for b in cut], dim=2).flatten(1)  # channel-major

    def mx(t):
        return t.amax(dim=(2, 3))

    def mean(t):
        return t.mean(dim=(2, 3))

    feats = torch.cat([cells(s, g, mx), cells(s, g, mean), cells(x, fg, mx), cells(x, fg, mean)], dim=1)
    return head.classifier(feats)


@pytest.mark.parametrize("c,h", [(16, 32), (32, 16), (64, 8)])
def test_module_matches_definition(c, h, grid_head):
    head = grid_head(c, n_classes=10, dim=12, k=5)
    f = torch.randn(3, c, h, h)
    with torch.no_grad():
        torch.testing.assert_close(head(f), _naive(head, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "c,n_classes,dim,k,grid,fgrid,size,h,w",
    [
        (16, 10, 64, 32, 2, 4, 8, 32, 32),
        (32, 10, 64, 32, 2, 4, 8, 16, 16),
        (64, 100, 64, 32, 2, 4, 8, 8, 8),
        (8, 3, 16, 4, 3, 2, 5, 7, 9),  # sizes the grids do not divide
        (4, 2, 8, 1, 2, 4, 8, 1, 3),  # a map smaller than the grids
    ],
)
def test_module_equals_folded_equals_reference(c, n_classes, dim, k, grid, fgrid, size, h, w, grid_head):
    head = grid_head(c, n_classes, dim, k, grid, fgrid, size)
    folded = head.fold()
    f = torch.randn(5, c, h, w) * 2.0 + 0.5
    with torch.no_grad():
        expect = head(f)
        got = folded(f)
        got_cl = folded(f.to(memory_format=torch.channels_last))
        module_cl = head(f.to(memory_format=torch.channels_last))
        ref = grid_head_reference(f, *folded.buffers(), grid, fgrid, size)
        exact = head.double()(f.double())
    assert got.shape == (5, n_classes) and got.dtype == torch.float32
    assert head.feature_dim == 2 * k * grid * grid + 2 * c * fgrid * fgrid
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the plan (eager) against its twin
    for out in (got, got_cl, module_cl):
        torch.testing.assert_close(out, expect, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorchs_own_error(dtype, grid_head):
    head = grid_head(32, n_classes=10, dim=64, k=32)
    folded = head.fold()
    f = torch.randn(16, 32, 16, 16)
    with torch.no_grad():
        exact = head.double()(f.double())
        own = head.to(dtype)(f.to(dtype))  # PyTorch's module, unfolded, in dtype
        got = folded(f.to(dtype))
    assert got.dtype == dtype
    own_err = (own.double() - exact).abs().max().item()
    got_err = (got.double() - exact).abs().max().item()
    assert got_err <= 2 * own_err, (got_err, own_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_projection_gives_zero_similarity_not_nan(dtype):
    head = GridPrototypeHead(4, 3, dim=8, n_prototypes=2).eval()
    with torch.no_grad():
        head.bn.bias.fill_(-5.0)  # ReLU zeroes every projected vector
        head.classifier.weight.zero_()
        head.classifier.weight[:, :16].fill_(1.0)  # the logits read only the similarities
    f = torch.randn(2, 4, 6, 6)
    for module in (head.to(dtype), head.fold()):
        with torch.no_grad():
            s = module(f.to(dtype))
            pooled = head.pooled_features(f.to(dtype))
        assert not torch.isnan(s).any()
        torch.testing.assert_close(s.float(), head.classifier.bias.float().expand(2, 3), rtol=0, atol=0)
        assert not pooled[:, :16].any()


def test_fold_buffers_and_torchscript(grid_head):
    head = grid_head(20, n_classes=7, dim=32, k=4, grid=2, feature_grid=3, max_size=6)
    folded = head.fold()
    assert isinstance(folded, FoldedGridPrototypeHead) and list(folded.parameters()) == []
    shapes = {name: list(b.shape) for name, b in folded.named_buffers()}
    width = 2 * 4 * 4 + 2 * 20 * 9
    assert shapes == {
        "proj_weight": [32, 20],
        "proj_bias": [32],
        "prototypes": [4, 32],
        "cls_weight": [7, width],
        "cls_bias": [7],
    }
    torch.testing.assert_close(folded.prototypes.norm(dim=1), torch.full((4,), 7.5))
    assert (folded.grid, folded.feature_grid, folded.max_size) == (2, 3, 6)
    f = torch.randn(3, 20, 11, 13)
    with torch.no_grad():
        for module in (head, folded):
            torch.testing.assert_close(torch.jit.script(module)(f), module(f), rtol=1e-6, atol=1e-6)


def test_gradients_reach_every_parameter():
    head = GridPrototypeHead(6, 4, dim=8, n_prototypes=3)
    head(torch.randn(4, 6, 9, 9)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments_are_named():
    """(Bad features: tests/test_heads.py, for every head.)"""
    for kwargs, msg in [
        (dict(in_channels=0), "in_channels: expected a positive int, got 0"),
        (dict(n_prototypes=0), "n_prototypes: expected a positive int, got 0"),
        (dict(grid=0), "grid: expected a positive int, got 0"),
        (dict(feature_grid=2.0), "feature_grid: expected a positive int, got 2.0"),
        (dict(grid=4, max_size=3), "grid: expected at most max_size = 3 cells a side, got 4"),
    ]:
        with pytest.raises(ValueError, match=msg):
            GridPrototypeHead(**{"in_channels": 4, "n_classes": 3, **kwargs})
    bufs = [torch.zeros(8, 4), torch.zeros(8), torch.zeros(2, 8), torch.zeros(3, 2 * 2 * 4 + 2 * 4 * 16)]
    FoldedGridPrototypeHead(*bufs, torch.zeros(3))
    with pytest.raises(ValueError, match=r"cls_weight: expected shape \[3, 144\], got \[3, 143\]"):
        FoldedGridPrototypeHead(*bufs[:3], torch.zeros(3, 143), torch.zeros(3))
    with pytest.raises(ValueError, match="prototypes: expected a floating torch.Tensor, got list"):
        FoldedGridPrototypeHead(*bufs[:2], bufs[2].tolist(), bufs[3], torch.zeros(3))
    with pytest.raises(ValueError, match="max_size: expected a positive int, got 0"):
        FoldedGridPrototypeHead(*bufs, torch.zeros(3), max_size=0)


def test_default_head_costs_at_most_half_a_percent_of_resnet56_per_branch():
    torch.manual_seed(0)
    bb = cifar_resnet(56, placement="flops", n_branches=3)
    assert bb.branch_points == ["layer1.6", "layer2.3", "layer3.1"]
    backbone = sum(segment_flops(bb))
    heads = [GridPrototypeHead(c, 10) for c in bb.branch_channels]
    for k, flops in enumerate(head_flops(heads, bb)):
        assert 0 < flops <= 0.005 * backbone, (k, flops / backbone)


def _cascade_pair(grid_head, seed: int = 0):
    torch.manual_seed(seed)
    bb = cifar_resnet(20, placement="flops", n_branches=3)
    heads = [grid_head(c, 10, dim=16, k=8, seed=seed + i) for i, c in enumerate(bb.branch_channels)]
    ref = ReferenceCascade(bb, heads)
    return ref, Cascade.from_reference(ref)


@pytest.mark.parametrize("quantile", [0.0, 0.4, 0.8])
def test_cascade_matches_reference_cascade(quantile, device, grid_head):
    ref, fast = _cascade_pair(grid_head)
    ref.to(device)
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    conf = torch.softmax(ref.simulate(x).branch_logits.float(), dim=2).amax(dim=2)  # [K, B]
    thr = torch.quantile(conf, quantile, dim=1, keepdim=True).repeat(1, 10) + 1e-4
    ref.set_thresholds(thr)
    fast.set_thresholds(thr)
    a, b = ref(x), fast(x)
    torch.testing.assert_close(b.exit_index, a.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    assert a.exit_index.unique().numel() > 1 or quantile == 0.0
    # the fast cascade ran the folded head (on CUDA the fused kernel, which reads the same cached folded head),
    # and so does its TorchScript form
    assert all(isinstance(b.folded, FoldedGridPrototypeHead) for b in fast._branches.values())
    assert len(fast._branches) >= 1
    c = fast.to_torchscript()(x)
    torch.testing.assert_close(c.exit_index, a.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-4, atol=1e-4)


def test_recipe_selects_the_head_and_runs_save_and_load_it(tmp_path, grid_head):
    assert Recipe().head == "grid" and Recipe().head_dim == 32  # the default head
    assert Recipe(head="prototype").head_dim == 128
    r = Recipe(head="grid")
    assert r.head_dim == 32 and Recipe.from_json(r.to_json()) == r
    head = make_head(16, 10, r, seed=3)
    assert isinstance(head, GridPrototypeHead) and (head.dim, head.n_prototypes) == (32, 32)
    assert make_head(16, 10, Recipe(head="grid", head_dim=24), seed=3).dim == 24
    with pytest.raises(ValueError, match=r"head: expected one of \('prototype', 'grid'\), got 'sdn'"):
        Recipe(head="sdn")
    heads = [grid_head(8, 3, dim=8, k=2, grid=3, feature_grid=2, max_size=5).eval(), head.eval()]
    save_heads(tmp_path / "h.safetensors", heads, {})
    loaded, _ = load_heads(tmp_path / "h.safetensors")
    f = [torch.randn(2, 8, 7, 7), torch.randn(2, 16, 12, 12)]
    for h, g, x in zip(heads, loaded, f, strict=True):
        assert isinstance(g, GridPrototypeHead) and (g.grid, g.feature_grid, g.max_size) == (
            h.grid,
            h.feature_grid,
            h.max_size,
        )
        with torch.no_grad():
            torch.testing.assert_close(g(x), h(x), rtol=0, atol=0)


def test_streaming_cascade_runs_the_grid_head_like_the_cascade(grid_head):
    ref, fast = _cascade_pair(grid_head, seed=2)
    xs = [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) for n in (5, 11, 3)]
    conf = torch.softmax(ref.simulate(torch.cat(xs)).branch_logits.float(), dim=2).amax(dim=2)
    fast.set_thresholds(torch.quantile(conf, 0.5, dim=1, keepdim=True).repeat(1, 10) + 1e-4)
    for x, out in zip(xs, fast.stream(xs, stage_batch=8), strict=True):
        expect = fast(x)
        torch.testing.assert_close(out.exit_index, expect.exit_index, rtol=0, atol=0)
        torch.testing.assert_close(out.logits, expect.logits, rtol=1e-5, atol=1e-5)


def test_recipe_trains_grid_heads_on_cached_features():
    g = torch.Generator().manual_seed(0)

    def cache(n):
        y = torch.randint(0, 3, (n,), generator=g)
        sig = F.one_hot(y, 3).float().view(n, 3, 1, 1).repeat(1, 2, 5, 5)  # 6 channels, 5x5 maps
        f0 = sig + 0.8 * torch.randn(n, 6, 5, 5, generator=g)
        f1 = 2 * sig[:, :4, :2, :2] + 0.5 * torch.randn(n, 4, 2, 2, generator=g)
        zb = F.one_hot(y, 3).float() * 4 + torch.randn(n, 3, generator=g)
        return FeatureCache([f0.half(), f1.half()], zb, y)

    tr, va = cache(160), cache(120)
    rec = recipes.recipe("reference", head="grid", n_prototypes=4, min_support=5)
    assert rec.head_dim == 32
    res = branch_training.train_branches(tr, va, rec, FitConfig(epochs=3, batch_size=32, lr=1e-2), progress=False)
    assert all(isinstance(h, GridPrototypeHead) for h in res.heads)
    for k, h in enumerate(res.heads):
        acc = (head_logits(h, va, k).argmax(1) == va.labels).float().mean().item()
        assert acc > 0.6, (k, acc)


def test_bench_script_reports_flops_and_times(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("bench_grid_head", ROOT / "bench" / "grid_head.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--batch", "2", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["batch"] == 2
    rows = {(r["head"], r["branch"]): r for r in out["heads"]}
    # grid-twin: the folded grid head's twin, timed beside its plans; with the exit decision: grid+rule (the plan
    # and the reference exit rule) and grid-exit (the C++ op, where the CPU library is loaded)
    heads = ["grid", "prototype", "grid-twin", "grid+rule"] + ["grid-exit"] * bool(library_status().cpu_path)
    assert sorted(rows) == sorted((h, b) for h in heads for b in ("layer1.6", "layer2.3", "layer3.1"))
    for (head, branch), r in rows.items():
        assert r["seconds"] > 0 and 0 < r["flops_pct"] <= (10 if head == "prototype" else 0.5)
        if head.startswith("grid"):
            assert r["flops"] == rows[("grid", branch)]["flops"]
    r18 = bench.main(["--backbone", "resnet18", "--batch", "2", "--repeats", "1"])
    assert r18["backbone"] == "resnet18" and {r["branch"] for r in r18["heads"]} == {"layer1", "layer2", "layer3"}
