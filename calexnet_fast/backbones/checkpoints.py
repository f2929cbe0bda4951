"""Reading weight files safely, fitting their keys to a model, and explaining a mismatch.

A weight file is ``.safetensors`` or a ``torch.save`` file read with ``torch.load(weights_only=True)`` (never
unpickling arbitrary objects). Wrappers such as ``{'state_dict': ...}`` or ``{'model': ...}`` are unwrapped,
and the key prefixes of ``nn.DataParallel`` (``module.``), of wrapper modules (``model.``) and of
``torch.compile`` (``_orig_mod.``) are removed when the model's own keys lack them. A file that does not fit
is reported by layer: the missing and unexpected keys, the shapes that differ, and, where the file's keys
are those of a known architecture, which one it looks like.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "check_state_dict_fits",
    "describe_state_dict",
    "fit_keys",
    "load_state_dict_file",
    "load_weights",
    "unwrap_state_dict",
]

_WRAPPERS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "net", "network", "weights", "params")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def unwrap_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: ``obj`` itself, or the first of ``state_dict``, ``model_state_dict``,
    ``model``, ... that holds a dict (recursively)."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise RuntimeError(f"{name}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    return obj


def load_state_dict_file(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: ``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``.

    Wrappers (``{'state_dict': ...}``, ``{'model': ...}``, ...) are unwrapped. ``name`` is the argument named
    in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: expected an existing file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file gets one explanation
            raise RuntimeError(f"{name}: could not read {str(path)!r} as safetensors: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that weights_only refuses
        text = " ".join(str(exc).split())
        reason = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
        raise RuntimeError(
            f"{name}: could not read {str(path)!r} with torch.load(weights_only=True) (the file is corrupt "
            f"or holds more than tensors, and this package never unpickles arbitrary objects): {reason[:300]}"
        ) from exc
    return unwrap_state_dict(obj, f"{name} {str(path)!r}")


def fit_keys(expected: dict, given: dict, aliases: dict[str, str] | None = None) -> dict:
    """``given`` with the wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) removed where ``expected``
    lacks them, and the key fragments in ``aliases`` (``{"fc.": "linear."}``) renamed where that makes a key
    fit."""
    out = OrderedDict(given)
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if out and all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in expected):
                out = OrderedDict((k[len(prefix) :], v) for k, v in out.items())
                changed = True
    for old, new in (aliases or {}).items():
        renamed = OrderedDict()
        for k, v in out.items():
            alt = re.sub(rf"(^|\.){re.escape(old)}", lambda m, new=new: m.group(1) + new, k)
            renamed[alt if k not in expected and alt in expected and alt not in out else k] = v
        out = renamed
    return out


def check_state_dict_fits(
    expected: dict, given: dict, strict: bool, what: str, arch: str = "the architecture", required=None
) -> None:
    """Raise RuntimeError on missing / unexpected / mis-shaped keys (``num_batches_tracked`` optional),
    listed by layer (``layer1.3.*``: the whole module); with a guess of the architecture ``given`` comes from,
    where it is a known one. ``what`` names the weights, ``arch`` the model they were loaded into;
    ``required``: the keys that must be there (default all of ``expected``; e.g. those a staged backbone
    uses, when the model has modules its forward never calls)."""
    optional = [
        k for k in expected if k.endswith("num_batches_tracked") or (required is not None and k not in required)
    ]
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [
        f"{k}: expected {list(expected[k].shape)}, got {list(given[k].shape)}"
        for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != expected[k].shape
    ]
    not_tensor = [f"{k}: got {type(v).__name__}" for k, v in given.items() if not isinstance(v, torch.Tensor)]
    problems = []
    if mis_shaped:
        problems.append(f"shape mismatches {_short(mis_shaped)}")
    if not_tensor:
        problems.append(f"non-tensor values {_short(not_tensor)}")
    if strict and missing:
        universe = [k for k in expected if k not in optional]
        problems.append(f"missing keys {_short(_by_module(missing, universe), len(missing))}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_short(_by_module(unexpected, list(given)), len(unexpected))}")
    if problems:
        guess = describe_state_dict(given)
        hint = f"; the weights look like {guess}" if guess else ""
        raise RuntimeError(f"{what} does not fit {arch}: " + "; ".join(problems) + hint)


def load_weights(
    model: nn.Module,
    weights: str | Path | dict,
    *,
    name: str = "checkpoint",
    arch: str | None = None,
    aliases: dict[str, str] | None = None,
    required=None,
) -> nn.Module:
    """Load ``weights`` (a file or a state dict) into ``model`` strictly, after :func:`fit_keys`.

    ``num_batches_tracked`` buffers may be absent, and so may every key not in ``required`` (when given);
    ``arch`` names the model in error messages (default its class name); ``aliases``: see :func:`fit_keys`.
    Returns ``model``.

    Raises:
        RuntimeError: the file cannot be read safely, or it does not fit ``model`` (the message lists the missing
            and unexpected keys by layer, the shapes that differ, and what the weights look like).
    """
    where = name if isinstance(weights, dict) else f"{name} {str(weights)!r}"
    given = unwrap_state_dict(weights, name) if isinstance(weights, dict) else load_state_dict_file(weights, name)
    expected = model.state_dict()
    given = fit_keys(expected, given, aliases)
    check_state_dict_fits(expected, given, True, what=where, arch=arch or type(model).__name__, required=required)
    model.load_state_dict(given, strict=False)
    return model


def describe_state_dict(sd: dict) -> str | None:
    """What architecture a state dict's keys and shapes come from, where it is one this package builds by name:
    ``"cifar_resnet56_b (option-B shortcuts, 100 classes)"``, ``"resnet18 (cifar stem, 10 classes)"``..."""
    sd = fit_keys({}, sd)
    conv1 = sd.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4 or "layer1.0.conv1.weight" not in sd:
        return None
    blocks = [len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
    fc = next((sd[k] for k in ("fc.weight", "linear.weight") if isinstance(sd.get(k), torch.Tensor)), None)
    classes = f", {fc.shape[0]} classes" if fc is not None and fc.dim() == 2 else ""
    if blocks[3] == 0 and conv1.shape[0] == 16 and blocks[0] == blocks[1] == blocks[2]:
        option_b = any(re.search(r"\.(downsample|shortcut)\.\d+\.weight$", k) for k in sd)
        depth = 6 * blocks[0] + 2
        if option_b:
            return f"cifar_resnet{depth}_b (option-B 1x1 conv + BN shortcuts{classes})"
        return f"cifar_resnet{depth} (option-A shortcuts{classes})"
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in sd)
    known = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50"}
    known.update({(3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"})
    arch = known.get((*blocks, bottleneck))
    if arch is None:
        return None
    stem = "cifar stem" if conv1.shape[-1] == 3 else "imagenet stem"
    return f"{arch} ({stem}{classes}; torchvision:{arch} for the imagenet stem)"


def _by_module(keys: list[str], universe: list[str]) -> list[str]:
    """``keys`` (a subset of ``universe``) named by the outermost modules all of whose keys they hold
    (``"layer1.3.*"``), and by layer otherwise (``"bn1.{weight, bias}"``), in order."""
    chosen = set(keys)
    memo: dict[str, bool] = {}

    def whole(prefix: str) -> bool:
        if prefix not in memo:
            memo[prefix] = all(k in chosen for k in universe if k.startswith(prefix))
        return memo[prefix]

    groups: OrderedDict[str, list[str]] = OrderedDict()
    for k in keys:
        parts = k.split(".")
        top = next((".".join(parts[:d]) for d in range(1, len(parts)) if whole(".".join(parts[:d]) + ".")), None)
        if top is not None:
            groups.setdefault(f"{top}.*", [])
        else:
            layer, _, leaf = k.rpartition(".")
            groups.setdefault(layer, []).append(leaf)
    out = []
    for name, leaves in groups.items():
        if not leaves:
            out.append(name)
        else:
            inner = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
            out.append(f"{name}.{inner}" if name else inner)
    return out


def _short(items: list[str], total: int | None = None, n: int = 6) -> str:
    shown = ", ".join(items[:n])
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"[{shown}{more}] ({total if total is not None else len(items)} in all)"
