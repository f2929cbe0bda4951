"""Cutting a model that is not a chain of its modules: its ``torch.fx`` graph, cut after branch-point nodes.

The forward is traced with the units of :func:`~calexnet_fast.backbones.generic.model_units` as leaves. A cut
after a node is valid when that node's output is the only value computed before the cut and used after it
(parameters and constants are copied into the later stage); otherwise the error names the values that cross.
Each stage is a ``torch.fx.GraphModule`` holding the model's own modules (shared, not copied), under their
original names.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .placement import DEFAULT_N_BRANCHES, pick_by_flops, placement_candidates
from .staged import FrozenStage, StagedBackbone

__all__ = ["fx_backbone"]


class _UnitTracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


class _Probe(fx.Interpreter):
    """Runs the graph once, recording each node's output dimensionality and the FLOPs so far."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.dims: dict[fx.Node, int] = {}
        self.cum: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.dims[n] = out.dim() if isinstance(out, torch.Tensor) else -1
        self.cum[n] = self.counter.get_total_flops()
        return out


def _trace(model: nn.Module, leaves: set[str]) -> fx.Graph:
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        graph = _UnitTracer(leaves).trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure gets one explanation
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(
            f"model: {type(model).__name__} is not a chain of its modules and torch.fx cannot trace its forward "
            f"({type(e).__name__}: {first}); give its stages with backbones.from_stages instead"
        ) from e
    # the arguments fixed at their defaults leave a placeholder and a guard each: drop them
    for extra in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        for guard in list(extra.users):
            for user in list(guard.users):
                if user.target is torch._assert:
                    graph.erase_node(user)
            if not guard.users:
                graph.erase_node(guard)
        if not extra.users:
            graph.erase_node(extra)
    return graph


def _describe(n: fx.Node) -> str:
    if n.op == "placeholder":
        return f"the input {n.name!r}"
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"node {n.name!r} ({n.op} {target})"


def fx_backbone(
    model: nn.Module,
    units: list[tuple[str, nn.Module]],
    aliases: dict[str, str],
    branch_points: Sequence[str] | None,
    n_branches: int | None,
    example: torch.Tensor,
    *,
    in_channels: int,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    name: str,
) -> StagedBackbone:
    """The :class:`StagedBackbone` of ``model`` cut after ``branch_points`` (or placed by FLOPs when ``None``)."""
    graph = _trace(model, {n for n, _ in units})
    gm = fx.GraphModule(model, graph)
    counter = FlopCounterMode(display=False)
    probe = _Probe(gm, counter)
    with torch.no_grad(), counter:
        probe.run(example)
    order = list(graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    crossing = _crossing(order, pos)
    calls: dict[str, list[fx.Node]] = {}
    for n in order:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    output = order[-1]

    def valid(unit: str) -> bool:
        nodes = calls.get(unit, [])
        return len(nodes) == 1 and probe.dims[nodes[0]] == 4 and crossing[nodes[0]] == [nodes[0]]

    if branch_points is None:
        modules = dict(units)
        called = sorted((u for u in modules if len(calls.get(u, [])) == 1), key=lambda u: pos[calls[u][0]])
        cand = placement_candidates([(u, modules[u]) for u in called], [probe.dims[calls[u][0]] for u in called])
        blocks = [called[i] for i in cand if valid(called[i])]
        k = n_branches if n_branches is not None else min(DEFAULT_N_BRANCHES, len(blocks))
        cum = [probe.cum[calls[u][0]] for u in blocks]
        points = [blocks[i] for i in pick_by_flops(cum, probe.cum[output], k)]
    else:
        points = list(branch_points)
    cuts = []
    for p in points:
        unit = aliases.get(p, p)
        nodes = calls.get(unit, [])
        if not nodes:
            shown = [u for u, _ in units if valid(u)]
            raise ValueError(f"branch_points: {p!r} is not a module that {name}'s forward calls; valid names: {shown}")
        if len(nodes) > 1:
            raise ValueError(f"branch_points: {p!r} is called {len(nodes)} times in {name}'s forward; cut elsewhere")
        node = nodes[0]
        others = [c for c in crossing[node] if c is not node]
        if others:
            listed = ", ".join(_describe(c) for c in others[:4])
            raise ValueError(
                f"branch_points: cannot cut {name} after {p!r}: besides its output, {len(others)} value(s) computed "
                f"before it are used after it ({listed}); a skip connection crosses this point, pick one outside it"
            )
        if probe.dims[node] != 4:
            raise ValueError(
                f"branch_points: {p!r} gives a {probe.dims[node]}-D output; expected a 4-D feature map [B, C, H, W]"
            )
        cuts.append(node)
    if not cuts:
        raise ValueError("branch_points: expected at least one branch point, got none")
    if any(pos[b] <= pos[a] for a, b in zip(cuts[:-1], cuts[1:])):
        raise ValueError(f"branch_points: expected distinct names in forward order, got {points}")
    stages, source_keys = [], {}
    bounds = [*cuts, output]
    start = 0
    for s, end in enumerate(bounds):
        seg = _segment(model, order[start : pos[end] + 1], order[start - 1] if start else order[0], end)
        start = pos[end] + 1
        stage = FrozenStage(OrderedDict([("graph", seg)]))
        for key in seg.state_dict():
            source_keys[f"stages.{s}.graph.{key}"] = key
        stages.append(stage)
    return StagedBackbone(
        stages,
        points,
        in_channels=in_channels,
        input_size=input_size,
        mean=mean,
        std=std,
        name=name,
        source_keys=source_keys,
    )


def _crossing(order: list[fx.Node], pos: dict[fx.Node, int]) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values computed at or before it that a later node uses (parameters excluded)."""
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in order}
    live: list[fx.Node] = []
    out = {}
    for i, n in enumerate(order):
        if n.op != "get_attr" and last_use[n] > i:
            live.append(n)
        live = [v for v in live if last_use[v] > i]
        out[n] = list(live)
    return out


def _segment(model: nn.Module, nodes: list[fx.Node], source: fx.Node, result: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``result`` from ``source`` with ``nodes`` (get_attr nodes copied on demand)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":
            env[a] = g.node_copy(a)
        return env[a]

    for n in nodes:
        if n in env or n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], arg))
            break
        env[n] = g.node_copy(n, arg)
    else:
        g.output(arg(result))
    return fx.GraphModule(model, g, class_name="Stage")
