"""Training: the fit engine, its batch sources, and backbone training.

* :mod:`~calexnet_fast.training.engine`: :func:`fit` (epochs over a batch source with a pluggable loss,
  cosine schedule, per-epoch checkpoints and resume, early stopping on a validation loss, DDP under
  ``torchrun``);
* :mod:`~calexnet_fast.training.sources`: :class:`CacheSource` (batches of a feature cache) and
  :class:`DatasetSource` (batches of images);
* :mod:`~calexnet_fast.training.backbone`: :func:`train_backbone` (a classifier trained on images).

The feature cache the heads train from (and :func:`~calexnet_fast.features.predict` over it) is
:mod:`calexnet_fast.features`; devices and process groups are :mod:`calexnet_fast.distributed`.
"""

from .backbone import BackboneTrainConfig, evaluate_classifier, train_backbone
from .engine import (
    CHECKPOINT_NAME,
    FitConfig,
    FitResult,
    epoch_order,
    evaluate_loss,
    fit,
    load_checkpoint,
    seed_everything,
)
from .sources import BatchSource, CachedBatch, CacheSource, DatasetSource, split_batches

__all__ = [
    "CHECKPOINT_NAME",
    "BackboneTrainConfig",
    "BatchSource",
    "CacheSource",
    "CachedBatch",
    "DatasetSource",
    "FitConfig",
    "FitResult",
    "epoch_order",
    "evaluate_classifier",
    "evaluate_loss",
    "fit",
    "load_checkpoint",
    "seed_everything",
    "split_batches",
    "train_backbone",
]
