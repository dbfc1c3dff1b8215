"""``equalize``: exact cross-layer equalization (Nagel et al. 2019), for INT8-friendly weights.

Opt-in (not in the default pipeline): it changes no op and no cost, only how the weights'
magnitudes are spread over channels. For a layer whose output channels reach other conv/linear
layers only through per-channel positively homogeneous ops, rescaling channel ``i`` by ``1/s_i``
and the readers' matching input channels by ``s_i`` computes the same function
(:mod:`repfuse.equalization` states the math and the exactness condition).

- **Find**: a conv/linear layer (the *producer*); follow its output through the ops that
  commute with a positive per-channel scale (ReLU, LeakyReLU, PReLU, max/avg pooling of any
  kind, spatial mean, zero/reflect/replicate padding of the spatial axes, flatten after the
  channel axis, concatenation and split along the channel axis, identity and eval dropout) to
  the conv/linear layers that read it (the *readers*).
- **Check**: every path ends in a reader, as its data input, on the channel axis; no module or
  weight involved is used elsewhere. Otherwise the producer is left alone with the reason:
  a non-homogeneous op (ReLU6, clamp/hardtanh, SiLU, GELU, hardswish, sigmoid, ...), a value
  that also goes elsewhere (a residual add, the graph output, a non-layer op), a constant pad,
  a concatenation on another axis, a shared layer.
- **Rewrite**: the producers and readers linked this way form a group (a chain, or a fan-out
  whose readers all share one scale per channel). Its scales are solved jointly, sweeping to
  convergence (:func:`repfuse.equalization.solve_equalization`), and the whole group is
  rewritten at once (:meth:`Rewriter.replace_region`): the layers get the rescaled weights,
  the ops between them are recomputed as they were, and only the group's outputs, whose values
  are unchanged, stand for the originals. A group already equalized is not a candidate.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from repfuse.equalization import (
    ChannelSet,
    LayerWeights,
    output_channel_ranges,
    range_ratio,
    solve_equalization,
)
from repfuse.graph import (
    LayerView,
    bind_args,
    data_users,
    describe,
    layer_view,
    read_count,
    shape_of,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

# A group whose solved scales are all within this of 1 is already equalized (float32 weights
# rounded after an earlier equalization land within ~1e-7).
SETTLED = 1e-5

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
                        nn.Dropout2d, nn.Dropout3d)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.leaky_relu_,
                          F.prelu, torch.prelu)
_HOMOGENEOUS_METHODS = ("relu", "relu_")
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_CLIPPING = "it clips at a fixed value"
_CURVED = "its shape depends on the input's scale"
# Ops that are not positively homogeneous, with why (named in the decline).
_NOT_HOMOGENEOUS_MODULES = {
    nn.ReLU6: _CLIPPING, nn.Hardtanh: _CLIPPING, nn.Threshold: _CLIPPING,
    nn.SiLU: _CURVED, nn.GELU: _CURVED, nn.Hardswish: _CURVED, nn.Hardsigmoid: _CURVED,
    nn.Sigmoid: _CURVED, nn.Tanh: _CURVED, nn.ELU: _CURVED, nn.SELU: _CURVED, nn.CELU: _CURVED,
    nn.Mish: _CURVED, nn.Softplus: _CURVED, nn.Softsign: _CURVED, nn.Tanhshrink: _CURVED,
    nn.Hardshrink: _CLIPPING, nn.Softshrink: _CLIPPING, nn.RReLU: "its slope is random",
}
_NOT_HOMOGENEOUS_FUNCTIONS = {
    F.relu6: _CLIPPING, F.hardtanh: _CLIPPING, F.hardtanh_: _CLIPPING, torch.clamp: _CLIPPING,
    torch.clip: _CLIPPING, F.threshold: _CLIPPING, F.silu: _CURVED, F.gelu: _CURVED,
    F.hardswish: _CURVED, F.hardsigmoid: _CURVED, torch.sigmoid: _CURVED, F.sigmoid: _CURVED,
    torch.tanh: _CURVED, F.tanh: _CURVED, F.elu: _CURVED, F.selu: _CURVED, F.celu: _CURVED,
    F.mish: _CURVED, F.softplus: _CURVED,
}
_NOT_HOMOGENEOUS_METHODS = {
    "clamp": _CLIPPING, "clamp_": _CLIPPING, "clip": _CLIPPING, "clip_": _CLIPPING,
    "sigmoid": _CURVED, "sigmoid_": _CURVED, "tanh": _CURVED, "tanh_": _CURVED,
}
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


@dataclass
class _Traced:
    """A producer's channel set: the ops its channels pass, and the layers that read them."""

    producer: LayerView
    between: list[Node] = field(default_factory=list)
    readers: list[tuple[LayerView, Tensor]] = field(default_factory=list)


class _Blocked(Exception):
    """The producer's channels reach something that would not see the same values."""


def _why_not_homogeneous(gm: GraphModule, node: Node) -> str | None:
    if node.op == "call_module":
        return _NOT_HOMOGENEOUS_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return _NOT_HOMOGENEOUS_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _NOT_HOMOGENEOUS_METHODS.get(node.target)
    return None


def _is_homogeneous(gm: GraphModule, node: Node) -> bool:
    """ReLU, LeakyReLU, PReLU, identity, eval dropout: ``f(x/s) = f(x)/s`` elementwise."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return not module.training or module.p == 0
        return isinstance(module, _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _pool_dims(gm: GraphModule, node: Node) -> int | None:
    """Spatial axes of a pooling op (max, average, adaptive), None if ``node`` is not one."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "return_indices", False):
            return None
        return _POOL_MODULES.get(type(module))
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        if node.kwargs.get("return_indices"):
            return None
        return _POOL_FUNCTIONS[node.target]
    return None


def _tensor_meta_shapes(node: Node) -> list[tuple[int, ...]] | None:
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)):
        return None
    shapes = [tuple(getattr(m, "shape", ())) for m in metas]
    return shapes if all(shapes) else None


class _ChannelFlow:
    """Follows a producer's output channels forward: which node carries which channel on
    which axis (a flow ``(axis, index)``: ``index[j]`` is the producer channel at position
    ``j`` of that axis, or -1 for a position filled from elsewhere)."""

    def __init__(self, gm: GraphModule, rewriter: Rewriter, producer: LayerView) -> None:
        self.gm = gm
        self.rewriter = rewriter
        self.producer = producer
        self.name = describe(producer.node, gm)

    def blocked(self, node: Node, why: str) -> _Blocked:
        return _Blocked(f"the channels of {self.name} reach {describe(node, self.gm)}, "
                        f"which {why}; rescaling them would change the result")

    def trace(self) -> _Traced | None:
        """The channel set, None when nothing but the graph output reads the channels.

        First the nodes the channels pass (each must be an op that commutes with a positive
        per-channel scale) and the layers reading them; then, in topological order, where
        each carries which channel.
        """
        producer = self.producer.node
        members: list[Node] = []
        readers: list[Node] = []
        seen = {producer}
        pending = deque([producer])
        reaches_output = False
        while pending:
            source = pending.popleft()
            for user in data_users(source):  # reading its shape is no use of its values
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    reaches_output = True
                elif layer_view(self.gm, user) is not None:
                    readers.append(user)
                else:
                    self._check_kind(user, source)
                    members.append(user)
                    pending.append(user)
        if not readers:
            return None
        if reaches_output:
            raise _Blocked(f"the channels of {self.name} are also an output of the graph; "
                           "rescaling them would change it")
        shape = shape_of(producer)
        if shape is None:
            raise _Blocked(f"the output shape of {self.name} is unknown (run shape "
                           "propagation, e.g. repfuse.trace)")
        axis = 1 if self.producer.kind != "linear" else len(shape) - 1
        flows: dict[Node, Any] = {producer: (axis, torch.arange(self.producer.out_channels))}
        for node in _topological([producer, *members])[1:]:
            flows[node] = self._through(node, flows)
        traced = _Traced(self.producer, members)
        for node in readers:
            reader = layer_view(self.gm, node)
            traced.readers.append((reader, self._reader_index(reader, flows)))
        return traced

    def _check_kind(self, node: Node, source: Node) -> None:
        """Raise unless ``node`` is an op the channels may pass (details checked later)."""
        gm = self.gm
        why = _why_not_homogeneous(gm, node)
        if why is not None:
            raise self.blocked(node, f"is not positively homogeneous (f(x/s) ≠ f(x)/s for "
                                     f"s > 0: {why})")
        if (_is_homogeneous(gm, node) or _pool_dims(gm, node) is not None or _is_pad(gm, node)
                or _is_flatten(gm, node) or _is_mean(node) or _is_split(node)
                or (node.op == "call_function" and node.target in _CAT_FUNCTIONS)):
            return
        if node.op == "call_function" and node.target is operator.getitem and _is_split(source):
            return
        if node.op in ("call_function", "call_method") and node.target in (
                operator.add, torch.add, "add", "add_", operator.iadd):
            raise self.blocked(node, "adds other values to them (a residual sum)")
        raise self.blocked(node, "is neither a conv/linear layer nor an op that commutes with "
                                 "a positive per-channel scale")

    def _reader_index(self, reader: LayerView, flows: dict) -> Tensor:
        source = reader.input
        if source not in flows or read_count(reader.node, source) != 1:
            raise self.blocked(reader.node, "reads them other than as its one data input")
        axis, index = flows[source]
        rank = len(shape_of(source) or ())
        reader_axis = 1 if reader.kind != "linear" else rank - 1
        if axis != reader_axis:
            raise self.blocked(reader.node, f"works on axis {reader_axis} of a {rank}-D tensor "
                                            f"whose channels are on axis {axis}")
        shared = self.rewriter.index.shared_reason(self.gm, reader)
        if shared:
            raise _Blocked(f"the channels of {self.name} are read by a shared layer: {shared}")
        return index

    def _single_source(self, node: Node, flows: dict) -> tuple[Node, int, Tensor]:
        """The one carrying input of ``node``, which must be its data input, read once."""
        carrying = [n for n in node.all_input_nodes if n in flows]
        data = _data_arg(node)
        if carrying != [data] or read_count(node, data) != 1 or not isinstance(flows[data][1],
                                                                            Tensor):
            raise self.blocked(node, "reads them other than as its data input")
        axis, index = flows[data]
        return data, axis, index

    def _through(self, node: Node, flows: dict) -> Any:
        """The flow at ``node``'s output, or raise why the channels cannot pass it."""
        gm = self.gm
        if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            return self._cat(node, flows)
        if node.op == "call_function" and node.target is operator.getitem:
            axis, parts = flows[node.args[0]]
            return axis, parts[node.args[1]]
        source, axis, index = self._single_source(node, flows)
        if _is_homogeneous(gm, node):
            return axis, index
        dims = _pool_dims(gm, node)
        if dims is not None:
            return self._pool(node, source, axis, index, dims)
        if _is_pad(gm, node):
            return self._pad(node, source, axis, index)
        if _is_flatten(gm, node):
            return self._flatten(node, source, axis, index)
        if _is_mean(node):
            return self._mean(node, source, axis, index)
        return self._split(node, source, axis, index)

    def _pool(self, node, source, axis, index, dims):
        rank = len(shape_of(source) or ())
        if axis != 1 or rank != dims + 2:
            raise self.blocked(node, f"pools a {rank}-D tensor whose channels are on axis "
                                     f"{axis} (per channel only for N×C×spatial, channels on "
                                     "axis 1)")
        return axis, index

    def _pad(self, node, source, axis, index):
        shape = shape_of(source)
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            pads, value = tuple(module.padding), getattr(module, "value", 0.0)
        else:
            args = bind_args(node, ("input", "pad", "mode", "value"),
                             {"mode": "constant", "value": None})
            pads, value = tuple(args["pad"]), args["value"]
            if args["mode"] != "constant":
                value = 0.0  # reflect/replicate/circular copy values: they commute
        if shape is None:
            raise self.blocked(node, "pads a tensor of unknown shape")
        if value not in (None, 0, 0.0):
            raise self.blocked(node, f"pads with the constant {value}, which does not scale")
        if axis >= len(shape) - len(pads) // 2:
            raise self.blocked(node, "pads the channel axis")
        return axis, index

    def _flatten(self, node, source, axis, index):
        shape = shape_of(source)
        if shape is None:
            raise self.blocked(node, "flattens a tensor of unknown shape")
        start, end = (d % len(shape) for d in _flatten_dims(self.gm, node))
        if axis != start or end != len(shape) - 1:
            raise self.blocked(node, f"flattens axes {start}..{end} of a {len(shape)}-D tensor "
                                     f"whose channels are on axis {axis} (handled: from the "
                                     "channel axis to the last)")
        return axis, index.repeat_interleave(math.prod(shape[axis + 1:]))

    def _mean(self, node, source, axis, index):
        shape = shape_of(source)
        args = bind_args(node, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
        dims = args["dim"]
        if shape is None or dims is None:
            raise self.blocked(node, "averages over every axis, channels included")
        dims = [d % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if any(d <= axis for d in dims):
            raise self.blocked(node, f"averages over axes {dims}, not only those after the "
                                     f"channel axis {axis}")
        return axis, index

    def _cat(self, node, flows):
        args = bind_args(node, ("tensors", "dim"), {"dim": 0})
        tensors, dim = args["tensors"], args["dim"]
        if not isinstance(tensors, (list, tuple)):
            raise self.blocked(node, "concatenates a sequence of unknown length")
        rank = len(shape_of(node) or ())
        axes = {flows[t][0] for t in tensors if t in flows}
        if rank == 0 or axes != {dim % rank}:
            raise self.blocked(node, f"concatenates along axis {dim}, not the channel axis")
        pieces = []
        for tensor in tensors:
            if tensor in flows:
                pieces.append(flows[tensor][1])
                continue
            shape = shape_of(tensor)
            if shape is None:
                raise self.blocked(node, "concatenates them with a tensor of unknown shape")
            pieces.append(torch.full((shape[dim],), -1, dtype=torch.long))
        return dim % rank, torch.cat(pieces)

    def _split(self, node, source, axis, index):
        args = bind_args(node, ("input", "split", "dim"), {"dim": 0})
        shapes = _tensor_meta_shapes(node)
        if shapes is None:
            raise self.blocked(node, "splits a tensor of unknown shape")
        if args["dim"] % len(shapes[0]) != axis:
            raise self.blocked(node, f"splits along axis {args['dim']}, not the channel axis "
                                     f"{axis}")
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem
                    and isinstance(user.args[1], int)):
                raise self.blocked(user, "reads the split's parts other than one by one")
        return axis, list(torch.split(index, [s[axis] for s in shapes]))


def _data_arg(node: Node) -> Any:
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _is_pad(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PAD_MODULES)
    return node.op == "call_function" and node.target is F.pad


def _is_flatten(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    return (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten")


def _flatten_dims(gm: GraphModule, node: Node) -> tuple[int, int]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module.start_dim, module.end_dim
    args = bind_args(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return args["start_dim"], args["end_dim"]


def _is_mean(node: Node) -> bool:
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)


def _is_split(node: Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.split, torch.chunk)) or (
        node.op == "call_method" and node.target in ("split", "chunk"))


def _topological(nodes: list[Node]) -> list[Node]:
    """``nodes`` ordered so that each comes after its inputs among them (Kahn's algorithm)."""
    members = set(nodes)
    waiting = {n: sum(1 for i in n.all_input_nodes if i in members) for n in nodes}
    ready = deque(n for n in nodes if waiting[n] == 0)
    ordered = []
    while ready:
        node = ready.popleft()
        ordered.append(node)
        for user in node.users:
            if user in waiting:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
    return ordered


def layer_weights(layer: LayerView) -> LayerWeights:
    """The weights of a conv/linear layer of the graph, as the equalization math reads them."""
    return LayerWeights(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                        layer.groups, layer.kind == "conv_transpose")


@dataclass(frozen=True)
class Equalize(Pass):
    """Rescale channels between conv/linear layers so their per-channel weight ranges match."""

    name: ClassVar[str] = "equalize"
    summary: ClassVar[str] = (
        "cross-layer equalization (opt-in): rescale channels across ReLU/LeakyReLU/PReLU/"
        "pooling so neighbouring layers' per-channel weight ranges match; exact, for INT8"
    )
    # After every merge and fold (stages 0 and 1): it balances the final layers' weights.
    stage: ClassVar[int] = 2

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        producer = layer_view(gm, node)
        if producer is None or not producer.weight.dtype.is_floating_point:
            return None
        found = self._channel_set(gm, rewriter, producer)
        if found is None or isinstance(found, str):
            return found if found is None else self.decline(node, found)
        group = self._group(gm, rewriter, found)
        return self._equalize(rewriter, group)

    def _channel_set(self, gm: GraphModule, rewriter: Rewriter,
                     producer: LayerView) -> _Traced | str | None:
        shared = rewriter.index.shared_reason(gm, producer)
        if shared:
            return shared
        try:
            return _ChannelFlow(gm, rewriter, producer).trace()
        except _Blocked as exc:
            return str(exc)

    def _group(self, gm: GraphModule, rewriter: Rewriter, first: _Traced) -> list[_Traced]:
        """The channel sets linked to ``first`` through shared layers (a reader of one set
        producing the next, or several producers feeding one reader), in discovery order."""
        sets: dict[Node, _Traced] = {first.producer.node: first}
        tried: set[Node] = {first.producer.node}
        pending = deque([first])
        while pending:
            current = pending.popleft()
            neighbours = [reader.node for reader, _ in current.readers]
            for reader, _ in current.readers:
                neighbours.extend(_upstream_layers(gm, reader.input))
            for candidate in neighbours:
                if candidate in tried:
                    continue
                tried.add(candidate)
                layer = layer_view(gm, candidate)
                if layer is None or not layer.weight.dtype.is_floating_point:
                    continue
                found = self._channel_set(gm, rewriter, layer)
                if isinstance(found, _Traced):
                    sets[candidate] = found
                    pending.append(found)
        return list(sets.values())

    def _equalize(self, rewriter: Rewriter, group: list[_Traced]) -> Rewrite | None:
        gm = rewriter.gm
        views: dict[Node, LayerView] = {}
        for channel_set in group:
            views[channel_set.producer.node] = channel_set.producer
            for reader, _ in channel_set.readers:
                views[reader.node] = reader
        order = list(views)
        position = {n: i for i, n in enumerate(order)}
        layers = [layer_weights(views[n]) for n in order]
        sets = [ChannelSet(position[s.producer.node],
                           tuple((position[r.node], index) for r, index in s.readers))
                for s in group]
        solved = solve_equalization(layers, sets)
        if all(float((s - 1).abs().max()) <= SETTLED for s in solved.scales):
            return None
        before = max(range_ratio(output_channel_ranges(layer)) for layer in layers)
        after = max(range_ratio(output_channel_ranges(layer)) for layer in solved.layers)
        layer_modules = {}
        for node, new in zip(order, solved.layers, strict=True):
            view = views[node]
            dtype = view.weight.dtype
            bias = None if new.bias is None else new.bias.to(dtype)
            module = view.build(new.weight.to(dtype), bias)
            path = view.module_path or view.origin_paths()[0]
            layer_modules[node] = (module, path, view.input)
        region = list(dict.fromkeys(
            n for s in group for n in (s.producer.node, *s.between,
                                       *(r.node for r, _ in s.readers))))
        region = _topological(region)
        inside = set(region)
        roots = [n for n in region if any(u not in inside for u in data_users(n))]
        extremes = torch.cat([s.reshape(-1) for s in solved.scales])
        names = [describe(s.producer.node, gm) for s in group]
        producers = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                             else "")
        detail = (f"equalized {len(group)} channel sets ({producers}) over {len(order)} layers "
                  f"in {solved.sweeps} sweeps{'' if solved.converged else ' (not converged)'};"
                  f" scales {float(extremes.min()):.3g}..{float(extremes.max()):.3g}; worst "
                  f"channel range ratio (max/median) {before:.3g} -> {after:.3g}")
        return rewriter.replace_region(self.name, nodes=region, layers=layer_modules,
                                       roots=roots, detail=detail)


def _upstream_layers(gm: GraphModule, start: Node) -> list[Node]:
    """The conv/linear layers whose output reaches ``start`` through channel-preserving ops
    (candidates for producers of the sets a reader reads)."""
    found, seen, pending = [], set(), [start]
    while pending:
        node = pending.pop()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if layer_view(gm, node) is not None:
            found.append(node)
            continue
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            pending.extend(node.all_input_nodes)
        elif node.op == "call_function" and node.target is operator.getitem:
            pending.append(node.args[0])
        elif node.all_input_nodes:
            pending.append(node.all_input_nodes[0])
    return found
