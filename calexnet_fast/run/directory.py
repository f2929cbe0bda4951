"""The run directory: :class:`Run` reads and writes every file of it (see the package docstring)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import BackboneSpec, StagedBackbone, build_backbone
from ..calibration import CalibrationSweep
from ..data import DataSplits
from ..distributed import default_device
from ..features import FeatureCache, branch_logits
from ..flops import FlopsProfile, profile_flops
from ..io import atomic_write, file_sha256, load_state_file, read_json, save_state_file, write_json
from ..normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization
from .files import export_stages, exported_backbone, load_heads, save_heads
from .records import CacheConfig, RunError, load_splits, versions

__all__ = ["Run", "SplitLogits"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
HEADS = "heads.safetensors"
THRESHOLDS = "thresholds.safetensors"
RESULTS = "results.json"
TRAIN_LOG = "train_log.json"
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_PROGRAMS = "backbone"
LOGITS = "logits"
CHECKSUMS = "sha256.json"


@dataclass
class SplitLogits:
    """What calibration and evaluation need of one split: branch logits [K, N, C], backbone logits [N, C],
    labels [N]."""

    branch: torch.Tensor
    backbone: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        k_n_c, n_c, n = tuple(self.branch.shape), tuple(self.backbone.shape), tuple(self.labels.shape)
        if len(k_n_c) != 3 or len(n_c) != 2 or k_n_c[1:] != n_c or n != n_c[:1]:
            raise ValueError(
                f"logits: expected branch [K, N, C], backbone [N, C] and labels [N], got {list(k_n_c)}, "
                f"{list(n_c)} and {list(n)}"
            )

    @classmethod
    def of_heads(cls, heads: Sequence[nn.Module], cache: FeatureCache, *, device=None) -> SplitLogits:
        """The logits of the K branch heads (head ``k`` on branch ``k``) on every sample of a feature cache,
        with the cache's backbone logits and labels (``device``: where the heads run)."""
        return cls(branch_logits(heads, cache, device=device), cache.logits_tensor(), cache.labels_tensor())


class Run:
    """A run directory (see the module docstring for its files).

    Create one from Python with :meth:`create`, then :meth:`save_heads`, :meth:`save_logits`,
    :meth:`save_thresholds`; or open an existing one with ``Run(path)`` and read it with :meth:`config`,
    :meth:`load_backbone`, :meth:`load_heads`, :meth:`load_logits` (:meth:`split_logits` computes missing
    ones), :meth:`load_thresholds`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- config and backbone ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        backbone: StagedBackbone,
        *,
        spec: BackboneSpec | None = None,
        dataset: dict | None = None,
        recipe: dict | None = None,
        fit: dict | None = None,
        **extra,
    ) -> Run:
        """Start a run directory: write ``config.json`` and whatever rebuilds ``backbone`` exactly.

        Args:
            path: the directory (created; an existing run there is overwritten file by file).
            backbone: the frozen backbone the heads are (or will be) trained on.
            spec: how to rebuild it by name (what ``calexnet train`` records); without a checkpoint file its
                weights are saved in the run. Without ``spec`` the stages are saved as ``torch.export``
                programs (any ``StagedBackbone``, e.g. from ``backbones.from_stages``).
            dataset: the record :func:`load_splits` reads (needed by ``calexnet measure`` and to compute
                missing logits); recipe, fit: the recipe's and the optimisation's JSON (for the record and the
                calibration defaults).
            extra: more JSON-able entries of ``config.json`` (``command``, ``argv``, ``cache`` ...).
        """
        run = cls(path)
        record = run._save_backbone(backbone, spec)
        config = {"command": "python", "dataset": dataset, "backbone": record, "recipe": recipe, "fit": fit}
        config.update(extra)
        config["versions"] = versions()
        write_json(run.path / CONFIG, config)
        return run

    def config(self) -> dict:
        """``config.json``."""
        path = self.path / CONFIG
        if not path.is_file():
            raise RunError(
                f"run {self.path}: no config.json there; expected a directory written by `calexnet train --out "
                f"{self.path}` or by calexnet_fast.run.Run.create"
            )
        try:
            config = read_json(path, "run config")
        except (ValueError, RuntimeError) as e:
            raise RunError(str(e)) from e
        if config.get("command") == "train-backbone":
            raise RunError(
                f"run {self.path}: this is a backbone run (`calexnet train-backbone`); train branches on it "
                f"with `calexnet train --backbone-run {self.path}`"
            )
        return config

    def _save_backbone(self, backbone: StagedBackbone, spec: BackboneSpec | None) -> dict:
        if spec is not None:
            record = spec.to_json()
            if spec.checkpoint is None:
                weights = {
                    k: v.float() if v.is_floating_point() else v for k, v in backbone.source_state_dict().items()
                }
                self._record(BACKBONE_WEIGHTS, save_state_file(self.path / BACKBONE_WEIGHTS, weights))
                record["checkpoint"] = BACKBONE_WEIGHTS
            return record
        stages = []
        for i, data in enumerate(export_stages(backbone)):
            rel = f"{BACKBONE_PROGRAMS}/stage{i}.pt2"
            atomic_write(self.path / rel, lambda f, data=data: f.write(data))
            self._record(rel, hashlib.sha256(data).hexdigest())
            stages.append(rel)
        return {
            "exported": stages,
            "name": backbone.name,
            "branch_points": list(backbone.branch_points),
            "in_channels": backbone.in_channels,
            "input_size": list(backbone.input_size),
            "n_classes": backbone.n_classes,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        }

    def backbone_record(self) -> dict:
        """``config.json``'s ``backbone``: a ``BackboneSpec`` as JSON, or the exported stages' description."""
        record = self.config().get("backbone")
        if not isinstance(record, dict):
            raise RunError(f"run config {self.path / CONFIG}: expected a 'backbone' object, got {record!r}")
        return record

    def normalization(self) -> Normalization:
        """The input normalisation of the run's backbone."""
        record = self.backbone_record()
        mean, std = record.get("mean") or IMAGENET_MEAN, record.get("std") or IMAGENET_STD
        return Normalization(tuple(mean), tuple(std), "backbone")

    def load_backbone(self) -> StagedBackbone:
        """The frozen backbone the run was trained on, rebuilt exactly (its weights checked if in the run)."""
        record = self.backbone_record()
        if "exported" not in record:
            spec = BackboneSpec.from_json(record)
            if spec.checkpoint is not None and not Path(spec.checkpoint).is_absolute():
                self._verify(spec.checkpoint)
                spec.checkpoint = str(self.path / spec.checkpoint)
            try:
                return build_backbone(spec)
            except (ValueError, RuntimeError) as e:
                raise RunError(f"run {self.path}: backbone {spec.arch}: {e}") from e
        for rel in record["exported"]:
            self._verify(rel)
        try:
            return exported_backbone([self.path / rel for rel in record["exported"]], record)
        except RuntimeError as e:
            raise RunError(str(e)) from e

    def load_data(self, data_dir: str | None = None) -> DataSplits:
        """The run's dataset splits with the backbone's normalisation (``data_dir``: if it moved)."""
        dataset = self.config().get("dataset")
        if not isinstance(dataset, dict) or "name" not in dataset:
            raise RunError(
                f"run {self.path}: its config.json records no dataset; save the run with "
                "Run.create(..., dataset={'name': ..., 'data_dir': ...}) to use it here"
            )
        try:
            return load_splits(dataset, self.normalization(), data_dir)
        except ValueError as e:
            raise RunError(str(e)) from e

    # -- heads -------------------------------------------------------------------------------------

    def save_heads(self, heads: Sequence[nn.Module], backbone: StagedBackbone, config: dict | None = None) -> None:
        """Write the trained heads, with the per-sample FLOPs of the backbone's segments and of each head."""
        profile = profile_flops(backbone, heads)
        meta = {
            "branch_points": list(backbone.branch_points),
            "n_classes": backbone.n_classes,
            "flops": {"segment_flops": list(profile.segment_flops), "head_flops": list(profile.head_flops)},
            **(config or {}),
        }
        self._record(HEADS, save_heads(self.path / HEADS, heads, meta))

    def load_heads(self, head_factory: Callable[[int, dict], nn.Module] | None = None) -> tuple[nn.ModuleList, dict]:
        """The trained heads (eval mode) and the heads file's config."""
        path = self._need(HEADS, "calexnet train")
        try:
            return load_heads(path, head_factory, self._sha(HEADS))
        except (ValueError, RuntimeError) as e:
            raise RunError(f"{e}; train again (`calexnet train --out {self.path}`) to rewrite it") from e

    def flops_profile(self) -> FlopsProfile:
        """Per-sample FLOPs of the backbone's segments and the heads (recorded with the heads)."""
        heads, config = self.load_heads()
        flops = config.get("flops")
        if flops is None:  # written before the heads file recorded them
            return profile_flops(self.load_backbone(), heads)
        return FlopsProfile(tuple(flops["segment_flops"]), tuple(flops["head_flops"]))

    # -- logits ------------------------------------------------------------------------------------

    def save_logits(self, split: str, logits: SplitLogits) -> None:
        """Keep a split's logits (they belong to the heads saved before them: new heads make them stale)."""
        heads_sha256 = self._sha(HEADS)
        if heads_sha256 is None:
            raise RunError(f"run {self.path}: save the heads (Run.save_heads) before their logits")
        rel = f"{LOGITS}/{split}.safetensors"
        tensors = {
            "branch_logits": logits.branch.float(),
            "backbone_logits": logits.backbone.float(),
            "labels": logits.labels.long(),
        }
        meta = {"split": split, "n": int(logits.labels.shape[0]), "heads_sha256": heads_sha256}
        self._record(rel, save_state_file(self.path / rel, tensors, meta))

    def load_logits(self, split: str) -> SplitLogits | None:
        """A split's cached logits, or ``None`` when the run has none for the current heads."""
        rel = f"{LOGITS}/{split}.safetensors"
        if not (self.path / rel).is_file():
            return None
        try:
            tensors, meta = load_state_file(self.path / rel, self._sha(rel))
            logits = SplitLogits(tensors["branch_logits"], tensors["backbone_logits"], tensors["labels"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RunError(f"{self.path / rel}: {e}; delete it to have the logits computed again") from e
        if meta.get("heads_sha256") != self._sha(HEADS):
            log.info("%s: computed with other heads than the run's; not used", self.path / rel)
            return None
        return logits

    def split_logits(
        self, split: str, *, data_dir: str | None = None, device=None, progress: bool = False
    ) -> SplitLogits:
        """The logits of the ``"val"`` or ``"test"`` split: the ones the run keeps, or computed once (the
        backbone runs over the split, cached as the run's ``cache`` options say) and kept.

        Args:
            data_dir: the dataset directory, if it moved since the run was written.
            device: where the backbone and the heads run (default: the GPU if there is one).
        """
        if split not in ("val", "test"):
            raise RunError(f"split: expected 'val' or 'test', got {split!r}")
        logits = self.load_logits(split)
        if logits is not None:
            return logits
        log.info("no %s logits in %s for its heads: computing them once (the backbone runs over it)", split, self.path)
        device = torch.device(device) if device is not None else default_device()
        heads, _ = self.load_heads()
        splits = self.load_data(data_dir)
        cache = CacheConfig.from_json(self.config().get("cache")).build(
            self.load_backbone(), getattr(splits, split), split, self.path, device=device, progress=progress
        )
        logits = SplitLogits.of_heads(heads, cache, device=device)
        self.save_logits(split, logits)
        return logits

    # -- thresholds, results, training log ----------------------------------------------------------

    def save_thresholds(self, sweep: CalibrationSweep) -> None:
        """Write the calibrated thresholds of every margin."""
        sweep.save(self.path / THRESHOLDS)
        self._record(THRESHOLDS, file_sha256(self.path / THRESHOLDS))

    def load_thresholds(self) -> CalibrationSweep:
        """The calibrated thresholds of every margin."""
        path = self._need(THRESHOLDS, "calexnet calibrate")
        self._verify(THRESHOLDS)
        try:
            return CalibrationSweep.load(path)
        except (ValueError, RuntimeError) as e:
            raise RunError(f"{e}; calibrate again (`calexnet calibrate --run {self.path}`) to rewrite it") from e

    def thresholds_at(self, margin: float) -> torch.Tensor:
        """[K, C] thresholds of the calibrated margin nearest to ``margin`` (which must lie in the sweep)."""
        sweep = self.load_thresholds()
        lo, hi = float(sweep.margins.min()), float(sweep.margins.max())
        if not lo - 1e-6 <= float(margin) <= hi + 1e-6:
            raise RunError(f"margin: expected a value within the calibrated sweep [{lo:.3f}, {hi:.3f}], got {margin}")
        return sweep.at(int((sweep.margins - float(margin)).abs().argmin()))

    def save_results(self, results: dict) -> None:
        write_json(self.path / RESULTS, results)

    def save_train_log(self, train_log: dict) -> None:
        write_json(self.path / TRAIN_LOG, train_log)

    def cascade_parts(self, margin: float = 0.2) -> tuple[StagedBackbone, nn.ModuleList, torch.Tensor]:
        """(backbone, heads, [K, C] thresholds at ``margin``): everything a cascade of this run needs."""
        self._need(CONFIG, "calexnet train")
        self._need(HEADS, "calexnet train")
        self._need(THRESHOLDS, "calexnet calibrate")
        thresholds = self.thresholds_at(margin)
        heads, _ = self.load_heads()
        return self.load_backbone(), heads, thresholds

    # -- files and their digests -------------------------------------------------------------------

    def _need(self, rel: str, made_by: str) -> Path:
        path = self.path / rel
        if not path.is_file():
            raise RunError(f"run: expected {path} (written by `{made_by}`), it is not there")
        return path

    def _checksums(self) -> dict[str, str]:
        path = self.path / CHECKSUMS
        if not path.is_file():
            return {}
        try:
            return read_json(path, "run checksums")
        except RuntimeError as e:
            raise RunError(f"{e}; the run's files can no longer be checked") from e

    def _sha(self, rel: str) -> str | None:
        return self._checksums().get(rel)

    def _record(self, rel: str, sha256: str) -> None:
        sums = self._checksums()
        sums[rel] = sha256
        write_json(self.path / CHECKSUMS, dict(sorted(sums.items())))

    def _verify(self, rel: str) -> None:
        want = self._sha(rel)
        if want is not None and (got := file_sha256(self.path / rel)) != want:
            raise RunError(
                f"{self.path / rel}: damaged or replaced: its SHA-256 is {got}, the one recorded in "
                f"{self.path / CHECKSUMS} when it was written is {want}"
            )
