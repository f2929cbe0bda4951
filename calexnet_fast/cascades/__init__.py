"""Early-exit cascades over a frozen staged backbone; exited samples really leave the batch.

Every cascade runs the one cascade loop of :class:`ReferenceCascade` and differs only in how a branch's
head and its exit decision run, how survivors are compacted and how the outputs are written:

- :class:`ReferenceCascade` (``reference``): plain PyTorch, the semantics; ``simulate`` + ``decide``.
- :class:`Cascade` (``fast``): fused Triton heads on CUDA, the C++ ``compact`` / ``scatter_rows_`` ops.
- :class:`DeployableCascade` (``deployable``): the TorchScript form of ``Cascade``.
- :class:`ScoreCascade` (``score``): ``Cascade`` with the baselines' score-based exit decision.

:class:`StreamingCascade` (``streaming``; ``Cascade.stream`` for short) runs a ``Cascade`` or
``ReferenceCascade`` over a stream of input batches with the same steps, survivors re-batched so that every
stage runs on full stage batches.

The exit rule they share is :mod:`calexnet_fast.exit_rule`; :class:`CascadeOutput` is what they return.
"""

from ..exit_rule import CascadeOutput
from .deployable import DeployableCascade
from .fast import Cascade
from .reference import ReferenceCascade, SimulatedOutput
from .score import ScoreCascade
from .streaming import Stream, StreamingCascade, StreamStats

__all__ = [
    "Cascade",
    "CascadeOutput",
    "DeployableCascade",
    "ReferenceCascade",
    "ScoreCascade",
    "SimulatedOutput",
    "Stream",
    "StreamStats",
    "StreamingCascade",
]
