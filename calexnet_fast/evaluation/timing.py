"""The timing harness: candidates timed in interleaved rounds, medians, re-runs of disturbed rounds, energy.

:func:`interleaved_rounds` runs every candidate once per round, the order reversed from one round to the
next (so neither always runs first on a warm or a cold machine); on CUDA a call is timed with CUDA events,
on CPU with ``perf_counter``. If a candidate's slowest round took more than ``noise_tolerance`` times its
fastest (another job got in the way), up to ``max_extra_rounds`` more rounds are run so that the median is
not set by the disturbed ones. With a :class:`PowerMeter` (CUDA: the driver's power readings through NVML,
sampled in a background thread) each call's energy is recorded too. A :class:`BatchInterleaved` candidate
interleaves several candidates batch by batch within one call and times each of them itself. ``calexnet
measure`` and the benchmarks in ``bench/`` time everything through it (:func:`median_time`,
:func:`interleaved_medians`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..availability import cascade_plan

__all__ = [
    "CPU_ENERGY_NOTE",
    "BatchInterleaved",
    "PowerMeter",
    "Rounds",
    "TimingConfig",
    "environment",
    "interleaved_medians",
    "interleaved_rounds",
    "median_time",
    "noisy",
    "sync",
    "timing_subset",
]

CPU_ENERGY_NOTE = "energy not measured on CPU (no power readings are taken)"


@dataclass
class TimingConfig:
    """How points are timed.

    Attributes:
        batch_size: images per forward, the same for the backbone and the cascade.
        repeats: interleaved rounds (backbone, cascade) per point; medians over rounds.
        warmup: untimed calls of each before the rounds.
        timing_images: images timed per round (a fixed random subset of the test images, the same for
            every point; ``None`` or 0: all of them). Accuracy always uses every test image.
        timing_seed: seed of that subset.
        noise_tolerance: if the slowest round of the backbone or of the cascade took more than this factor
            times its fastest (another job got in the way), more rounds are run ...
        max_extra_rounds: ... up to this many, so that the median is not set by the disturbed rounds.
            Every round is recorded (``seconds_per_round``).
    """

    batch_size: int = 256
    repeats: int = 5
    warmup: int = 1
    timing_images: int | None = None
    timing_seed: int = 0
    noise_tolerance: float = 1.2
    max_extra_rounds: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {self.warmup}")
        if not self.noise_tolerance >= 1.0 or self.max_extra_rounds < 0:
            raise ValueError(
                f"noise_tolerance, max_extra_rounds: expected >= 1 and >= 0, got {self.noise_tolerance} and "
                f"{self.max_extra_rounds}"
            )
        if self.timing_images is not None and self.timing_images < 0:
            raise ValueError(f"timing_images: expected >= 0 (0: all), got {self.timing_images}")


def timing_subset(n: int, config: TimingConfig) -> torch.Tensor:
    """Sorted indices of the images timed in every round (all of them unless ``config.timing_images``)."""
    if not config.timing_images or config.timing_images >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(config.timing_seed)
    return torch.sort(torch.randperm(n, generator=g)[: config.timing_images]).values


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def noisy(times: dict[str, list[float]], tolerance: float) -> bool:
    """Whether any candidate's slowest round took more than ``tolerance`` times its fastest."""
    return any(ts and max(ts) > tolerance * min(ts) for ts in times.values())


class PowerMeter:
    """Mean power draw of a CUDA device over a timed section (NVML, sampled every ``interval`` s).

    ``available`` is False on CPU and where no NVML reading works (``reason`` says why). Use as a context
    manager around the timed work; ``watts`` is then the mean of the samples (``None`` if unavailable).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = torch.device(device), interval
        self.available, self.reason, self._read = False, CPU_ENERGY_NOTE, None
        self.watts: float | None = None
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.power_draw(self.device)  # milliwatts, through NVML
            self._read = lambda: torch.cuda.power_draw(self.device) / 1000.0
            self.available, self.reason = True, "torch.cuda.power_draw (NVML)"
            return
        except Exception as e:  # noqa: BLE001 - any failure means: not available here
            first = f"torch.cuda.power_draw failed ({type(e).__name__}: {e})"
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or torch.cuda.current_device())
            pynvml.nvmlDeviceGetPowerUsage(handle)
            self._read = lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            self.available, self.reason = True, "pynvml nvmlDeviceGetPowerUsage"
        except Exception as e:  # noqa: BLE001
            self.reason = f"energy not available: {first}; pynvml: {type(e).__name__}: {e}"

    def __enter__(self) -> PowerMeter:
        self._samples: list[float] = []
        self._stop = threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._samples.append(float(self._read()))
            except Exception:  # noqa: BLE001
                return
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()
            self.watts = statistics.fmean(self._samples) if self._samples else None


def _clocked(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed(fn: Callable[[], object], device: torch.device, meter: PowerMeter | None) -> tuple[float, float | None]:
    """Time of one call of ``fn()`` in seconds and its energy in joules (``None`` without a power meter)."""
    sync(device)
    if meter is None or not meter.available:
        return _clocked(fn, device), None
    with meter:
        dt = _clocked(fn, device)
    return dt, (meter.watts * dt if meter.watts is not None else None)


class BatchInterleaved:
    """Candidates interleaved batch by batch: one candidate of :func:`interleaved_rounds` that times itself.

    A call is one pass over ``batches``: each batch goes through every per-batch candidate (``per_batch``:
    name -> ``f(batch)``, each call timed on its own, their order reversed from one batch to the next), then
    into the stream candidate (``stream``: ``(name, f)``, ``f(batches)`` an iterable, consumed to its end, that
    reads the batches as it goes), whose time is the pass's total less the per-batch calls'. The call returns
    every name's seconds over the pass. Two whole streams timed back to back meet different stretches of a
    shared machine's speed; interleaved batch by batch, the candidates meet the same ones, so the ratio of
    their per-pass times varies far less from pass to pass. (The price: a stream's queued rows may leave the
    caches between two of its batches, as they may under any other work done between batches.) On CUDA each
    call is timed between its own events on the current stream, with no synchronisation inside the pass; no
    energy is recorded for these candidates.
    """

    def __init__(
        self,
        batches: list[torch.Tensor],
        per_batch: dict[str, Callable[[torch.Tensor], object]],
        stream: tuple[str, Callable[[Iterator[torch.Tensor]], Iterable[object]]] | None = None,
        device: torch.device | None = None,
    ) -> None:
        names = [*per_batch, *([stream[0]] if stream is not None else [])]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"BatchInterleaved: expected distinct candidate names, got {names}")
        if not batches:
            raise ValueError("BatchInterleaved: expected at least one batch, got none")
        self.batches, self.per_batch, self.stream = list(batches), dict(per_batch), stream
        self.device = device or torch.device("cpu")
        self.names = tuple(names)

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __call__(self) -> dict[str, float]:
        marks: dict[str, list[tuple]] = {name: [] for name in self.per_batch}

        def feed() -> Iterator[torch.Tensor]:
            for i, batch in enumerate(self.batches):
                order = list(self.per_batch.items())
                for name, fn in order[::-1] if i % 2 else order:
                    start = self._mark()
                    fn(batch)
                    marks[name].append((start, self._mark()))
                yield batch

        start = self._mark()
        for _ in feed() if self.stream is None else self.stream[1](feed()):
            pass
        end = self._mark()
        if self.device.type == "cuda":
            end.synchronize()

            def span(a, b) -> float:
                return a.elapsed_time(b) / 1e3
        else:

            def span(a, b) -> float:
                return b - a

        seconds = {name: sum(span(a, b) for a, b in pairs) for name, pairs in marks.items()}
        if self.stream is not None:
            seconds[self.stream[0]] = span(start, end) - sum(seconds.values())
        return seconds


@dataclass
class Rounds:
    """Every timed round of :func:`interleaved_rounds`: ``seconds[name]`` and ``joules[name]`` (empty
    without a power meter), one value per round."""

    seconds: dict[str, list[float]]
    joules: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        """Median seconds per candidate."""
        return {name: statistics.median(ts) for name, ts in self.seconds.items()}

    def paired_ratio(self, numerator: str, denominator: str, scale: float = 1.0) -> float:
        """The median over rounds of ``scale * seconds[numerator] / seconds[denominator]`` within each round
        (e.g. a speedup: the baseline's seconds over a candidate's): the two were timed next to each other,
        so a drift of the machine's speed over the rounds cancels out, which a ratio of medians does not do."""
        return statistics.median(self._ratios(numerator, denominator, scale))

    def paired_interval(
        self, numerator: str, denominator: str, scale: float = 1.0, level: float = 0.95
    ) -> tuple[float, float]:
        """A distribution-free confidence interval (at ``level``) for the median that :meth:`paired_ratio`
        estimates: two order statistics of the per-round ratios, ``[r_(k), r_(n+1-k)]`` with ``k`` the largest
        rank such that a Binomial(n, 1/2) falls below it with probability at most ``(1 - level) / 2``. It
        says how far the machine's noise leaves the ratio open (15 rounds: the 4th and the 12th of the sorted
        ratios). With too few rounds for any such rank (fewer than 6 at 0.95), the range of the ratios, which
        then covers less than ``level``."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"paired_interval: level: expected a probability in (0, 1), got {level!r}")
        ratios = sorted(self._ratios(numerator, denominator, scale))
        n = len(ratios)
        tail, k, below = (1.0 - level) / 2, 0, 0.0  # below: P(B <= k - 1) for B ~ Binomial(n, 1/2)
        while k < n // 2:
            below += math.comb(n, k) / 2.0**n
            if below > tail:
                break
            k += 1
        k = max(k, 1)
        return ratios[k - 1], ratios[n - k]

    def _ratios(self, numerator: str, denominator: str, scale: float) -> list[float]:
        a, b = self.seconds[numerator], self.seconds[denominator]
        if len(a) != len(b) or not a:
            raise ValueError(f"paired_ratio: {numerator!r} and {denominator!r} have {len(a)} and {len(b)} rounds")
        return [scale * x / y for x, y in zip(a, b, strict=True)]


def interleaved_rounds(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    noise_tolerance: float = 1.2,
    max_extra_rounds: int = 0,
    meter: PowerMeter | None = None,
) -> Rounds:
    """Time several candidates in interleaved rounds (fair on a noisy machine).

    Args:
        fns: name -> a call doing the work to time, or a :class:`BatchInterleaved` (under any key), whose
            calls time its candidates themselves (recorded under their own names).
        device: where the work runs (CUDA: timed with CUDA events; CPU: ``perf_counter``).
        repeats: rounds; each runs every candidate once, in reversed order on odd rounds.
        warmup: untimed calls of every candidate (in turn) before the rounds.
        noise_tolerance, max_extra_rounds: more rounds, up to ``max_extra_rounds``, while a candidate's
            slowest round is over ``noise_tolerance`` times its fastest.
        meter: a :class:`PowerMeter` to record each call's energy (``Rounds.joules``).
    """
    keys = list(fns)
    for _ in range(warmup):
        for key in keys:
            fns[key]()
    names = [n for key, fn in fns.items() for n in (fn.names if isinstance(fn, BatchInterleaved) else (key,))]
    times: dict[str, list[float]] = {name: [] for name in names}
    energy: dict[str, list[float]] = {name: [] for name in names}
    r = 0
    while r < repeats or (r < repeats + max_extra_rounds and noisy(times, noise_tolerance)):
        for key in keys if r % 2 == 0 else keys[::-1]:
            fn = fns[key]
            if isinstance(fn, BatchInterleaved):  # times its candidates itself
                sync(device)
                for name, dt in fn().items():
                    times[name].append(dt)
                continue
            dt, joules = _timed(fn, device, meter)
            times[key].append(dt)
            if joules is not None:
                energy[key].append(joules)
        r += 1
    return Rounds(times, {name: v for name, v in energy.items() if v})


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each candidate over ``repeats`` interleaved rounds (:func:`interleaved_rounds`)."""
    return interleaved_rounds(fns, device, repeats=repeats, warmup=warmup).medians()


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved_medians({"fn": fn}, device, repeats, warmup)["fn"]


def environment(device: torch.device) -> dict:
    """Where a timing ran: versions, device, threads, the machine's load, the cascade's execution plan."""
    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["cpu_count"] = os.cpu_count()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env["cascade_plan"] = cascade_plan(device.type).describe()
    return env
