"""The published early-exit baselines on a frozen backbone: PTEEnet, ZTW and BoostNet.

* :mod:`~calexnet_fast.baselines.models`: the models, their losses and their exit outputs (score, prediction);
* :mod:`~calexnet_fast.baselines.train`: construction by name, head FLOPs, training on cached features;
* :mod:`~calexnet_fast.baselines.exit_heads`: each exit as an exit head of a score cascade.

Their exit rule (one global threshold on the score) is :func:`calexnet_fast.exit_rule.global_threshold_exit`.
"""

from .exit_heads import BoostNetExitHead, PTEEnetExitHead, ZTWExitHead, baseline_exit_heads
from .models import (
    ZTW,
    BoostNet,
    ExitOutputs,
    GeometricEnsembles,
    PTEEnet,
    PTEEnetExit,
    SDNPool,
    ZTWHead,
    boosted_predictions,
    cumulative_eenet,
)
from .train import (
    BASELINE_NAMES,
    BaselineConfig,
    TensorSource,
    TrainedBaseline,
    baseline_head_flops,
    exit_outputs,
    make_baseline,
    train_baseline,
)

__all__ = [
    "BASELINE_NAMES",
    "BaselineConfig",
    "BoostNet",
    "BoostNetExitHead",
    "ExitOutputs",
    "GeometricEnsembles",
    "PTEEnet",
    "PTEEnetExit",
    "PTEEnetExitHead",
    "SDNPool",
    "TensorSource",
    "TrainedBaseline",
    "ZTW",
    "ZTWExitHead",
    "ZTWHead",
    "baseline_exit_heads",
    "baseline_head_flops",
    "boosted_predictions",
    "cumulative_eenet",
    "exit_outputs",
    "make_baseline",
    "train_baseline",
]
