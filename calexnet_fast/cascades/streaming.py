"""Streaming inference: survivors are re-batched across input batches, so every stage runs on full batches.

Per batch, a cascade runs its later stages on the few samples still in it, and small batches cost far more
per image than full ones. :class:`StreamingCascade` takes an iterable of input batches instead and keeps
one survivor queue per stage: a stage runs only when its queue holds a full *stage batch*, its survivors
join the next stage's queue, and the queues are flushed at the end of the stream. Each input batch comes
back, in order, as exactly the :class:`~calexnet_fast.exit_rule.CascadeOutput` the cascade gives it per
batch (same exit indices and predictions, logits to float rounding), as soon as all its samples have left.

The stages, heads, exit decisions and compaction are the wrapped cascade's own steps (its ``_head_exit`` and
``_compact``), so a :class:`~calexnet_fast.Cascade` streams with its fused heads and C++ ``compact``, and a
:class:`~calexnet_fast.cascades.ReferenceCascade` in plain PyTorch.

Bookkeeping: every sample gets a stream-wide id (its position in the concatenated input). A queue is a
FIFO of *segments* (rows, their ids on the device, and host-side bounds ``[lo, hi)`` on those ids), and
every queue is sorted by id because each stage takes its rows from the front of its queue. The host never
reads an id: a segment of ``n`` sorted distinct ids inside ``[lo, hi)`` split after ``m`` rows gives the
bounds ``[lo, hi - (n - m))`` and ``[lo + m, hi)``, and an input batch is complete once the smallest bound
at the front of every queue has passed its last id. Logits and exit indices are written at each stage into
a window of pending outputs by ``index_copy_`` / ``index_fill_`` (later stages overwrite: a sample's deepest
stage is its exit), so on CUDA the one host sync per stage run is the survivor count of ``_compact``; on CPU
a stage run where no row exits writes nothing and hands its rows on uncopied.

Memory is bounded: between input batches every queue holds fewer than ``stage_batch`` rows; while one is
being processed, the first stage's queue holds at most ``stage_batch - 1 + B`` rows (``B`` the input
batch) and every later queue at most ``2 * stage_batch - 1`` (one stage run's survivors on top). Without a
latency cap the outputs of batches waiting for an earlier sample also accumulate (``n_classes`` logits per
sample); ``max_wait`` bounds both the wait and that window.
"""

from __future__ import annotations

import dataclasses
import types
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from ..exit_rule import CascadeOutput, exit_decision_reference
from ..heads import PrototypePoolingHead
from ..reference import folded_head_reference
from .fast import Cascade
from .reference import ReferenceCascade
from .score import ScoreCascade

__all__ = ["StreamStats", "Stream", "StreamingCascade"]


@dataclasses.dataclass
class StreamStats:
    """What a stream did, per stage (lists of ``K + 1``, stage ``K`` the backbone's last).

    Attributes:
        runs: stage runs.
        rows: rows run through the stage (padding excluded).
        partial_runs: runs on fewer than ``stage_batch`` rows (the flush at the end, latency-cap flushes).
        peak_queue: the most rows the stage's queue held at once.
        peak_pending: the most input batches read but not yet returned.
    """

    runs: list[int]
    rows: list[int]
    partial_runs: list[int]
    peak_queue: list[int]
    peak_pending: int = 0


class _Segment(NamedTuple):
    rows: torch.Tensor  # [n, ...] stage inputs
    ids: torch.Tensor  # [n] int64 stream-wide sample ids, increasing, on the rows' device
    lo: int  # host-side bounds: every id lies in [lo, hi)
    hi: int
    owned: bool  # False while ``rows`` is a view of a caller's input batch


class _Queue:
    """The rows waiting for one stage: a FIFO of segments, sorted by sample id."""

    def __init__(self) -> None:
        self.segments: deque[_Segment] = deque()
        self.size = 0

    def push(self, segment: _Segment) -> None:
        self.segments.append(segment)
        self.size += segment.rows.shape[0]

    def front_lo(self) -> float:
        """A lower bound on every id in the queue (``inf`` when empty)."""
        return self.segments[0].lo if self.segments else float("inf")

    def take(self, m: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The first ``m`` rows as one batch (no copy when they are one segment or a prefix of it)."""
        pieces: list[_Segment] = []
        need = m
        while need > 0:
            seg = self.segments[0]
            n = seg.rows.shape[0]
            if n <= need:
                pieces.append(self.segments.popleft())
                need -= n
            else:
                rows, ids = seg.rows, seg.ids
                pieces.append(_Segment(rows[:need], ids[:need], seg.lo, seg.hi - (n - need), seg.owned))
                self.segments[0] = _Segment(rows[need:], ids[need:], seg.lo + need, seg.hi, seg.owned)
                need = 0
        self.size -= m
        lo, hi = min(p.lo for p in pieces), max(p.hi for p in pieces)
        if len(pieces) == 1:
            return pieces[0].rows, pieces[0].ids, lo, hi
        return torch.cat([p.rows for p in pieces]), torch.cat([p.ids for p in pieces]), lo, hi

    def own(self) -> None:
        """Copy the rows still viewing a caller's input batch (the caller may reuse its buffer)."""
        self.segments = deque(s if s.owned else s._replace(rows=s.rows.clone(), owned=True) for s in self.segments)


class _Outputs:
    """Logits and exit indices of the samples read but not yet returned, indexed by ``id - base``."""

    def __init__(self, n_classes: int, dtype: torch.dtype, device: torch.device) -> None:
        self.logits = torch.empty([0, n_classes], dtype=dtype, device=device)
        self.exit_index = torch.empty([0], dtype=torch.int64, device=device)
        self.base = 0  # the id of row 0
        self.done = 0  # ids below this have been returned
        self.end = 0  # ids from here on are not read yet

    def extend(self, n: int) -> None:
        """Make room for the next ``n`` ids (moving the live rows to the front, growing when needed)."""
        if self.end + n - self.base > self.logits.shape[0]:
            live = self.end - self.done
            capacity = max(self.logits.shape[0], 2 * (live + n))
            lo, hi = self.done - self.base, self.end - self.base
            logits = self.logits.new_empty([capacity, self.logits.shape[1]])
            exit_index = self.exit_index.new_empty([capacity])
            logits[:live] = self.logits[lo:hi]
            exit_index[:live] = self.exit_index[lo:hi]
            self.logits, self.exit_index, self.base = logits, exit_index, self.done
        self.end += n

    def write(self, ids: torch.Tensor, logits: torch.Tensor, exit_value: int) -> None:
        """Rows ``ids`` reached a stage with these logits (a deeper stage overwrites them later)."""
        dest = ids - self.base if self.base else ids
        self.logits.index_copy_(0, dest, logits if logits.dtype == self.logits.dtype else logits.to(self.logits.dtype))
        self.exit_index.index_fill_(0, dest, exit_value)

    def pop(self, start: int, end: int) -> CascadeOutput:
        """The outputs of ids ``[start, end)`` (the next input batch), as new tensors."""
        lo, hi = start - self.base, end - self.base
        self.done = end
        return CascadeOutput(self.logits[lo:hi].clone(), self.exit_index[lo:hi].clone())


class _Batch(NamedTuple):
    index: int  # position in the stream
    start: int  # ids [start, end)
    end: int


class _EagerStep:
    """Stage ``k``, then the cascade's own branch step (head and exit decision), eagerly."""

    def __init__(self, cascade: ReferenceCascade, k: int) -> None:
        self.cascade, self.k, self.last = cascade, k, k == cascade.n_branches

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (stage output, logits, exit mask); the last stage: (logits, logits, None)."""
        h = self.cascade.stages[self.k](rows)
        if self.last:
            return h, h, None
        return (h, *self.cascade._head_exit(self.k, h))


def _head_form(cascade: ReferenceCascade, k: int) -> str | None:
    """How branch ``k``'s head runs inside a compiled stage: ``"folded"`` (``Cascade``'s inference form of a
    prototype head), ``"module"`` (the head module, then the exit rule), or ``None`` (the cascade has its own
    exit step: the head runs eagerly, after the compiled stage)."""
    own = type(cascade)._head_exit
    if own is Cascade._head_exit:
        return "folded" if isinstance(cascade.heads[k], PrototypePoolingHead) else "module"
    return "module" if own is ReferenceCascade._head_exit else None


class _CompiledStep:
    """Stage ``k`` and its branch (head and exit rule) as one ``torch.compile`` graph at a fixed batch of
    ``size`` rows: shorter runs are padded with zeros, so nothing recompiles. Thresholds and the folded
    head's buffers are inputs of the graph, so later ``set_thresholds`` calls and head updates apply."""

    def __init__(self, cascade: ReferenceCascade, k: int, size: int) -> None:
        self.cascade, self.k, self.size = cascade, k, size
        self.last = k == cascade.n_branches
        self.head = None if self.last else _head_form(cascade, k)
        stage, head, form = cascade.stages[k], None if self.head is None else cascade.heads[k], self.head

        def forward(x: torch.Tensor, thresholds: torch.Tensor | None, operands: tuple[torch.Tensor, ...]):
            h = stage(x)
            if form is None:
                return h, h, h
            logits = folded_head_reference(h, *operands) if form == "folded" else head(h)
            return h, logits, exit_decision_reference(logits, thresholds)[0]

        # Dynamo keeps one cache, with its recompile limit, per code object: give each step its own.
        code = forward.__code__.replace(co_name=f"stage_{k}_{id(self):x}")
        forward = types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
        self.graph = torch.compile(forward, dynamic=False)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :class:`_EagerStep`."""
        m = rows.shape[0]
        if m < self.size:
            cl = rows.dim() == 4 and not rows.is_contiguous() and rows.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if cl else torch.contiguous_format
            padded = rows.new_zeros([self.size, *rows.shape[1:]]).contiguous(memory_format=fmt)
            padded[:m] = rows
            rows = padded
        cascade = self.cascade
        thresholds = None if self.last else cascade.thresholds[self.k]
        operands = cascade.folded_head(self.k, rows.device).operands() if self.head == "folded" else ()
        h, logits, exit_ = (t[:m] for t in self.graph(rows, thresholds, operands))
        if self.last:
            return h, h, None
        if self.head is None:
            logits, exit_ = cascade._head_exit(self.k, h)
        return h, logits, exit_


class Stream:
    """One pass of a :class:`StreamingCascade` over an iterable of batches: an iterator of ``CascadeOutput``.

    ``stats`` (:class:`StreamStats`) is updated as the stream runs; ``queued()`` gives the rows waiting
    per stage right now.
    """

    def __init__(self, owner: StreamingCascade, batches: Iterable[torch.Tensor]) -> None:
        self.cascade = owner.cascade
        self.stage_batch = owner.stage_batch
        self.max_wait = owner.max_wait
        self._steps = owner._steps
        stages = self.cascade.n_branches + 1
        self.stats = StreamStats([0] * stages, [0] * stages, [0] * stages, [0] * stages)
        self._queues = [_Queue() for _ in range(stages)]
        self._pending: deque[_Batch] = deque()
        self._outputs: _Outputs | None = None
        self._signature: tuple | None = None  # (trailing shape, dtype, device) of the first batch
        self._iter = self._run(iter(batches))

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> CascadeOutput:
        return next(self._iter)

    def queued(self) -> list[int]:
        """Rows waiting in each stage's queue now."""
        return [q.size for q in self._queues]

    # -- the stream ---------------------------------------------------------------------------------

    def _run(self, batches: Iterator[torch.Tensor]) -> Iterator[CascadeOutput]:
        for j, x in enumerate(batches):
            with torch.inference_mode():  # not across the yields: the caller's code runs between them
                self._check(j, x)
                self._read(j, x)
                limit = self._overdue(j)
                self._drain(0, limit)
                self._queues[0].own()
                ready = self._ready()
            yield from ready
        with torch.inference_mode():
            self._drain(0, float("inf"))
            ready = self._ready()
        yield from ready

    def _check(self, j: int, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"batches[{j}]: expected a tensor [B, C, H, W], got {type(x).__name__}")
        self.cascade.check_input(x)
        signature = (tuple(x.shape[1:]), x.dtype, x.device)
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            shape, dtype, device = self._signature
            raise ValueError(
                f"batches[{j}]: expected [B, {', '.join(map(str, shape))}] {dtype} on {device} (as the stream's "
                f"first batch), got {list(x.shape)} {x.dtype} on {x.device}"
            )

    def _read(self, j: int, x: torch.Tensor) -> None:
        """Queue input batch ``j`` for the first stage and make room for its outputs."""
        if self._outputs is None:
            self._outputs = _Outputs(self.cascade.n_classes, x.dtype, x.device)
        out = self._outputs
        start, n = out.end, x.shape[0]
        out.extend(n)
        self._pending.append(_Batch(j, start, start + n))
        self.stats.peak_pending = max(self.stats.peak_pending, len(self._pending))
        if n > 0:
            ids = torch.arange(start, start + n, device=x.device)
            self._push(0, _Segment(x, ids, start, start + n, owned=False))

    def _overdue(self, j: int) -> float:
        """Ids below this must leave now: the end of the last pending batch read ``max_wait`` batches ago."""
        limit = float("-inf")
        if self.max_wait is not None:
            for batch in self._pending:
                if batch.index > j - self.max_wait:
                    break
                limit = batch.end
        return limit

    def _drain(self, k: int, limit: float) -> None:
        """Run stage ``k`` on full stage batches, and on partial ones while its queue may hold an id below
        ``limit``; downstream queues are drained after every run, so none grows past two stage batches."""
        queue = self._queues[k]
        while queue.size >= self.stage_batch or (queue.size > 0 and queue.front_lo() < limit):
            self._stage(k, min(queue.size, self.stage_batch))
            if k < self.cascade.n_branches:
                self._drain(k + 1, float("-inf"))
        if k < self.cascade.n_branches:
            self._drain(k + 1, limit)

    def _stage(self, k: int, m: int) -> None:
        """One run of stage ``k`` (and its branch) on the first ``m`` rows of its queue."""
        rows, ids, lo, hi = self._queues[k].take(m)
        stats = self.stats
        stats.runs[k] += 1
        stats.rows[k] += m
        stats.partial_runs[k] += m < self.stage_batch
        h, logits, exit_ = self._steps[k](rows)
        if exit_ is not None and self.cascade._none_exit(exit_):
            # no output to write (a deeper stage writes these rows), the rows and ids as they are
            self._push(k + 1, _Segment(h, ids, lo, hi, owned=True))
            return
        self._outputs.write(ids, logits, k + 1)
        if exit_ is None:  # the last stage: every row leaves here
            return
        h, keep = self.cascade._compact(h, ~exit_)  # on CUDA: the run's one host sync (the survivor count)
        if h.shape[0] > 0:
            self._push(k + 1, _Segment(h, ids.index_select(0, keep), lo, hi, owned=True))

    def _push(self, k: int, segment: _Segment) -> None:
        queue = self._queues[k]
        queue.push(segment)
        self.stats.peak_queue[k] = max(self.stats.peak_queue[k], queue.size)

    def _ready(self) -> list[CascadeOutput]:
        """The outputs of the pending batches all of whose samples have left, in order."""
        horizon = min(q.front_lo() for q in self._queues)
        ready = []
        while self._pending and self._pending[0].end <= horizon:
            batch = self._pending.popleft()
            ready.append(self._outputs.pop(batch.start, batch.end))
        return ready


class StreamingCascade:
    """A cascade run over a stream of input batches, every stage on full stage batches.

    Args:
        cascade: a :class:`~calexnet_fast.Cascade` or :class:`~calexnet_fast.cascades.ReferenceCascade`
            (shared, not copied: later ``set_thresholds`` calls apply). Put it in eval mode. A
            :class:`~calexnet_fast.cascades.ScoreCascade` cannot stream: its exit rule carries state from
            branch to branch within a batch.
        stage_batch: rows per stage run (the last runs of a stream, and those forced by ``max_wait``, may
            have fewer).
        max_wait: latency cap: a sample of input batch ``i`` is returned before batch ``i + max_wait + 1``
            is read (``0``: each batch before the next is read, as per batch but in stage batches).
            ``None``: no cap, samples wait until their stage batches fill up or the stream ends.
        compile: run every stage with its branch (head and exit rule) as one ``torch.compile`` graph at
            ``stage_batch`` rows (partial runs padded with zeros, so each stage compiles on the first stream
            only; the first stage once more if it sees both caller tensors and inference-mode ones). The
            heads then run in their PyTorch form, ``Cascade``'s folded one included, also on CUDA (instead
            of the fused Triton kernel); a cascade with its own exit step runs its heads eagerly after the
            compiled stage.

    ``stream(batches)`` (or calling the object) returns a :class:`Stream`; see the module docstring.
    """

    def __init__(
        self, cascade: ReferenceCascade, stage_batch: int = 64, max_wait: int | None = None, *, compile: bool = False
    ) -> None:
        if not isinstance(cascade, ReferenceCascade):
            raise ValueError(f"cascade: expected a Cascade or ReferenceCascade, got {type(cascade).__name__}")
        if isinstance(cascade, ScoreCascade):
            raise ValueError(
                "cascade: a ScoreCascade cannot stream (its exit rule carries state between the branches of a batch)"
            )
        if isinstance(stage_batch, bool) or not isinstance(stage_batch, int) or stage_batch < 1:
            raise ValueError(f"stage_batch: expected a positive int, got {stage_batch!r}")
        if max_wait is not None and (isinstance(max_wait, bool) or not isinstance(max_wait, int) or max_wait < 0):
            raise ValueError(f"max_wait: expected None or an int >= 0, got {max_wait!r}")
        self.cascade = cascade
        self.stage_batch = stage_batch
        self.max_wait = max_wait
        self.compile = bool(compile)
        stages = range(cascade.n_branches + 1)
        self._steps = [_CompiledStep(cascade, k, stage_batch) if compile else _EagerStep(cascade, k) for k in stages]

    def stream(self, batches: Iterable[torch.Tensor]) -> Stream:
        """The outputs of ``batches``, one :class:`~calexnet_fast.exit_rule.CascadeOutput` per batch, in order.

        Args:
            batches: [B_i, in_channels, H, W] normalised images in the cascade's dtype and on its device, all
                of one shape but the batch size (which may vary, 0 included). A batch is read when the
                outputs so far are consumed; rows still queued after it is processed are copied, so the
                caller may reuse its buffer.
        """
        return Stream(self, batches)

    __call__ = stream

    def __repr__(self) -> str:
        return f"StreamingCascade(stage_batch={self.stage_batch}, max_wait={self.max_wait}, compile={self.compile})"
