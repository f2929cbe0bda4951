"""Any classifier ``nn.Module`` as a frozen staged backbone: :func:`from_model`.

The model is cut into units along its module tree: its children, with block containers expanded (an
``nn.Sequential`` of blocks, an ``nn.ModuleList``, and every module on the path to a named branch point).
Where the forward is a chain of those units (checked by running them in order, with a flatten inserted before
a ``Linear`` classifier, against the model's own output) the stages are ``nn.Sequential`` runs of the
model's own modules. Otherwise the forward is traced with ``torch.fx`` (units as leaves) and the graph is cut
after each branch point's node; a cut is valid only when that node's output is the one tensor crossing it.

Branch points are unit names (``"layer1.6"``, ``"features.4"``, ``"stages.1"``) or the names of the
containers they sit in (``"layer1"``: after its last block), or are placed by FLOPs (``placement="flops"``:
the block boundaries nearest to equal fractions of the total). Input statistics and size default to what the
model declares (timm's ``pretrained_cfg``, or ``mean`` / ``std`` / ``input_size`` attributes), else ImageNet
statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .classmap import with_class_map
from .fxsplit import fx_backbone
from .placement import DEFAULT_N_BRANCHES, is_conv, pick_by_flops, placement_candidates, split_units
from .staged import StagedBackbone, as_pair

__all__ = ["declared_input", "from_model", "model_units"]
_NO_OPS = (nn.Dropout, nn.Identity)


def declared_input(model: nn.Module) -> dict:
    """What ``model`` says about its input: ``mean``, ``std`` (tuples) and ``input_size`` ``(H, W)``, from timm's
    ``pretrained_cfg`` / ``default_cfg`` or from plain attributes of those names (tensors are ignored)."""
    out: dict = {}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        for key in ("mean", "std"):
            if isinstance(cfg.get(key), (tuple, list)):
                out[key] = tuple(float(v) for v in cfg[key])
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            out["input_size"] = (int(size[1]), int(size[2]))
    for key in ("mean", "std", "input_size"):
        value = getattr(model, key, None)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = tuple(value) if key != "input_size" else as_pair(tuple(int(v) for v in value), "input_size")
        elif key == "input_size" and isinstance(value, int):
            out[key] = (value, value)
    return out


def _is_block_container(module: nn.Module) -> bool:
    """A ``ModuleList``, or an ``nn.Sequential`` of blocks or of several convolutions (not a conv-BN-act)."""
    if isinstance(module, nn.ModuleList):
        return True
    if not isinstance(module, nn.Sequential):
        return False
    children = list(module.children())
    return any(next(c.children(), None) is not None for c in children) or sum(map(is_conv, children)) > 1


def model_units(model: nn.Module, inside: Sequence[str] = ()) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The units of ``model`` in registration order and the container aliases (``"layer1"`` -> ``"layer1.2"``).

    Children are units, except block containers (see the module docstring) and the modules on the path to a
    name in ``inside``, which are replaced by their own units.
    """
    units: list[tuple[str, nn.Module]] = []
    aliases: dict[str, str] = {}

    def expand(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if _is_block_container(child) or any(p.startswith(full + ".") for p in inside):
                start = len(units)
                expand(child, full + ".")
                if len(units) > start and isinstance(child, (nn.Sequential, nn.ModuleList)):
                    aliases[full] = units[-1][0]
            else:
                units.append((full, child))

    expand(model, "")
    return units, aliases


def _starts_with_linear(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return True
        if not isinstance(m, _NO_OPS) and next(m.children(), None) is None:
            return False
    return False


def _chain(units, example: torch.Tensor, expected: torch.Tensor):
    """``(units with flattens inserted, output dims, cumulative FLOPs)`` when running ``units`` in order gives
    ``expected``, else ``None``."""
    seq, dims, cum = [], [], []
    taken = {n for n, _ in units}
    flatten_name = next(f"flatten{i or ''}" for i in range(len(units) + 1) if f"flatten{i or ''}" not in taken)
    counter = FlopCounterMode(display=False)
    x = example
    try:
        with torch.no_grad(), counter:
            for name, m in units:
                if x.dim() > 2 and _starts_with_linear(m):
                    seq.append((flatten_name, nn.Flatten(1)))
                    x = torch.flatten(x, 1)
                    dims.append(x.dim())
                    cum.append(counter.get_total_flops())
                x = m(x)
                seq.append((name, m))
                dims.append(x.dim() if isinstance(x, torch.Tensor) else -1)
                cum.append(counter.get_total_flops())
            if isinstance(x, torch.Tensor) and x.dim() > 2 and expected.dim() == 2:
                seq.append((flatten_name, nn.Flatten(1)))
                x = torch.flatten(x, 1)
                dims.append(2)
                cum.append(cum[-1])
    except Exception:  # noqa: BLE001 - any failure means: not a chain of these units
        return None
    if not isinstance(x, torch.Tensor) or x.shape != expected.shape:
        return None
    if not torch.allclose(x, expected, rtol=1e-4, atol=1e-5 * (1.0 + float(expected.abs().max()))):
        return None
    if len({n for n, _ in seq}) != len(seq):  # a flatten inserted twice: not this simple a chain
        return None
    return seq, dims, cum


def from_model(
    model: nn.Module,
    branch_points: Sequence[str] | None = None,
    *,
    placement: str | None = None,
    n_branches: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_map: Sequence[int] | None = None,
    name: str | None = None,
) -> StagedBackbone:
    """Any classifier as a frozen :class:`StagedBackbone` (its modules are shared and frozen in place).

    Args:
        model: an ``nn.Module`` whose forward maps images ``[B, C, H, W]`` to logits ``[B, n_classes]``.
        branch_points: names of the modules after which a branch reads the features (``"layer1.6"``,
            ``"features.4"``) or of their containers (``"layer1"``). Default: ``placement="flops"``.
        placement: ``"flops"``: ``n_branches`` block boundaries nearest to equal FLOPs fractions.
        n_branches: for ``placement="flops"`` (default 3, fewer when the model has fewer blocks).
        input_size: ``(H, W)`` the model is meant for (probes shapes and FLOPs); default what the model
            declares, else required.
        in_channels: default the first convolution's input channels.
        mean, std: the input statistics it was trained with; default declared, else ImageNet.
        class_map: one label per model class, when the labels are coarser (see :mod:`.classmap`).
        name: default the model's class name.

    Raises:
        ValueError: a branch point that is not a module of the model, or where more than its output crosses
            the cut (the message names the nodes); a forward that is neither a chain nor traceable by
            ``torch.fx``; inconsistent arguments.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(branch_points, str):
        raise ValueError(f"branch_points: expected a sequence of names, got the string {branch_points!r}")
    if placement not in (None, "flops"):
        raise ValueError(f"placement: expected None or 'flops', got {placement!r}")
    if placement == "flops" and branch_points is not None:
        raise ValueError("branch_points: expected None with placement='flops' (the placement picks them)")
    if placement is None and branch_points is None:
        placement = "flops"
    elif placement is None and n_branches is not None:
        raise ValueError("n_branches: only used with placement='flops'; give branch_points names instead")
    declared = declared_input(model)
    size = input_size if input_size is not None else declared.get("input_size")
    if size is None:
        raise ValueError(f"input_size: expected (H, W) (the model {type(model).__name__} declares none), got None")
    size = as_pair(size, "input_size")
    if in_channels is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        in_channels = conv.in_channels if conv is not None else 3
    mean = tuple(mean if mean is not None else declared.get("mean", IMAGENET_MEAN))
    std = tuple(std if std is not None else declared.get("std", IMAGENET_STD))
    name = name or type(model).__name__
    model.requires_grad_(False)
    model.eval()
    units, aliases = model_units(model, list(branch_points or []))
    example = torch.randn(2, int(in_channels), *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _forward(model, example)
    common = {"in_channels": int(in_channels), "input_size": size, "mean": mean, "std": std, "name": name}
    chain = _chain(units, example, expected)
    if chain is None:
        bb = fx_backbone(model, units, aliases, branch_points, n_branches, example, **common)
    else:
        seq, dims, cum = chain
        names = [n for n, _ in seq]
        allowed = [n for i, n in enumerate(names[:-1]) if dims[i] == 4]
        if placement == "flops":
            cand = placement_candidates(seq, dims)
            k = n_branches if n_branches is not None else min(DEFAULT_N_BRANCHES, len(cand))
            branch_points = [names[cand[i]] for i in pick_by_flops([cum[i] for i in cand], cum[-1], k)]
        bb = split_units(seq, allowed, aliases, branch_points, None, None, [], **common)
    return with_class_map(bb, class_map) if class_map is not None else bb


def _forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    out = model(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected its forward to return logits [B, n_classes], got {what}")
    return out
