"""The run directory: the one owner of its layout, written by ``calexnet train`` or from Python, read by
``calexnet calibrate`` / ``evaluate`` / ``measure`` and :meth:`calexnet_fast.Cascade.from_run`.

A run directory holds::

    RUN/config.json                     what was run: dataset, backbone, recipe, optimisation, cache, versions
    RUN/backbone.safetensors            the backbone's weights when no file outside the run holds them
                                        (``--random-init``: the exact backbone that was trained on)
    RUN/backbone/stage<i>.pt2           a backbone given only as a module (e.g. ``backbones.from_stages``),
                                        saved as ``torch.export`` programs, one per stage
    RUN/heads.safetensors (+ .json)     the trained heads, their FLOPs and the backbone's segment FLOPs
    RUN/logits/<split>.safetensors      branch logits [K, N, C], backbone logits [N, C] and labels [N] of the
                                        validation and test splits: calibrate and evaluate need only these
    RUN/thresholds.safetensors (+ .json) CPM thresholds for a sweep of margins (``calexnet calibrate``)
    RUN/results.json                    accuracy and FLOPs reduction per margin (``calexnet evaluate``)
    RUN/train_log.json                  loss history, training weights, m_train thresholds
    RUN/sha256.json                     the SHA-256 of the backbone, heads, logits and thresholds files,
                                        recorded when each is written and checked when it is read: a damaged
                                        file is reported, never used (the feature cache checks its own data)
    RUN/branches/branch_<k>/            the training engine's per-branch checkpoints (resume)
    RUN/cache/<split>.safetensors       branch features of each split (``--cache disk``)

A directory written by ``calexnet train-backbone`` (:func:`save_trained_backbone`, read back by
:func:`trained_backbone`) holds ``backbone.safetensors`` (+ ``backbone.json``: architecture, stem, classes,
normalisation) beside its ``config.json``, ``train_log.json`` and epoch checkpoint.

:func:`data_and_backbone` turns the data and backbone options of ``calexnet train`` / ``calexnet compare``
(or any object holding them as attributes) into the dataset record, its splits, the backbone spec and the
frozen backbone; :meth:`Run.split_logits` computes a split's logits once when the run has none.

Every error names the file and what was expected: :class:`RunError` (a ``ValueError``).
"""

from .directory import Run, SplitLogits
from .files import load_heads, save_heads
from .records import (
    BACKBONE_OPTIONS,
    DATA_OPTIONS,
    CacheConfig,
    RunError,
    TrainingInputs,
    backbone_input,
    backbone_spec,
    class_map_of,
    data_and_backbone,
    dataset_record,
    dataset_record_of,
    load_splits,
    save_trained_backbone,
    spec_normalization,
    trained_backbone,
    versions,
)

__all__ = [
    "BACKBONE_OPTIONS",
    "DATA_OPTIONS",
    "CacheConfig",
    "Run",
    "RunError",
    "SplitLogits",
    "TrainingInputs",
    "backbone_input",
    "backbone_spec",
    "class_map_of",
    "data_and_backbone",
    "dataset_record",
    "dataset_record_of",
    "load_heads",
    "load_splits",
    "save_heads",
    "save_trained_backbone",
    "spec_normalization",
    "trained_backbone",
    "versions",
]
