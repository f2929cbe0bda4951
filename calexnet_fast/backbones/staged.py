"""The frozen stage and the staged backbone: ``K + 1`` stages with ``K`` branch points.

Frozen means frozen: every stage is a :class:`FrozenStage`, whose parameters never require gradients, whose
BatchNorm layers stay in eval mode whatever ``.train()`` is called with, and whose forward runs without
autograd.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization
from .checkpoints import check_state_dict_fits

__all__ = ["FrozenStage", "StagedBackbone", "as_pair"]


class FrozenStage(nn.Sequential):
    """A frozen segment of a backbone: an ``nn.Sequential`` that stays in eval mode without gradients.

    ``train(True)`` is accepted (so a parent module's ``.train()`` does not fail) but leaves the stage and
    all its children in eval mode; the parameters are created with ``requires_grad=False`` and the forward
    pass runs under ``torch.no_grad()``, so even a later ``requires_grad_(True)`` from a parent cannot make
    gradients flow into the backbone.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenStage:  # noqa: ARG002 - the mode is ignored on purpose
        """Keep eval mode whatever ``mode`` is (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: the stage input (an image batch or a feature map). Returns: the stage output."""
        with torch.no_grad():
            for module in self:
                x = module(x)
        return x


def _check_image_batch(x: torch.Tensor, in_channels: int, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: expected {in_channels} channels (dimension 1), got {x.shape[1]}")


class StagedBackbone(nn.Module):
    """A frozen backbone as ``K + 1`` stages with ``K`` branch points.

    Args:
        stages: ``K + 1`` modules; stage ``k < K`` maps its input to the branch feature map ``f_{k+1}``
            ``[B, C_k, H_k, W_k]``, stage ``K`` ends with the backbone's pooling and classifier and returns
            logits ``[B, n_classes]``. Modules that are not :class:`FrozenStage` are wrapped in one.
        branch_points: ``K`` names of the branch points (default ``"stage0"`` ... ``"stage{K-1}"``).
        in_channels: channels of the input images.
        input_size: ``(H, W)`` of the input the backbone is meant for; used to probe the branch shapes,
            the number of classes and the FLOPs.
        mean, std: per-channel input normalisation the backbone was trained with (inputs to ``forward`` are
            expected normalised already; :meth:`normalize` applies it).
        name: a human-readable name.
        source_keys: optional map from this module's state-dict keys to those of the model the stages came
            from (for :meth:`source_state_dict` / :meth:`load_source_state_dict`).

    Attributes:
        stages: ``nn.ModuleList`` of the ``K + 1`` frozen stages.
        n_branches: ``K``.
        branch_points: list of ``K`` names.
        branch_channels: list of ``K`` channel counts ``C_k`` of the branch feature maps.
        branch_shapes: list of ``K`` ``(C_k, H_k, W_k)`` at ``input_size``.
        n_classes, in_channels, input_size, mean, std, name.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        branch_points: Sequence[str] | None = None,
        *,
        in_channels: int,
        input_size: tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str = "backbone",
        source_keys: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        stages = list(stages)
        if len(stages) < 2:
            raise ValueError(f"stages: expected at least 2 stages (one branch point), got {len(stages)}")
        for i, s in enumerate(stages):
            if not isinstance(s, nn.Module):
                raise ValueError(f"stages[{i}]: expected an nn.Module, got {type(s).__name__}")
        n_branches = len(stages) - 1
        if branch_points is None:
            branch_points = [f"stage{i}" for i in range(n_branches)]
        branch_points = [str(b) for b in branch_points]
        if len(branch_points) != n_branches:
            raise ValueError(
                f"branch_points: expected {n_branches} names (one per stage but the last), got {len(branch_points)}"
            )
        if int(in_channels) < 1:
            raise ValueError(f"in_channels: expected a positive int, got {in_channels}")
        input_size = as_pair(input_size, "input_size")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean/std: expected {in_channels} values each (in_channels), got {len(mean)} and {len(std)}"
            )
        self.stages = nn.ModuleList([s if isinstance(s, FrozenStage) else FrozenStage(s) for s in stages])
        self.n_branches: int = n_branches
        self.branch_points: list[str] = branch_points
        self.in_channels: int = int(in_channels)
        self.input_size: tuple[int, int] = input_size
        self.mean: tuple[float, ...] = mean
        self.std: tuple[float, ...] = std
        self.name: str = name
        self._source_keys: dict[str, str] = dict(source_keys) if source_keys is not None else {}

        feats, logits = self.features(self.example_input(2))
        if logits.dim() != 2:
            raise ValueError(
                f"stages[{n_branches}]: expected the last stage to return logits [B, n_classes], "
                f"got shape {list(logits.shape)}"
            )
        for k, f in enumerate(feats):
            if f.dim() != 4:
                raise ValueError(
                    f"stages[{k}]: expected a 4-D feature map [B, C, H, W] at branch point "
                    f"{branch_points[k]!r}, got shape {list(f.shape)}"
                )
        self.n_classes: int = int(logits.shape[1])
        self.branch_shapes: list[tuple[int, int, int]] = [tuple(int(s) for s in f.shape[1:]) for f in feats]
        self.branch_channels: list[int] = [s[0] for s in self.branch_shapes]

    # -- frozen ------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> StagedBackbone:
        """Set ``self.training`` as asked; the stages stay in eval mode (see :class:`FrozenStage`)."""
        super().train(mode)
        return self

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: [B, in_channels, H, W] normalised images. Returns: logits [B, n_classes]."""
        _check_image_batch(x, self.in_channels)
        for stage in self.stages:
            x = stage(x)
        return x

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All branch feature maps and the backbone logits in one pass.

        Args:
            x: [B, in_channels, H, W] normalised images.

        Returns:
            feats: ``K`` tensors ``f_k`` [B, C_k, H_k, W_k] (``f_k`` is the input of branch ``k``).
            logits: [B, n_classes] the backbone's own logits.
        """
        _check_image_batch(x, self.in_channels)
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        logits = feats.pop()
        return feats, logits

    # -- helpers ----------------------------------------------------------------------------------

    def example_input(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zeros [batch_size, in_channels, *input_size] on the backbone's device (for probing and FLOPs)."""
        p = next(self.stages.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
        return torch.zeros(batch_size, self.in_channels, *self.input_size, device=device, dtype=dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel for images in ``[0, 1]``, x: [B, C, H, W] or [C, H, W]."""
        return Normalization(self.mean, self.std).apply(x)

    def normalization(self):
        """A ``torchvision.transforms.Normalize`` with this backbone's mean and std (for data pipelines)."""
        from torchvision.transforms import Normalize

        return Normalize(self.mean, self.std)

    def source_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under the key names of the model it was built from.

        For torchvision ResNets that is a plain ``torchvision.models.ResNet`` state dict (loadable with
        ``strict=True``); for CIFAR ResNets the keys of :class:`CifarResNet` (checkpoint keys without the
        ``module.`` prefix).
        """
        own = self.state_dict()
        if not self._source_keys:
            return own
        return OrderedDict((self._source_keys[k], v) for k, v in own.items() if k in self._source_keys)

    def load_source_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights given under the source model's key names (inverse of :meth:`source_state_dict`).

        Raises:
            RuntimeError: naming the missing, unexpected and mis-shaped keys when ``state_dict`` does not fit.
        """
        if not self._source_keys:
            self.load_state_dict(state_dict, strict=strict)
            return
        inverse = {v: k for k, v in self._source_keys.items()}
        check_state_dict_fits(
            {v: t for k, t in self.state_dict().items() if (v := self._source_keys.get(k)) is not None},
            state_dict,
            strict,
            what=f"state_dict for {self.name}",
        )
        mapped = OrderedDict((inverse[k], v) for k, v in state_dict.items() if k in inverse)
        self.load_state_dict(mapped, strict=False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, branch_points={self.branch_points}, "
            f"branch_channels={self.branch_channels}, "
            f"n_classes={self.n_classes}, input_size={self.input_size}"
        )


def as_pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        h, w = (int(a) for a in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or a pair (H, W), got {v!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w
