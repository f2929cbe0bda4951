"""Reading weight files safely and checking that a state dict fits an architecture before loading it."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["check_state_dict_fits", "load_state_dict_file"]


def load_state_dict_file(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: ``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``.

    A ``{'state_dict': ...}`` wrapper is unwrapped. ``name`` is the argument named in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: expected an existing file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that weights_only refuses
        text = " ".join(str(exc).split())
        reason = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
        raise RuntimeError(
            f"{name}: could not read {str(path)!r} with torch.load(weights_only=True) (the file is corrupt "
            f"or holds more than tensors, and this package never unpickles arbitrary objects): {reason[:300]}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RuntimeError(f"{name}: expected {str(path)!r} to hold a state dict, got {type(obj).__name__}")
    return obj


def check_state_dict_fits(expected: dict, given: dict, strict: bool, what: str) -> None:
    """Raise RuntimeError on missing / unexpected / mis-shaped keys (``num_batches_tracked`` optional)."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
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
        problems.append(f"missing keys {_short(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if problems:
        raise RuntimeError(f"{what} does not fit the architecture: " + "; ".join(problems))


def _short(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"[{shown}{more}] ({len(items)} in all)"
