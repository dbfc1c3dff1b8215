"""Global average pooling moved in front of the pointwise layers before it (streamline merging).

Global average pooling ``G`` (``AdaptiveAvgPool(1)``, ``x.mean((2, 3))``, or their ``aten`` ops
in an exported program) commutes with every *pointwise* affine map ``P`` (a 1×1, stride-1,
unpadded conv; BN; per-channel scale/bias): ``G(P(x)) = P(G(x))``, since both are linear and
``P`` mixes channels, never pixels. So the head ``P → G [→ flatten] → Linear`` becomes
``G [→ flatten] → Linear ∘ P``: ``P`` runs on one pixel instead of ``H·W``, and composes with the
Linear into one Linear (:func:`repfuse.algebra.compose`, always exact for a pointwise first
map). Without a Linear after it, ``P`` becomes a 1×1 conv (or a Linear) on the pooled tensor
when that costs less.

Not exact, and declined: a k×k or strided conv before the pool (it weighs border pixels less,
or skips pixels), anything non-linear between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from repfuse.algebra import Kernel, compose, is_pointwise
from repfuse.cost import NodeCost, activation_bytes, layer_cost, nodes_cost, pays
from repfuse.graph import bind_args, describe, layer_view, meta_with_size, shape_of, sole_user
from repfuse.lift import (
    LinearStep,
    kernel_module,
    lift,
    linear_kernel,
    linear_module,
    shape_specialized,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

aten = torch.ops.aten
_ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                       aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
                       aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
                       aten._adaptive_avg_pool3d.default)
_MEANS = (torch.mean, aten.mean.dim)
_FLATTENS = (torch.flatten, aten.flatten.using_ints)
# What an exported program writes for ``flatten(1)`` of ``N×C×1×1``: a view to ``[N, C]``.
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _all_ones(size) -> bool:
    sizes = size if isinstance(size, (list, tuple)) else (size,)
    return all(s == 1 for s in sizes)


def global_pool_input(gm: GraphModule, node: Node) -> Node | None:
    """The input of ``node`` if it averages an ``N×C×spatial`` tensor over all spatial axes."""
    data = None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _ADAPTIVE_MODULES) and _all_ones(module.output_size):
            data = node.args[0] if len(node.args) == 1 else None
    elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        args = bind_args(node, ("input", "output_size"), {})
        data = args["input"] if _all_ones(args.get("output_size")) else None
    elif (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target in _MEANS
    ):
        args = bind_args(node, ("input", "dim", "keepdim", "dtype"),
                         {"dim": None, "keepdim": False, "dtype": None})
        shape = shape_of(args["input"])
        dims = args["dim"]
        if shape is None or dims is None or args["dtype"] is not None:
            return None
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        rank = len(shape)
        if sorted(d % rank for d in dims) == list(range(2, rank)):
            data = args["input"]
    if not isinstance(data, Node):
        return None
    shape = shape_of(data)
    return data if shape is not None and len(shape) >= 3 else None


def _flatten_of(gm: GraphModule, node: Node) -> Node | None:
    """The sole user of ``node`` if it flattens ``N×C×1…1`` to ``N×C``.

    In a program that torch.export specialized to its input shapes, a view to the recorded
    ``[N, C]`` is that flatten on every input the program accepts
    (:func:`repfuse.lift.shape_specialized`).
    """
    user = sole_user(node)
    if user is None or not user.args or user.args[0] is not node:
        return None
    shape = shape_of(user)
    if shape is None or len(shape) != 2:
        return None
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        ok = isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    elif (user.op == "call_function" and user.target in _FLATTENS) or (
        user.op == "call_method" and user.target == "flatten"
    ):
        args = bind_args(user, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
        ok = args["start_dim"] == 1 and args["end_dim"] == -1
    elif user.op == "call_function" and user.target in _RESHAPES:
        ok = shape_specialized(user) and shape[0] == shape_of(node)[0]
    else:
        ok = False
    return user if ok else None


@dataclass(frozen=True)
class _Chain:
    """Pointwise linear steps ``nodes`` (last first) between ``input`` and a global pool."""

    input: Node
    kernel: Kernel | None
    nodes: tuple[Node, ...]


def _pointwise_chain(gm: GraphModule, pool: Node, data: Node) -> _Chain:
    kernel, nodes, current, reader = None, [], data, pool
    while True:
        step = lift(gm, current)
        if not isinstance(step, LinearStep) or not is_pointwise(step.kernel) or (
                sole_user(current) is not reader):
            break
        combined = step.kernel if kernel is None else compose(step.kernel, kernel)
        if isinstance(combined, str):
            break
        kernel, reader, current = combined, current, step.input
        nodes.append(reader)
    return _Chain(current, kernel, tuple(nodes))


def _copy_call(gm: GraphModule, node: Node, data: Node, channels: int) -> Node:
    """``node``'s op applied to ``data`` (with ``channels`` channels) instead of its first
    argument; a view to ``[N, C]`` becomes one to ``[N, channels]``."""
    rest = node.args[1:]
    if node.op == "call_function" and node.target in _RESHAPES:
        rest = ([shape_of(node)[0], channels], *rest[1:])
    new = gm.graph.create_node(node.op, node.target, (data, *rest), dict(node.kwargs))
    if "tensor_meta" in node.meta:
        new.meta["tensor_meta"] = meta_with_size(node.meta["tensor_meta"], 1, channels)
    return new


@dataclass(frozen=True)
class HoistGlobalPool(Pass):
    """Move global average pooling before the pointwise layers that precede it."""

    name: ClassVar[str] = "hoist_global_pool"
    summary: ClassVar[str] = (
        "move global average pooling in front of the 1x1 convs/BN before it and fold them "
        "into the Linear head after it (Deep Rebirth streamline merging)"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        data = global_pool_input(gm, node)
        if data is None:
            return None
        chain = _pointwise_chain(gm, node, data)
        if chain.kernel is None:
            return self._explain_stop(node, data, gm)
        pooled = shape_of(node)
        if pooled is None:
            return None
        flat = _flatten_of(gm, node) if len(pooled) > 2 else None
        head_input = flat if flat is not None else node
        head = sole_user(head_input)
        layer = None if head is None else layer_view(gm, head)
        if layer is not None and (layer.kind != "linear" or layer.input is not head_input
                                  or len(shape_of(head_input)) != 2):
            layer = None
        if layer is not None:
            return self._into_linear(node, flat, layer, chain, rewriter)
        return self._before_chain(node, chain, rewriter)

    def _explain_stop(self, pool: Node, data: Node, gm: GraphModule) -> Decline | None:
        step = lift(gm, data)
        if not isinstance(step, LinearStep) or not step.is_conv or sole_user(data) is not pool:
            return None
        return self.decline(pool, f"global pool {describe(pool, gm)} stays after "
                                  f"{describe(data, gm)}: only 1x1 stride-1 unpadded layers "
                                  "commute with it (a larger or strided kernel weighs border "
                                  "pixels differently)")

    def _into_linear(self, pool: Node, flat: Node | None, layer, chain: _Chain,
                     rewriter: Rewriter) -> Rewrite | Decline:
        gm = rewriter.gm
        dims = chain.kernel.spatial_dims
        fused = compose(chain.kernel, linear_kernel(layer.weight, layer.bias, dims))
        if isinstance(fused, str):
            return self.decline(pool, f"global pool {describe(pool, gm)} stays: {fused}")
        itemsize = layer.weight.element_size()
        pooled = (shape_of(pool)[0], fused.in_channels)
        after = layer_cost((fused.out_channels, fused.in_channels), pooled, shape_of(layer.node),
                           itemsize)
        after = after + NodeCost(bytes=activation_bytes(chain.input) + 2 * pooled[0]
                                 * pooled[1] * itemsize)
        replaced = [layer.node, *([flat] if flat is not None else []), pool, *chain.nodes]
        costlier = pays(nodes_cost(gm, replaced), after)
        if costlier is not None:
            return self.decline(pool, f"global pool {describe(pool, gm)} stays before "
                                      f"{describe(layer.node, gm)}: moving it costs more: "
                                      f"{costlier}")
        module = linear_module(fused, layer.weight)
        channels = chain.kernel.in_channels

        def args() -> tuple[Node]:
            moved = _copy_call(gm, pool, chain.input, channels)
            if flat is not None:
                moved = _copy_call(gm, flat, moved, channels)
            return (moved,)

        names = ", ".join(describe(n, gm) for n in reversed(chain.nodes))
        return rewriter.replace_with_module(
            self.name, root=layer.node, replaced=replaced, module=module, args=args,
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"global pool {describe(pool, gm)} moved before {names}, folded into "
                   f"{describe(layer.node, gm)}",
        )

    def _before_chain(self, pool: Node, chain: _Chain,
                      rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        layer = next((v for v in (layer_view(gm, n) for n in chain.nodes) if v is not None),
                     None)
        if layer is None:
            return None  # only BN/scale: a per-channel op after the pool is no cheaper
        like = layer.weight
        kernel = chain.kernel
        pooled = shape_of(pool)
        keepdim = len(pooled) == len(shape_of(chain.input))
        in_shape = (*pooled[:1], kernel.in_channels, *pooled[2:])
        weight_shape = tuple(kernel.weight.shape) if keepdim else (kernel.out_channels,
                                                                   kernel.in_channels)
        after = layer_cost(weight_shape, in_shape, pooled, like.element_size()) + NodeCost(
            bytes=activation_bytes(chain.input) + in_shape[0] * kernel.in_channels
            * like.element_size())
        costlier = pays(nodes_cost(gm, (pool, *chain.nodes)), after)
        label = f"global pool {describe(pool, gm)}"
        if costlier is not None:
            return self.decline(pool, f"{label} stays: moving it costs more: {costlier}")
        if keepdim:
            module = kernel_module(kernel, like)
        else:
            module = linear_module(kernel, like)
        names = ", ".join(describe(n, gm) for n in reversed(chain.nodes))
        return rewriter.replace_with_module(
            self.name, root=pool, replaced=[pool, *chain.nodes], module=module,
            args=lambda: (_copy_call(gm, pool, chain.input, kernel.in_channels),),
            module_path=layer.origin_paths()[0], detail=f"{label} moved before {names}",
        )
