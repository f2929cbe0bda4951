"""What one ``calexnet measure`` call shares: its configuration, the decoded test images and the backbone's
features on them (:class:`Session`), and its outputs: ``speed.json`` (:func:`payload`), ``speed.png`` /
``speed.svg`` and ``speed_table.md`` (:func:`write_outputs`), resumed runs (:func:`previous_runs`).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..backbones import inference_form
from ..data import decode_images
from ..distributed import default_device
from ..features import backbone_features
from .points import parse_margins, point_metrics
from .report import headline_table, margin_table, plot_speed, points_table, speed_table
from .speed import MODES, frontiers, headline, measure_points
from .timing import CPU_ENERGY_NOTE, PowerMeter, TimingConfig, environment, noisy

__all__ = [
    "DEFAULT_MODES",
    "DTYPES",
    "MeasureConfig",
    "Session",
    "margin_list",
    "payload",
    "previous_runs",
    "report",
    "write_outputs",
]

log = logging.getLogger(__name__)

PIPELINE_NOTE = (
    "test images decoded once into one normalised tensor; only the model work on batches of that tensor is "
    "timed (no decoding or data loading); backbone alone and cascade (per batch, and streaming over the batches "
    "of a round) run on the same batches, device, dtype, memory format and inference form of the stages, in "
    "interleaved rounds (order alternating), median over rounds"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MARGINS = "0,0.05,0.1,0.15,0.2,0.3"
DEFAULT_BASELINE_REDUCTIONS = "0.1,0.2,0.3,0.4,0.5"
DEFAULT_MODES = ",".join(MODES)


@dataclass
class MeasureConfig:
    """Everything ``calexnet measure`` is told (the fields and defaults of its command-line options).

    Source, exactly one of: ``run`` (a run directory of ``calexnet train`` + ``calexnet calibrate``) or
    ``compare`` (the output directory of ``calexnet compare``; with ``work_dir``, ``methods``, ``seeds`` as
    comma lists, default: all it ran). Points: ``margins`` (a comma list, ``START:STOP:COUNT`` or ``"all"``;
    a run measures the calibrated margins closest to these), ``baseline_reductions`` (per target FLOPs
    reduction, the baseline's Pareto-envelope point nearest to it), ``losses`` (``compare``, every method:
    per accuracy loss, the envelope point with the largest reduction within it). Output: ``out`` (default:
    the source). Timing:
    ``batch_size``, ``repeats``, ``warmup``, ``timing_images`` (0: all), ``max_extra_rounds``, ``dtype``
    (a key of :data:`DTYPES`), ``channels_last`` (``None``: on), ``fold`` (the frozen stages' inference form,
    ``backbones.inference_form``: BatchNorm folded into the convolutions; for the backbone and the cascade
    alike). Modes:
    ``modes`` (a comma list of :data:`~.speed.MODES`: ``batch`` per input batch, ``stream`` streaming),
    ``stage_batch`` (rows per stage run when streaming; ``None``: ``batch_size``). ``max_loss``: the
    headline's accuracy loss.
    ``resume``: keep runs already in ``out/speed.json`` measured alike. ``render``: measure nothing, redo
    summary, figure and table from ``speed.json``. ``data_dir``: the dataset if it moved. Execution:
    ``device``, ``threads``, ``quiet``.
    """

    run: str | None = None
    compare: str | None = None
    work_dir: str | None = None
    methods: str | None = None
    seeds: str | None = None
    margins: str = DEFAULT_MARGINS
    baseline_reductions: str = DEFAULT_BASELINE_REDUCTIONS
    losses: str = ""
    out: str | None = None
    batch_size: int = 256
    repeats: int = 5
    warmup: int = 1
    timing_images: int = 0
    max_extra_rounds: int = 4
    dtype: str = "float32"
    channels_last: bool | None = None
    fold: bool = True
    modes: str = DEFAULT_MODES
    stage_batch: int | None = None
    max_loss: float = 0.01
    resume: bool = False
    render: bool = False
    data_dir: str | None = None
    device: str | None = None
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if (self.run is None) == (self.compare is None):
            raise ValueError(
                f"run, compare: expected exactly one of them, got run={self.run!r}, compare={self.compare!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        modes = self.mode_list()
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"modes: expected a comma list of {', '.join(MODES)}, got {self.modes!r}")
        if self.stage_batch is not None and self.stage_batch < 1:
            raise ValueError(f"stage_batch: expected a positive int (or None: batch_size), got {self.stage_batch}")

    def mode_list(self) -> list[str]:
        """The modes to measure, in :data:`~.speed.MODES` order."""
        given = [m.strip() for m in self.modes.split(",") if m.strip()]
        return [m for m in MODES if m in given] + [m for m in given if m not in MODES]


def margin_list(text: str) -> list[float] | None:
    """The margins of ``MeasureConfig.margins`` (``None`` for ``"all"``, none for ``"none"``)."""
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return []
    return [float(v) for v in parse_margins(text)]


def _prepare(model: nn.Module, device, dtype, channels_last: bool) -> nn.Module:
    model = model.eval().to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class Session:
    """What every run of one ``calexnet measure`` call shares: device, images, backbone and its features.

    ``bb`` is the backbone in the inference form that is timed (BatchNorm folded unless ``fold`` is off;
    device, dtype, memory format): the cascades are built on its stages and the simulated evaluation uses its
    features, so real and simulated run the same arithmetic. ``trained`` is the backbone as trained (feature
    caches shared with ``calexnet compare`` are built and checked with it). With ``calibration_rows`` (the
    test rows that chose the thresholds) those rows form ``calibration`` and only the others are measured.
    """

    def __init__(self, cfg: MeasureConfig, bb, splits, calibration_rows: torch.Tensor | None = None) -> None:
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        self.dtype = DTYPES[cfg.dtype]
        self.channels_last = True if cfg.channels_last is None else bool(cfg.channels_last)
        self.fold = bool(cfg.fold)
        self.modes = cfg.mode_list()
        self.stage_batch = cfg.stage_batch or cfg.batch_size
        self.timing = TimingConfig(
            cfg.batch_size,
            cfg.repeats,
            cfg.warmup,
            cfg.timing_images or None,
            max_extra_rounds=cfg.max_extra_rounds,
        )
        self.progress = not cfg.quiet
        inference = inference_form(bb.eval()) if self.fold else bb  # folded in float32, then cast
        self.trained = _prepare(bb, self.device, self.dtype, self.channels_last)
        self.bb = _prepare(inference, self.device, self.dtype, self.channels_last)
        t0 = time.time()
        x, y = decode_images(splits.test)
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.images, self.labels = x, y
        log.info(f"decoded {x.shape[0]} test images into one tensor {list(x.shape)} in {time.time() - t0:.1f}s")
        t0 = time.time()
        self.test = backbone_features(self.bb, x, cfg.batch_size, self.progress)
        self.test.labels = y
        self.calibration = None
        if calibration_rows is not None:  # the test half that calibrates; the other half is measured
            keep = torch.ones(y.shape[0], dtype=torch.bool)
            keep[calibration_rows] = False
            rows = keep.nonzero().squeeze(1)
            self.calibration = self.test.subset(calibration_rows)
            self.test = self.test.subset(rows)
            self.images, self.labels = x.index_select(0, rows.to(x.device)), y[rows]
            y = self.labels
        self.backbone_accuracy = float((self.test.logits_tensor().argmax(1) == y).double().mean())
        log.info(
            f"backbone features of the test images in {time.time() - t0:.1f}s; accuracy {self.backbone_accuracy:.4f}"
        )

    def form(self) -> str:
        """How the models run, in words (for titles)."""
        modes = " and ".join(
            "per batch" if m == "batch" else f"streaming (stage batch {self.stage_batch})" for m in self.modes
        )
        layout = ", channels_last" if self.channels_last else ""
        return f"batch {self.timing.batch_size}, {modes}, BatchNorm {'folded' if self.fold else 'as trained'}{layout}"

    def measure(self, cascade, thresholds, profile, params, expected, desc) -> list[dict]:
        cascade = _prepare(cascade, self.device, self.dtype, False)
        return measure_points(
            cascade,
            self.bb,
            self.images,
            self.labels,
            [t.to(self.device) for t in thresholds],
            profile,
            params=params,
            expected=expected,
            config=self.timing,
            modes=self.modes,
            stage_batch=self.stage_batch,
            progress=self.progress,
            desc=desc,
        )

    def simulated(self, profile, expected) -> list[dict]:
        """Accuracy and FLOPs reduction of the simulated evaluation at each point (``expected``'s decisions)."""
        return [
            {k: v for k, v in point_metrics(pred, ex, self.labels, profile).items() if k != "exit_fractions"}
            for pred, ex in expected
        ]


def write_outputs(out: Path, payload: dict, title: str) -> None:
    """``speed.json`` and, with any run in it, ``speed.png`` / ``speed.svg`` and ``speed_table.md``."""
    payload["title"] = title
    io.write_json(out / "speed.json", payload, indent=1)
    if payload["runs"]:
        plot_speed(
            payload["runs"],
            [out / "speed.png", out / "speed.svg"],
            backbone_accuracy=payload["backbone"]["test_accuracy"],
            title=title,
        )
        summary = payload["summary"]
        tables = [headline_table(summary), speed_table(summary), margin_table(payload["runs"])]
        tables.append(points_table(payload["runs"]))
        io.write_text(out / "speed_table.md", "\n".join(tables))


def payload(cfg: MeasureConfig, session: Session, runs: list[dict], source: dict, t_start: float) -> dict:
    """The content of ``speed.json``."""
    bb_ips = [p["images_per_s"]["backbone"] for r in runs for p in r["points"]]
    return {
        "command": "measure",
        "argv": sys.argv,
        "source": source,
        "pipeline": PIPELINE_NOTE,
        "energy": PowerMeter(session.device).reason if session.device.type == "cuda" else CPU_ENERGY_NOTE,
        "timing": asdict(session.timing),
        "dtype": cfg.dtype,
        "channels_last": session.channels_last,
        "fold_batchnorm": session.fold,
        "modes": session.modes,
        "stage_batch": session.stage_batch,
        "environment": environment(session.device),
        "backbone": {
            "test_accuracy": session.backbone_accuracy,
            "n_test": int(session.labels.shape[0]),
            "images_per_s_median_over_points": statistics.median(bb_ips) if bb_ips else None,
        },
        "summary": headline(runs, session.backbone_accuracy, cfg.max_loss),
        "frontiers": frontiers(runs),
        "runs": runs,
        "seconds": time.time() - t_start,
    }


def previous_runs(out: Path, cfg: MeasureConfig, session: Session) -> dict:
    """With ``resume``: the runs of ``out/speed.json`` measured alike (timing, dtype, memory format, inference
    form, modes, stage batch), and settled."""
    path = out / "speed.json"
    if not cfg.resume or not path.is_file():
        return {}
    old = io.read_json(path, "speed.json")
    timing = session.timing
    same = ("batch_size", "repeats", "warmup", "timing_images", "timing_seed")
    if any((old.get("timing") or {}).get(k) != getattr(timing, k) for k in same):
        return {}
    setting = {
        "dtype": cfg.dtype,
        "channels_last": session.channels_last,
        "fold_batchnorm": session.fold,
        "modes": session.modes,
        "stage_batch": session.stage_batch,
    }
    if any(old.get(k) != v for k, v in setting.items()):
        return {}

    def settled(run: dict) -> bool:
        # a point whose rounds were disturbed and that did not get every extra round is measured again
        return all(
            not noisy(p["seconds_per_round"], timing.noise_tolerance)
            or len(p["seconds_per_round"]["backbone"]) >= timing.repeats + timing.max_extra_rounds
            for p in run["points"]
        )

    return {(r["method"], r["seed"]): r for r in old.get("runs", []) if settled(r)}


def report(result: dict, out: Path, quiet: bool) -> None:
    """Print the points and the headline (unless ``quiet``) and say where the results are."""
    if not quiet:
        print(
            f"backbone accuracy {result['backbone']['test_accuracy']:.4f}, "
            f"{result['backbone']['images_per_s_median_over_points']:.0f} images/s (median over points)"
        )
        print(points_table(result["runs"]))
        print(speed_table(result["summary"]))
    log.info(f"results in {out / 'speed.json'}, {out / 'speed.png'}, {out / 'speed_table.md'}")
