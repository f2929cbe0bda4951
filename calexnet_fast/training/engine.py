"""The training loop: :func:`fit`, its checkpoints and resume.

:func:`fit` is head-agnostic: it runs epochs over any :class:`~calexnet_fast.training.sources.BatchSource`
with a pluggable ``loss_fn(model, batch) -> scalar``, where ``model`` is the (possibly
DistributedDataParallel-wrapped) module. ``loss_fn`` must call ``model(...)`` exactly once per step for its
forward (that is what keeps DDP's gradient synchronisation correct); everything else (which branch features
it reads, what target, what weights) is up to the loss. The loop provides: seeded shuffling that does not
depend on global RNG state, AdamW/Adam/SGD with a per-step cosine schedule and warm-up, tqdm progress, a
checkpoint after every epoch (one safetensors file written atomically, with a JSON twin for people), resume
from it losing at most the interrupted epoch, and ``torchrun``/DDP (gloo on CPU, NCCL on GPU) with
rank-sharded batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import DistInfo, all_reduce_sum, barrier, default_device, dist_info
from ..io import load_state_file, save_state_file
from .sources import BatchSource, split_batches

__all__ = [
    "CHECKPOINT_NAME",
    "FitConfig",
    "FitResult",
    "epoch_order",
    "evaluate_loss",
    "fit",
    "load_checkpoint",
    "seed_everything",
]

CHECKPOINT_NAME = "checkpoint.safetensors"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitConfig:
    """Optimisation settings of one :func:`fit` run (all recorded in its checkpoint).

    Attributes:
        epochs: passes over the data.
        batch_size: samples per step per process.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum, Nesterov).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD).
        momentum: SGD momentum.
        schedule: ``"cosine"`` (per step, to 0) or ``"constant"``.
        warmup_epochs: linear warm-up length (fractional allowed).
        grad_clip: max gradient norm, or ``None``.
        seed: shuffling seed (epoch ``e`` uses permutation ``seed, e``; independent of global RNG state).
        patience: early stopping: with a ``validate`` function given to :func:`fit`, stop once the validation
            loss has not improved for ``patience`` epochs and keep the best epoch's weights (0: off; the
            validation loss is still recorded and the best epoch kept).
    """

    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    patience: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs: expected >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"patience: expected >= 0 epochs (0: no early stopping), got {self.patience}")

    @classmethod
    def of_options(cls, options, seed: int) -> FitConfig:
        """The optimisation options of ``calexnet train`` / ``calexnet compare`` (``epochs``, ``batch_size``,
        ``optimizer``, ``lr``, ``weight_decay``, optional ``patience``, read as attributes of ``options``) with
        ``seed``."""
        o = options
        return cls(
            epochs=o.epochs,
            batch_size=o.batch_size,
            optimizer=o.optimizer,
            lr=o.lr,
            weight_decay=o.weight_decay,
            seed=seed,
            patience=getattr(o, "patience", 0),
        )


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch history (loss, lr, seconds, ``val_loss`` with validation, extra
    metrics), where it resumed, and with validation the epoch whose weights the model holds (``best_epoch``)
    and whether early stopping ended it (``stopped_early``)."""

    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    epochs_run: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    source: BatchSource,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """The sample-weighted mean of ``loss_fn(model, batch)`` over every sample of ``source`` in order, with
    ``model`` in eval mode (its mode is restored): the validation loss of early stopping."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in source.batches(torch.arange(len(source)), batch_size, device):
            b = _batch_len(batch)
            total += float(loss_fn(model, batch)) * b
            count += b
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    )


def _lr_at(cfg: FitConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant" or total <= warm:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g)


def _rank_share(order: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Interleaved shard: rank r takes order[r::W] (padded by wrapping so every rank steps equally often).

    With batch B per rank, step i of all ranks together covers order[i*B*W:(i+1)*B*W]: the same samples
    as one process with batch B*W.
    """
    if not info.distributed:
        return order
    w = info.world_size
    pad = (-order.numel()) % w
    if pad:
        order = torch.cat([order, order[:pad]])
    return order[info.rank :: w]


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    py = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    return tensors, {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    if "numpy" in info:
        a = info["numpy"]
        np.random.set_state((a[0], np.array(a[1], dtype=np.uint32), a[2], a[3], a[4]))
    if "python" in info:
        p = info["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last epoch checkpoint in ``checkpoint_dir`` as (tensors, info), or ``None`` if there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return load_state_file(path)


def _comparable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def fit(
    model: nn.Module,
    source: BatchSource,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    config: FitConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "train",
    params: Sequence[nn.Parameter] | None = None,
    run_config: dict | None = None,
    on_epoch_end: Callable[[int, dict], dict | None] | None = None,
    find_unused_parameters: bool = False,
    amp_dtype: torch.dtype | None = None,
    compile_model: bool = False,
    validate: Callable[[nn.Module], float] | None = None,
) -> FitResult:
    """Train ``model`` over ``source`` with ``loss_fn``; checkpoint every epoch; resume if asked.

    Args:
        model: the module to train (moved to ``device``; wrapped in DDP under ``torchrun``).
        source: a :class:`BatchSource` (e.g. :class:`CacheSource`, :class:`DatasetSource`).
        loss_fn: ``loss_fn(wrapped_model, batch) -> scalar``; must call ``wrapped_model(...)`` once.
        config: :class:`FitConfig`.
        checkpoint_dir: where ``checkpoint.safetensors`` (+ ``.json``) is written after every epoch.
        resume: continue from the checkpoint there if one exists (it must come from the same config).
        device: default GPU if any, else CPU.
        progress: tqdm bar per epoch (rank 0 only).
        desc: bar label.
        params: the parameters to optimise (default: all of ``model``'s that require grad).
        run_config: extra JSON-able facts stored with the checkpoint (and compared on resume).
        on_epoch_end: ``f(epoch, record) -> dict | None`` after each epoch (1-based) and its checkpoint;
            a returned dict is merged into the history record (e.g. validation metrics).
        find_unused_parameters: passed to DDP.
        amp_dtype: autocast dtype on CUDA (e.g. ``torch.bfloat16``); ignored on CPU.
        compile_model: run the forward through ``torch.compile`` (fuses the element-wise work of heads;
            pays a one-off compile of tens of seconds, so it helps long runs). Checkpoints still hold the
            plain module's state dict.
        validate: ``f(model) -> validation loss`` after every epoch (e.g. :func:`evaluate_loss` on a held-out
            source; it must not draw random numbers). The model ends with the weights of the epoch of lowest
            validation loss, and ``config.patience`` > 0 stops training once it has not improved for that many
            epochs. Checkpoints hold the best weights too, so a resumed run ends the same.

    Returns:
        :class:`FitResult`. The model holds the final weights (with ``validate``: the best epoch's).

    Raises:
        RuntimeError: the checkpoint in ``checkpoint_dir`` was written by a different configuration, or
            the loss became non-finite.
    """
    from tqdm.auto import tqdm

    info = dist_info()
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameter that requires grad (nothing to train)")
    optimizer = _make_optimizer(params, config)
    ckpt_config = {"fit": asdict(config), "run": run_config or {}}
    result = FitResult()
    start_epoch = 0
    best: dict = {"loss": math.inf, "epoch": None, "state": None, "stopped": False}
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None and resume:
        found = load_checkpoint(ckdir)
        if found is not None:
            tensors, saved = found
            if _comparable(saved.get("config", {})) != _comparable(ckpt_config):
                diff = _config_diff(saved.get("config", {}), ckpt_config)
                raise RuntimeError(
                    f"checkpoint {ckdir / CHECKPOINT_NAME} was written with a different configuration "
                    f"({diff}); use a new output directory or turn resuming off (--no-resume) to start over"
                )
            model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
            _restore_optimizer(optimizer, tensors, saved["optimizer"])
            _restore_rng(tensors, saved.get("rng", {}))
            start_epoch = int(saved["epoch"])
            result.history = list(saved.get("history", []))
            result.resumed_from_epoch = start_epoch
            if "best" in saved:
                best.update(saved["best"], loss=float(saved["best"]["loss"]))
                best["state"] = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")}
    wrapped: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if compile_model:
        wrapped = torch.compile(wrapped)
    n = len(source)
    if n == 0:
        raise ValueError("source: expected at least one training sample, got 0")
    steps_per_epoch = len(split_batches(_rank_share(torch.arange(n), info), config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    for epoch in range(start_epoch, config.epochs):
        if best["stopped"]:
            break
        t0 = time.perf_counter()
        model.train()
        order = _rank_share(epoch_order(n, config.seed, epoch), info)
        loss_sum, count = 0.0, 0
        step = epoch * steps_per_epoch
        bar = tqdm(
            total=order.numel(),
            desc=f"{desc} {epoch + 1}/{config.epochs}",
            unit="sample",
            leave=False,
            disable=not progress or not info.is_main,
        )
        for batch in source.batches(order, config.batch_size, device):
            lr = _lr_at(config, step, total_steps, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            if amp_dtype is not None and device.type == "cuda":
                with torch.autocast("cuda", dtype=amp_dtype):
                    loss = loss_fn(wrapped, batch)
            else:
                loss = loss_fn(wrapped, batch)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} ({desc}); lower the "
                    "learning rate or check the inputs"
                )
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            b = _batch_len(batch)
            loss_sum += float(loss.detach()) * b
            count += b
            step += 1
            bar.update(b)
            bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}")
        bar.close()
        loss_sum, count = all_reduce_sum([loss_sum, count], device)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(count, 1),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(record)
        result.epochs_run += 1
        if validate is not None:
            record["val_loss"] = float(validate(model))
            if record["val_loss"] < best["loss"]:
                best.update(loss=record["val_loss"], epoch=epoch + 1)
                best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            since = epoch + 1 - (best["epoch"] or 0)  # a NaN validation loss never counts as the best
            best["stopped"] = config.patience > 0 and since >= config.patience
        if ckdir is not None and info.is_main:
            _save_checkpoint(ckdir, model, optimizer, epoch + 1, result.history, ckpt_config, best)
        barrier()
        if on_epoch_end is not None:
            # hooks (validation, logging) must not shift the training RNG stream, or a resumed run would
            # differ from an uninterrupted one: restore the state the checkpoint recorded
            rng_tensors, rng_info = _rng_state()
            extra = on_epoch_end(epoch + 1, record)
            _restore_rng(rng_tensors, rng_info)
            if extra:
                record.update(extra)
                if ckdir is not None and info.is_main:  # keep the metrics in the saved history too
                    _save_checkpoint(ckdir, model, optimizer, epoch + 1, result.history, ckpt_config, best)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        result.best_epoch = best["epoch"]
        result.stopped_early = best["stopped"]
    return result


def _batch_len(batch) -> int:
    if isinstance(batch, (tuple, list)):
        for t in batch:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return int(t.shape[0])
        return 1
    return len(batch)


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _config_diff(va, vb, f"{prefix}{k}.")
            if d:
                diffs.append(d)
        elif _comparable({"v": va}) != _comparable({"v": vb}):
            diffs.append(f"{prefix}{k}: saved {va!r}, now {vb!r}")
    return "; ".join(diffs)


def _save_checkpoint(
    ckdir: Path, model: nn.Module, optimizer, epoch: int, history: list, config: dict, best: dict
) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    ot, oinfo = _optimizer_state_tensors(optimizer)
    rt, rinfo = _rng_state()
    tensors.update(ot)
    tensors.update(rt)
    info = {"epoch": epoch, "config": config, "history": history, "optimizer": oinfo, "rng": rinfo}
    if best["state"] is not None:
        tensors.update({f"best/{k}": v for k, v in best["state"].items()})
        info["best"] = {"loss": best["loss"], "epoch": best["epoch"], "stopped": best["stopped"]}
    save_state_file(ckdir / CHECKPOINT_NAME, tensors, info)
