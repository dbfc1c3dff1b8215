"""Fold per-channel affine ops (eval batch norm, scale/bias by constants) into conv/linear.

A batch norm in eval mode and ``x * c + d`` with constant ``c``, ``d`` are the same map,
``a(x) = s·x + t`` per channel (:class:`repfuse.algebra.ChannelAffine`). Such a map folds

- into the conv, transposed conv or linear layer that produces ``x`` (always exact:
  ``a(W*x + b) = (s·W)*x + s·b + t``), or, failing that,
- into the conv or linear layer that consumes ``a(x)``: ``W*a(x) + b = (W·s)*x + b + W*t``,
  exact unless that conv pads with zeros and ``t ≠ 0`` (the padded border would see 0 where the
  original saw ``t``).

Both folds need the other layer to be used only here: its new weights must not leak into
another call of the same module or a parameter tied to it. A map that folds nowhere stays, with
the reason for each direction.

**Across layout ops.** Real code normalizes after rearranging a layer's output: LeViT's
``Linear → flatten(0, 1) → BatchNorm1d → reshape_as``, a ``Linear`` on channels-last pixels then
``permute(0, 3, 1, 2) → BatchNorm2d``. The map ``a`` acts along one axis ``j`` of the rearranged
tensor ``P(y)``; if ``P`` carries the layer's channel axis onto ``j`` element for element, for
every input size (:func:`repfuse.lift.map_axis`: permutes and transposes; flattens and reshapes
that keep it as the last axis or leave it outside the merged range), then
``a(P(y)) = P(a'(y))`` with ``a'`` the same map along the channel axis, and ``a'`` folds into the
layer as above; ``P`` is then applied to the new layer's output. The same holds before a
consuming layer. Where ``P`` mixes the channel axis with others, the map stays, with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.fx import GraphModule, Node

from repfuse.algebra import ChannelAffine, fold_affine_into_input, fold_affine_into_output
from repfuse.graph import LayerView, describe, layer_view, other_users, shape_of, sole_user
from repfuse.lift import (
    AffineOp,
    batchnorm_op,
    channel_concat,
    is_layout,
    layout_chain,
    map_axis_through,
    replay,
    scale_bias_op,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter


class _FoldChannelAffine(Pass):
    """Shared find/check/rewrite of the two fold passes; subclasses say what an affine op is."""

    def lift(self, node: Node, gm: GraphModule) -> AffineOp | Decline | None:
        raise NotImplementedError

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        op = self.lift(node, rewriter.gm)
        if op is None or isinstance(op, Decline):
            return op
        upstream = self._into_producer(op, rewriter)
        if isinstance(upstream, Rewrite):
            return upstream
        downstream = self._into_consumer(op, rewriter)
        if isinstance(downstream, Rewrite):
            return downstream
        return self.decline(
            node, f"{op.label} stays: not into its producer ({upstream}), "
                  f"nor into its consumer ({downstream})"
        )

    def _into_producer(self, op: AffineOp, rewriter: Rewriter) -> Rewrite | str:
        gm = rewriter.gm
        chain = _layout_before(op.input)
        source = chain[0].args[0] if chain else op.input
        layer = layer_view(gm, source)
        items = channel_concat(source) if layer is None and not chain else None
        if items is not None:
            return self._into_concatenated(op, source, items, rewriter)
        if layer is None:
            return f"{describe(source, gm)} is not a conv/linear layer with constant weights"
        reader = chain[0] if chain else op.node
        if sole_user(layer.node) is not reader:
            return other_users(gm, layer.node, reader)
        shared = rewriter.index.shared_reason(gm, layer)
        if shared:
            return shared
        axis = map_axis_through(chain, layer.channel_axis)
        if axis is None:
            return _mixed(chain, layer, gm)
        affine = op.along(axis, shape_of(op.input), layer.out_channels)
        if isinstance(affine, str):
            return affine

        def wrap(new: Node) -> Node:
            new.meta["tensor_meta"] = layer.node.meta.get("tensor_meta")
            return replay(gm, chain, new)

        return rewriter.replace_with_module(
            self.name, root=op.node, replaced=[layer.node, *chain, op.node],
            module=_with_output_affine(layer, affine), args=(layer.input,),
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{op.label} folded into {describe(layer.node, gm)}{_across(chain, gm)}",
            wrap=wrap if chain else None, same_shape_as_new=layer.node,
        )

    def _into_concatenated(self, op: AffineOp, cat: Node, items: list,
                           rewriter: Rewriter) -> Rewrite | str:
        """``a(cat([L_1(x_1), …, L_n(x_n)]))`` on the channel axis is
        ``cat([a_1(L_1(x_1)), …])`` with ``a_i`` the channels of ``a`` that ``L_i`` writes, and
        each ``a_i`` folds into its layer: one rewrite for all (MixNet's mixed convs)."""
        gm = rewriter.gm
        if sole_user(cat) is not op.node:
            return other_users(gm, cat, op.node)
        layers = []
        for item in items:
            layer = layer_view(gm, item) if isinstance(item, Node) else None
            if layer is None:
                return (f"{describe(cat, gm)} concatenates {describe(item, gm)}, which is not a "
                        "conv/linear layer with constant weights")
            if sole_user(layer.node) is not cat or layer.kind == "linear":
                return (f"{describe(cat, gm)} concatenates {describe(item, gm)}, which is read "
                        "elsewhere too or is a linear layer")
            shared = rewriter.index.shared_reason(gm, layer)
            if shared:
                return shared
            layers.append(layer)
        whole = op.along(1, shape_of(op.input), sum(v.out_channels for v in layers))
        if isinstance(whole, str):
            return whole
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + layer.out_channels)

        def folded(layer: LayerView, start: int, stop: int) -> Callable[[], Node]:
            def build() -> Node:
                part = ChannelAffine(whole.scale[start:stop], whole.shift[start:stop])
                path = rewriter.place_module(layer.module_path or layer.origin_paths()[0],
                                             _with_output_affine(layer, part), [layer.node])
                new = gm.graph.call_module(path, (layer.input,))
                new.meta["tensor_meta"] = layer.node.meta.get("tensor_meta")
                return new
            return build

        changes = [(layer.node, folded(layer, start, stop))
                   for layer, start, stop in zip(layers, offsets, offsets[1:], strict=False)]
        changes.append((op.node, lambda: cat))
        names = ", ".join(describe(v.node, gm) for v in layers)
        return rewriter.replace_many(
            self.name, changes=changes, standing=[op.node],
            detail=f"{op.label} split along {describe(cat, gm)} and folded into {names}")

    def _into_consumer(self, op: AffineOp, rewriter: Rewriter) -> Rewrite | str:
        gm = rewriter.gm
        chain = layout_chain(op.node)
        last = chain[-1] if chain else op.node
        user = sole_user(last)
        if user is None:
            return f"its output is read by {len(last.users)} nodes, or twice by one"
        layer = layer_view(gm, user)
        if layer is None or layer.input is not last:
            return f"{describe(user, gm)} is not a conv/linear layer with constant weights"
        if layer.kind == "conv_transpose":
            return (f"{describe(user, gm)} is a transposed conv, which would spread the shift "
                    "unevenly near the borders")
        shared = rewriter.index.shared_reason(gm, layer)
        if shared:
            return shared
        axis = _axis_reaching(chain, op.node, layer) if chain else layer.channel_axis
        if axis is None:
            return _mixed(chain, layer, gm)
        affine = op.along(axis, shape_of(op.node), layer.in_channels)
        if isinstance(affine, str):
            return affine
        if layer.pads_with_zeros() and affine.has_shift():
            return (f"{describe(user, gm)} pads with zeros, where the unfused model sees the "
                    "shift; exact only without padding")
        weight, bias = fold_affine_into_input(layer.weight, layer.bias, affine,
                                              groups=layer.groups)
        return rewriter.replace_with_module(
            self.name, root=user, replaced=[op.node, *chain, user],
            module=layer.build(weight, bias),
            args=(lambda: (replay(gm, chain, op.input),)) if chain else (op.input,),
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{op.label} folded into the input of {describe(user, gm)}"
                   f"{_across(chain, gm)}",
        )


def _with_output_affine(layer: LayerView, affine: ChannelAffine) -> nn.Module:
    """A fresh copy of ``layer`` computing ``affine`` of its output."""
    weight, bias = fold_affine_into_output(layer.weight, layer.bias, affine,
                                           groups=layer.groups,
                                           transposed=layer.kind == "conv_transpose")
    return layer.build(weight, bias)


def _layout_before(node: Node) -> list[Node]:
    """The layout ops (permute, reshape, ...) that end at ``node``, each read only by the next,
    in graph order; empty when ``node`` is no layout op."""
    chain: list[Node] = []
    current = node
    while is_layout(current) and (not chain or sole_user(current) is chain[-1]):
        chain.append(current)
        data = current.args[0]
        if not isinstance(data, Node):
            return []
        current = data
    return list(reversed(chain))


def _axis_reaching(chain: list[Node], start: Node, layer: LayerView) -> int | None:
    """The axis of ``start`` that ``chain`` carries onto the layer's channel axis."""
    shape = shape_of(start)
    target_shape = shape_of(layer.input)
    if shape is None or target_shape is None:
        return None
    wanted = layer.channel_axis % len(target_shape)
    found = [a for a in range(len(shape)) if map_axis_through(chain, a) == wanted]
    return found[0] if len(found) == 1 else None


def _mixed(chain: list[Node], layer: LayerView, gm: GraphModule) -> str:
    names = ", ".join(describe(n, gm) for n in chain)
    return (f"the layout ops {names} between it and {describe(layer.node, gm)} do not keep "
            "the layer's channel axis as one axis of their own on every input size")


def _across(chain: list[Node], gm: GraphModule) -> str:
    if not chain:
        return ""
    return " across " + ", ".join(describe(n, gm) for n in chain)


@dataclass(frozen=True)
class FoldBatchNorm(_FoldChannelAffine):
    """Fold eval-mode batch norm (module or functional) into a neighbouring conv/linear."""

    name: ClassVar[str] = "fold_batchnorm"
    summary: ClassVar[str] = (
        "fold eval BatchNorm into the preceding conv/transposed conv/linear, or into a "
        "following linear or unpadded conv"
    )

    def lift(self, node: Node, gm: GraphModule) -> AffineOp | Decline | None:
        op = batchnorm_op(gm, node)
        return self.decline(node, op) if isinstance(op, str) else op


@dataclass(frozen=True)
class FoldScaleBias(_FoldChannelAffine):
    """Fold ``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x`` (``c`` constant) into a conv/linear."""

    name: ClassVar[str] = "fold_scale_bias"
    summary: ClassVar[str] = (
        "fold multiply/divide/add/subtract by a per-channel or scalar constant or parameter "
        "into the producing or consuming conv/linear"
    )

    def lift(self, node: Node, gm: GraphModule) -> AffineOp | Decline | None:
        op = scale_bias_op(gm, node)
        return self.decline(node, op) if isinstance(op, str) else op
