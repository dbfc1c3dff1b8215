"""Structural reparameterization from the graph alone: merge linear branches and chains.

Every linear, shift-equivariant op is lifted to a :class:`repfuse.algebra.Kernel` (a conv;
eval batch norm and per-channel scale/bias as depthwise 1×1; average pooling as a depthwise
kernel; the identity) and combined with the algebra's three combinators:

- ``merge_branches``: branches that read one tensor and are *added* (``a + b``, ``torch.add``,
  ``sum(...)``, any nesting) become one conv (:func:`~repfuse.algebra.parallel_sum`); branches
  that are *concatenated* along channels become one conv (:func:`~repfuse.algebra.concat`).
  A branch may be a chain of linear ops (DBB's 1×1 → k×k, 1×1 → avg-pool); the chain is composed
  first. Terms that are not linear in the shared input stay and are added to the merged conv.
- ``compose_linear``: conv → conv/avg-pool (or pool → conv) with nothing between becomes one
  conv (:func:`~repfuse.algebra.compose`) when exact and when it does not raise the MACs.
- ``merge_padding``: a zero ``F.pad`` before a conv becomes the conv's padding; a 1×1 conv whose
  output is padded with its own bias (DBB's BN-and-pad layer) becomes that conv with padding.

No pass calls any method of the model: the rules see only the graph.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from repfuse.algebra import (
    ChannelAffine,
    Kernel,
    affine_kernel,
    avgpool_kernel,
    compose,
    compose_reason,
    composed_weight_shape,
    concat,
    identity_kernel,
    parallel_sum,
    regroup,
)
from repfuse.cost import layer_cost, nodes_cost, pays
from repfuse.graph import (
    LayerView,
    bind_args,
    constant_value,
    describe,
    frozen_parameter,
    layer_view,
    meta_with_size,
    new_layer,
    shape_of,
    sole_user,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter
from repfuse.passes.fold_affine import AffineOp, FoldBatchNorm, FoldScaleBias

# --- lifting one node to a kernel ------------------------------------------------------------


@dataclass(frozen=True)
class LinearStep:
    """A node that applies ``kernel`` to ``input`` (a conv, BN/scale, or average pool).

    The kernel (a float64 copy of the weights) is built on first use: most candidates are
    rejected on structure alone.
    """

    node: Node
    input: Node
    build: Callable[[], Kernel]
    is_conv: bool
    origin: str  # module path (or node name) for naming the merged conv

    @functools.cached_property
    def kernel(self) -> Kernel:
        return self.build()


def numeric_padding(layer: LayerView) -> tuple[int, ...] | None:
    """A conv's padding as numbers (``'valid'`` is 0, symmetric ``'same'``), else None."""
    if not isinstance(layer.padding, str):
        return layer.padding
    if layer.padding == "valid":
        return (0,) * layer.spatial_dims
    totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        return None  # asymmetric 'same' padding has no conv-padding equivalent
    return tuple(t // 2 for t in totals)


def _affine_op(gm: GraphModule, node: Node) -> AffineOp | None:
    for lift in (FoldBatchNorm().lift, FoldScaleBias().lift):
        op = lift(node, gm)
        if isinstance(op, AffineOp):
            return op
    return None


_AVGPOOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_AVGPOOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_AVGPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
_AVGPOOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False,
                     "count_include_pad": True, "divisor_override": None}


def _avgpool_settings(gm: GraphModule, node: Node) -> tuple[Node, dict, int] | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        dims = _AVGPOOL_MODULES.get(type(module))
        if dims is None or len(node.args) != 1 or node.kwargs:
            return None
        settings = {name: getattr(module, name, None) for name in _AVGPOOL_ARGS[1:]}
        return node.args[0], settings, dims
    if node.op == "call_function" and node.target in _AVGPOOL_FUNCTIONS:
        settings = bind_args(node, _AVGPOOL_ARGS, _AVGPOOL_DEFAULTS)
        return settings.pop("input"), settings, _AVGPOOL_FUNCTIONS[node.target]
    return None


def avgpool_reason(settings: dict, dims: int) -> str | None:
    """Why an average pool is not a convolution, or None when it is one."""
    padding = _ntuple(settings["padding"], dims)
    if settings["ceil_mode"]:
        return "it uses ceil_mode, whose last window is partial"
    if settings["divisor_override"] is not None:
        return "it overrides the divisor"
    if any(padding) and not settings["count_include_pad"]:
        return "it pads without counting the padding (count_include_pad=False)"
    return None


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else (int(value[0]),) * n
    return (int(value),) * n


def lift(gm: GraphModule, node: Node) -> LinearStep | None:
    """The kernel ``node`` applies to its data input, or None if it is not such an op."""
    layer = layer_view(gm, node)
    if layer is not None:
        if layer.kind != "conv" or layer.padding_mode != "zeros":
            return None
        padding = numeric_padding(layer)
        if padding is None:
            return None
        def build() -> Kernel:
            return Kernel.of(layer.weight, layer.bias, layer.stride, padding, layer.dilation,
                             layer.groups)

        return LinearStep(node, layer.input, build, True, layer.origin_paths()[0])
    shape = shape_of(node)
    if shape is None or len(shape) < 3:
        return None  # per-channel ops on N×C tensors are the fold passes' business
    dims = len(shape) - 2
    pool = _avgpool_settings(gm, node)
    if pool is not None:
        data, settings, pool_dims = pool
        if pool_dims != dims or avgpool_reason(settings, dims) is not None:
            return None
        size = _ntuple(settings["kernel_size"], dims)
        stride = _ntuple(settings["stride"] or settings["kernel_size"], dims)
        pool_padding = _ntuple(settings["padding"], dims)
        return LinearStep(node, data, lambda: avgpool_kernel(shape[1], size, stride, pool_padding),
                          False, node.name)
    op = _affine_op(gm, node)
    if op is None:
        return None
    affine = op.along(1, shape_of(op.input), shape[1])
    if not isinstance(affine, ChannelAffine):
        return None
    origin = node.target if node.op == "call_module" else node.name
    return LinearStep(node, op.input, lambda: affine_kernel(affine, dims), False, origin)


# --- branches: chains of linear ops back to a shared input -----------------------------------


@dataclass(frozen=True)
class Branch:
    """``term = kernel(input)`` through ``nodes`` (term first); ``kernel`` None: identity."""

    term: Node
    input: Node
    kernel: Kernel | None
    nodes: tuple[Node, ...]
    has_conv: bool
    origin: str


def branch_of(gm: GraphModule, term: Node, consumer: Node) -> Branch:
    """Walk back from ``term`` through linear ops read only along the chain, composing them.

    The walk stops at a node read elsewhere too (typically the shared input), at a non-linear
    op, or where composing would not be exact.
    """
    if sole_user(term) is not consumer:
        return Branch(term, term, None, (), False, term.name)
    kernel: Kernel | None = None
    nodes: list[Node] = []
    has_conv, origin, current = False, term.name, term
    while True:
        step = lift(gm, current)
        if step is None or (nodes and sole_user(current) is not nodes[-1]):
            break
        combined = step.kernel if kernel is None else compose(step.kernel, kernel)
        if isinstance(combined, str):
            break
        kernel = combined
        nodes.append(current)
        if step.is_conv and not has_conv:
            origin = step.origin
        has_conv = has_conv or step.is_conv
        current = step.input
    return Branch(term, current, kernel, tuple(nodes), has_conv, origin)


def _kernel_module(kernel: Kernel, like: torch.Tensor) -> nn.Module:
    """A fresh ``nn.Conv*d`` holding ``kernel``, in the dtype and device of ``like``."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[kernel.spatial_dims]
    module = new_layer(cls, kernel.in_channels, kernel.out_channels, kernel.kernel_size,
                       kernel.stride, kernel.padding, kernel.dilation, kernel.groups, bias=True,
                       dtype=like.dtype)
    module.weight = frozen_parameter(kernel.weight.to(like))
    module.bias = frozen_parameter(kernel.bias.to(like))
    return module


def linear_kernel(weight: torch.Tensor, bias: torch.Tensor | None, dims: int = 1) -> Kernel:
    """A linear layer ``(C_out, C_in)`` as a 1×…×1 conv with ``dims`` spatial axes: on
    ``N×C_in×1…1`` they compute the same, so the conv algebra applies to linear layers too."""
    return Kernel.of(weight.reshape(*weight.shape, *(1,) * dims), bias, (1,) * dims,
                     (0,) * dims, (1,) * dims, 1)


def linear_module(kernel: Kernel, like: torch.Tensor) -> nn.Linear:
    """A fresh ``nn.Linear`` holding a 1×…×1 ``kernel`` (densified to one group)."""
    dense = regroup(kernel, 1)
    module = new_layer(nn.Linear, dense.in_channels, dense.out_channels, dtype=like.dtype)
    weight = dense.weight.reshape(dense.out_channels, dense.in_channels)
    module.weight = frozen_parameter(weight.to(like))
    module.bias = frozen_parameter(dense.bias.to(like))
    return module


def _weight_like(gm: GraphModule, nodes) -> torch.Tensor:
    """A conv weight among ``nodes``: the merged conv takes its dtype and device."""
    for node in nodes:
        layer = layer_view(gm, node)
        if layer is not None:
            return layer.weight
    raise AssertionError("a merge always involves a conv")


def _identity_for(shape: tuple[int, ...]) -> Kernel:
    """The identity on a tensor of ``shape``, as a depthwise 1×…×1 kernel."""
    channels, dims = shape[1], len(shape) - 2
    return identity_kernel(channels, 1, dims, groups=channels)


# --- the sum and concat merge pass -----------------------------------------------------------


def _is_sum(node: Node) -> bool:
    """``a + b`` of two activations (operator, torch or method spelling, no ``alpha``)."""
    is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add"
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return False
    return all(isinstance(a, Node) and a.op != "get_attr" for a in node.args)


def _sum_terms(root: Node) -> tuple[list[tuple[Node, Node]], list[Node]]:
    """The addends of a tree of binary adds (inner adds read only by the tree), each with the
    add that reads it, and the adds themselves."""
    terms: list[tuple[Node, Node]] = []
    adds: list[Node] = []

    def visit(node: Node) -> None:
        adds.append(node)
        for arg in node.args:
            if _is_sum(arg) and sole_user(arg) is node:
                visit(arg)
            else:
                terms.append((arg, node))

    visit(root)
    return terms, adds


_CATS = {torch.cat, torch.concat, torch.concatenate}


@dataclass(frozen=True)
class MergeBranches(Pass):
    """Merge linear branches on one input that are summed or concatenated into one conv."""

    name: ClassVar[str] = "merge_branches"
    summary: ClassVar[str] = (
        "merge conv/BN/identity/avg-pool branches of one input that are added or concatenated "
        "along channels into one conv (RepVGG, ACNet, DBB, MobileOne, RepLKNet)"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if _is_sum(node):
            root, user = node, sole_user(node)
            while user is not None and _is_sum(user):
                root, user = user, sole_user(user)
            if root is not node and root in rewriter.pending:
                return None  # the tree's outermost add is still to come and merges it all
            return self._merge_sum(root, rewriter)
        if node.op == "call_function" and node.target in _CATS:
            return self._merge_concat(node, rewriter)
        return None

    def _merge_sum(self, root: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        shape = shape_of(root)
        if shape is None or len(shape) < 3:
            return None
        terms, adds = _sum_terms(root)
        branches = [branch_of(gm, term, add) for term, add in terms]
        groups: dict[Node, list[Branch]] = {}
        for branch in branches:
            if shape_of(branch.term) == shape:
                groups.setdefault(branch.input, []).append(branch)
        mergeable = [g for g in groups.values() if len(g) > 1 and any(b.has_conv for b in g)]
        if not mergeable:
            return None
        group = max(mergeable, key=len)
        kernels = [b.kernel if b.kernel is not None else _identity_for(shape) for b in group]
        merged = parallel_sum(kernels)
        names = ", ".join(describe(b.term, gm) for b in group)
        if isinstance(merged, str):
            return self.decline(root, f"branches {names} of the sum {describe(root, gm)} "
                                      f"stay: {merged}")
        merged_terms = {id(b.term) for b in group}
        rest = [term for term, _ in terms if id(term) not in merged_terms]
        return self._rewrite(rewriter, root, group, adds, merged, rest, operator.add,
                             f"sum of {len(group)} branches {names}")

    def _merge_concat(self, cat: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        args = bind_args(cat, ("tensors", "dim"), {"dim": 0})
        items, dim = args["tensors"], args["dim"]
        shape = shape_of(cat)
        if not isinstance(items, (list, tuple)) or shape is None or len(shape) < 3:
            return None
        if not isinstance(dim, int) or dim % len(shape) != 1:  # a computed dim stays
            return None
        branches = [
            branch_of(gm, item, cat) if isinstance(item, Node) else None for item in items
        ]
        run = _longest_run(branches)
        if run is None:
            return None
        start, stop = run
        group = branches[start:stop]
        merged = concat([b.kernel for b in group])
        names = ", ".join(describe(b.term, gm) for b in group)
        if isinstance(merged, str):
            return self.decline(cat, f"concatenated branches {names} stay: {merged}")
        before, after = list(items[:start]), list(items[stop:])

        def wrap(new: Node) -> Node:
            if not before and not after:
                return new
            new.meta["tensor_meta"] = meta_with_size(cat.meta["tensor_meta"], 1,
                                                     merged.out_channels)
            joined = gm.graph.call_function(torch.cat, ([*before, new, *after], 1))
            joined.meta["tensor_meta"] = cat.meta["tensor_meta"]
            return joined

        return self._rewrite(rewriter, cat, group, [cat], merged, None, None,
                             f"concat of {len(group)} branches {names}", wrap=wrap)

    def _rewrite(
        self, rewriter: Rewriter, root: Node, group: list[Branch], joins: list[Node],
        merged: Kernel, rest: list[Node] | None, combine: Callable | None, detail: str,
        wrap: Callable[[Node], Node] | None = None,
    ) -> Rewrite:
        gm = rewriter.gm
        like = _weight_like(gm, (n for b in group for n in b.nodes))
        if wrap is None and rest:
            def wrap(new: Node) -> Node:
                result = new
                for term in rest:
                    result = gm.graph.call_function(combine, (result, term))
                    result.meta["tensor_meta"] = root.meta.get("tensor_meta")
                return result

        replaced = [*joins, *(n for b in group for n in b.nodes)]
        origin = max((b for b in group if b.has_conv), key=lambda b: _kernel_area(b.kernel))
        return rewriter.replace_with_module(
            self.name, root=root, replaced=replaced, module=_kernel_module(merged, like),
            args=(group[0].input,), module_path=origin.origin, detail=detail, wrap=wrap,
        )


def _kernel_area(kernel: Kernel | None) -> int:
    return 0 if kernel is None else math.prod(kernel.kernel_size)


def _longest_run(branches: list[Branch | None]) -> tuple[int, int] | None:
    """The longest run (≥ 2) of adjacent conv branches reading one input, as (start, stop)."""
    best = None
    start = 0
    while start < len(branches):
        first = branches[start]
        stop = start + 1
        if first is not None and first.has_conv and first.kernel is not None:
            while stop < len(branches):
                item = branches[stop]
                if item is None or not item.has_conv or item.input is not first.input:
                    break
                stop += 1
            if stop - start >= 2 and (best is None or stop - start > best[1] - best[0]):
                best = (start, stop)
        start = stop
    return best


# --- sequential composition -------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeLinear(Pass):
    """Compose conv → conv / conv → avg-pool / avg-pool → conv into one conv, and linear →
    linear into one linear, when it pays."""

    name: ClassVar[str] = "compose_linear"
    summary: ClassVar[str] = (
        "compose a conv with a following conv or average pool (or a pool with a following "
        "conv) into one conv, and two linear layers into one, when exact and it pays"
    )
    allow_costlier: bool = False

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        second = lift(gm, node)
        if second is None:
            return self._linear_pair(node, rewriter) or self._unliftable_pool(node, gm)
        first = lift(gm, second.input)
        if first is None or not (first.is_conv or second.is_conv):
            return None
        if not _is_pool_or_conv(gm, first, second):
            return None  # BN/scale next to a conv: the fold passes' business
        label = f"{describe(first.node, gm)} -> {describe(node, gm)}"
        if sole_user(first.node) is not node:
            return self.decline(node, f"{label} stay: the output of "
                                      f"{describe(first.node, gm)} is also used elsewhere")
        reason = compose_reason(first.kernel, second.kernel)
        if reason is not None:
            return self.decline(node, f"{label} stay: {reason}")
        like = _weight_like(gm, (first.node, node))
        # priced before it is computed: a dense composition can take seconds
        costlier = self._costlier(gm, first.input, first.node, node, label,
                                  composed_weight_shape(first.kernel, second.kernel),
                                  like.itemsize)
        if costlier is not None:
            return costlier
        combined = compose(first.kernel, second.kernel)
        origin = first.origin if first.is_conv else second.origin
        return rewriter.replace_with_module(
            self.name, root=node, replaced=[node, first.node],
            module=_kernel_module(combined, like), args=(first.input,), module_path=origin,
            detail=f"{label} composed",
        )


    def _linear_pair(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        """Linear → Linear with nothing between: ``W = W_2·W_1``, ``b = W_2·b_1 + b_2``."""
        gm = rewriter.gm
        second = layer_view(gm, node)
        if second is None or second.kind != "linear":
            return None
        first = layer_view(gm, second.input)
        if first is None or first.kind != "linear":
            return None
        label = f"{describe(first.node, gm)} -> {describe(node, gm)}"
        if sole_user(first.node) is not node:
            return self.decline(node, f"{label} stay: the output of "
                                      f"{describe(first.node, gm)} is also used elsewhere")
        combined = compose(linear_kernel(first.weight, first.bias),
                           linear_kernel(second.weight, second.bias))
        if isinstance(combined, str):
            return self.decline(node, f"{label} stay: {combined}")
        costlier = self._costlier(gm, first.input, first.node, node, label,
                                  (combined.out_channels, combined.in_channels),
                                  second.weight.element_size())
        if costlier is not None:
            return costlier
        return rewriter.replace_with_module(
            self.name, root=node, replaced=[node, first.node],
            module=linear_module(combined, second.weight), args=(first.input,),
            module_path=second.module_path or second.origin_paths()[0],
            detail=f"{label} composed",
        )

    def _costlier(self, gm: GraphModule, data: Node, first: Node, node: Node, label: str,
                  weight_shape: tuple[int, ...], itemsize: int) -> Decline | None:
        """A decline when one layer of ``weight_shape`` on ``data`` costs more than
        ``first → node`` (unless ``allow_costlier``), or when the shapes to tell are unknown."""
        in_shape, out_shape = shape_of(data), shape_of(node)
        if in_shape is None or out_shape is None:
            return self.decline(node, f"{label} stay: shapes unknown (run shape propagation)")
        before = nodes_cost(gm, (first, node))
        after = layer_cost(weight_shape, in_shape, out_shape, itemsize)
        costlier = pays(before, after)
        if costlier is not None and not self.allow_costlier:
            return self.decline(node, f"{label} stay: composing costs more: {costlier}")
        return None

    def _unliftable_pool(self, node: Node, gm: GraphModule) -> Decline | None:
        """A conv → avg pool pair that stays because the pool is not a convolution."""
        pool = _avgpool_settings(gm, node)
        if pool is None:
            return None
        data, settings, dims = pool
        first = lift(gm, data) if isinstance(data, Node) else None
        if first is None or not first.is_conv:
            return None
        reason = avgpool_reason(settings, dims)
        if reason is None:
            return None
        return self.decline(node, f"{describe(data, gm)} -> {describe(node, gm)} stay: the "
                                  f"pool is not a convolution: {reason}")


def _is_pool_or_conv(gm: GraphModule, first: LinearStep, second: LinearStep) -> bool:
    return all(step.is_conv or _avgpool_settings(gm, step.node) is not None
               for step in (first, second))


# --- padding ------------------------------------------------------------------------------------

_PAD_ARGS = ("input", "pad", "mode", "value")
_PAD_DEFAULTS = {"mode": "constant", "value": None}


def _zero_pad(gm: GraphModule, node: Node) -> tuple[Node, tuple[int, ...]] | None:
    """``(input, per-axis padding)`` of a symmetric constant pad, or None."""
    if node.op == "call_function" and node.target is F.pad:
        args = bind_args(node, _PAD_ARGS, _PAD_DEFAULTS)
        if args["mode"] != "constant" or args["value"] not in (None, 0, 0.0):
            return None
        data, pads = args["input"], args["pad"]
    elif node.op == "call_module" and isinstance(
        gm.get_submodule(node.target), (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
    ):
        data, pads = node.args[0], gm.get_submodule(node.target).padding
    else:
        return None
    shape = shape_of(data)
    if not isinstance(data, Node) or shape is None:
        return None
    pads = tuple(pads) if isinstance(pads, (list, tuple)) else (pads,) * (2 * (len(shape) - 2))
    if len(pads) % 2 or any(pads[i] != pads[i + 1] or pads[i] < 0
                            for i in range(0, len(pads), 2)):
        return None  # asymmetric or cropping: not a conv padding
    per_axis = tuple(reversed(pads[::2]))  # F.pad lists the last axis first
    spatial = len(shape) - 2
    if len(per_axis) > spatial:
        return None  # pads batch or channel axes
    return data, (0,) * (spatial - len(per_axis)) + per_axis


def _border_fill(pad: Node, gm: GraphModule) -> torch.Tensor | None:
    """The per-channel value written over every padded border strip of ``pad``, if any.

    Recognizes ``y = F.pad(x, [p]*2d); y[:, :, :p] = v; y[:, :, -p:] = v; ...`` (DBB's
    BN-and-pad layer) with ``v`` a constant broadcasting per channel.
    """
    fills = _setitem_users(pad)
    return _fill_value(gm, pad, fills) if fills else None


def _setitem_users(node: Node) -> list[Node]:
    """The ``node[index] = value`` writes into ``node``."""
    return [u for u in node.users if u.op == "call_function" and u.target is operator.setitem]


def _fill_value(gm: GraphModule, pad: Node, fills: list[Node]) -> torch.Tensor | None:
    found = _zero_pad(gm, pad)
    if found is None:
        return None
    data, padding = found
    spatial = len(padding)
    covered: set[tuple[int, str]] = set()
    value = None
    for fill in fills:
        _, index, fill_value = fill.args
        constant = constant_value(gm, fill_value)
        if not isinstance(constant, torch.Tensor) or not isinstance(index, tuple):
            return None
        if value is not None and not torch.equal(constant, value):
            return None
        value = constant
        strip = _border_strip(index, padding, spatial)
        if strip is None:
            return None
        covered.add(strip)
    needed = {(axis, side) for axis in range(spatial) if padding[axis]
              for side in ("low", "high")}
    if covered != needed or value is None:
        return None
    return value.reshape(-1)


def _border_strip(index: tuple, padding: tuple[int, ...], spatial: int) -> tuple[int, str] | None:
    """``(axis, 'low'|'high')`` if ``index`` selects exactly one padded border strip."""
    if len(index) != 2 + spatial or any(i != slice(None) for i in index[:2]):
        return None
    strip = None
    for axis, item in enumerate(index[2:]):
        if item == slice(None):
            continue
        if strip is not None or not isinstance(item, slice) or item.step not in (None, 1):
            return None
        p = padding[axis]
        if item.start in (0, None) and item.stop == p:
            strip = (axis, "low")
        elif item.start == -p and item.stop is None:
            strip = (axis, "high")
        else:
            return None
    return strip


@dataclass(frozen=True)
class MergePadding(Pass):
    """Turn zero pads before a conv or avg pool, and DBB's pad-with-bias after a 1x1 conv,
    into padding."""

    name: ClassVar[str] = "merge_padding"
    summary: ClassVar[str] = (
        "fold a zero F.pad into the following conv's (or counting avg pool's) padding; a 1x1 "
        "conv whose output is padded with its own bias (DBB's BN-and-pad) becomes that conv "
        "with padding"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        found = _zero_pad(gm, node)
        if found is None:
            return None
        fill = _border_fill(node, gm)
        if fill is not None:
            return self._pad_with_bias(node, found, fill, rewriter)
        if _setitem_users(node):
            return self.decline(node, f"{describe(node, gm)} is overwritten in place in a way "
                                      "that is not a per-channel border fill")
        user = sole_user(node)
        pool = None if user is None else _avgpool_settings(gm, user)
        if pool is not None and pool[0] is node:
            return self._into_avgpool(node, found, user, pool[1:], rewriter)
        layer = None if user is None else layer_view(gm, user)
        if layer is None or layer.kind != "conv" or layer.input is not node:
            return None
        data, padding = found
        current = numeric_padding(layer)
        if layer.padding_mode != "zeros" or current is None:
            return self.decline(node, f"{describe(node, gm)} stays: {describe(user, gm)} does "
                                      "not pad with zeros")
        total = tuple(a + b for a, b in zip(current, padding, strict=True))
        bias = None if layer.bias is None else layer.bias.clone()
        module = replace(layer, padding=total).build(layer.weight.clone(), bias)
        return rewriter.replace_with_module(
            self.name, root=user, replaced=[node, user], module=module, args=(data,),
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"zero pad {describe(node, gm)} folded into {describe(user, gm)}",
        )

    def _into_avgpool(self, pad: Node, found, user: Node, pool: tuple[dict, int],
                      rewriter: Rewriter) -> Rewrite | Decline:
        """``avg_pool(zero_pad(x, q), p)`` counting padding is ``avg_pool(x, p + q)``."""
        gm = rewriter.gm
        (data, padding), (settings, dims) = found, pool
        label = f"zero pad {describe(pad, gm)} before {describe(user, gm)} stays"
        if len(padding) != dims:
            return self.decline(pad, f"{label}: it pads {len(padding)} axes, the pool {dims}")
        reason = avgpool_reason(settings, dims)
        if reason is None and not settings["count_include_pad"]:
            reason = "it does not count padding, but the zeros of the pad are counted"
        if reason is not None:
            return self.decline(pad, f"{label}: the pool is not a convolution: {reason}")
        size = _ntuple(settings["kernel_size"], dims)
        total = tuple(a + b for a, b in zip(_ntuple(settings["padding"], dims), padding,
                                            strict=True))
        if any(2 * t > k for t, k in zip(total, size, strict=True)):
            return self.decline(pad, f"{label}: the pool would need padding {list(total)}, "
                                     f"more than half its kernel {list(size)} (PyTorch's limit)")
        cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
        module = cls(size, _ntuple(settings["stride"] or settings["kernel_size"], dims), total,
                     count_include_pad=True)
        path = user.target if user.op == "call_module" else user.name
        return rewriter.replace_with_module(
            self.name, root=user, replaced=[pad, user], module=module, args=(data,),
            module_path=path, detail=f"zero pad {describe(pad, gm)} folded into "
                                     f"{describe(user, gm)}",
        )

    def _pad_with_bias(self, pad: Node, found, fill: torch.Tensor,
                       rewriter: Rewriter) -> Rewrite | Decline:
        gm = rewriter.gm
        data, padding = found
        label = describe(pad, gm)
        layer = layer_view(gm, data)
        if layer is None or layer.kind != "conv" or sole_user(data) is not pad:
            return self.decline(pad, f"{label} pads with a per-channel value, but its input is "
                                     "not a conv read only here")
        pointwise = (all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in
                     layer.stride) and numeric_padding(layer) == (0,) * layer.spatial_dims)
        if not pointwise:
            return self.decline(pad, f"{label} pads with a per-channel value after "
                                     f"{describe(data, gm)}, which is not a 1x1 stride-1 "
                                     "unpadded conv")
        bias = layer.bias if layer.bias is not None else torch.zeros_like(fill)
        if fill.numel() != bias.numel() or not _equal_up_to_rounding(fill, bias):
            return self.decline(pad, f"{label} pads with values that differ from the bias of "
                                     f"{describe(data, gm)}")
        module = replace(layer, padding=padding).build(layer.weight.clone(), bias.clone())
        fills = _setitem_users(pad)
        return rewriter.replace_with_module(
            self.name, root=pad, replaced=[data, *fills, pad], module=module,
            args=(layer.input,), module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{describe(data, gm)} padded with its own bias by {label}: padding moved "
                   "before the 1x1 conv",
        )


def _equal_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a few units of rounding in the coarser of the two dtypes."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    a64, b64 = a.detach().to(torch.float64).reshape(-1), b.detach().to(torch.float64).reshape(-1)
    scale = max(float(a64.abs().max()), float(b64.abs().max()), 1e-30)
    return bool((a64 - b64).abs().max() <= 16 * eps * scale)
