"""A small cost model: op counts, parameters and multiply-accumulates of a captured graph.

MACs count conv, transposed conv and linear layers (whatever their spelling) from the shapes
recorded by shape propagation, for the example input's batch size:

- conv: ``numel(output) · (C_in / g) · Πk``;
- transposed conv: ``numel(input) · (C_out / g) · Πk``;
- linear: ``numel(output) · C_in``.

Elementwise ops (batch norm, activations, adds) are not counted as MACs; they show in the op
counts. Parameters count each distinct tensor once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from repfuse.graph import layer_view, shape_of


@dataclass(frozen=True)
class GraphCost:
    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int = 0

    def to_dict(self) -> dict:
        return {"ops": dict(sorted(self.ops.items())), "params": self.params, "macs": self.macs}


def op_name(gm: GraphModule, node: Node) -> str | None:
    """A readable op kind: the module class, function or method name; None for plumbing."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return node.target
    return None


def node_macs(gm: GraphModule, node: Node) -> int:
    layer = layer_view(gm, node)
    if layer is None:
        return 0
    out_shape, in_shape = shape_of(node), shape_of(layer.input)
    if out_shape is None or in_shape is None:
        return 0
    kernel = math.prod(layer.kernel_size)
    if layer.kind == "conv":
        return math.prod(out_shape) * (layer.in_channels // layer.groups) * kernel
    if layer.kind == "conv_transpose":
        return math.prod(in_shape) * (layer.out_channels // layer.groups) * kernel
    return math.prod(out_shape) * layer.in_channels


def graph_cost(gm: GraphModule) -> GraphCost:
    """Op counts, distinct parameter count and conv/linear MACs of ``gm``."""
    ops: Counter = Counter()
    macs = 0
    for node in gm.graph.nodes:
        name = op_name(gm, node)
        if name is not None:
            ops[name] += 1
            macs += node_macs(gm, node)
    params = sum(p.numel() for p in gm.parameters())
    return GraphCost(ops, params, macs)
