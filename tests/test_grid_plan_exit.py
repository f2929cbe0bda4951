"""grid_plan_exit: the C++ CPU op against its twin, and the grid head's plan with the exit decision
(``GridHeadPlan.exit``, what ``Cascade`` runs on CPU) against the reference head and exit rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calexnet_fast import Cascade, ReferenceCascade
from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.heads import GridPrototypeHead
from calexnet_fast.heads import grid_plan as grid_plan_module
from calexnet_fast.heads.grid_plan import cell_windows
from calexnet_fast.ops.grid_plan_exit import grid_plan_exit
from calexnet_fast.reference import grid_head_reference, grid_plan_exit_reference

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-11, atol=1e-11)}
X, PROJ, BIAS, PROTO, S_WIN, X_WIN, WEIGHT, CLS_BIAS, THR = range(9)  # operand positions


def _windows(h, w, rows, cols, extra=()):
    """The cells of a rows x cols grid over an h x w map (duplicates dropped), plus ``extra`` windows."""
    return torch.tensor(list(dict.fromkeys([*cell_windows(h, w, rows, cols), *extra])), dtype=torch.int64)


def _features(windows, ch):
    return sum(ch if (r1 - r0) * (c1 - c0) == 1 else 2 * ch for r0, r1, c0, c1 in windows.tolist())


def _operands(n, h, w, c, k=5, d=6, n_classes=7, dtype=torch.float64, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other channel of a wider map
        x = torch.randn(n, 2 * c, h, w, generator=gen, dtype=dtype)[:, ::2]
    proj_t = torch.randn(c, d, generator=gen, dtype=dtype) / c**0.5
    proj_bias = torch.randn(d, generator=gen, dtype=dtype) * 0.3  # some projections negative: the ReLU acts
    prototypes_t = torch.randn(d, k, generator=gen, dtype=dtype) * 3
    s_windows = _windows(h, w, 2, 2)
    x_windows = _windows(h, w, 3, 2, extra=[(0, h, 0, w)])
    width = _features(s_windows, k) + _features(x_windows, c)
    weight = torch.randn(n_classes, width, generator=gen, dtype=dtype)
    bias = torch.randn(n_classes, generator=gen, dtype=dtype)
    thresholds = torch.rand(n_classes, generator=gen) * 0.6 + 0.2
    return [x, proj_t, proj_bias, prototypes_t, s_windows, x_windows, weight, bias, thresholds, 1e-8]


def _assert_same(got, want, dtype, thresholds):
    logits, exit_, pred, conf = got
    r_logits, r_exit, r_pred, r_conf = want
    assert logits.dtype == dtype and exit_.dtype == torch.bool and pred.dtype == torch.int64
    assert conf.dtype == torch.float32
    torch.testing.assert_close(logits, r_logits, **TOL[dtype])
    torch.testing.assert_close(
        conf, r_conf, **(TOL[torch.float32] if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-6))
    )
    assert torch.equal(pred, r_pred)
    away = (r_conf - thresholds[r_pred]).abs() > 1e-4  # the decisions agree away from the thresholds
    assert away.float().mean() > 0.8 and torch.equal(exit_[away], r_exit[away])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("geometry", [(8, 8, 16), (4, 4, 9), (2, 2, 33), (5, 7, 3), (1, 1, 17), (3, 1, 20)])
def test_op_matches_twin(dtype, layout, geometry):
    h, w, c = geometry
    ops = _operands(13, h, w, c, dtype=dtype, layout=layout, seed=h * 100 + w * 10 + c)
    _assert_same(grid_plan_exit(*ops), grid_plan_exit_reference(*ops), dtype, ops[THR])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, k", [(32, 32), (16, 64), (64, 16), (32, 7), (5, 32), (48, 48)])
@pytest.mark.parametrize("geometry", [(8, 8, 24), (5, 7, 12), (2, 2, 40)])
def test_op_products_at_every_width(dtype, d, k, geometry):
    """D and K of the blocked products (16, 32, 64) and others, pixel counts that are not a whole number of
    row blocks, channel counts that are not a whole number of 8 x 8 transposes."""
    h, w, c = geometry
    ops = _operands(9, h, w, c, k=k, d=d, dtype=dtype, seed=d * 1000 + k * 10 + c)
    _assert_same(grid_plan_exit(*ops), grid_plan_exit_reference(*ops), dtype, ops[THR])


@st.composite
def _random_case(draw):
    """Any map size, channel counts and windows (repeated, overlapping, one-pixel), any layout of x."""
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n, c, k, d = (draw(st.integers(lo, hi)) for lo, hi in ((0, 5), (1, 40), (1, 33), (1, 33)))
    n_classes = draw(st.integers(1, 13))

    def windows():
        r = [sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2, unique=True))) for _ in range(2)]
        cols = [sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2, unique=True))) for _ in range(2)]
        return [(*r[i], *cols[i]) for i in range(2)]

    found = [windows() for _ in range(draw(st.integers(0, 4)))]
    s_windows = torch.tensor([win for pair in found for win in pair[:1]], dtype=torch.int64).reshape(-1, 4)
    x_windows = torch.tensor([win for pair in found for win in pair], dtype=torch.int64).reshape(-1, 4)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return n, h, w, c, k, d, n_classes, s_windows, x_windows, layout, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=_random_case())
def test_op_matches_twin_on_random_windows(case):
    n, h, w, c, k, d, n_classes, s_windows, x_windows, layout, dtype, seed = case
    ops = _operands(n, h, w, c, k=k, d=d, n_classes=n_classes, dtype=dtype, layout=layout, seed=seed)
    width = _features(s_windows, k) + _features(x_windows, c)
    ops[S_WIN], ops[X_WIN] = s_windows, x_windows
    ops[WEIGHT] = torch.randn(n_classes, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got, want = grid_plan_exit(*ops), grid_plan_exit_reference(*ops)
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    torch.testing.assert_close(got[3], want[3], rtol=1e-4 if dtype == torch.float32 else 1e-5, atol=1e-5)
    if dtype == torch.float64:  # (float32 rounding may swap two near-equal classes)
        assert torch.equal(got[2], want[2])


def test_op_empty_batch_and_nan():
    ops = _operands(0, 4, 4, 8)
    logits, exit_, pred, conf = grid_plan_exit(*ops)
    assert logits.shape == (0, 7) and exit_.shape == pred.shape == conf.shape == (0,)
    ops = _operands(3, 4, 4, 8)
    ops[X][1, 2, 1, 3] = float("nan")  # a NaN feature of sample 1: projection, pools and products carry it
    ops[X][2, 0, 0, 0] = float("nan")
    logits, exit_, pred, conf = grid_plan_exit(*ops)
    r_logits, r_exit, r_pred, r_conf = grid_plan_exit_reference(*ops)
    assert torch.isnan(logits[1:]).all() and not torch.isnan(logits[0]).any()
    assert torch.isnan(conf[1:]).all() and not exit_[1:].any()
    assert torch.equal(pred, r_pred) and torch.equal(exit_, r_exit)
    assert torch.equal(pred, torch.argmax(logits.float(), dim=1))


def test_op_relu_keeps_nan_and_zeroes_negatives():
    """A NaN projection stays NaN through the ReLU (as torch.relu), a negative one becomes 0."""
    ops = _operands(2, 2, 2, 4, k=3, d=16)
    ops[BIAS] = torch.full((16,), -1e6, dtype=torch.float64)  # every projection negative: u = 0, sim = 0
    logits, *_ = grid_plan_exit(*ops)
    torch.testing.assert_close(logits, grid_plan_exit_reference(*ops)[0], **TOL[torch.float64])
    ops[PROJ][0, 3] = float("nan")  # one projection channel NaN wherever x is non-zero
    logits, *_ = grid_plan_exit(*ops)
    assert torch.isnan(logits).all() and torch.isnan(grid_plan_exit_reference(*ops)[0]).all()


def test_op_thresholds_decide():
    ops = _operands(20, 4, 4, 8)
    ops[THR] = torch.zeros(7)  # everything exits
    assert grid_plan_exit(*ops)[1].all()
    ops[THR] = torch.full((7,), float("inf"))  # nothing does
    assert not grid_plan_exit(*ops)[1].any()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda o: o.__setitem__(S_WIN, torch.tensor([[0, 5, 0, 1]])), r"s_windows\[0\] = \(0, 5, 0, 1\) lies outside"),
        (lambda o: o.__setitem__(X_WIN, torch.tensor([[1, 1, 0, 2]])), r"x_windows\[0\] = \(1, 1, 0, 2\) lies outside"),
        (lambda o: o.__setitem__(WEIGHT, o[WEIGHT][:, 1:].contiguous()), r"cls_weight: expected \[7, "),
        (lambda o: o.__setitem__(X, o[X].half()), r"x: expected torch.float32 or torch.float64, got torch.float16"),
        (lambda o: o.__setitem__(BIAS, o[BIAS].float()), r"proj_bias: expected a contiguous tensor of x's dtype"),
        (lambda o: o.__setitem__(PROJ, o[PROJ].t()), r"proj_weight_t: expected a contiguous tensor"),
        (lambda o: o.__setitem__(PROJ, o[PROJ][:3].contiguous()), r"proj_weight_t: expected \[8, D\]"),
        (lambda o: o.__setitem__(PROTO, o[PROTO][:2].contiguous()), r"prototypes_t: expected \[6, K\]"),
        (lambda o: o.__setitem__(X, o[X][0]), r"x: expected a working map \[N, C, h, w\]"),
        (lambda o: o.__setitem__(THR, o[THR][:3]), r"thresholds: expected a contiguous torch.float32 tensor \[7\]"),
        (lambda o: o.__setitem__(S_WIN, o[S_WIN].int()), r"s_windows: expected a contiguous int64 CPU tensor \[W, 4\]"),
    ],
)
def test_op_errors(change, message):
    ops = _operands(2, 4, 4, 8)
    change(ops)
    with pytest.raises(RuntimeError, match=message):
        grid_plan_exit(*ops)


def _head(c, n_classes=10, seed=0, **kwargs):
    torch.manual_seed(seed)
    head = GridPrototypeHead(c, n_classes, **kwargs)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    return head.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    "shape, sizes",
    [
        ((64, 8, 8), {}),
        ((128, 4, 4), {}),
        ((256, 2, 2), {}),
        ((24, 16, 16), {}),  # pooled to the 8 x 8 working map first
        ((12, 5, 7), {"grid": 3, "feature_grid": 2}),
        ((10, 3, 3), {"grid": 2, "feature_grid": 4, "max_size": 3}),
    ],
)
def test_plan_exit_matches_reference(dtype, layout, shape, sizes):
    c, h, w = shape
    folded = _head(c, **sizes).fold().to(dtype)
    features = torch.randn(9, c, h, w, dtype=dtype).contiguous(memory_format=layout)
    thresholds = torch.rand(10) * 0.5 + 0.3
    plan = folded.plan(features)
    assert plan.fused
    got = plan.exit(features, thresholds)
    logits = grid_head_reference(features, *folded.operands(), folded.grid, folded.feature_grid, folded.max_size)
    _assert_same(got, (logits, *exit_decision_reference(logits, thresholds)), dtype, thresholds)


def test_plan_exit_empty_batch_and_other_dtypes():
    folded = _head(32).fold()
    logits, exit_, _, _ = folded.plan(torch.randn(0, 32, 4, 4)).exit(torch.randn(0, 32, 4, 4), torch.zeros(10))
    assert logits.shape == (0, 10) and exit_.shape == (0,)
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit inputs keep the plan and the reference exit rule
        features = torch.randn(2, 32, 4, 4, dtype=dtype)
        plan = folded.to(dtype).plan(features)
        assert not plan.fused
        with pytest.raises(RuntimeError, match="this plan has no C\\+\\+ exit path"):
            plan.exit(features, torch.zeros(10))


@pytest.mark.parametrize("kernel", [True, False])
def test_cascade_on_cpu_with_and_without_the_op(monkeypatch, kernel):
    """Cascade (the C++ exit path, or the plan and the exit rule where the op does not run) == ReferenceCascade."""
    monkeypatch.setattr(grid_plan_module, "_cpu_kernel", lambda: kernel)
    torch.manual_seed(0)
    stages = [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)]
    stages.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)))
    heads = [_head(16, seed=1), _head(16, seed=2)]
    ref = ReferenceCascade([s.double() for s in stages], [h.double() for h in heads], n_classes=10).eval()
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        sim = ref.simulate(x)
        conf = torch.softmax(sim.branch_logits.float(), dim=2).amax(dim=2)
        ref.set_thresholds(torch.stack([c.quantile(0.6).expand(10) for c in conf]) + 1e-4)
        fast = Cascade.from_reference(ref)
        assert fast.folded_head(0, x.device).plan(ref.stages[0](x)).fused == kernel
        out, want = fast(x), ref(x)
    assert 0 < int((want.exit_index < 3).sum()) < 40
    assert torch.equal(out.exit_index, want.exit_index)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-10, atol=1e-10)


def _update(kind, ref, fast):
    """One change to the cascades' shared heads (or to both cascades' thresholds)."""
    head = ref.heads[0]
    with torch.no_grad():
        if kind == "in place":
            head.classifier.bias.add_(1.0)
        elif kind == "parameter":
            head.classifier.bias = torch.nn.Parameter(head.classifier.bias + 1.0)
        elif kind == "submodule":
            head.classifier = torch.nn.Linear(head.classifier.in_features, 10).double()
        elif kind == "head":
            new = _head(16, seed=7).double()
            ref.heads[0], fast.heads[0] = new, new
        elif kind == "dtype":
            ref.float()  # the shared stages and heads: their tensors are replaced under the same Parameters
        elif kind == "thresholds":
            for c in (ref, fast):
                c.set_thresholds(torch.cat([torch.full((1, 10), float("inf")), torch.zeros(1, 10)]))
        else:  # thresholds modified in place
            for c in (ref, fast):
                c.thresholds[0].fill_(float("inf"))


@pytest.mark.parametrize(
    "kind", ["in place", "parameter", "submodule", "head", "dtype", "thresholds", "thresholds in place"]
)
def test_cascade_sees_every_update(kind):
    """Cascade caches each branch's folded head, plans and threshold row: any change to what they come from
    (a weight modified or replaced, a submodule or head replaced, a cast, new or modified thresholds) is seen."""
    torch.manual_seed(0)
    stages = [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)]
    stages.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)))
    heads = [_head(16, seed=1).double(), _head(16, seed=2).double()]
    ref = ReferenceCascade([s.double() for s in stages], heads, torch.zeros(2, 10)).eval()  # all exit at branch 1
    fast = Cascade.from_reference(ref)
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    first = fast(x)
    assert fast._branches[0].plan(ref.stages[0](x)).fused and (first.exit_index == 1).all()
    _update(kind, ref, fast)
    x = x.float() if kind == "dtype" else x
    got, want = fast(x), ref(x)
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    if kind == "dtype":  # the same head, refolded in float32
        assert got.logits.dtype == torch.float32 and fast._branches[0].folded.cls_weight.dtype == torch.float32
    else:
        assert not torch.allclose(got.logits, first.logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("width", [16, 32])
def test_op_at_narrower_vector_widths(width):
    """The products and transposes at every vector width the op picks from (64 bytes with AVX-512, 32 with
    AVX2, 16 otherwise), on any machine: CALEXNET_CPU_VECTOR_BYTES narrows the width in a fresh process."""
    script = textwrap.dedent(
        """
        import torch, test_grid_plan_exit as t
        for dtype in (torch.float32, torch.float64):
            for d, k in ((32, 32), (16, 64), (64, 16), (5, 32)):
                for h, w, c in ((8, 8, 24), (5, 7, 12), (2, 2, 40)):
                    ops = t._operands(9, h, w, c, k=k, d=d, dtype=dtype, seed=d + k + c)
                    t._assert_same(t.grid_plan_exit(*ops), t.grid_plan_exit_reference(*ops), dtype, ops[t.THR])
        print("ok")
        """
    )
    env = {**os.environ, "CALEXNET_CPU_VECTOR_BYTES": str(width), "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
