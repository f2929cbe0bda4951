"""Backbone training: a classifier (e.g. a torchvision ResNet) trained on images with :func:`fit`.

SGD + Nesterov, a per-step cosine schedule, standard augmentation (the dataset's augmented view), the same
epoch checkpoints and resume as every other :func:`fit` run, an optional validation accuracy per epoch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..distributed import default_device, dist_info
from .engine import FitConfig, FitResult, fit
from .sources import DatasetSource

__all__ = ["BackboneTrainConfig", "evaluate_classifier", "train_backbone"]


@dataclass
class BackboneTrainConfig:
    """Backbone training recipe (the usual CIFAR ResNet schedule by default).

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay, warmup_epochs: SGD (Nesterov) with a per-step
            cosine schedule.
        label_smoothing: cross-entropy label smoothing.
        seed: shuffling / initialisation seed.
        num_workers: DataLoader workers.
        amp: bfloat16 autocast on CUDA.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 2
    amp: bool = True

    def fit_config(self) -> FitConfig:
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            schedule="cosine",
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
        )


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset, *, batch_size: int = 256, device=None, num_workers: int = 0
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode)."""
    from torch.utils.data import DataLoader

    device = torch.device(device) if device is not None else default_device()
    was = model.training
    model.eval().to(device)
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == torch.as_tensor(y)).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def train_backbone(
    model: nn.Module,
    train_set,
    val_set=None,
    config: BackboneTrainConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    run_config: dict | None = None,
) -> FitResult:
    """Train a classifier (e.g. a torchvision ResNet) on images with SGD, cosine schedule and augmentation.

    Args:
        model: an ``nn.Module`` mapping [B, 3, H, W] to logits (trained in place).
        train_set: training images; an ``ImageDataset`` is switched to its augmented view.
        val_set: optional images for a per-epoch validation accuracy (recorded in the history).
        config: :class:`BackboneTrainConfig`.
        out_dir: checkpoints go to ``out_dir/checkpoint.safetensors`` every epoch (resume from there).
        resume, device, progress, run_config: as in :func:`fit`.

    Returns:
        The :class:`FitResult` (history with ``loss`` and ``val_accuracy`` per epoch).
    """
    config = config or BackboneTrainConfig()
    if hasattr(train_set, "with_options"):
        train_set = train_set.with_options(augment=True)
    info = dist_info()
    device = torch.device(device) if device is not None else default_device()
    if info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ls = config.label_smoothing

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(m(x), y, label_smoothing=ls)

    def on_epoch_end(epoch: int, record: dict) -> dict | None:
        if val_set is None or not info.is_main:
            return None
        return {"val_accuracy": evaluate_classifier(model, val_set, device=device, num_workers=config.num_workers)}

    return fit(
        model,
        DatasetSource(train_set, num_workers=config.num_workers),
        loss_fn,
        config.fit_config(),
        checkpoint_dir=out_dir,
        resume=resume,
        device=device,
        progress=progress,
        desc="backbone",
        run_config={
            "backbone_train": {k: v for k, v in asdict(config).items() if k != "num_workers"},
            **(run_config or {}),
        },
        on_epoch_end=on_epoch_end,
        amp_dtype=torch.bfloat16 if config.amp else None,
    )
