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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from repfuse.algebra import (
    FOLD_DTYPE,
    ChannelAffine,
    batchnorm_affine,
    fold_affine_into_input,
    fold_affine_into_output,
)
from repfuse.graph import (
    arith_kind,
    batchnorm_view,
    constant_value,
    describe,
    dtype_of,
    layer_view,
    shape_of,
    sole_user,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

# (channel axis, shape of the tensor the map acts on or None, channel count) -> affine | reason
AffineAlong = Callable[[int, tuple[int, ...] | None, int], ChannelAffine | str]


@dataclass(frozen=True)
class AffineOp:
    """A node computing ``s·x + t`` per channel of its data input ``input``."""

    node: Node
    input: Node
    label: str
    along: AffineAlong


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
        layer = layer_view(gm, op.input)
        if layer is None:
            return f"{describe(op.input, gm)} is not a conv/linear layer with constant weights"
        if sole_user(layer.node) is not op.node:
            return f"the output of {describe(layer.node, gm)} is also used elsewhere"
        shared = rewriter.index.shared_reason(gm, layer)
        if shared:
            return shared
        affine = op.along(layer.channel_axis, shape_of(layer.node), layer.out_channels)
        if isinstance(affine, str):
            return affine
        weight, bias = fold_affine_into_output(
            layer.weight, layer.bias, affine, groups=layer.groups,
            transposed=layer.kind == "conv_transpose",
        )
        return rewriter.replace_with_module(
            self.name, root=op.node, replaced=[layer.node, op.node],
            module=layer.build(weight, bias), args=(layer.input,),
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{op.label} folded into {describe(layer.node, gm)}",
        )

    def _into_consumer(self, op: AffineOp, rewriter: Rewriter) -> Rewrite | str:
        gm = rewriter.gm
        user = sole_user(op.node)
        if user is None:
            return f"its output is read by {len(op.node.users)} nodes, or twice by one"
        layer = layer_view(gm, user)
        if layer is None or layer.input is not op.node:
            return f"{describe(user, gm)} is not a conv/linear layer with constant weights"
        if layer.kind == "conv_transpose":
            return (f"{describe(user, gm)} is a transposed conv, which would spread the shift "
                    "unevenly near the borders")
        shared = rewriter.index.shared_reason(gm, layer)
        if shared:
            return shared
        affine = op.along(layer.channel_axis, shape_of(op.node), layer.in_channels)
        if isinstance(affine, str):
            return affine
        if layer.pads_with_zeros() and affine.has_shift():
            return (f"{describe(user, gm)} pads with zeros, where the unfused model sees the "
                    "shift; exact only without padding")
        weight, bias = fold_affine_into_input(layer.weight, layer.bias, affine,
                                              groups=layer.groups)
        return rewriter.replace_with_module(
            self.name, root=user, replaced=[op.node, user],
            module=layer.build(weight, bias), args=(op.input,),
            module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{op.label} folded into the input of {describe(user, gm)}",
        )


def _check_channels(affine: ChannelAffine, channels: int, label: str) -> ChannelAffine | str:
    if affine.channels != channels:
        return f"{label} has {affine.channels} channels but the layer has {channels}"
    return affine


@dataclass(frozen=True)
class FoldBatchNorm(_FoldChannelAffine):
    """Fold eval-mode batch norm (module or functional) into a neighbouring conv/linear."""

    name: ClassVar[str] = "fold_batchnorm"
    summary: ClassVar[str] = (
        "fold eval BatchNorm into the preceding conv/transposed conv/linear, or into a "
        "following linear or unpadded conv"
    )

    def lift(self, node: Node, gm: GraphModule) -> AffineOp | Decline | None:
        view = batchnorm_view(gm, node)
        if view is None:
            return None
        label = describe(node, gm)
        if view.training:
            return self.decline(node, f"{label} is in training mode: it normalizes with batch "
                                      "statistics, which no fixed weights reproduce")
        if view.running_mean is None or view.running_var is None:
            return self.decline(node, f"{label} has no running statistics: it normalizes with "
                                      "batch statistics, which no fixed weights reproduce")
        affine = batchnorm_affine(view.running_mean, view.running_var, view.weight, view.bias,
                                  view.eps)

        def along(axis: int, shape: tuple[int, ...] | None, channels: int) -> ChannelAffine | str:
            if axis != 1 and (shape is None or axis % len(shape) != 1):
                ndim = "an unknown-rank" if shape is None else f"a {len(shape)}-D"
                return (f"{label} normalizes axis 1 but the layer works on the last axis of "
                        f"{ndim} tensor")
            return _check_channels(affine, channels, label)

        return AffineOp(node, view.input, label, along)


@dataclass(frozen=True)
class FoldScaleBias(_FoldChannelAffine):
    """Fold ``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x`` (``c`` constant) into a conv/linear."""

    name: ClassVar[str] = "fold_scale_bias"
    summary: ClassVar[str] = (
        "fold multiply/divide/add/subtract by a per-channel or scalar constant or parameter "
        "into the producing or consuming conv/linear"
    )

    def lift(self, node: Node, gm: GraphModule) -> AffineOp | Decline | None:
        kind = arith_kind(node)
        if kind is None or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None  # e.g. div with rounding_mode: not affine
        alpha = node.kwargs.get("alpha", 1)
        first, second = node.args
        c_first, c_second = constant_value(gm, first), constant_value(gm, second)
        if isinstance(first, Node) and c_first is None and c_second is not None:
            data, const, data_first = first, c_second, True
        elif isinstance(second, Node) and c_second is None and c_first is not None:
            data, const, data_first = second, c_first, False
        else:
            return None  # two activations (or two constants): not a scale/bias
        label = describe(node, gm)
        data_dtype = dtype_of(data)
        if isinstance(const, Tensor) and const.dim() > 0 and const.dtype != data_dtype:
            return self.decline(node, f"{label}: the constant is {const.dtype} but the data is "
                                      f"{data_dtype}; folding would change the result's dtype")
        if data_dtype is None or dtype_of(node) != data_dtype:
            return self.decline(node, f"{label} changes the dtype of its input "
                                      f"({data_dtype} -> {dtype_of(node)}), or it is unknown")
        terms = _affine_terms(kind, const, alpha, data_first)
        if terms is None:
            return None  # c / x is not affine in x
        if isinstance(terms, str):
            return self.decline(node, f"{label} {terms}")
        scale, shift = terms

        def along(axis: int, shape: tuple[int, ...] | None, channels: int) -> ChannelAffine | str:
            vectors = []
            for value in (scale, shift):
                vector = _channel_vector(value, axis, shape, channels)
                if isinstance(vector, str):
                    return f"{label}: {vector}"
                vectors.append(vector)
            return ChannelAffine(*vectors)

        return AffineOp(node, data, label, along)


def _affine_terms(kind: str, const: Any, alpha: Any, data_first: bool):
    """``(scale, shift)`` constants of ``x op c`` (or ``c op x``); None if not affine in x."""
    if kind == "mul":
        return const, 0.0
    if kind == "div":
        if not data_first:
            return None
        if isinstance(const, Tensor) and bool(torch.any(const == 0)) or (
            not isinstance(const, Tensor) and const == 0
        ):
            return "divides by a constant that contains zero"
        return 1.0 / _as64(const), 0.0
    sign = 1.0 if kind == "add" else -1.0
    if data_first:  # x + alpha*c or x - alpha*c
        return 1.0, sign * alpha * _as64(const)
    return sign * alpha, const  # c + alpha*x or c - alpha*x


def _as64(value: Any) -> Any:
    return value.detach().to(FOLD_DTYPE) if isinstance(value, Tensor) else float(value)


def _channel_vector(
    value: Any, axis: int, shape: tuple[int, ...] | None, channels: int
) -> Tensor | str:
    """``value`` broadcast against a tensor of ``shape`` as one entry per channel of ``axis``."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return torch.full((channels,), float(value), dtype=FOLD_DTYPE)
    if shape is None:
        return "the shape of its input is unknown (run shape propagation)"
    if value.dim() > len(shape):
        return f"a constant of shape {tuple(value.shape)} would broadcast the output to more axes"
    aligned = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    channel_axis = axis % len(shape)
    for position, (size, extent) in enumerate(zip(aligned, shape, strict=True)):
        if size != 1 and not (position == channel_axis and size == extent):
            return (f"a constant of shape {tuple(value.shape)} is not per-channel along axis "
                    f"{channel_axis} of a {list(shape)} tensor")
    flat = value.detach().to(FOLD_DTYPE).reshape(-1)
    return flat.expand(channels).clone() if flat.numel() == 1 else flat
