"""Sequential training of a recipe's branches on cached features (docs/design.md §1).

:func:`train_branches` trains branch ``k = 1..K`` one after the other, as the :class:`~calexnet_fast.recipes.Recipe`
says: weights ``w_k`` from the already trained branches and their thresholds at the training margin
(:func:`~calexnet_fast.recipes.survivor_weights`), the head trained on the recipe's loss
(:func:`~calexnet_fast.recipes.branch_loss`) weighted by them, with early stopping on validation samples
weighted as survivors, then ``τ_k`` calibrated at ``m_train`` for the next branch's weights. It records the
weights' effect per branch (:class:`BranchTraining`) and warns when they have (nearly) none. Runs resume from
their output directory when the saved configuration trains the same heads (``Recipe.training_json``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibration import calibrate
from .distributed import dist_info
from .exit_rule import exit_decision_reference
from .features import FeatureCache, head_logits
from .io import load_state_file, save_state_file
from .recipes import Recipe, branch_loss, make_head, survivor_weights
from .training import CacheSource, FitConfig, evaluate_loss, fit

__all__ = ["DEGENERATE_EXIT_SHARE", "BranchTraining", "train_branches"]


@dataclass
class BranchTraining:
    """Result of :func:`train_branches`.

    Attributes:
        heads: the K trained heads (eval mode, on CPU).
        train_thresholds: [K-1, C] thresholds at ``m_train`` of branches 1..K-1 (what defined the
            weights), or ``None`` with ``weighting="none"``.
        weights: per branch, the [N] training weights it used (``None``: all ones).
        weight_stats: per branch: min, max and effective sample fraction ``(Σw)² / (N Σw²)``; for weighted
            branches also ``exiting_classes`` (per earlier branch, classes with a finite threshold at
            ``m_train``) and ``train_exit_share`` (training samples the exit rule lets out of an earlier
            branch). Below 1 % a ``RuntimeWarning`` says the weights have (nearly) no effect.
        history: per branch, the :func:`~calexnet_fast.training.fit` history.
    """

    heads: nn.ModuleList
    train_thresholds: torch.Tensor | None
    weights: list[torch.Tensor | None] = field(default_factory=list)
    weight_stats: list[dict] = field(default_factory=list)
    history: list[list[dict]] = field(default_factory=list)


def _recipe_weights(recipe: Recipe, prev_logits: Sequence[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
    return survivor_weights(prev_logits, thresholds, recipe.weighting, recipe.weight_temperature, recipe.weight_floor)


def _weight_stats(w: torch.Tensor) -> dict:
    w = w.double()
    return {
        "min": float(w.min()),
        "max": float(w.max()),
        "effective_fraction": float(w.sum() ** 2 / (len(w) * (w * w).sum())),
    }


DEGENERATE_EXIT_SHARE = 0.01  # below this share leaving earlier branches, the weights are (nearly) all equal


def _exit_stats(prev_logits: Sequence[torch.Tensor], thresholds: torch.Tensor) -> dict:
    """Classes that can exit at each earlier branch, and the share of samples leaving some earlier branch."""
    out = torch.zeros(prev_logits[0].shape[0], dtype=torch.bool)
    for z, t in zip(prev_logits, thresholds.unbind(0), strict=True):
        out |= exit_decision_reference(z, t.to(z.device))[0].cpu()
    return {
        "exiting_classes": [int(torch.isfinite(t).sum()) for t in thresholds.unbind(0)],
        "train_exit_share": float(out.double().mean()) if len(out) else 0.0,
    }


def _same_training(stored: dict, current: dict) -> bool:
    """Whether a saved head's run configuration trains what ``current`` would (recipes compared by
    :meth:`Recipe.training_json`, everything else as stored)."""
    a, b = json.loads(json.dumps(stored)), json.loads(json.dumps(current))
    for d in (a, b):
        if isinstance(d.get("recipe"), dict):
            try:
                d["recipe"] = Recipe.from_json(d["recipe"]).training_json()
            except (TypeError, ValueError):  # not a recipe this version knows: not the same training
                return False
    return a == b


def _warn_if_degenerate(k: int, stats: dict, recipe: Recipe) -> None:
    if stats["train_exit_share"] >= DEGENERATE_EXIT_SHARE:
        return
    warnings.warn(
        f"recipe {recipe.name!r}, branch {k + 1}: at the training margin m_train={recipe.m_train} the earlier "
        f"branches let {stats['train_exit_share']:.1%} of the training samples exit (classes that can exit: "
        f"{stats['exiting_classes']}, min_support={recipe.min_support}), so the survivor weights are nearly all 1 "
        f"(effective sample fraction {stats['effective_fraction']:.3f}) and this branch trains as without them; "
        "lower min_support, raise m_train, or train the earlier branches longer",
        RuntimeWarning,
        stacklevel=3,
    )


def train_branches(
    train_cache: FeatureCache,
    val_cache: FeatureCache,
    recipe: Recipe,
    fit_config: FitConfig,
    *,
    head_factory: Callable[[int, int, int], nn.Module] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    run_config: dict | None = None,
    on_epoch_end: Callable[[int, int, dict], dict | None] | None = None,
    compile_model: bool = False,
) -> BranchTraining:
    """Train the K branch heads one after the other with ``recipe`` on cached features.

    Args:
        train_cache: features of the training split (the heads learn from it).
        val_cache: features of the validation split: the ``m_train`` calibration reads it, and with
            ``fit_config.patience`` > 0 each head stops early on the recipe's loss there (with the survivor
            weights of the validation samples, computed as the training ones) and keeps its best epoch.
        recipe: the :class:`Recipe`.
        fit_config: optimisation settings for each head (``seed`` also seeds head ``k``'s initialisation
            as ``seed * 1000 + k``).
        head_factory: ``f(k, in_channels, n_classes) -> module`` (default :func:`make_head`).
        out_dir: ``branch_{k}/`` subfolders hold each head's epoch checkpoints and final ``head.safetensors``;
            with ``resume`` a finished branch is loaded, an unfinished one continues from its last epoch.
        device, progress: as in :func:`~calexnet_fast.training.fit`.
        run_config: extra facts stored with every checkpoint (compared on resume).
        on_epoch_end: ``f(branch (1-based), epoch, record)`` hook forwarded to ``fit``.
        compile_model: ``torch.compile`` each head's forward during training (see ``fit``).

    Returns:
        :class:`BranchTraining`.
    """
    if train_cache.n_branches != val_cache.n_branches or train_cache.n_classes != val_cache.n_classes:
        raise ValueError(
            f"val_cache: expected {train_cache.n_branches} branches and {train_cache.n_classes} classes like "
            f"train_cache, got {val_cache.n_branches} and {val_cache.n_classes}"
        )
    k_count, n_classes = train_cache.n_branches, train_cache.n_classes
    out = Path(out_dir) if out_dir is not None else None
    y_val = val_cache.labels_tensor()
    z_val_bb = val_cache.logits_tensor()
    heads = nn.ModuleList()
    train_logits: list[torch.Tensor] = []
    val_logits: list[torch.Tensor] = []
    thresholds: torch.Tensor | None = None
    result = BranchTraining(heads, None)
    base = {"recipe": recipe.to_json(), "fit": asdict(fit_config), **(run_config or {})}
    for k in range(k_count):
        in_ch = train_cache.branch_shapes[k][0]
        if head_factory is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(fit_config.seed * 1000 + k)
                head = head_factory(k, in_ch, n_classes)
        else:
            head = make_head(in_ch, n_classes, recipe, seed=fit_config.seed * 1000 + k)
        weighted = k > 0 and recipe.weighting != "none"
        weights = _recipe_weights(recipe, train_logits, thresholds) if weighted else None
        result.weights.append(weights)
        stats = _weight_stats(weights if weights is not None else torch.ones(len(train_cache)))
        if weights is not None:
            stats.update(_exit_stats(train_logits, thresholds))
            _warn_if_degenerate(k, stats, recipe)
        result.weight_stats.append(stats)
        bdir = out / f"branch_{k + 1}" if out is not None else None
        final = bdir / "head.safetensors" if bdir is not None else None
        history: list[dict] = []
        if final is not None and resume and final.is_file():
            tensors, cfg = load_state_file(final)
            if not _same_training(cfg.get("run", {}), base):
                raise RuntimeError(
                    f"{final} was trained with a different recipe or configuration; use a new output "
                    "directory or turn resuming off (--no-resume)"
                )
            head.load_state_dict(tensors)
            history = cfg.get("history", [])
        else:

            def loss_fn(model, batch, _k=k):
                return branch_loss(model(batch.features[_k]), batch, recipe)

            hook = None
            if on_epoch_end is not None:

                def hook(epoch, record, _k=k):
                    return on_epoch_end(_k + 1, epoch, record)

            validate = None
            if fit_config.patience > 0:
                # the survivors of the validation split, weighted the same way
                val_weights = _recipe_weights(recipe, val_logits, thresholds) if weighted else None
                val_source = CacheSource(val_cache, val_weights, branches=[k])

                def validate(model, _loss=loss_fn, _src=val_source):
                    return evaluate_loss(model, _src, _loss, device=device)

            fr = fit(
                head,
                CacheSource(train_cache, weights, branches=[k]),
                loss_fn,
                fit_config,
                checkpoint_dir=bdir,
                resume=resume,
                device=device,
                progress=progress,
                desc=f"{recipe.name} branch {k + 1}/{k_count}",
                run_config={**base, "branch": k + 1},
                on_epoch_end=hook,
                compile_model=compile_model,
                validate=validate,
            )
            history = fr.history
            if final is not None and dist_info().is_main:  # one writer under torchrun
                save_state_file(
                    final,
                    head.state_dict(),
                    {"run": base, "branch": k + 1, "history": history, "weights": result.weight_stats[-1]},
                )
        head.eval()
        result.history.append(history)
        heads.append(head)
        if recipe.weighting != "none" and k + 1 < k_count:
            train_logits.append(head_logits(head, train_cache, k))
            val_logits.append(head_logits(head, val_cache, k))
            thresholds = calibrate(
                val_logits,
                z_val_bb,
                y_val,
                recipe.m_train,
                aligned=recipe.aligned,
                margin_mode=recipe.margin_mode,
                min_support=recipe.min_support,
                bar_from=recipe.bar_from,
            )
    result.heads = heads.cpu()
    result.train_thresholds = thresholds
    return result
