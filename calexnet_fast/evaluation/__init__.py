"""Evaluation of early-exit methods: simulated operating points, Pareto envelopes, measured speed, reports.

* :mod:`~calexnet_fast.evaluation.points`: the one simulated operating-point evaluation (exit decisions per
  point, accuracy, exit fractions, FLOPs reduction) and the sweeps of a method's operating parameter;
* :mod:`~calexnet_fast.evaluation.pareto`: Pareto envelopes, reading them at a reduction, their area,
  statistics over seeds;
* :mod:`~calexnet_fast.evaluation.timing`: the one timing harness (interleaved rounds, medians, re-runs of
  disturbed rounds, energy), also used by ``bench/``;
* :mod:`~calexnet_fast.evaluation.speed`: the real cascade at every operating point, timed against the backbone;
* :mod:`~calexnet_fast.evaluation.report`: figures and Markdown tables in one style;
* :mod:`~calexnet_fast.evaluation.protocol`: where thresholds are chosen and where they are judged (test halves
  or the validation split);
* :mod:`~calexnet_fast.evaluation.compare`: the ``calexnet compare`` engine (:class:`CompareConfig`,
  :func:`run_compare`);
* :mod:`~calexnet_fast.evaluation.measure` (+ :mod:`~calexnet_fast.evaluation.measure_session`): the
  ``calexnet measure`` engine (:class:`MeasureConfig`, :func:`run_measure`).
"""

from .compare import CPM_METHODS, DEFAULT_METHODS, CompareConfig, run_compare
from .measure import MeasureConfig, run_measure
from .pareto import AREA_RANGE, REDUCTIONS, aggregate, envelope_area, envelope_value, pareto_envelope, summarize
from .points import (
    SweepResult,
    baseline_decisions,
    cpm_decisions,
    evaluate_points,
    parse_margins,
    point_metrics,
    score_decisions,
    sweep_cpm,
    sweep_global_threshold,
    threshold_grid,
)
from .report import margin_table, plot_envelopes, plot_speed, points_table, results_table, speed_table
from .speed import frontiers, headline, measure_points
from .timing import PowerMeter, TimingConfig, interleaved_medians, interleaved_rounds, median_time

__all__ = [
    "AREA_RANGE",
    "CPM_METHODS",
    "DEFAULT_METHODS",
    "REDUCTIONS",
    "CompareConfig",
    "MeasureConfig",
    "PowerMeter",
    "SweepResult",
    "TimingConfig",
    "aggregate",
    "baseline_decisions",
    "cpm_decisions",
    "envelope_area",
    "envelope_value",
    "evaluate_points",
    "frontiers",
    "headline",
    "interleaved_medians",
    "interleaved_rounds",
    "margin_table",
    "measure_points",
    "median_time",
    "pareto_envelope",
    "parse_margins",
    "plot_envelopes",
    "plot_speed",
    "point_metrics",
    "points_table",
    "results_table",
    "run_compare",
    "run_measure",
    "score_decisions",
    "speed_table",
    "summarize",
    "sweep_cpm",
    "sweep_global_threshold",
    "threshold_grid",
]
