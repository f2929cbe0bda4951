"""The run's model files: the heads file, and backbones saved as ``torch.export`` programs."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..backbones import StagedBackbone
from ..heads import GridPrototypeHead, PrototypePoolingHead
from ..io import load_state_file, save_state_file
from .records import RunError

__all__ = ["export_stages", "exported_backbone", "load_heads", "save_heads"]

_GRID_SIZES = ("grid", "feature_grid", "max_size")  # GridPrototypeHead's sizes beyond D and K


def save_heads(path: str | Path, heads: Sequence[nn.Module], config: dict) -> str:
    """Write K heads (``heads.{k}.*`` keys) and their config to a safetensors file; returns its SHA-256."""
    tensors = {}
    specs = []
    for k, h in enumerate(heads):
        for name, v in h.state_dict().items():
            tensors[f"heads.{k}.{name}"] = v
        specs.append(
            {
                "class": type(h).__name__,
                "in_channels": getattr(h, "in_channels", None),
                "n_classes": getattr(h, "n_classes", None),
                "dim": getattr(h, "dim", None),
                "n_prototypes": getattr(h, "n_prototypes", None),
                **{a: getattr(h, a) for a in _GRID_SIZES if isinstance(h, GridPrototypeHead)},
            }
        )
    return save_state_file(path, tensors, {**config, "heads": specs})


def load_heads(
    path: str | Path, head_factory: Callable[[int, dict], nn.Module] | None = None, sha256: str | None = None
) -> tuple[nn.ModuleList, dict]:
    """Read heads written by :func:`save_heads`: (``nn.ModuleList`` in eval mode, config).

    Args:
        head_factory: ``f(k, spec) -> module`` for heads that are not ``PrototypePoolingHead``.
        sha256: the digest recorded when the file was written; the file must match it.

    Raises:
        ValueError: the file does not exist.  RuntimeError: it is damaged, or its tensors do not fit the heads
        its config describes.
    """
    tensors, config = load_state_file(path, sha256)
    specs = config.get("heads")
    if not isinstance(specs, list) or not specs:
        raise RuntimeError(f"{path}: no 'heads' list in its config; was it written by save_heads?")
    heads = nn.ModuleList()
    for k, spec in enumerate(specs):
        if head_factory is not None:
            h = head_factory(k, spec)
        elif spec.get("class") == "PrototypePoolingHead":
            h = PrototypePoolingHead(
                spec["in_channels"], spec["n_classes"], dim=spec["dim"], n_prototypes=spec["n_prototypes"]
            )
        elif spec.get("class") == "GridPrototypeHead":
            sizes = {a: spec[a] for a in _GRID_SIZES}
            h = GridPrototypeHead(
                spec["in_channels"], spec["n_classes"], dim=spec["dim"], n_prototypes=spec["n_prototypes"], **sizes
            )
        else:
            raise RuntimeError(f"{path}: head {k} is a {spec.get('class')!r}; pass head_factory to build it")
        sd = {n[len(f"heads.{k}.") :]: v for n, v in tensors.items() if n.startswith(f"heads.{k}.")}
        try:
            h.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{path}: head {k} does not fit its stored weights: {e}") from e
        heads.append(h.eval())
    return heads, config


# --------------------------------------------------------------------------------------------------
# backbones saved as exported programs
# --------------------------------------------------------------------------------------------------


class _ExportedStage(nn.Module):
    """A stage loaded from a ``torch.export`` program (its input shape is fixed but for the batch)."""

    def __init__(self, program: nn.Module, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.program = program
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x: expected [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        return self.program(x)

    def train(self, mode: bool = True) -> _ExportedStage:
        self.training = mode  # an exported program has no training mode: it was exported in eval mode
        return self


def _stage_inputs(backbone: StagedBackbone) -> list[torch.Tensor]:
    x = backbone.example_input(2)
    feats, _ = backbone.features(x)
    return [x, *feats]


def export_stages(backbone: StagedBackbone) -> list[bytes]:
    """Each stage of ``backbone`` as the bytes of a ``torch.export`` program (float32, CPU, eval mode; the batch
    size is free, the rest of the input shape is that of the backbone's ``input_size``).

    Raises:
        RunError: a stage cannot be exported (the message says which and why).
    """
    cpu = copy.deepcopy(backbone).float().cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    out = []
    for i, (stage, x) in enumerate(zip(cpu.stages, _stage_inputs(cpu), strict=True)):
        try:
            program = torch.export.export(stage, (x,), dynamic_shapes=({0: batch},))
        except Exception as e:  # noqa: BLE001 - any export failure gets one explanation
            raise RunError(
                f"backbone: stage {i} cannot be saved as a torch.export program ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); pass spec= (a BackboneSpec that rebuilds it) instead"
            ) from e
        buf = io.BytesIO()
        torch.export.save(program, buf)
        out.append(buf.getvalue())
    return out


def exported_backbone(paths: Sequence[Path], record: dict) -> StagedBackbone:
    """The ``StagedBackbone`` of stages saved by :func:`export_stages` and described by ``record``
    (``branch_points``, ``in_channels``, ``input_size``, ``mean``, ``std``, ``name``).

    Raises:
        RuntimeError: a file is not a readable ``torch.export`` program.
    """
    stages: list[nn.Module] = []
    shape = (int(record["in_channels"]), *(int(s) for s in record["input_size"]))
    for path in paths:
        try:
            program = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - any unreadable program gets one explanation
            raise RuntimeError(f"{path}: not a readable torch.export program ({type(e).__name__}: {e})") from e
        stages.append(_ExportedStage(program, shape))
        with torch.no_grad():
            shape = tuple(stages[-1](torch.zeros(1, *shape)).shape[1:])
    return StagedBackbone(
        stages,
        record["branch_points"],
        in_channels=int(record["in_channels"]),
        input_size=tuple(record["input_size"]),
        mean=record["mean"],
        std=record["std"],
        name=record.get("name", "backbone"),
    )
