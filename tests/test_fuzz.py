"""Fuzz suite: every public op and module, on awkward inputs, against plain-PyTorch / float64 oracles.

Targets (the entry points as a user calls them; each case also calls the reference twin where there is one,
which must give the same classification): ``ops.compact``, ``ops.scatter_rows_``, ``ops.scatter_rows``,
``kernels.exit_decision``, ``kernels.proto_head_exit`` (on CPU their kernel is the reference; the Triton
interpreter is too slow to fuzz), ``PrototypePoolingHead`` (and its ``fold()``), ``FoldedPrototypeHead``,
``ReferenceCascade`` and ``Cascade`` (``forward`` and ``decide(simulate(x))``), ``cpm_thresholds``,
``calibrate`` and ``calibrate_sweep``.

Every case is classified against an oracle written here from the documented semantics:

* **correct**: the oracle accepts the input and the result matches it (bitwise for the data-movement ops
  and the calibration thresholds; within a float64 error bound for the heads; discrete outputs exact away
  from ties);
* **clear error**: the oracle refuses the input and the call raises ``ValueError`` / ``RuntimeError`` whose
  message names the offending argument and says what was expected and what was given, without writing
  anything first.

Anything else fails the test: a wrong result, an invalid input accepted, an error that does not name the
argument, another exception type, a write before an error, a crash. Inputs include empty batches,
non-contiguous / channels_last / expanded / overlapping / aliased tensors, wrong dtypes and devices (meta),
NaN and infinities, duplicate and out-of-range indices, float16 and bfloat16.

Hypothesis runs derandomized (a fixed seed per test), with ``CALEXNET_FUZZ_EXAMPLES`` cases per target
(default 100: a few seconds, so CI stays fast); ``CALEXNET_FUZZ_REPORT=path.json`` writes the tally per
target. The long run and its result are in docs/fuzz.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from calexnet_fast import Cascade, ReferenceCascade, ops
from calexnet_fast.calibration import calibrate, calibrate_sweep, cpm_thresholds
from calexnet_fast.exit_rule import exit_decision_reference
from calexnet_fast.heads import FoldedPrototypeHead, PrototypePoolingHead
from calexnet_fast.kernels import exit_decision, proto_head_exit
from calexnet_fast.reference import (
    compact_reference,
    proto_head_exit_reference,
    scatter_rows__reference,
    scatter_rows_reference,
)

EXAMPLES = int(os.environ.get("CALEXNET_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ALL_DTYPES = (*FLOATS, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
LAYOUTS = ("contiguous", "contiguous", "strided", "permuted", "channels_last", "expanded", "overlapping", "offset")
SEEDS = st.integers(0, 2**31 - 1)
INF = math.inf

# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------

TALLY: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    keys = ("cases", "correct", "clear_error", "meta_shape_only", "conservative_refusal")
    rows = {target: {k: c[k] for k in keys} for target, c in sorted(TALLY.items())}
    path = os.environ.get("CALEXNET_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"examples_per_target": EXAMPLES, "targets": rows}, f, indent=2)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for target, r in rows.items():
            reporter.write_line(f"fuzz {target:32s} " + " ".join(f"{k} {v}" for k, v in r.items()))


@dataclass
class Invalid:
    """The oracle refuses the input: a clear error naming one of ``names`` is the right answer."""

    names: tuple[str, ...]
    why: str


@dataclass
class MayRefuse:
    """Either ``check`` passes on the result, or a clear error names one of ``names`` (a documented
    conservative refusal)."""

    check: Callable[[Any], None]
    names: tuple[str, ...]


def names_argument(message: str, name: str) -> bool:
    """``name: ...`` (the package's convention, also ``name[3]:`` and ``a, name:``) or ``argument 'name'``
    (torch's schema errors)."""
    n = re.escape(name)
    return bool(re.search(rf"(^|[\s(,]){n}(\[\d+\])?(, \w+)*:", message) or re.search(rf"argument '{n}'", message))


def is_clear(e: BaseException, names: tuple[str, ...]) -> bool:
    msg = str(e)
    return (
        isinstance(e, (ValueError, RuntimeError))
        and any(names_argument(msg, n) for n in names)
        and re.search("expected", msg, re.I) is not None
        and re.search(r"\b(got|found|given)\b", msg, re.I) is not None
    )


def root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def run_case(
    target: str, call: Callable[[], Any], expect, *, untouched: tuple[torch.Tensor, ...] = (), meta: bool = False
) -> None:
    """Run one case and classify it; anything but correct / clear error raises ``AssertionError``.

    Args:
        expect: an :class:`Invalid`, a :class:`MayRefuse`, or a check of the result (raises when wrong).
        untouched: tensors that an error must leave as they were (nothing written before raising).
        meta: a valid case on meta tensors (only shapes, dtypes and devices can be checked; tallied apart).
    """
    tally = TALLY[target]
    tally["cases"] += 1
    before = [(t, t.clone()) for t in untouched if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    try:
        result = call()
    except Exception as e:
        names = expect.names if isinstance(expect, (Invalid, MayRefuse)) else ()
        if not names:
            raise AssertionError(f"{target}: refused a valid input with {type(e).__name__}: {e}") from e
        if not is_clear(e, names):
            why = f" ({expect.why})" if isinstance(expect, Invalid) else ""
            raise AssertionError(
                f"{target}: unclear error{why}: expected ValueError/RuntimeError naming one of {names} with "
                f"'expected ... got ...', got {type(e).__name__}: {e}"
            ) from e
        for t, snapshot in before:
            assert same(t, snapshot), f"{target}: wrote into an argument before raising {type(e).__name__}: {e}"
        tally["clear_error"] += 1
        tally["conservative_refusal"] += isinstance(expect, MayRefuse)
        return
    if isinstance(expect, Invalid):
        raise AssertionError(f"{target}: accepted an invalid input ({expect.why}) and returned {result!r}")
    (expect.check if isinstance(expect, MayRefuse) else expect)(result)
    tally["correct"] += 1
    tally["meta_shape_only"] += meta


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values (``-0.0 == 0.0``; for gradients, where ``g * 0`` may be either)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, device and bits (NaN payloads and signed zeros included); values only on meta."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.device.type == "meta":
        return True
    if a.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def filled(seed: int, shape, dtype: torch.dtype, *, scale: float = 1.0, specials: float = 0.0, ties: bool = False):
    """A tensor of ``shape``: normal floats times ``scale`` (small integers with ``ties``), a fraction
    ``specials`` of NaN / +inf / -inf; integers in [0, 100); random bools."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    if ties:
        t = torch.randint(-2, 3, shape, generator=g).double() * scale
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials:
        r = torch.rand(shape, generator=g, dtype=torch.float64)
        t = torch.where(r < specials / 3, math.nan, t)
        t = torch.where((r >= specials / 3) & (r < 2 * specials / 3), INF, t)
        t = torch.where((r >= 2 * specials / 3) & (r < specials), -INF, t)
    return t.to(dtype)


def lay(kind: str, t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` in another memory layout. ``expanded`` and ``overlapping`` change the values (rows repeat or
    share elements); callers use what the returned tensor holds."""
    g = torch.Generator().manual_seed(seed)
    if kind == "strided" and t.dim() >= 1:
        d = int(torch.randint(0, t.dim(), (1,), generator=g))
        big = torch.zeros([s * 2 if i == d else s for i, s in enumerate(t.shape)], dtype=t.dtype)
        view = big[(slice(None),) * d + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    if kind == "permuted" and t.dim() >= 2:
        perm = torch.randperm(t.dim(), generator=g).tolist()
        inverse = sorted(range(t.dim()), key=perm.__getitem__)
        return t.permute(perm).contiguous().permute(inverse)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "expanded" and t.dim() >= 1:
        d = int(torch.randint(0, t.dim(), (1,), generator=g))
        return t.narrow(d, 0, min(1, t.shape[d])).expand(t.shape)
    if kind == "overlapping" and t.dim() >= 1 and t.numel() > 0:
        row = t[0].numel()
        step = row // 2  # consecutive rows share half their elements (row == 1: stride 0)
        size = (t.shape[0] - 1) * step + row
        inner = torch.empty(t.shape[1:]).stride()
        return t.reshape(-1)[:size].clone().as_strided(t.shape, (step, *inner))
    if kind == "random_strides" and t.dim() >= 1 and t.numel() > 0:
        strides = torch.randint(0, 7, (t.dim(),), generator=g).tolist()
        size = 1 + sum((s - 1) * st_ for s, st_ in zip(t.shape, strides, strict=True))
        base = filled(seed, (size,), t.dtype)
        return base.as_strided(t.shape, strides)
    if kind == "offset":
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype)
        view = buf[3:].view(t.shape)
        view.copy_(t)
        return view
    return t


def shares_memory(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` are the same memory (exact: every element's offset is enumerated)."""
    if t.numel() <= 1:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.unique().numel() != t.numel()


def first_argmax(z: torch.Tensor) -> torch.Tensor:
    """[N] index of the first maximum of each row of ``z`` (float64), a NaN counting as the maximum."""
    nan = torch.isnan(z)
    peak = torch.where(nan, -INF, z).amax(1, keepdim=True) if z.shape[1] else z[:, :1]
    first_peak = (z == peak).to(torch.uint8).argmax(1)
    return torch.where(nan.any(1), nan.to(torch.uint8).argmax(1), first_peak)


def softmax_conf64(z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """[N] float64 maximum softmax probability of ``z`` (float64) at ``pred``, NaN as IEEE gives it."""
    top = z.gather(1, pred.view(-1, 1))
    return 1.0 / torch.exp(z - top).sum(1)


def check_exit_triple(result, logits: torch.Tensor, thresholds: torch.Tensor, n: int, device) -> None:
    """``(exit, pred, conf)`` is the exit rule on ``logits``: pred exact, conf within float32 rounding of
    the float64 softmax, exit exactly ``conf >= thresholds[pred]`` in float32 (NaN never exits)."""
    exit_, pred, conf = result
    assert exit_.dtype == torch.bool and pred.dtype == torch.int64 and conf.dtype == torch.float32
    assert exit_.shape == pred.shape == conf.shape == (n,)
    assert exit_.device == pred.device == conf.device == torch.device(device)
    if torch.device(device).type == "meta":
        return
    z = logits.detach().float().double()
    want_pred = first_argmax(z)
    assert torch.equal(pred, want_pred), (pred, want_pred, z)
    want_conf = softmax_conf64(z, want_pred)
    nan = torch.isnan(want_conf)
    assert torch.equal(torch.isnan(conf), nan), (conf, want_conf)
    assert bool(((conf.double() - want_conf).abs()[~nan] <= 2e-6).all()), (conf, want_conf)
    want_exit = conf >= thresholds.detach().float()[pred]
    assert torch.equal(exit_, want_exit), (exit_, conf, thresholds)


def fault_strategy(*faults: str):
    """One fault (an invalid argument) per case, or ``"none"`` (a valid case) half of the time."""
    return st.sampled_from(("none",) * len(faults) + faults)


# --------------------------------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------------------------------

COMPACT_FAULTS = (
    "mask_dtype",
    "mask_2d",
    "mask_length",
    "x_0d",
    "mask_meta",
    "x_meta",
    "both_meta",
    "x_not_tensor",
    "mask_not_tensor",
)


@FUZZ
@given(data=st.data())
def test_compact(data):
    d = data.draw
    dtype = d(st.sampled_from(ALL_DTYPES))
    shape = (d(st.integers(0, 8)), *d(st.lists(st.integers(0, 4), max_size=3)))
    x = lay(d(st.sampled_from(LAYOUTS)), filled(d(SEEDS), shape, dtype, specials=0.2), d(SEEDS))
    p = d(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    mask = torch.rand(shape[0], generator=torch.Generator().manual_seed(d(SEEDS))) < p
    fault = d(fault_strategy(*COMPACT_FAULTS))
    expect: Any
    if fault == "mask_dtype":
        mask, expect = mask.to(d(st.sampled_from([torch.uint8, torch.int64, torch.float32]))), Invalid(("mask",), fault)
    elif fault == "mask_2d":
        mask, expect = mask.view(-1, 1), Invalid(("mask",), fault)
    elif fault == "mask_length":
        length = shape[0] + d(st.sampled_from([-1, 1, 2] if shape[0] else [1, 2]))
        mask, expect = torch.ones(length, dtype=torch.bool), Invalid(("mask",), fault)
    elif fault == "x_0d":
        x, expect = torch.tensor(1.0), Invalid(("x", "mask"), fault)
    elif fault == "mask_meta":
        mask, expect = mask.to("meta"), Invalid(("mask",), fault)
    elif fault == "x_meta":
        x, expect = x.to("meta"), Invalid(("x", "mask"), fault)
    elif fault == "both_meta":  # the row count depends on the mask's values, which a meta tensor has not
        x, mask, expect = x.to("meta"), mask.to("meta"), Invalid(("x", "mask"), fault)
    elif fault == "x_not_tensor":
        x, expect = x.tolist(), Invalid(("x",), fault)
    elif fault == "mask_not_tensor":
        mask, expect = mask.tolist(), Invalid(("mask",), fault)
    else:
        x0, m0 = x.clone(), mask.clone()
        grad = dtype in (torch.float32, torch.float64) and d(st.booleans())
        if grad:
            x = x.detach().requires_grad_()  # compact is differentiable: rows' gradient lands at their positions

        def expect(result, x=x):
            rows, index = result
            if grad:
                g_rows = torch.randn(rows.shape, dtype=rows.dtype)
                (g_x,) = torch.autograd.grad(rows, x, g_rows)
                want = torch.zeros(x.shape, dtype=x.dtype)
                want[m0] = g_rows
                assert equal(g_x, want), "compact: wrong gradient"
                rows = rows.detach()
            assert same(index, m0.nonzero().view(-1))
            assert same(rows, x0[m0])
            assert same(x, x0)  # x is not modified
            keep_cl = (
                x.dim() == 4
                and x.shape[0] > 0
                and x[:1].is_contiguous(memory_format=torch.channels_last)
                and not x[:1].is_contiguous()
            )
            fmt = torch.channels_last if keep_cl else torch.contiguous_format
            assert rows.is_contiguous(memory_format=fmt), (rows.shape, rows.stride(), fmt)
            if rows.numel():
                assert rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a new tensor

    run_case("compact", lambda: ops.compact(x, mask), expect)
    run_case("compact_reference", lambda: compact_reference(x, mask), expect)


# --------------------------------------------------------------------------------------------------
# scatter_rows_ / scatter_rows
# --------------------------------------------------------------------------------------------------

SCATTER_FAULTS = (
    "index_dtype",
    "index_2d",
    "index_high",
    "index_low",
    "index_length",
    "src_dtype",
    "src_trailing",
    "src_dim",
    "out_0d",
    "one_meta",
    "all_meta",
    "src_not_tensor",
    "index_not_tensor",
)


def _scatter_case(d):
    """(out, src, index, fault names, why) for one scatter case; ``out`` may be a view, ``src`` may alias it."""
    dtype = d(st.sampled_from(ALL_DTYPES))
    rows = d(st.integers(0, 7))
    trailing = tuple(d(st.lists(st.integers(0, 3), max_size=2)))
    out_kind = d(st.sampled_from((*LAYOUTS, "random_strides")))
    out = lay(out_kind, filled(d(SEEDS), (rows, *trailing), dtype, specials=0.2), d(SEEDS))
    n = d(st.integers(0, 6)) if rows else d(st.sampled_from([0, 0, 0, 1, 2]))
    g = torch.Generator().manual_seed(d(SEEDS))
    span = max(1, d(st.integers(1, max(1, rows))))  # small spans give duplicates
    index = torch.randint(0, span, (n,), generator=g) if rows else torch.full((n,), 0, dtype=torch.int64)
    names: tuple[str, ...] = ()
    if rows == 0 and n:
        names = ("index",)  # no row to write into: any index is out of range
    src_kind = d(st.sampled_from(["fresh", "fresh", "alias", "alias_flip", "index_alias"]))
    if src_kind == "alias" and n <= rows:
        src = out.narrow(0, d(st.integers(0, rows - n)), n)
    elif src_kind == "alias_flip" and n <= rows:
        src = out.flip(0)[:n]  # a copy (flip), of out's rows
    elif (
        src_kind == "index_alias" and dtype == torch.int64 and not trailing and 0 < n <= rows and not shares_memory(out)
    ):
        out.copy_(torch.randint(0, rows, (rows,), generator=g))
        index, src = out[:n], out.flip(0)[:n]  # index is a view of out: read as it was before the call
    else:
        src = lay(d(st.sampled_from(LAYOUTS)), filled(d(SEEDS), (n, *trailing), dtype, specials=0.2), d(SEEDS))
    fault = d(fault_strategy(*SCATTER_FAULTS))
    if fault == "index_dtype":
        index = index.to(d(st.sampled_from([torch.int32, torch.float32, torch.uint8])))
        names += ("index",)
    elif fault == "index_2d":
        index, names = index.view(-1, 1), names + ("index", "src")
    elif fault == "index_high" and n:
        index = index.clone()
        index[d(st.integers(0, n - 1))] = rows + d(st.integers(0, 3))
        names += ("index",)
    elif fault == "index_low" and n:
        index = index.clone()
        index[d(st.integers(0, n - 1))] = -1 - d(st.integers(0, 3))
        names += ("index",)
    elif fault == "index_length":
        index, names = torch.cat([index, torch.zeros(1, dtype=torch.int64)]), names + ("index",)
    elif fault == "src_dtype":
        other = d(st.sampled_from([t for t in ALL_DTYPES if t != dtype]))
        src, names = src.to(other), names + ("src",)
    elif fault == "src_trailing":
        src, names = torch.zeros((n, *trailing, 2), dtype=dtype), names + ("out", "src")
    elif fault == "src_dim" and trailing:
        src, names = torch.zeros((n, *trailing[:-1], trailing[-1] + 1), dtype=dtype), names + ("out", "src")
    elif fault == "out_0d":
        out, names = torch.zeros((), dtype=dtype), names + ("out",)
    elif fault == "one_meta":
        which = d(st.sampled_from(["out", "src", "index"]))
        out, src, index = (t.to("meta") if w == which else t for t, w in ((out, "out"), (src, "src"), (index, "index")))
        names += ("out", "src", "index")
    elif fault == "all_meta":
        out, src, index = out.to("meta"), src.to("meta"), index.to("meta")
        names = tuple(n_ for n_ in names if n_ != "index")  # a meta index has no values to check
    elif fault == "src_not_tensor":
        src, names = src.tolist(), names + ("src",)
    elif fault == "index_not_tensor":
        index, names = index.tolist(), names + ("index",)
    return out, src, index, names, fault, out_kind


def _scatter_expected(out_values: torch.Tensor, src_values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[index[j]] = src[j]`` one write after the other (the last duplicate wins)."""
    for j, i in enumerate(index.tolist()):
        out_values[i] = src_values[j]
    return out_values


@FUZZ
@given(data=st.data())
def test_scatter_rows_in_place(data):
    out, src, index, names, fault, out_kind = _scatter_case(data.draw)
    if out.dim() >= 1 and shares_memory(out):
        names += ("out",)  # writing one element of out would change another
    base = root(out)
    base0 = base.clone() if base.device.type != "meta" else None
    for target, fn in (("scatter_rows_", ops.scatter_rows_), ("scatter_rows__reference", scatter_rows__reference)):
        if base0 is not None:
            base.copy_(base0)  # as before the previous call (src and index may be views of out)
        expect: Any
        if names:
            expect = Invalid(names, fault if fault != "none" else "out elements share memory")
        elif out.device.type == "meta":

            def expect(result, out=out):
                assert result is out and result.device.type == "meta"
        else:
            want = base0.clone()
            view = want.as_strided(out.shape, out.stride(), out.storage_offset() - base.storage_offset())
            _scatter_expected(view, src.clone(), index.clone())

            def expect(result, out=out, base=base, want=want):
                assert result is out
                assert same(base, want), "scatter_rows_ wrote the wrong rows (or outside out)"

        if not names and out_kind == "random_strides":
            expect = MayRefuse(expect, ("out",))
        valid_meta = not names and out.device.type == "meta"
        run_case(target, lambda fn=fn: fn(out, src, index), expect, untouched=(base,), meta=valid_meta)


@FUZZ
@given(data=st.data())
def test_scatter_rows_out_of_place(data):
    out, src, index, names, fault, _ = _scatter_case(data.draw)
    grad = not names and out.dtype in (torch.float32, torch.float64) and data.draw(st.booleans())
    if grad:  # scatter_rows is differentiable (leaves that keep the layouts and the aliasing)
        out, src = out.detach().requires_grad_(), src.detach().requires_grad_()
    base = root(out)
    for target, fn in (("scatter_rows", ops.scatter_rows), ("scatter_rows_reference", scatter_rows_reference)):
        expect: Any
        if names:
            expect = Invalid(names, fault)
        elif out.device.type == "meta":

            def expect(result, out=out):
                assert result.shape == out.shape and result.dtype == out.dtype and result.device.type == "meta"
        else:
            base0, out0, src0, index0 = base.detach().clone(), out.detach().clone(), src.detach().clone(), index.clone()

            def expect(result, out=out, base=base, base0=base0, out0=out0, src0=src0, index0=index0):
                if grad:  # the gradient reaches the rows of out not written, and the src rows that won
                    g = torch.randn(result.shape, dtype=result.dtype)
                    grads = torch.autograd.grad(result, (out, src), g, allow_unused=True)
                    g_out, g_src = (torch.zeros_like(t) if t_g is None else t_g for t, t_g in zip((out, src), grads))
                    written = torch.zeros(out.shape[0], dtype=torch.bool)
                    written[index0] = True
                    want_out = g.masked_fill(written.view(-1, *[1] * (out.dim() - 1)), 0.0)
                    winner = {i: j for j, i in enumerate(index0.tolist())}  # the last occurrence wins
                    want_src = torch.zeros(src0.shape, dtype=g.dtype)
                    for i, j in winner.items():
                        want_src[j] = g[i]
                    assert equal(g_out, want_out) and equal(g_src, want_src), "scatter_rows: wrong gradient"
                    result = result.detach()
                assert same(result, _scatter_expected(out0.clone(), src0, index0))
                assert same(base.detach(), base0), "scatter_rows modified out"
                if result.numel():
                    assert result.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()

        valid_meta = not names and out.device.type == "meta"
        run_case(target, lambda fn=fn: fn(out, src, index), expect, untouched=(base.detach(),), meta=valid_meta)


# --------------------------------------------------------------------------------------------------
# exit_decision
# --------------------------------------------------------------------------------------------------

EXIT_FAULTS = (
    "logits_1d",
    "logits_3d",
    "logits_int",
    "no_class",
    "thresholds_length",
    "thresholds_2d",
    "thresholds_int",
    "thresholds_list",
    "one_meta",
    "all_meta",
    "logits_not_tensor",
)


def _thresholds(d, logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class thresholds: special values, random ones, and the float32 confidence of a row (exact ties)."""
    z = logits.detach().float()
    confs = torch.softmax(z, 1).amax(1).tolist() if z.numel() else []
    choices = [-INF, 0.0, 0.5, 1.0, INF, math.nan]
    values = []
    for _ in range(n_classes):
        kind = d(st.sampled_from(["special", "random", "tie", "tie"]))
        if kind == "tie" and confs:
            values.append(confs[d(st.integers(0, len(confs) - 1))])
        elif kind == "special":
            values.append(d(st.sampled_from(choices)))
        else:
            values.append(d(st.floats(0, 1)))
    return torch.tensor(values, dtype=torch.float64).to(d(st.sampled_from(FLOATS)))


@FUZZ
@given(data=st.data())
def test_exit_decision(data):
    d = data.draw
    dtype = d(st.sampled_from(FLOATS))
    n, c = d(st.integers(0, 8)), d(st.integers(1, 6))
    scale = d(st.sampled_from([1.0, 10.0, 1e4])) if dtype != torch.float16 else d(st.sampled_from([1.0, 10.0]))
    logits = filled(
        d(SEEDS), (n, c), dtype, scale=scale, specials=d(st.sampled_from([0.0, 0.1, 0.3])), ties=d(st.booleans())
    )
    logits = lay(d(st.sampled_from(LAYOUTS)), logits, d(SEEDS))
    thresholds = lay(d(st.sampled_from(["contiguous", "strided", "expanded"])), _thresholds(d, logits, c), d(SEEDS))
    fault = d(fault_strategy(*EXIT_FAULTS))
    expect: Any = Invalid(("logits",), fault)
    if fault == "logits_1d":
        logits = logits.reshape(-1)
    elif fault == "logits_3d":
        logits = logits.unsqueeze(0)
    elif fault == "logits_int":
        logits = logits.nan_to_num(0, 0, 0).to(torch.int64)
    elif fault == "no_class":
        logits, thresholds = logits[:, :0], thresholds[:0]
    elif fault == "logits_not_tensor":
        logits = logits.tolist()
    elif fault == "thresholds_length":
        thresholds, expect = (
            torch.cat([thresholds, thresholds])[: c + d(st.sampled_from([-1, 1]))],
            Invalid(("thresholds",), fault),
        )
    elif fault == "thresholds_2d":
        thresholds, expect = thresholds.view(1, -1), Invalid(("thresholds",), fault)
    elif fault == "thresholds_int":
        thresholds, expect = torch.zeros(c, dtype=torch.int64), Invalid(("thresholds",), fault)
    elif fault == "thresholds_list":
        thresholds, expect = thresholds.tolist(), Invalid(("thresholds",), fault)
    elif fault == "one_meta":
        if d(st.booleans()):
            logits = logits.to("meta")
        else:
            thresholds = thresholds.to("meta")
        expect = Invalid(("logits", "thresholds"), fault)
    else:
        if fault == "all_meta":
            logits, thresholds = logits.to("meta"), thresholds.to("meta")
        logits0, thr0, device = logits.clone(), thresholds.clone(), logits.device

        def expect(result):
            check_exit_triple(result, logits0, thr0, n, device)

    meta = fault == "all_meta"
    run_case("exit_decision", lambda: exit_decision(logits, thresholds), expect, meta=meta)
    op = torch.ops.calexnet_fast.exit_decision
    run_case("torch.ops exit_decision", lambda: op(logits, thresholds), expect, meta=meta)
    if fault in ("none", "all_meta"):  # the twin's contract is the valid inputs
        run_case("exit_decision_reference", lambda: exit_decision_reference(logits, thresholds), expect, meta=meta)


# --------------------------------------------------------------------------------------------------
# the prototype heads: a float64 oracle with an error bound
# --------------------------------------------------------------------------------------------------


def cosine_floor(dtype: torch.dtype) -> float:
    """The documented norm floor of the heads' cosine: 1e-8, float16's smallest normal in float16."""
    return 2.0**-14 if dtype == torch.float16 else 1e-8


def head_oracle(x, a, a_abs, p, cw, cb, eps: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a folded prototype head in float64 and a first-order bound of the error of computing them
    with unit roundoff ``eps``.

    Args:
        x: [N, HW, C] float64 features.  a: [N, HW, D] float64 pre-ReLU projection; a_abs: the same computed
            on absolute values (the size of the rounding errors).  p: [K, D] gamma-scaled unit prototypes.
        cw, cb: classifier weight [n_classes, 2K + D] and bias.
    """
    hw, d = a.shape[1], a.shape[2]
    k = p.shape[0]
    err_a = (x.shape[2] + 8) * eps * a_abs
    u = a.clamp_min(0)
    err_u = torch.where(torch.isneginf(a) | (a < -err_a), 0.0, err_a)  # clearly negative: ReLU gives exactly 0
    norm = torch.linalg.vector_norm(u, dim=2, keepdim=True).clamp_min(floor)
    s = (u @ p.t()) / norm  # [N, HW, K]
    pn = torch.linalg.vector_norm(p, dim=1)  # |s| <= ||p_k||
    eu = torch.linalg.vector_norm(err_u, dim=2, keepdim=True)
    err_s = torch.minimum(2 * eu * pn / norm, 2 * pn) + (d + 6) * eps * pn
    feats = torch.cat([s.amax(1), s.mean(1), u.mean(1)], dim=1)
    err_f = torch.cat(
        [
            err_s.amax(1),
            err_s.amax(1) + hw * eps * s.abs().amax(1),
            err_u.amax(1) + hw * eps * u.amax(1),
        ],
        dim=1,
    )
    f_abs = torch.cat([s.abs().amax(1), s.abs().mean(1), u.mean(1)], dim=1)
    logits = feats @ cw.t() + cb
    bound = err_f @ cw.abs().t() + (2 * k + d + 4) * eps * (f_abs @ cw.abs().t() + cb.abs())
    return logits, bound


def folded_oracle(features, w, b, p, cw, cb, eps: float, floor: float):
    """:func:`head_oracle` for a folded head's buffers."""
    f = features.detach().double()
    n, c, h, wd = f.shape
    x = f.reshape(n, c, h * wd).transpose(1, 2)
    w, b = w.detach().double(), b.detach().double()
    a = x @ w.t() + b
    a_abs = x.abs() @ w.abs().t() + b.abs()
    return head_oracle(x, a, a_abs, p.detach().double(), cw.detach().double(), cb.detach().double(), eps, floor)


def module_oracle(head: PrototypePoolingHead, features: torch.Tensor, eps: float):
    """:func:`head_oracle` for the module (BN with its running statistics, prototypes normalised here)."""
    f = features.detach().double()
    n, c, h, wd = f.shape
    x = f.reshape(n, c, h * wd).transpose(1, 2)
    dt = head.proj.weight.dtype
    w = head.proj.weight.detach().double().flatten(1)
    bn = head.bn
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    mean, beta = bn.running_mean.double(), bn.bias.detach().double()
    a = (x @ w.t() - mean) * scale + beta
    a_abs = (x.abs() @ w.abs().t() + mean.abs()) * scale.abs() + beta.abs()
    protos = head.prototypes.detach().double()
    unit = protos / torch.linalg.vector_norm(protos, dim=1, keepdim=True).clamp_min(cosine_floor(dt))
    p = head.gamma.detach().double() * unit
    cls = head.classifier
    return head_oracle(x, a, a_abs, p, cls.weight.detach().double(), cls.bias.detach().double(), eps, cosine_floor(dt))


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """NaN where the oracle is NaN, the same infinity where it is infinite, else within 4 x the bound."""
    got = got.detach().double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), (what, got, want)
    finite = torch.isfinite(want)
    assert bool(torch.isfinite(got[finite]).all()), (what, got, want)
    tol = (4 * bound).nan_to_num(nan=INF)[finite] + 1e-30
    err = (got[finite] - want[finite]).abs()
    assert bool((err <= tol).all()), (what, float((err / tol).max()), got, want)


def within(dtype: torch.dtype, shape: tuple[int, ...], want: torch.Tensor, bound: torch.Tensor, what: str):
    """The check of a head's output: its dtype and shape, then :func:`assert_within` the oracle."""

    def expect(out):
        assert out.dtype == dtype and out.shape == shape, (what, out.dtype, out.shape)
        assert_within(out, want, bound, what)

    return expect


def exactly_float32(want: torch.Tensor):
    """The check of a float32 result that must equal the oracle ``want`` to the bit (CPM thresholds)."""

    def expect(out):
        assert out.dtype == torch.float32 and out.shape == want.shape, (out.shape, want.shape)
        assert torch.equal(out, want), (out, want)

    return expect


def random_prototype_head(d, c: int, n_classes: int) -> PrototypePoolingHead:
    """A trained-looking head: random BN statistics, prototypes (some zero), gamma, classifier."""
    dim, k = d(st.integers(1, 6)), d(st.integers(1, 3))
    g = torch.Generator().manual_seed(d(SEEDS))
    head = PrototypePoolingHead(c, n_classes, dim=dim, n_prototypes=k).eval()
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) / math.sqrt(c))
        head.bn.running_mean.copy_(torch.randn(dim, generator=g) * 0.5)
        head.bn.running_var.copy_(torch.rand(dim, generator=g) * 2 + 0.2)
        head.bn.weight.copy_(torch.randn(dim, generator=g))
        head.bn.bias.copy_(torch.randn(dim, generator=g) * 0.5)
        head.prototypes.copy_(torch.randn(k, dim, generator=g))
        head.gamma.fill_(float(torch.randn((), generator=g) * 5))
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=g) / math.sqrt(2 * k + dim))
        head.classifier.bias.copy_(torch.randn(n_classes, generator=g))
        if d(st.booleans()):
            head.prototypes[0] = 0.0
        if d(st.sampled_from([False, False, True])):
            head.bn.bias.fill_(-1e4)  # ReLU kills every channel: a zero projection
    return head


HEAD_FAULTS = (
    "features_3d",
    "features_channels",
    "features_empty_hw",
    "features_int",
    "features_meta",
    "features_not_tensor",
)


def _head_features(d, c: int, dtype: torch.dtype):
    n, h, w = d(st.integers(0, 4)), d(st.integers(1, 3)), d(st.integers(1, 3))
    sixteen = dtype in (torch.float16, torch.bfloat16)
    scale = 1.0 if sixteen else d(st.sampled_from([1.0, 1.0, 1e3]))
    f = filled(d(SEEDS), (n, c, h, w), dtype, scale=scale, specials=d(st.sampled_from([0.0, 0.0, 0.05])))
    return lay(d(st.sampled_from(LAYOUTS)), f, d(SEEDS))


def _features_fault(d, f: torch.Tensor, fault: str):
    n, c, h, w = f.shape
    if fault == "features_3d":
        return f[0] if n else f.reshape(c, h, w * n)
    if fault == "features_channels":
        return torch.zeros(n, c + 1, h, w, dtype=f.dtype)
    if fault == "features_empty_hw":
        return f[:, :, :0] if d(st.booleans()) else f[:, :, :, :0]
    if fault == "features_int":
        return torch.zeros(f.shape, dtype=d(st.sampled_from([torch.int64, torch.uint8, torch.bool])))
    if fault == "features_meta":
        return f.to("meta")
    return f.tolist()


@FUZZ
@given(data=st.data())
def test_prototype_pooling_head(data):
    d = data.draw
    c, n_classes = d(st.integers(1, 5)), d(st.integers(1, 4))
    dtype = d(st.sampled_from(FLOATS))
    head = random_prototype_head(d, c, n_classes).to(dtype)
    f = _head_features(d, c, dtype)
    fault = d(fault_strategy(*HEAD_FAULTS, "features_dtype"))
    expect: Any
    if fault == "features_dtype":
        f, expect = f.to(d(st.sampled_from([t for t in FLOATS if t != dtype]))), Invalid(("features",), fault)
    elif fault != "none":
        f, expect = _features_fault(d, f, fault), Invalid(("features",), fault)
    else:
        want, bound = module_oracle(head, f, torch.finfo(dtype).eps)
        expect = within(dtype, (f.shape[0], n_classes), want, bound, "PrototypePoolingHead")

    with torch.no_grad():
        run_case("PrototypePoolingHead", lambda: head(f), expect)
        folded = head.fold()
        if fault == "features_dtype":  # the folded head computes in the features' dtype (documented)
            want, bound = folded_oracle(f, *folded.buffers(), torch.finfo(f.dtype).eps, cosine_floor(f.dtype))
            expect = within(f.dtype, (f.shape[0], n_classes), want, bound, "PrototypePoolingHead.fold()")

        run_case("PrototypePoolingHead.fold()", lambda: folded(f), expect)


# the folded head's buffers, mis-shaped (FoldedPrototypeHead and proto_head_exit take the same five)
BUFFER_FAULTS = ("proj_weight_1d", "proj_bias_length", "prototypes_width", "cls_weight_width", "cls_bias_length")
FOLDED_FAULTS = (*BUFFER_FAULTS, "buffer_not_tensor")


def mis_shaped(buffers, fault: str) -> tuple:
    """The five folded-head buffers with the one mis-shaped that ``fault`` (of :data:`BUFFER_FAULTS`) names."""
    w, b, p, cw, cb = buffers
    return {
        "proj_weight_1d": (w.reshape(-1), b, p, cw, cb),
        "proj_bias_length": (w, torch.cat([b, b[:1]]), p, cw, cb),
        "prototypes_width": (w, b, torch.cat([p, p[:, :1]], 1), cw, cb),
        "cls_weight_width": (w, b, p, cw[:, 1:], cb),
        "cls_bias_length": (w, b, p, cw, torch.cat([cb, cb[:1]])),
    }[fault]


def random_folded_buffers(d, c: int, n_classes: int, dtype: torch.dtype):
    dim, k = d(st.integers(1, 6)), d(st.integers(1, 3))
    g = torch.Generator().manual_seed(d(SEEDS))
    w = torch.randn(dim, c, generator=g, dtype=torch.float64) / math.sqrt(c)
    b = torch.randn(dim, generator=g, dtype=torch.float64) * 0.5
    if d(st.sampled_from([False, False, True])):
        b.fill_(-1e4)
    p = torch.randn(k, dim, generator=g, dtype=torch.float64)
    p = float(torch.randn((), generator=g) * 5) * p / p.norm(dim=1, keepdim=True)
    if d(st.booleans()):
        p[0] = 0.0
    cw = torch.randn(n_classes, 2 * k + dim, generator=g, dtype=torch.float64) / math.sqrt(2 * k + dim)
    cb = torch.randn(n_classes, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (w, b, p, cw, cb)]


@FUZZ
@given(data=st.data())
def test_folded_prototype_head(data):
    d = data.draw
    c, n_classes = d(st.integers(1, 5)), d(st.integers(1, 4))
    buffers = random_folded_buffers(d, c, n_classes, d(st.sampled_from([torch.float32, torch.float64])))
    dtype = d(st.sampled_from(FLOATS))
    f = _head_features(d, c, dtype)
    fault = d(fault_strategy(*HEAD_FAULTS, *FOLDED_FAULTS))
    names = ("proj_weight", "proj_bias", "prototypes", "cls_weight", "cls_bias")
    expect: Any
    if fault in FOLDED_FAULTS:
        if fault == "buffer_not_tensor":
            broken = tuple(t.tolist() if i == 2 else t for i, t in enumerate(buffers))
        else:
            broken = mis_shaped(buffers, fault)
        run_case("FoldedPrototypeHead", lambda: FoldedPrototypeHead(*broken), Invalid(names, fault))
        return
    head = FoldedPrototypeHead(*buffers)
    if fault != "none":
        f, expect = _features_fault(d, f, fault), Invalid(("features",), fault)
    else:
        want, bound = folded_oracle(f, *buffers, torch.finfo(dtype).eps, cosine_floor(dtype))
        expect = within(dtype, (f.shape[0], n_classes), want, bound, "FoldedPrototypeHead")

    run_case("FoldedPrototypeHead", lambda: head(f), expect)


# --------------------------------------------------------------------------------------------------
# proto_head_exit
# --------------------------------------------------------------------------------------------------

PROTO_FAULTS = (
    "features_3d",
    "features_channels",
    "features_empty_hw",
    "features_int",
    "features_f64",
    *BUFFER_FAULTS,
    "thresholds_length",
    "operand_int",
    "operand_not_tensor",
    "one_meta",
    "all_meta",
)
PROTO_NAMES = ("features", "proj_weight", "proj_bias", "prototypes", "cls_weight", "cls_bias", "thresholds")


@FUZZ
@given(data=st.data())
def test_proto_head_exit(data):
    d = data.draw
    c, n_classes = d(st.integers(1, 5)), d(st.integers(1, 4))
    buffers = random_folded_buffers(d, c, n_classes, torch.float64)
    buffers = [
        lay(d(st.sampled_from(["contiguous", "permuted", "strided"])), t.to(d(st.sampled_from(FLOATS))), d(SEEDS))
        for t in buffers
    ]
    dtype = d(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    f = _head_features(d, c, dtype)
    thresholds = torch.rand(n_classes, generator=torch.Generator().manual_seed(d(SEEDS)))
    fault = d(fault_strategy(*PROTO_FAULTS))
    if fault == "none":  # the CPU path computes in float32; thresholds from the oracle's confidences (ties)
        want_logits, bound = folded_oracle(f, *buffers, torch.finfo(torch.float32).eps, 1e-8)
        thresholds = _thresholds(d, want_logits.float(), n_classes)
    args = [f, *buffers, thresholds]
    if fault.startswith("features"):
        args[0] = f.double() if fault == "features_f64" else _features_fault(d, f, fault)
    elif fault in BUFFER_FAULTS:
        args[1:6] = mis_shaped(buffers, fault)
    elif fault == "operand_int":
        i = d(st.integers(1, 5))
        args[i] = args[i].to(torch.int64)
    elif fault == "thresholds_length":
        args[6] = torch.zeros(n_classes + 1)
    if fault == "operand_not_tensor":
        i = d(st.integers(1, 6))
        args[i] = args[i].tolist()
    elif fault == "one_meta":
        i = d(st.integers(0, 6))
        args[i] = args[i].to("meta")
    elif fault == "all_meta":
        args = [a.to("meta") for a in args]
    expect: Any
    if fault not in ("none", "all_meta"):
        expect = Invalid(PROTO_NAMES, fault)
    elif fault == "all_meta":

        def expect(result):
            logits, *triple = result
            assert logits.shape == (f.shape[0], n_classes) and logits.dtype == torch.float32
            check_exit_triple(triple, logits, args[6], f.shape[0], "meta")
    else:
        thresholds = args[6].clone()

        def expect(result):
            logits, *triple = result
            assert logits.dtype == torch.float32 and logits.shape == (f.shape[0], n_classes)
            assert_within(logits, want_logits, bound, "proto_head_exit logits")
            check_exit_triple(triple, logits, thresholds, f.shape[0], "cpu")

    meta = fault == "all_meta"
    run_case("proto_head_exit", lambda: proto_head_exit(*args), expect, meta=meta)
    run_case("torch.ops proto_head_exit", lambda: torch.ops.calexnet_fast.proto_head_exit(*args), expect, meta=meta)
    if fault == "none":  # the twin's contract is the valid inputs
        run_case("proto_head_exit_reference", lambda: proto_head_exit_reference(*args), expect)


# --------------------------------------------------------------------------------------------------
# the cascades
# --------------------------------------------------------------------------------------------------

# Relative tolerance between the cascade and the same modules run on the whole batch in plain PyTorch (the
# only differences: batch-size dependent kernels on the compacted batches); also the width of a "tie" around
# a threshold, where either decision is right.
CASCADE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CASCADE_FAULTS = (
    "x_dtype",
    "x_channels",
    "x_3d",
    "x_empty_hw",
    "x_meta",
    "x_not_tensor",
    "thresholds_nan",
    "thresholds_shape",
    "thresholds_int",
    "thresholds_str",
    "thresholds_meta",
)


def random_cascade_parts(d, in_channels: int, n_classes: int):
    n_branches = d(st.integers(1, 3))
    g = torch.Generator().manual_seed(d(SEEDS))
    stages, heads, c = [], [], in_channels
    for k in range(n_branches):
        width = d(st.integers(1, 5))
        conv = nn.Conv2d(c, width, 3, stride=1 if k == 0 else 2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(9 * c))
            conv.bias.copy_(torch.randn(width, generator=g) * 0.1)
        stages.append(nn.Sequential(conv, nn.ReLU()))
        c = width
        if d(st.sampled_from([True, True, False])):
            heads.append(random_prototype_head(d, c, n_classes))
        else:
            heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes)).eval())
    last = nn.Linear(c, n_classes)
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), last))
    return stages, heads


def allowed_exits(branch_logits: list[torch.Tensor], thresholds: torch.Tensor, tol: float) -> list[set[int]]:
    """Per sample, every exit the rule may give when confidences within ``tol`` of a threshold may go either
    way (computed in float64 from the oracle's logits)."""
    n = branch_logits[0].shape[0] if branch_logits else 0
    allowed: list[set[int]] = [set() for _ in range(n)]
    open_ = [True] * n  # no earlier branch surely exited
    for k, z in enumerate(branch_logits):
        z = z.double()
        pred = first_argmax(z)
        conf = softmax_conf64(z, pred)
        thr = thresholds[k].double()[pred]
        for i in range(n):
            if not open_[i] or math.isnan(conf[i]):
                continue
            if conf[i] >= thr[i] + tol:
                allowed[i].add(k + 1)
                open_[i] = False
            elif conf[i] >= thr[i] - tol:
                allowed[i].add(k + 1)
    for i in range(n):
        if open_[i]:
            allowed[i].add(len(branch_logits) + 1)
    return allowed


def check_cascade_output(out, every: list[torch.Tensor], thresholds, dtype, what: str) -> None:
    """``out`` takes an allowed exit for each sample, with the logits of that exit (``every``: the K branch
    logits and the backbone's, computed by the oracle)."""
    logits, exit_index = out
    n = every[0].shape[0]
    assert logits.dtype == dtype and logits.shape == every[0].shape, (what, logits.dtype, logits.shape)
    assert exit_index.dtype == torch.int64 and exit_index.shape == (n,), what
    tol = CASCADE_TOL[dtype]
    allowed = allowed_exits(every[:-1], thresholds, max(tol, 2e-6))  # the exit test is in float32
    for i in range(n):
        e = int(exit_index[i])
        assert e in allowed[i], (what, i, e, allowed[i])
        got, want = logits[i].double(), every[e - 1][i].double()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
        finite = torch.isfinite(want)
        assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)]), (what, got, want)
        scale = 1.0 + float(want[finite].abs().max()) if bool(finite.any()) else 1.0
        assert bool(((got[finite] - want[finite]).abs() <= tol * scale).all()), (what, got, want)


@FUZZ
@given(data=st.data())
def test_cascades(data):
    d = data.draw
    in_channels, n_classes = d(st.integers(1, 3)), d(st.integers(1, 4))
    stages, heads = random_cascade_parts(d, in_channels, n_classes)
    dtype = d(st.sampled_from((torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    for m in (*stages, *heads):
        m.to(dtype)
    batch, h, w = d(st.integers(0, 6)), d(st.integers(1, 6)), d(st.integers(1, 6))
    x = filled(d(SEEDS), (batch, in_channels, h, w), dtype, specials=d(st.sampled_from([0.0, 0.0, 0.02])))
    x = lay(d(st.sampled_from(LAYOUTS)), x, d(SEEDS))
    fold = [hd.fold() if isinstance(hd, PrototypePoolingHead) else hd for hd in heads]
    with torch.no_grad():  # the oracle: the same modules on the whole batch, plain PyTorch
        feats, zs, zs_folded = x, [], []
        for k in range(len(heads)):
            feats = stages[k](feats)
            zs.append(heads[k](feats))
            zs_folded.append(fold[k](feats))
        zb = stages[-1](feats)
    thr_values = []
    for k in range(len(heads)):
        z = zs[k].float().nan_to_num()
        confs = sorted(torch.softmax(z, 1).amax(1).tolist()) if batch else [0.5]
        mids = [(a + b) / 2 for a, b in zip(confs, confs[1:], strict=False)] or confs
        row = [d(st.sampled_from([*mids, INF, -INF, 0.0, 1.0])) for _ in range(n_classes)]
        thr_values.append(row)
    thresholds = torch.tensor(thr_values, dtype=torch.float32)
    fault = d(fault_strategy(*CASCADE_FAULTS))
    thresholds_fault = fault.startswith("thresholds")
    bad_thresholds: Any = None
    if fault == "x_dtype":
        x = x.to(d(st.sampled_from([t for t in (*FLOATS, torch.int64, torch.uint8) if t != dtype])))
    elif fault == "x_channels":
        x = torch.zeros(batch, in_channels + 1, h, w, dtype=dtype)
    elif fault == "x_3d":
        x = x[0] if batch else x.reshape(in_channels, h, w * batch)
    elif fault == "x_empty_hw":
        x = x[:, :, :0]
    elif fault == "x_meta":
        x = x.to("meta")
    elif fault == "x_not_tensor":
        x = x.tolist()
    elif fault == "thresholds_nan":
        bad_thresholds = thresholds.clone()
        bad_thresholds[0, 0] = math.nan
    elif fault == "thresholds_shape":
        bad_thresholds = thresholds[:, :-1] if d(st.booleans()) else thresholds[:1].expand(len(heads) + 1, n_classes)
    elif fault == "thresholds_int":
        bad_thresholds = thresholds.nan_to_num(0, 1, 0).to(torch.int64)
    elif fault == "thresholds_str":
        bad_thresholds = "0.5"
    elif fault == "thresholds_meta":
        bad_thresholds = thresholds.to("meta")
    for cls in (ReferenceCascade, Cascade):
        cascade = cls(stages, heads, thresholds, in_channels=in_channels).eval()
        target = cls.__name__
        if thresholds_fault:
            run_case(target, lambda c=cascade: c.set_thresholds(bad_thresholds), Invalid(("thresholds",), fault))
            assert torch.equal(cascade.thresholds, thresholds)
            continue
        if fault != "none":
            run_case(target, lambda c=cascade: c(x), Invalid(("x",), fault))
            run_case(f"{target}.simulate", lambda c=cascade: c.simulate(x), Invalid(("x",), fault))
            continue
        every = [*(zs_folded if cls is Cascade else zs), zb]

        def expect(out, every=every, target=target):
            check_cascade_output(out, every, thresholds, dtype, target)

        run_case(target, lambda c=cascade: c(x), expect)

        def expect_sim(out):
            check_cascade_output(out, [*zs, zb], thresholds, dtype, "decide(simulate(x))")

        with torch.no_grad():
            run_case(f"{target}.simulate", lambda c=cascade: c.decide(c.simulate(x)), expect_sim)


# --------------------------------------------------------------------------------------------------
# calibration: a brute-force float64 oracle
# --------------------------------------------------------------------------------------------------

PREC_SLACK = 1e-12  # the documented slack of the precision comparison (calibration._PREC_EPS)


def cpm_oracle(conf32: list[float], pred: list[int], labels: list[int], bars: list[list[float]], min_support, alive):
    """[M, C] thresholds by the definition: per class, the lowest confidence whose upper set (among the
    calibration samples predicted as that class, NaN left out) has precision >= bar and >= min_support
    members; +inf when none."""
    out = []
    for m, bar in enumerate(bars):
        row = []
        for c in range(len(bar)):
            items = sorted(
                (
                    (conf32[i], pred[i] == labels[i])
                    for i in range(len(conf32))
                    if alive[m][i] and pred[i] == c and not math.isnan(conf32[i])
                ),
                key=lambda t: -t[0],
            )
            best, count, hits, i = INF, 0, 0, 0
            while i < len(items):
                t = items[i][0]
                while i < len(items) and items[i][0] == t:
                    count += 1
                    hits += items[i][1]
                    i += 1
                if count >= min_support and hits / count >= bar[c] - PREC_SLACK:
                    best = t
            row.append(best)
        out.append(row)
    return torch.tensor(out, dtype=torch.float32)


CPM_FAULTS = (
    "conf_int",
    "conf_shape",
    "pred_float",
    "pred_range",
    "labels_float",
    "labels_bool",
    "bars_int",
    "bars_3d",
    "bars_list",
    "mask_float",
    "mask_flat",
    "mask_rows",
    "min_support_0",
    "min_support_none",
    "min_support_float",
    "conf_not_tensor",
    "pred_not_tensor",
    "meta",
)


def _confidences(d, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(d(SEEDS))
    if d(st.booleans()):
        conf = torch.randint(0, 9, (n,), generator=g).double() / 8  # many ties
    else:
        conf = torch.rand(n, generator=g, dtype=torch.float64)
    if d(st.sampled_from([False, False, True])) and n:
        conf[torch.randint(0, n, (max(1, n // 5),), generator=g)] = d(st.sampled_from([math.nan, INF, -INF]))
    return conf.to(d(st.sampled_from(FLOATS)))


@FUZZ
@given(data=st.data())
def test_cpm_thresholds(data):
    d = data.draw
    n, c, m = d(st.integers(0, 30)), d(st.integers(1, 4)), d(st.integers(1, 3))
    g = torch.Generator().manual_seed(d(SEEDS))
    conf = _confidences(d, n)
    pred = torch.randint(0, c, (n,), generator=g).to(d(st.sampled_from([torch.int64, torch.int32, torch.uint8])))
    labels = torch.randint(-1, c + 1, (n,), generator=g)  # labels outside [0, C) are simply never right
    labels = torch.where(torch.rand(n, generator=g) < 0.6, pred.long(), labels)
    bar_values = [d(st.sampled_from([0.0, 0.5, 2 / 3, 0.75, 0.8, 1.0, math.nan, -INF, 1.5])) for _ in range(m * c)]
    bars = torch.tensor(bar_values, dtype=torch.float64).view(m, c).to(d(st.sampled_from(FLOATS)))
    squeeze = m == 1 and d(st.booleans())
    if squeeze:
        bars = bars[0]
    mask_kind = d(st.sampled_from(["none", "flat", "rows", "one_row"]))
    mask = {
        "none": None,
        "flat": torch.rand(n, generator=g) < 0.7,
        "rows": torch.rand(m, n, generator=g) < 0.7,
        "one_row": torch.rand(1, n, generator=g) < 0.7,
    }[mask_kind]
    if mask is not None and squeeze and mask.dim() == 2:
        mask = mask[:1]
    min_support = d(st.integers(1, 5))
    fault = d(fault_strategy(*CPM_FAULTS))
    kwargs: dict = {"min_support": min_support, "mask": mask}
    args = [conf, pred, labels, bars]
    names = {"conf": ("conf",), "pred": ("pred",), "labels": ("labels",), "bars": ("bars",), "mask": ("mask",)}
    expect: Any = None
    if fault == "conf_int":
        args[0], expect = torch.zeros(n, dtype=torch.int64), Invalid(names["conf"], fault)
    elif fault == "conf_shape":
        args[0], expect = torch.zeros(n + 1), Invalid(("conf", "pred", "labels"), fault)
    elif fault == "pred_float":
        args[1], expect = pred.float(), Invalid(names["pred"], fault)
    elif fault == "pred_range" and n:
        args[1] = pred.long().clone()
        args[1][d(st.integers(0, n - 1))] = d(st.sampled_from([-1, c, c + 3]))
        expect = Invalid(names["pred"], fault)
    elif fault == "labels_float":
        args[2], expect = labels.float() + 0.5, Invalid(names["labels"], fault)
    elif fault == "labels_bool":
        args[2], expect = labels > 0, Invalid(names["labels"], fault)
    elif fault == "bars_int":
        args[3], expect = torch.zeros(bars.shape, dtype=torch.int64), Invalid(names["bars"], fault)
    elif fault == "bars_3d":
        args[3], expect = bars.reshape(1, 1, -1), Invalid(names["bars"], fault)
    elif fault == "bars_list":
        args[3], expect = bars.tolist(), Invalid(names["bars"], fault)
    elif fault == "mask_float":
        kwargs["mask"], expect = torch.ones(n), Invalid(names["mask"], fault)
    elif fault == "mask_flat":
        kwargs["mask"], expect = torch.ones(2 * n + 1, dtype=torch.bool), Invalid(names["mask"], fault)
    elif fault == "mask_rows":
        kwargs["mask"], expect = torch.ones(m + 1, n, dtype=torch.bool), Invalid(names["mask"], fault)
    elif fault == "min_support_0":
        kwargs["min_support"], expect = d(st.sampled_from([0, -1])), Invalid(("min_support",), fault)
    elif fault == "min_support_none":
        kwargs["min_support"], expect = None, Invalid(("min_support",), fault)
    elif fault == "min_support_float":
        kwargs["min_support"], expect = 2.5, Invalid(("min_support",), fault)
    elif fault == "conf_not_tensor":
        args[0], expect = conf.tolist(), Invalid(names["conf"], fault)
    elif fault == "pred_not_tensor":
        args[1], expect = pred.tolist(), Invalid(names["pred"], fault)
    elif fault == "meta":
        i = d(st.integers(0, 4))
        if i == 4:
            kwargs["mask"] = torch.ones(n, dtype=torch.bool, device="meta")
        else:
            args[i] = args[i].to("meta")
        expect = Invalid(("conf", "pred", "labels", "bars", "mask"), fault)
    if expect is None:
        conf32 = conf.float().double().tolist()
        bars2 = bars.double().view(-1, c).tolist()
        rows = torch.ones(1, n, dtype=torch.bool) if mask is None else mask.view(-1 if n else 1, n)
        alive = rows.expand(len(bars2), n).tolist()
        want = cpm_oracle(conf32, pred.long().tolist(), labels.tolist(), bars2, min_support, alive)
        if squeeze:
            want = want[0]
        expect = exactly_float32(want)

    run_case("cpm_thresholds", lambda: cpm_thresholds(*args, **kwargs), expect)


def calibrate_oracle(branches, backbone, labels, margins, aligned, margin_mode, min_support, bar_from):
    """[M, K, C] CPM thresholds by the definitions of calexnet_fast.calibration, in float64 Python."""
    n, c = backbone.shape
    y = labels.tolist()
    bb_pred = first_argmax(backbone.float().double()).tolist()
    per_branch = []
    for z in branches:
        z32 = z.float()
        pred = first_argmax(z32.double())
        conf = torch.softmax(z32, 1).gather(1, pred.view(-1, 1)).view(-1) if n else torch.zeros(0)
        per_branch.append((conf.double().tolist(), pred.tolist()))

    def precision(subset):
        size = sum(subset)
        right = sum(1 for i in range(n) if subset[i] and bb_pred[i] == y[i])
        acc = right / size if size else math.nan
        out = []
        for cls in range(c):
            den = sum(1 for i in range(n) if subset[i] and bb_pred[i] == cls)
            num = sum(1 for i in range(n) if subset[i] and bb_pred[i] == cls and y[i] == cls)
            out.append(num / den if den else acc)
        return out

    full = precision([True] * n)
    result = []
    for margin in margins:
        alive = [True] * n
        rows = []
        for conf, pred in per_branch:
            pr = precision(alive) if aligned and bar_from == "subset" else full
            bars = [p - margin if margin_mode == "additive" else (1.0 - margin) * p for p in pr]
            subset = alive if aligned else [True] * n
            thr = cpm_oracle(conf, pred, y, [bars], min_support, [subset])[0]
            rows.append(thr)
            if aligned:
                alive = [alive[i] and not (conf[i] >= float(thr[pred[i]])) for i in range(n)]
        result.append(torch.stack(rows) if rows else torch.zeros(0, c))
    return torch.stack(result) if result else torch.zeros(0, len(branches), c)


CALIBRATE_FAULTS = (
    "labels_float",
    "labels_range",
    "labels_length",
    "margins_none",
    "margins_str",
    "margins_nested",
    "margins_nan",
    "margin_mode",
    "bar_from",
    "min_support",
    "branch_shape",
    "branch_empty",
    "branch_not_tensor",
    "backbone_1d",
    "backbone_not_tensor",
    "no_class",
    "meta",
)


def _calibration_case(d, sweep: bool):
    n, c, k = d(st.integers(0, 24 if sweep else 40)), d(st.integers(1, 4)), d(st.integers(1, 3))
    g = torch.Generator().manual_seed(d(SEEDS))
    dtype = d(st.sampled_from(FLOATS))
    ties = d(st.booleans())
    labels = torch.randint(0, c, (n,), generator=g)
    backbone = torch.randn(n, c, generator=g) * 2
    backbone[torch.arange(n), labels] += torch.where(torch.rand(n, generator=g) < 0.7, 3.0, 0.0)
    branches = []
    for _ in range(k):
        z = torch.randint(-2, 3, (n, c), generator=g).float() if ties else torch.randn(n, c, generator=g) * 2
        z[torch.arange(n), labels] += torch.where(torch.rand(n, generator=g) < 0.6, 2.0, 0.0)
        if n and d(st.sampled_from([False, False, True])):
            z[int(torch.randint(0, n, (1,), generator=g))] = d(st.sampled_from([math.nan, INF]))
        branches.append(z.to(dtype))
    branch_logits: Any = torch.stack(branches) if d(st.booleans()) else branches
    grid = [0.0, 0.05, 0.1, 0.2, 1 / 3, 0.5, -0.1, 1.0]
    if sweep and d(st.sampled_from([True, False, False])):
        margins: Any = None
    elif not sweep and d(st.booleans()):
        margins = d(st.sampled_from(grid))
    else:
        margins = d(st.lists(st.sampled_from(grid), max_size=4))
        if d(st.booleans()):
            margins = torch.tensor(margins, dtype=d(st.sampled_from([torch.float32, torch.float64])))
    kwargs = {
        "aligned": d(st.booleans()),
        "margin_mode": d(st.sampled_from(["additive", "relative"])),
        "min_support": d(st.integers(1, 6)),
        "bar_from": d(st.sampled_from(["subset", "full_validation"])),
    }
    args = [branch_logits, backbone, labels, margins]
    fault = d(fault_strategy(*CALIBRATE_FAULTS))
    expect = None
    if fault == "labels_float":
        args[2], expect = labels.float() + 0.5, Invalid(("labels",), fault)
    elif fault == "labels_range" and n:
        args[2] = labels.clone()
        args[2][d(st.integers(0, n - 1))] = d(st.sampled_from([-1, c]))
        expect = Invalid(("labels",), fault)
    elif fault == "labels_length":
        args[2], expect = (
            torch.cat([labels, labels[:1], torch.zeros(1, dtype=torch.int64)]),
            Invalid(("labels",), fault),
        )
    elif fault == "margins_none" and not sweep:
        args[3], expect = None, Invalid(("margins",), fault)
    elif fault == "margins_str":
        args[3], expect = "0.1", Invalid(("margins",), fault)
    elif fault == "margins_nested":
        args[3], expect = [[0.1, 0.2]], Invalid(("margins",), fault)
    elif fault == "margins_nan":
        args[3], expect = [0.1, math.nan], Invalid(("margins",), fault)
    elif fault == "margin_mode":
        kwargs["margin_mode"], expect = "multiplicative", Invalid(("margin_mode",), fault)
    elif fault == "bar_from":
        kwargs["bar_from"], expect = "test", Invalid(("bar_from",), fault)
    elif fault == "min_support":
        kwargs["min_support"], expect = d(st.sampled_from([0, -2, None, 1.5])), Invalid(("min_support",), fault)
    elif fault == "branch_shape":
        bad = torch.zeros(n + d(st.sampled_from([0, 1])), c + 1)
        args[0], expect = [*branches[:-1], bad], Invalid(("branch_logits",), fault)
    elif fault == "branch_empty":
        args[0], expect = d(st.sampled_from([[], torch.zeros(0, n, c)])), Invalid(("branch_logits",), fault)
    elif fault == "branch_not_tensor":
        args[0], expect = (
            d(st.sampled_from([None, [b.tolist() for b in branches], 3])),
            Invalid(("branch_logits",), fault),
        )
    elif fault == "backbone_1d":
        args[1], expect = backbone[:, 0], Invalid(("backbone_logits",), fault)
    elif fault == "backbone_not_tensor":
        args[1], expect = backbone.tolist(), Invalid(("backbone_logits",), fault)
    elif fault == "no_class":
        args[0], args[1] = [b[:, :0] for b in branches], backbone[:, :0]
        expect = Invalid(("backbone_logits", "branch_logits", "labels"), fault)
    elif fault == "meta":
        i = d(st.integers(0, 2))
        args[i] = [b.to("meta") for b in branches] if i == 0 else args[i].to("meta")
        expect = Invalid(("branch_logits", "backbone_logits", "labels"), fault)
    return args, kwargs, expect, branches


def _margins64(margins) -> list[float]:
    if margins is None:
        return torch.linspace(0.0, 0.5, 51, dtype=torch.float64).tolist()
    return torch.as_tensor(margins, dtype=torch.float64).reshape(-1).tolist()


@FUZZ
@given(data=st.data())
def test_calibrate(data):
    args, kwargs, expect, branches = _calibration_case(data.draw, sweep=False)
    if expect is None:
        branch_logits, backbone, labels, margins = args
        want = calibrate_oracle(branches, backbone, labels, _margins64(margins), **kwargs)
        scalar = isinstance(margins, float) or (isinstance(margins, torch.Tensor) and margins.dim() == 0)
        if scalar:
            want = want[0]
        expect = exactly_float32(want)

    run_case("calibrate", lambda: calibrate(*args, **kwargs), expect)


@FUZZ
@given(data=st.data())
def test_calibrate_sweep(data):
    args, kwargs, expect, branches = _calibration_case(data.draw, sweep=True)
    if expect is None:
        branch_logits, backbone, labels, margins = args
        grid = _margins64(margins)
        want = calibrate_oracle(branches, backbone, labels, grid, **kwargs)

        def expect(sweep):
            assert sweep.margins.dtype == torch.float64 and sweep.margins.tolist() == grid
            assert sweep.thresholds.dtype == torch.float32 and torch.equal(sweep.thresholds, want)
            assert sweep.config == kwargs

    run_case("calibrate_sweep", lambda: calibrate_sweep(*args, **kwargs), expect)
