"""Frozen stages in inference form: every eval-mode BatchNorm folded into the convolution just before it,
and every max pooling run where PyTorch's CPU kernel is fast.

A frozen stage never trains, so its BatchNorm layers are fixed affine maps of the convolution outputs and
can be folded into the convolution's weight and bias: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` (computed in float64, stored in the convolution's dtype and memory
format), the BatchNorm replaced by ``nn.Identity``. The result equals the original to float rounding and
skips one pass over every feature map per BatchNorm. The cascades and the plain backbone take the same
form, so they are compared like with like (``bench/throughput.py``).

Which BatchNorm follows which convolution is read from the module's ``torch.fx`` graph (a pair is folded
only when the convolution's output goes nowhere else and neither module is called twice); a module that
cannot be traced is searched child by child, with adjacent pairs in an ``nn.Sequential`` folded.

:func:`inference_form` does that and also replaces every ``nn.MaxPool2d`` (without ``return_indices``) by
:class:`InferenceMaxPool2d`, which pools a contiguous (NCHW) float32 / float64 CPU tensor with the C++ op
``calexnet_fast.ops.max_pool2d`` (one pass over the map; where the op library is missing, or for dilated or
ceil-mode pools, in channels_last and handed back contiguous): the same values, but PyTorch 2.14's NCHW CPU
kernel for the 3x3 / stride-2 stem pool of a torchvision ResNet took ~5 ms on a [64, 64, 16, 16] map, about a
fifth of a ResNet-18's time at 32 x 32, where the channels_last one took 0.9 ms with its two layout copies and
the op 0.35-0.43 ms (2 threads, this project's CPU machine; docs/design.md §2). Other devices and layouts pool as
before.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _pair

from ..ops import library_status

__all__ = ["InferenceMaxPool2d", "fold_batchnorm", "inference_form"]


class InferenceMaxPool2d(nn.Module):
    """``pool`` (an ``nn.MaxPool2d``) with the same values, fast on CPU: a contiguous 4-D float32 / float64 CPU
    input goes to the C++ op ``calexnet_fast.ops.max_pool2d`` (dilation 1, floor mode, the op library
    loaded), any other contiguous 4-D CPU input is pooled in channels_last and handed back contiguous, and
    everything else goes to ``pool`` itself."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
            raise ValueError(f"pool: expected an nn.MaxPool2d without return_indices, got {pool!r}")
        self.pool = pool
        stride = pool.stride if pool.stride is not None else pool.kernel_size  # (None: the kernel size)
        self._kernel, self._stride, self._padding = (list(_pair(v)) for v in (pool.kernel_size, stride, pool.padding))
        plain = _pair(pool.dilation) == (1, 1) and not pool.ceil_mode
        self._op = plain and library_status().cpu_path is not None  # (TorchScript: decided once, here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.device.type != "cpu" or not x.is_contiguous():
            return self.pool(x)
        if self._op and (x.dtype == torch.float32 or x.dtype == torch.float64):
            k, s, p = self._kernel, self._stride, self._padding
            return torch.ops.calexnet_fast.max_pool2d(x, k[0], k[1], s[0], s[1], p[0], p[1])
        return self.pool(x.contiguous(memory_format=torch.channels_last)).contiguous()


def inference_form(module: nn.Module) -> nn.Module:
    """The inference form of frozen stages: :func:`fold_batchnorm`, then every ``nn.MaxPool2d`` of the
    (folded) stages wrapped in :class:`InferenceMaxPool2d` (module docstring). Same arguments, same
    copy semantics and outputs equal to the original's to float rounding (the pools: exactly)."""
    folded = fold_batchnorm(module)
    stages = getattr(folded, "stages", None)
    root = stages if isinstance(stages, nn.ModuleList) else folded
    pools = [
        name
        for name, m in root.named_modules()
        if type(m) is nn.MaxPool2d and not m.return_indices and name  # the root itself: wrap below
    ]
    for name in pools:
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, InferenceMaxPool2d(root.get_submodule(name)))
    if type(folded) is nn.MaxPool2d and not folded.return_indices:
        return InferenceMaxPool2d(folded)
    return folded


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """The inference form of frozen stages: a copy of ``module`` with BatchNorm folded into convolutions.

    Args:
        module: a stage, a list of stages, a :class:`~calexnet_fast.backbones.StagedBackbone` or a cascade.
            Anything with a ``stages`` module list (a staged backbone, a cascade) has only its stages
            folded: heads keep their BatchNorm (they may still train; their own inference form is
            ``PrototypePoolingHead.fold``).

    Returns:
        A deep copy (``module`` itself is left as it is) in which every BatchNorm in eval mode with running
        statistics that directly follows a (non-transposed) convolution is folded into it and replaced by
        ``nn.Identity``. Its outputs equal the original's to float rounding; its state dict lacks the folded
        BatchNorm entries (it is for inference, not for saving).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected an nn.Module, got {type(module).__name__}")
    folded = copy.deepcopy(module)
    stages = getattr(folded, "stages", None)
    root = stages if isinstance(stages, nn.ModuleList) else folded
    calls = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    _fold_in(root, calls)
    return folded


def _fold_in(module: nn.Module, calls: Counter) -> None:
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # untraceable (data-dependent control flow, a ModuleList, ...): search the children
        if isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            for a, b in zip(names, names[1:]):
                _fold_pair(module, a, b, calls)
        for child in module.children():
            _fold_in(child, calls)
        return
    used = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if source.op == "call_module" and len(source.users) == 1 and used[source.target] == used[node.target] == 1:
            _fold_pair(module, source.target, node.target, calls)


def _fold_pair(root: nn.Module, conv_name: str, bn_name: str, calls: Counter) -> None:
    conv, bn = root.get_submodule(conv_name), root.get_submodule(bn_name)
    if not isinstance(conv, _ConvNd) or conv.transposed or not isinstance(bn, _BatchNorm):
        return
    if bn.training or bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
        return
    if calls[id(conv)] != 1 or calls[id(bn)] != 1:  # shared with another place in the model
        return
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = conv.weight
        weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty_like(shift, dtype=weight.dtype), requires_grad=False)
        conv.bias.copy_(bias * scale + shift)
    parent_name, _, name = bn_name.rpartition(".")
    setattr(root.get_submodule(parent_name), name, nn.Identity())
