"""Where a model comes from, by name: ``torchvision:<name>``, ``timm:<name>`` or ``path/to/file.py:factory``.

* ``torchvision:<name>``: any torchvision classification model (``torchvision.models.get_model``, never
  downloading weights).
* ``timm:<name>``: any ``timm`` model (``timm.create_model(pretrained=False)``; needs the optional extra
  ``pip install "calexnet_fast[timm]"``).
* ``path/to/file.py:factory``: a function in a Python file that returns the ``nn.Module``; called with
  ``n_classes=`` or ``num_classes=`` when it takes one of them. A run records the file's absolute path and
  SHA-256, and rebuilding refuses a file that moved or changed, naming both.

Weights are loaded separately (:func:`~calexnet_fast.backbones.checkpoints.load_weights`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from torch import nn

__all__ = ["build_model", "file_sha256", "is_model_source", "split_source"]

_FILE = re.compile(r"^(?P<path>.+\.py):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")


def is_model_source(arch: str) -> bool:
    """Whether ``arch`` names a model by source (``torchvision:``, ``timm:``, ``file.py:factory``)."""
    return arch.startswith(("torchvision:", "timm:")) or _FILE.match(arch) is not None


def split_source(arch: str) -> tuple[str, str, str]:
    """``(kind, where, name)``: ``("torchvision", "", "resnet18")``, ``("file", "/abs/m.py", "make")``...

    Raises:
        ValueError: ``arch`` is none of the three forms.
    """
    for kind in ("torchvision", "timm"):
        if arch.startswith(kind + ":"):
            name = arch[len(kind) + 1 :]
            if not name:
                raise ValueError(f"arch: expected {kind}:<model name>, got {arch!r}")
            return kind, "", name
    m = _FILE.match(arch)
    if m is None:
        raise ValueError(f"arch: expected torchvision:<name>, timm:<name> or path/to/file.py:factory, got {arch!r}")
    return "file", m.group("path"), m.group("attr")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_model(arch: str, n_classes: int | None, expected_sha256: str | None = None) -> nn.Module:
    """The (not staged) model ``arch`` names, with ``n_classes`` outputs where its constructor takes that.

    Args:
        arch: ``torchvision:<name>``, ``timm:<name>`` or ``path/to/file.py:factory``.
        n_classes: number of classes to build (``None``: the constructor's default).
        expected_sha256: for a file, the SHA-256 it must have (what a run recorded).

    Raises:
        ValueError: unknown model name (with the closest names), ``timm`` not installed, a file that is missing,
            moved or changed, a factory that is not there or does not return an ``nn.Module``.
    """
    kind, where, name = split_source(arch)
    if kind == "torchvision":
        return _torchvision(name, n_classes)
    if kind == "timm":
        return _timm(name, n_classes)
    return _from_file(Path(where), name, n_classes, expected_sha256)


def _closest(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"closest: {near}" if near else f"{len(names)} models, e.g. {names[:8]}"


def _torchvision(name: str, n_classes: int | None) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(
            f"arch: torchvision:{name} is not a torchvision classification model ({_closest(name, names)})"
        )
    kwargs = {"num_classes": int(n_classes)} if n_classes is not None else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # training-only side outputs; the weights file would not hold them anyway
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(name: str, n_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"arch: timm:{name} needs the timm package, which is not installed "
            '(pip install "calexnet_fast[timm]", or pip install timm)'
        ) from None
    if not timm.is_model(name):
        raise ValueError(f"arch: timm:{name} is not a timm model ({_closest(name, timm.list_models())})")
    kwargs = {"num_classes": int(n_classes)} if n_classes is not None else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def _from_file(path: Path, attr: str, n_classes: int | None, expected_sha256: str | None) -> nn.Module:
    if not path.is_file():
        if expected_sha256 is None:
            raise ValueError(f"arch: the model file {str(path)!r} does not exist")
        raise ValueError(
            f"the model file {str(path)!r} has been moved or deleted since the run was made (its SHA-256 was "
            f"{expected_sha256}); put it back at that path: a run rebuilds its backbone from the file it was "
            "trained with"
        )
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(
            f"the model file {str(path)!r} changed since the run was made: its SHA-256 is {sha}, "
            f"the run recorded {expected_sha256}; restore that version, or train a new run on the new file"
        )
    module_name = f"calexnet_user_model_{sha[:16]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"arch: running the model file {str(path)!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"arch: the model file {str(path)!r} has no function {attr!r} (callables there: {found})")
    model = _call_factory(factory, n_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"arch: {path.name}:{attr}() returned a {type(model).__name__}, expected an nn.Module")
    return model


def _call_factory(factory, n_classes: int | None) -> nn.Module:
    """``factory(n_classes=...)`` or ``factory(num_classes=...)`` when it takes one of them, else ``factory()``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key in ("n_classes", "num_classes"):
        if n_classes is not None and key in params:
            return factory(**{key: int(n_classes)})
    return factory()
