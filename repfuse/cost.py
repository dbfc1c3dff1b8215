"""A small cost model: op counts, parameters, multiply-accumulates and bytes moved.

Per node, from the shapes recorded by shape propagation, for the example input's batch size:

- MACs of conv, transposed conv and linear layers (whatever their spelling):
  conv ``numel(output) · (C_in / g) · Πk``; transposed conv ``numel(input) · (C_out / g) · Πk``;
  linear ``numel(output) · C_in``. Elementwise ops (batch norm, activations, adds) count no
  MACs; they show in the op counts and in the bytes.
- parameters: the tensors the node reads as weights (its module's, or ``get_attr`` reads);
- bytes moved: every activation the node reads, its output, and its weights, each once. Views
  (``getitem``, ``split``, ``flatten``, ``view``, aten ops whose result aliases their input,
  ...) move nothing.

A merge *pays* (:func:`pays`) when it does not raise the MACs and, at equal MACs, does not
raise the bytes moved. Parameters are reported but are not a criterion: a composed kernel may
hold more weights and still cost fewer MACs (conv3x3 → avgpool2/s2 = conv4x4/s2).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from repfuse.graph import aten_view, fetch_attr, layer_view, shape_of

# Ops that only reinterpret or select memory: they move no bytes in eager PyTorch.
_VIEW_FUNCTIONS = {operator.getitem, torch.split, torch.chunk, torch.flatten, torch.reshape,
                   torch.squeeze, torch.unsqueeze, torch.narrow}
_VIEW_METHODS = {"view", "reshape", "flatten", "split", "chunk", "squeeze", "unsqueeze",
                 "narrow", "size", "dim", "view_as", "expand", "expand_as"}
_VIEW_MODULES = (nn.Flatten, nn.Identity, nn.Unflatten)


@dataclass(frozen=True)
class NodeCost:
    """The cost of one node (or, summed, of several)."""

    macs: int = 0
    params: int = 0
    bytes: int = 0

    def __add__(self, other: NodeCost) -> NodeCost:
        return NodeCost(self.macs + other.macs, self.params + other.params,
                        self.bytes + other.bytes)

    def __sub__(self, other: NodeCost) -> NodeCost:
        return NodeCost(self.macs - other.macs, self.params - other.params,
                        self.bytes - other.bytes)

    def to_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "bytes": self.bytes}


@dataclass(frozen=True)
class GraphCost:
    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int = 0
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"ops": dict(sorted(self.ops.items())), "params": self.params, "macs": self.macs,
                "bytes": self.bytes}


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


def _is_view(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_function":
        # an exported program's aten op moves nothing when its result aliases its input
        return aten_view(node) or node.target in _VIEW_FUNCTIONS
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _VIEW_MODULES)
    return True  # placeholders, get_attr and output compute nothing


def activation_bytes(node: Node) -> int:
    """Bytes of the tensors ``node`` outputs (all of them, for a tuple), 0 when unknown."""
    return _bytes_of(node.meta.get("tensor_meta"))


def _bytes_of(meta) -> int:
    if isinstance(meta, TensorMetadata):
        return math.prod(meta.shape) * meta.dtype.itemsize
    if isinstance(meta, (list, tuple)):
        return sum(_bytes_of(m) for m in meta)
    if isinstance(meta, dict):
        return sum(_bytes_of(m) for m in meta.values())
    return 0


def _weights(gm: GraphModule, node: Node) -> list[Tensor]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return [*module.parameters(), *module.buffers()]
    reads = (fetch_attr(gm, a.target) for a in node.all_input_nodes if a.op == "get_attr")
    return [t for t in reads if isinstance(t, Tensor)]


def node_cost(gm: GraphModule, node: Node) -> NodeCost:
    """MACs, parameters read and bytes moved by ``node`` (see the module docstring)."""
    if _is_view(gm, node):
        return NodeCost()
    weights = _weights(gm, node)
    params = sum(t.numel() for t in weights if isinstance(t, nn.Parameter))
    moved = activation_bytes(node) + sum(t.numel() * t.element_size() for t in weights)
    moved += sum(activation_bytes(a) for a in node.all_input_nodes if a.op != "get_attr")
    return NodeCost(node_macs(gm, node), params, moved)


def nodes_cost(gm: GraphModule, nodes: Iterable[Node]) -> NodeCost:
    total = NodeCost()
    for node in nodes:
        total = total + node_cost(gm, node)
    return total


def layer_cost(
    weight_shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    itemsize: int,
) -> NodeCost:
    """The cost of a conv (``weight_shape = (C_out, C_in / g, *k)``) or linear
    (``(C_out, C_in)``) layer with a bias, reading ``in_shape`` and writing ``out_shape``."""
    per_output = math.prod(weight_shape[1:])
    params = math.prod(weight_shape) + weight_shape[0]
    moved = (math.prod(in_shape) + math.prod(out_shape) + params) * itemsize
    return NodeCost(math.prod(out_shape) * per_output, params, moved)


def pays(before: NodeCost, after: NodeCost) -> str | None:
    """None when replacing ``before`` by ``after`` does not cost more, else why it does."""
    if after.macs > before.macs:
        return f"it would raise MACs from {before.macs:,} to {after.macs:,}"
    if after.macs == before.macs and after.bytes > before.bytes:
        return f"it would raise the bytes moved from {before.bytes:,} to {after.bytes:,}"
    return None


def graph_cost(gm: GraphModule) -> GraphCost:
    """Op counts, distinct parameter count, conv/linear MACs and bytes moved by ``gm``."""
    ops: Counter = Counter()
    macs = moved = 0
    for node in gm.graph.nodes:
        name = op_name(gm, node)
        if name is not None:
            ops[name] += 1
            cost = node_cost(gm, node)
            macs += cost.macs
            moved += cost.bytes
    params = sum(p.numel() for p in gm.parameters())
    return GraphCost(ops, params, macs, moved)
