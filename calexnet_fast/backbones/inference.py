"""Frozen stages in inference form: every eval-mode BatchNorm folded into the convolution just before it.

A frozen stage never trains, so its BatchNorm layers are fixed affine maps of the convolution outputs and
can be folded into the convolution's weight and bias: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` (computed in float64, stored in the convolution's dtype and memory
format), the BatchNorm replaced by ``nn.Identity``. The result equals the original to float rounding and
skips one pass over every feature map per BatchNorm. The cascades and the plain backbone take the same
form, so they are compared like with like (``bench/throughput.py``).

Which BatchNorm follows which convolution is read from the module's ``torch.fx`` graph (a pair is folded
only when the convolution's output goes nowhere else and neither module is called twice); a module that
cannot be traced is searched child by child, with adjacent pairs in an ``nn.Sequential`` folded.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["fold_batchnorm"]


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
