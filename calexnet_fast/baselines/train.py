"""Building, training and running the baselines on cached branch features.

:func:`train_baseline` builds a baseline by name (:func:`make_baseline`), counts its heads' FLOPs
(:func:`baseline_head_flops`, with :mod:`calexnet_fast.flops`: ``FlopCounterMode``), sets PTEEnet's exit
costs from them and trains it from a :class:`~calexnet_fast.features.FeatureCache` with the engine's
:func:`~calexnet_fast.training.fit` (ZTW in two stages: heads, then its ensembles on the fixed heads'
logits, trained on the training split; the validation split is kept for thresholds only).
:func:`exit_outputs` gives the score and prediction of every exit on every cached sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..features import FeatureCache, predict
from ..flops import count_flops
from ..heads import DEFAULT_HEAD_DIMS, HEADS
from ..io import load_state_file, save_state_file
from ..training import BatchSource, CacheSource, FitConfig, evaluate_loss, fit
from .models import ZTW, BoostNet, ExitOutputs, PTEEnet

__all__ = [
    "BASELINE_NAMES",
    "BaselineConfig",
    "TensorSource",
    "TrainedBaseline",
    "baseline_head_flops",
    "exit_outputs",
    "make_baseline",
    "train_baseline",
]

BASELINE_NAMES: tuple[str, ...] = ("pteenet", "ztw", "boostnet")


@dataclass
class BaselineConfig:
    """Options of the three baselines (defaults as BASELINES.md).

    Attributes:
        pteenet_convs: PTEEnet exit block depth (2 = ``conv2``).
        pteenet_cost_weight: λ (1).
        pteenet_target: ``"backbone"`` or ``"labels"``.
        ztw_cascading: ZTW cascade connections.
        ztw_ensemble_epochs: epochs of the second (ensemble) stage.
        ztw_ensemble_lr: its learning rate.
        boost_r: BoostNet's r (0.5).
        boost_target: ``"labels"`` or ``"backbone"``.
        boost_head: BoostNet's heads, the CalexNet head by name (``"grid"``, default, or ``"prototype"``).
        head_dim, n_prototypes: their D (``None``: the head's default) and K.
        max_size: PTEEnet's exit blocks and ZTW's heads read the branch map average-pooled to at most this
            side (``None``: the full map, as published); heads that start with this pooling train exactly on
            a feature cache pooled the same way.
    """

    pteenet_convs: int = 2
    pteenet_cost_weight: float = 1.0
    pteenet_target: str = "backbone"
    ztw_cascading: bool = True
    ztw_ensemble_epochs: int = 20
    ztw_ensemble_lr: float = 1e-2
    boost_r: float = 0.5
    boost_target: str = "labels"
    boost_head: str = "grid"
    head_dim: int | None = None
    n_prototypes: int = 32
    max_size: int | None = None


def make_baseline(
    name: str, branch_channels: Sequence[int], n_classes: int, config: BaselineConfig | None = None
) -> nn.Module:
    """A fresh baseline model by name (one of :data:`BASELINE_NAMES`), initialised from torch's RNG."""
    cfg = config or BaselineConfig()
    if name == "pteenet":
        return PTEEnet(
            branch_channels,
            n_classes,
            n_convs=cfg.pteenet_convs,
            cost_weight=cfg.pteenet_cost_weight,
            target=cfg.pteenet_target,
            max_size=cfg.max_size,
        )
    if name == "ztw":
        return ZTW(branch_channels, n_classes, cascading=cfg.ztw_cascading, max_size=cfg.max_size)
    if name == "boostnet":
        return BoostNet(
            branch_channels,
            n_classes,
            r=cfg.boost_r,
            head_dim=cfg.head_dim or DEFAULT_HEAD_DIMS[cfg.boost_head],
            n_prototypes=cfg.n_prototypes,
            target=cfg.boost_target,
            head=HEADS[cfg.boost_head],
        )
    raise ValueError(f"name: expected one of {list(BASELINE_NAMES)}, got {name!r}")


def baseline_head_flops(model: nn.Module, branch_shapes: Sequence[Sequence[int]]) -> list[float]:
    """Per-sample FLOPs of each of the model's K heads on its branch feature map (FlopCounterMode).

    ZTW heads are counted with their cascade input; ensemble and boosting arithmetic is element-wise
    (zero FLOPs under the counter's rules, like BatchNorm and pooling).

    Args:
        model: a :class:`PTEEnet`, :class:`ZTW` or :class:`BoostNet` (anything with ``.heads``).
        branch_shapes: K ``(C, H, W)`` shapes.
    """
    heads = list(model.heads)
    if len(heads) != len(branch_shapes):
        raise ValueError(f"branch_shapes: expected {len(heads)} shapes (one per head), got {len(branch_shapes)}")
    p = next(model.parameters())
    out = []
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for head, shape in zip(heads, branch_shapes, strict=True):
            x = torch.zeros(2, *[int(s) for s in shape], device=p.device, dtype=p.dtype)
            flops, _ = count_flops(head, x)
            out.append(flops / 2)
    finally:
        for m, mode in saved:
            m.training = mode
    return out


class TensorSource(BatchSource):
    """Batches ``(x [B, ...], labels [B])`` of in-memory tensors (for the ZTW ensemble stage)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"labels: expected {x.shape[0]} rows (one per sample), got {labels.shape[0]}")
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[tuple]:
        for idx in order.split(batch_size):
            yield self.x[idx].to(device), self.labels[idx].to(device)


@dataclass
class TrainedBaseline:
    """A trained baseline with what evaluation needs.

    Attributes:
        name: ``pteenet``, ``ztw`` or ``boostnet``.
        model: the trained module (eval mode, CPU).
        head_flops: K per-sample FLOPs of its heads.
        history: the engine's per-epoch records (``stage2`` too for ZTW).
    """

    name: str
    model: nn.Module
    head_flops: list[float]
    history: dict

    @torch.no_grad()
    def exit_outputs(self, cache: FeatureCache, batch_size: int = 512, device=None) -> ExitOutputs:
        """Scores and predictions of every exit on every cached sample (in cache order)."""
        return exit_outputs(self.model, cache, batch_size=batch_size, device=device)


@torch.no_grad()
def _raw_outputs(model: nn.Module, cache: FeatureCache, batch_size: int, device) -> torch.Tensor | tuple:
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if isinstance(model, PTEEnet):
        # pack (logits [K,B,C], conf [K,B]) as [B, K, C + 1] so predict() can concatenate along B
        packed = predict(lambda f: _pack_pteenet(model(f)), cache, batch_size=batch_size, device=dev)
        return packed[..., :-1].permute(1, 0, 2), packed[..., -1].t()
    return predict(lambda f: model(f).permute(1, 0, 2), cache, batch_size=batch_size, device=dev).permute(1, 0, 2)


def _pack_pteenet(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logits, conf = out
    return torch.cat([logits.permute(1, 0, 2), conf.t().unsqueeze(2)], dim=2)


@torch.no_grad()
def exit_outputs(model: nn.Module, cache: FeatureCache, batch_size: int = 512, device=None) -> ExitOutputs:
    """:class:`ExitOutputs` of a baseline model on every sample of ``cache`` (eval mode, no grad)."""
    raw = _raw_outputs(model, cache, batch_size, device)
    model.cpu()
    if isinstance(raw, tuple):
        return model.exit_outputs((raw[0], raw[1]))
    return model.exit_outputs(raw)


def train_baseline(
    name: str,
    train_cache: FeatureCache,
    fit_config: FitConfig,
    *,
    segment_flops: Sequence[float],
    config: BaselineConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    val_cache: FeatureCache | None = None,
    compile_model: bool = False,
) -> TrainedBaseline:
    """Build and train one baseline on cached branch features with the engine's :func:`fit`.

    Args:
        name: ``pteenet``, ``ztw`` or ``boostnet``.
        train_cache: features, backbone logits and labels of the training split.
        fit_config: optimisation settings (``seed`` also seeds the initialisation, as ``seed * 1000 + 7``).
        segment_flops: the backbone's K + 1 per-sample segment FLOPs (``calexnet_fast.flops.segment_flops``);
            PTEEnet's cost term needs them.
        config: :class:`BaselineConfig`.
        out_dir: epoch checkpoints (``stage1/``, ``stage2/`` for ZTW) and the final ``model.safetensors``.
        resume: continue from checkpoints in ``out_dir``.
        device, progress, compile_model: as in :func:`~calexnet_fast.training.fit`.
        val_cache: a held-out split: with ``fit_config.patience`` > 0 each stage stops early on its loss
            there and keeps its best epoch (required then).

    Returns:
        :class:`TrainedBaseline` (model in eval mode on the CPU).
    """
    cfg = config or BaselineConfig()
    if fit_config.patience > 0 and val_cache is None:
        raise ValueError("val_cache: early stopping (fit_config.patience > 0) needs a validation feature cache")
    shapes = train_cache.branch_shapes
    if len(segment_flops) != len(shapes) + 1:
        raise ValueError(
            f"segment_flops: expected K + 1 = {len(shapes) + 1} values (the backbone's segments), "
            f"got {len(segment_flops)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit_config.seed * 1000 + 7)
        model = make_baseline(name, [s[0] for s in shapes], train_cache.n_classes, cfg)
    hf = baseline_head_flops(model, shapes)
    backbone = float(sum(segment_flops))
    costs = [(sum(segment_flops[: k + 1]) + sum(hf[: k + 1])) / backbone for k in range(len(shapes))]
    costs.append((backbone + sum(hf)) / backbone)
    if isinstance(model, PTEEnet):
        model.set_exit_costs(costs)
    run = {"baseline": name, "config": asdict(cfg), "fit": asdict(fit_config), "exit_costs": costs}
    out = Path(out_dir) if out_dir is not None else None
    final = out / "model.safetensors" if out is not None else None
    if final is not None and resume and final.is_file():
        tensors, saved = load_state_file(final)
        if json.loads(json.dumps(saved.get("run", {}))) == json.loads(json.dumps(run)):
            model.load_state_dict(tensors)
            return TrainedBaseline(name, model.eval().cpu(), hf, saved.get("history", {}))
    history: dict = {}
    if isinstance(model, ZTW):  # stage 1 trains the heads only (and DDP must not wait for unused grads)
        model.ensembles.requires_grad_(False)

    def loss1(m, b):
        return model.loss(m(b.features), b)

    def validate1(m):
        return evaluate_loss(m, CacheSource(val_cache), loss1, device=device)

    r1 = fit(
        model,
        CacheSource(train_cache),
        loss1,
        fit_config,
        checkpoint_dir=out / "stage1" if out is not None else None,
        resume=resume,
        device=device,
        progress=progress,
        desc=name,
        run_config=run,
        compile_model=compile_model,
        validate=validate1 if fit_config.patience > 0 else None,
    )
    history["stage1"] = r1.history
    if isinstance(model, ZTW):
        ic = _raw_outputs(model, train_cache, 1024, device)  # [K, N, C], heads fixed from here on
        ens = model.ensembles.requires_grad_(True)
        stage2 = FitConfig(
            epochs=cfg.ztw_ensemble_epochs,
            batch_size=fit_config.batch_size,
            optimizer="adam",
            lr=cfg.ztw_ensemble_lr,
            weight_decay=0.0,
            schedule="cosine",
            seed=fit_config.seed,
            patience=fit_config.patience,
        )

        def loss2(m, b):
            return ens.loss(m(b[0].permute(1, 0, 2)), b[1])

        validate2 = None
        if fit_config.patience > 0:
            ic_val = _raw_outputs(model, val_cache, 1024, device).permute(1, 0, 2).contiguous()
            val_source = TensorSource(ic_val, val_cache.labels_tensor())

            def validate2(m):
                return evaluate_loss(m, val_source, loss2, device=device)

        r2 = fit(
            ens,
            TensorSource(ic.permute(1, 0, 2).contiguous(), train_cache.labels_tensor()),
            loss2,
            stage2,
            checkpoint_dir=out / "stage2" if out is not None else None,
            resume=resume,
            device=device,
            progress=progress,
            desc=f"{name} ensembles",
            run_config=run,
            validate=validate2,
        )
        history["stage2"] = r2.history
    model.eval().cpu()
    if final is not None:
        save_state_file(final, model.state_dict(), {"run": run, "history": history, "head_flops": hf})
    return TrainedBaseline(name, model, hf, history)
