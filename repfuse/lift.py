"""Reading fx nodes as linear maps: the one place that turns a node into a kernel.

Every linear, shift-equivariant op is lifted to a :class:`repfuse.algebra.Kernel` (section 2 of
DESIGN.md) or, acting per channel, to a :class:`repfuse.algebra.ChannelAffine`:

==========================================  ==================================================
node                                        lifted to
==========================================  ==================================================
conv (module, ``F.conv*d``, ``aten``)       its kernel (zero padding; ``'same'`` if symmetric)
eval batch norm, ``x * c + d``              a :class:`ChannelAffine`, as a depthwise 1×1
average pool (counting padding, floor)      a depthwise kernel of weights ``1/Πk``
symmetric crop ``x[..., c:-c]``             the identity with padding ``−c``
``aten.slice.Tensor`` cropping one axis     the same, on that axis (:func:`crop_of`)
zero ``F.pad`` / ``nn.ZeroPad*d``           conv padding (:func:`zero_pad`)
``a + b``, ``a − b``, ``torch.add/sub``     a sum of signed terms (:func:`sum_terms`)
==========================================  ==================================================

A node that is such an op but cannot be lifted exactly (a conv padding by reflection, a pool in
``ceil_mode``, a kernel size computed at run time) lifts to a *reason* (a string), so the
passes can say why a chain stopped there. Passes call these functions and the algebra's
combinators; they do not read fx nodes as maps themselves.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node

from repfuse.algebra import (
    FOLD_DTYPE,
    ChannelAffine,
    Kernel,
    affine_kernel,
    avgpool_kernel,
    avgpool_reason,
    batchnorm_affine,
    compose,
    crop_kernel,
    identity_kernel,
    negate,
    ntuple,
    on_meta,
    regroup,
)
from repfuse.graph import (
    LayerView,
    batchnorm_view,
    bind_args,
    constant_value,
    describe,
    dtype_of,
    frozen_parameter,
    is_metadata_helper,
    layer_view,
    new_layer,
    shape_of,
    sole_user,
    written_in_place,
)
from repfuse.graph import arith_kind as _arith_kind
from repfuse.graph import has_node as _has_node

# --- per-channel affine ops: eval batch norm and scale/bias by constants ---------------------

# (channel axis, shape of the tensor the map acts on or None, channel count) -> affine | reason
AffineAlong = Callable[[int, tuple[int, ...] | None, int], ChannelAffine | str]


@dataclass(frozen=True)
class AffineOp:
    """A node computing ``s·x + t`` per channel of its data input ``input``.

    ``along(axis, shape, channels)`` gives the map along the channel ``axis`` of a tensor of
    ``shape`` with ``channels`` channels, or the reason it is not per-channel there.
    """

    node: Node
    input: Node
    label: str
    along: AffineAlong


def batchnorm_op(gm: GraphModule, node: Node) -> AffineOp | str | None:
    """An eval batch norm as an affine op; a reason if it normalizes with batch statistics;
    None if ``node`` is no batch norm."""
    view = batchnorm_view(gm, node)
    if view is None:
        return None
    label = describe(node, gm)
    if view.training:
        return (f"{label} is in training mode: it normalizes with batch statistics, which no "
                "fixed weights reproduce")
    if view.running_mean is None or view.running_var is None:
        return (f"{label} has no running statistics: it normalizes with batch statistics, "
                "which no fixed weights reproduce")
    affine = batchnorm_affine(view.running_mean, view.running_var, view.weight, view.bias,
                              view.eps)

    def along(axis: int, shape: tuple[int, ...] | None, channels: int) -> ChannelAffine | str:
        if axis != 1 and (shape is None or axis % len(shape) != 1):
            ndim = "an unknown-rank" if shape is None else f"a {len(shape)}-D"
            return (f"{label} normalizes axis 1 but the layer works on the last axis of "
                    f"{ndim} tensor")
        return _check_channels(affine, channels, label)

    return AffineOp(node, view.input, label, along)


def _check_channels(affine: ChannelAffine, channels: int, label: str) -> ChannelAffine | str:
    if affine.channels != channels:
        return f"{label} has {affine.channels} channels but the layer has {channels}"
    return affine


def scale_bias_op(gm: GraphModule, node: Node) -> AffineOp | str | None:
    """``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x`` (``c`` a constant or parameter) as an affine
    op; a reason when it is such an op but not foldable; None otherwise."""
    kind = _arith_kind(node)
    if kind is None or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None  # e.g. div with rounding_mode: not affine
    if is_metadata_helper(node):
        return None  # arithmetic on sizes (``x.size(0) * 8``), not on a tensor
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
        return (f"{label}: the constant is {const.dtype} but the data is {data_dtype}; "
                "folding would change the result's dtype")
    if data_dtype is None or dtype_of(node) != data_dtype:
        return (f"{label} changes the dtype of its input ({data_dtype} -> {dtype_of(node)}), "
                "or it is unknown")
    terms = _affine_terms(kind, const, alpha, data_first)
    if terms is None:
        return None  # c / x is not affine in x
    if isinstance(terms, str):
        return f"{label} {terms}"
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


def affine_op(gm: GraphModule, node: Node) -> AffineOp | str | None:
    """A batch norm or scale/bias node as an affine op (see :func:`batchnorm_op`)."""
    found = batchnorm_op(gm, node)
    return found if found is not None else scale_bias_op(gm, node)


# --- one node as a kernel -------------------------------------------------------------------


@dataclass(frozen=True)
class LinearStep:
    """A node that applies ``kernel`` to ``input`` (a conv, BN/scale, average pool or crop).

    The kernel (a float64 copy of the weights) is built on first use: most candidates are
    rejected on structure alone; :attr:`shape_kernel` has the same shape and settings on the
    meta device, to price a merge before building it.
    """

    node: Node
    input: Node
    build: Callable[[], Kernel]
    is_conv: bool
    origin: str  # module path (or node name) for naming the merged conv
    build_shape: Callable[[], Kernel] | None = None

    @functools.cached_property
    def kernel(self) -> Kernel:
        return self.build()

    @functools.cached_property
    def shape_kernel(self) -> Kernel:
        if self.build_shape is not None:
            return self.build_shape()
        return on_meta(self.kernel)


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


_AVGPOOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_AVGPOOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                      torch.ops.aten.avg_pool2d.default: 2, torch.ops.aten.avg_pool3d.default: 3}
_AVGPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
_AVGPOOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False,
                     "count_include_pad": True, "divisor_override": None}


@dataclass(frozen=True)
class AvgPool:
    """An average pool's settings, whatever its spelling."""

    node: Node
    input: Any
    dims: int
    kernel_size: Any
    stride: Any
    padding: Any
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: Any

    def settings_reason(self) -> str | None:
        """Why the pool is not :func:`avgpool_kernel` (computed sizes included), or None."""
        for name in ("kernel_size", "stride", "padding"):
            if _has_node(getattr(self, name)):
                return (f"its {name.replace('_', ' ')} is computed at run time (e.g. from the "
                        "input's size)")
        return avgpool_reason(self.padding_tuple(), self.ceil_mode, self.count_include_pad,
                              self.divisor_override)

    def size(self) -> tuple[int, ...]:
        return ntuple(self.kernel_size, self.dims)

    def stride_tuple(self) -> tuple[int, ...]:
        stride = self.stride if self.stride not in (None, [], ()) else self.kernel_size
        return ntuple(stride, self.dims)

    def padding_tuple(self) -> tuple[int, ...]:
        return ntuple(self.padding, self.dims)


def avgpool_of(gm: GraphModule, node: Node) -> AvgPool | None:
    """``node`` as an average pool (module, functional or aten), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        dims = _AVGPOOL_MODULES.get(type(module))
        if dims is None or len(node.args) != 1 or node.kwargs:
            return None
        settings = {name: getattr(module, name, None) for name in _AVGPOOL_ARGS[1:]}
        if settings["count_include_pad"] is None:  # AvgPool1d keeps it under another guise
            settings["count_include_pad"] = True
        return AvgPool(node, node.args[0], dims, **settings)
    if node.op == "call_function" and node.target in _AVGPOOL_FUNCTIONS:
        settings = bind_args(node, _AVGPOOL_ARGS, _AVGPOOL_DEFAULTS)
        data = settings.pop("input")
        return AvgPool(node, data, _AVGPOOL_FUNCTIONS[node.target], **settings)
    return None


def lift(gm: GraphModule, node: Node) -> LinearStep | str | None:
    """The kernel ``node`` applies to its data input; a reason when ``node`` is a linear op
    that cannot be lifted exactly; None when it is not such an op."""
    layer = layer_view(gm, node)
    if layer is not None:
        return _lift_conv(gm, layer)
    shape = shape_of(node)
    if shape is None or len(shape) < 3:
        return None  # per-channel ops on N×C tensors are the fold passes' business
    dims = len(shape) - 2
    pool = avgpool_of(gm, node)
    if pool is not None:
        return _lift_pool(gm, pool, shape, dims)
    crop = crop_of(node)
    if crop is not None:
        data, amounts = crop
        if isinstance(amounts, str):
            return f"{describe(node, gm)} {amounts}"
        channels = shape[1]
        return LinearStep(node, data, lambda: crop_kernel(channels, amounts), False, node.name)
    op = affine_op(gm, node)
    if op is None or isinstance(op, str):
        return op
    affine = op.along(1, shape_of(op.input), shape[1])
    if isinstance(affine, str):
        return affine
    origin = node.target if node.op == "call_module" else node.name
    return LinearStep(node, op.input, lambda: affine_kernel(affine, dims), False, origin)


def _lift_conv(gm: GraphModule, layer: LayerView) -> LinearStep | str | None:
    if layer.kind != "conv":
        return None
    name = describe(layer.node, gm)
    if layer.padding_mode != "zeros":
        return (f"{name} pads with '{layer.padding_mode}', which is not a zero-padded "
                "convolution")
    padding = numeric_padding(layer)
    if padding is None:
        return f"{name} uses asymmetric 'same' padding, which no conv padding expresses"

    def build() -> Kernel:
        return Kernel.of(layer.weight, layer.bias, layer.stride, padding, layer.dilation,
                         layer.groups)

    def build_shape() -> Kernel:
        bias = None if layer.bias is None else layer.bias.to("meta")
        return Kernel.of(layer.weight.to("meta"), bias, layer.stride, padding, layer.dilation,
                         layer.groups)

    return LinearStep(layer.node, layer.input, build, True, layer.origin_paths()[0],
                      build_shape)


def _lift_pool(gm: GraphModule, pool: AvgPool, shape: tuple[int, ...],
               dims: int) -> LinearStep | str | None:
    if pool.dims != dims or not isinstance(pool.input, Node):
        return None
    reason = pool.settings_reason()
    if reason is not None:
        return f"the pool is not a convolution: {reason}"
    size, stride, padding = pool.size(), pool.stride_tuple(), pool.padding_tuple()
    channels = shape[1]
    return LinearStep(pool.node, pool.input,
                      lambda: avgpool_kernel(channels, size, stride, padding), False,
                      pool.node.name)


def _negative_pad_crop(node: Node) -> tuple[Node, tuple[int, ...] | str] | None:
    """``F.pad(x, [-c, -c, ...])``: a pad by negative amounts crops (whatever its fill)."""
    names = ("input", "pad", "value") if node.target is \
        torch.ops.aten.constant_pad_nd.default else _PAD_ARGS
    args = bind_args(node, names, _PAD_DEFAULTS)
    data, pads = args["input"], args["pad"]
    shape = shape_of(data) if isinstance(data, Node) else None
    if shape is None or len(shape) < 3 or not isinstance(pads, (list, tuple)) or _has_node(pads):
        return None
    if not pads or any(p > 0 for p in pads) or all(p == 0 for p in pads):
        return None  # a real pad (zero_pad's business), or nothing
    if args.get("mode", "constant") != "constant":
        return None
    spatial = len(shape) - 2
    if len(pads) % 2 or len(pads) // 2 > spatial:
        return data, "pads the batch or channel axes by negative amounts"
    if any(pads[i] != pads[i + 1] for i in range(0, len(pads), 2)):
        return data, "crops different amounts from the two ends of an axis"
    per_axis = tuple(-p for p in reversed(pads[::2]))  # F.pad lists the last axis first
    return data, (0,) * (spatial - len(per_axis)) + per_axis


def crop_of(node: Node) -> tuple[Node, tuple[int, ...] | str] | None:
    """``(input, per-axis crop)`` when ``node`` slices its ``N×C×spatial`` input
    ``x[:, :, c:-c, ...]`` (or ``x[..., c:-c]``, ``F.pad(x, [-c, -c, ...])``, or an exported
    ``aten.slice``), the same
    amount from both ends of each spatial axis; a reason instead of the crop for other slices
    of the spatial axes; None when ``node`` is no such slice."""
    if node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor:
        return _aten_crop(node)
    if node.op == "call_function" and node.target in _PAD_FUNCTIONS:
        return _negative_pad_crop(node)
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    data, index = node.args
    shape = shape_of(data) if isinstance(data, Node) else None
    if shape is None or len(shape) < 3 or not isinstance(index, tuple):
        return None
    if not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if sum(1 for i in index if i is Ellipsis) > 1:
        return None
    items = list(index)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    items += [slice(None)] * (len(shape) - len(items))
    if len(items) != len(shape) or any(i != slice(None) for i in items[:2]):
        return None  # a slice of the batch or channel axes: no convolution
    crop = []
    for item in items[2:]:
        start, stop, step = item.start, item.stop, item.step
        if any(isinstance(v, Node) for v in (start, stop, step)):
            return data, "crops by amounts computed at run time"
        if step not in (None, 1):
            return None  # subsampling, not a crop
        if (start is not None and start < 0) or (stop is not None and stop >= 0):
            return data, "crops by an amount tied to the input's size, not from both ends"
        low = 0 if start is None else start
        high = 0 if stop is None else -stop
        if low != high:
            return data, f"crops {low} and {high} pixels from the two ends of an axis"
        crop.append(low)
    if not any(crop):
        return None
    return data, tuple(crop)


_SLICE = torch.ops.aten.slice.Tensor
_SCATTER = torch.ops.aten.slice_scatter.default
_SLICE_ARGS = ("input", "dim", "start", "end", "step")
_SLICE_DEFAULTS = {"dim": 0, "start": None, "end": None, "step": 1}


def _aten_crop(node: Node) -> tuple[Node, tuple[int, ...] | str] | None:
    """``aten.slice.Tensor(x, dim, start, end, step)``, one spatial axis, as a crop.

    A negative ``end`` counts from the end and a ``start ≥ 0`` from the start, on any input
    size. torch.export writes ``x[..., c:x.size(3) - c]`` with the end computed: a positive
    int, ``size − c`` for the one size it traced. That end is read against the recorded
    size only where torch.export specialized the sliced axis to that size (the fake value it
    recorded for the input has an int there, :func:`shape_specialized`): the program is then
    defined only for that size (``ExportedProgram`` checks its inputs against it), so
    ``end = size − c`` and the crop by ``c`` computes the same on every input it accepts. A
    symbolically traced graph runs on any size, where ``x[..., 1:31]`` crops differently from
    ``x[..., 1:-1]``.
    """
    args = bind_args(node, _SLICE_ARGS, _SLICE_DEFAULTS)
    data, dim, start, end, step = (args[k] for k in _SLICE_ARGS)
    shape = shape_of(data)
    if not isinstance(data, Node) or shape is None or len(shape) < 3 or not isinstance(dim, int):
        return None
    axis = dim % len(shape)
    if axis < 2:
        return None  # a slice of the batch or channel axis: no convolution
    if any(isinstance(v, Node) for v in (start, end, step)):
        return data, "crops by amounts computed at run time"
    if step != 1:
        return None  # subsampling, not a crop
    size = shape[axis]
    specialized = shape_specialized(data, axis)
    low = 0 if start is None else start
    if low < 0:
        if not specialized:
            return data, "crops by an amount tied to the input's size, not from both ends"
        low = max(size + low, 0)
    if end is None or end >= size and (specialized or end > _INT_MAX_DIV_2):
        high = 0  # to the end (export writes the open end as the largest int64)
    elif end < 0:
        high = -end
    elif specialized:
        high = size - end
    else:
        return data, "crops by an amount tied to the input's size, not from both ends"
    if low != high:
        return data, f"crops {low} and {high} pixels from the two ends of an axis"
    if not low:
        return None
    crop = [0] * (len(shape) - 2)
    crop[axis - 2] = low
    return data, tuple(crop)


_INT_MAX_DIV_2 = 2**62  # an end beyond any real size: "to the end" on every input


def shape_specialized(node: Node, axis: int | None = None) -> bool:
    """True when ``node`` comes from a program that torch.export specialized to the sizes it
    traced (along ``axis``, or all of them): export records the value it traced each node
    with (``meta['val']``, a fake tensor), where a static size is an int and a dynamic one a
    symbol; the program checks its inputs against the static ones."""
    value = node.meta.get("val")
    if not isinstance(value, FakeTensor):
        # a node a rewrite made: specialized when the whole program is (every input static)
        return _static_program(node.graph)
    sizes = value.shape if axis is None else (value.shape[axis],)
    return all(type(s) is int for s in sizes)


def _static_program(graph: torch.fx.Graph) -> bool:
    """True for an exported program whose every input has static sizes."""
    inputs = graph.find_nodes(op="placeholder")
    return bool(inputs) and all(_static_value(n) for n in inputs)


def _static_value(node: Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, FakeTensor) and all(type(s) is int for s in value.shape)


def whole_slice_value(node: Node) -> Node | None:
    """The node whose value ``node`` is when it slices or scatters a whole axis (export writes
    these for a dynamic batch axis): ``aten.slice.Tensor(x, dim, 0, end ≥ size)`` is ``x``,
    ``aten.slice_scatter(x, src, dim, 0, end ≥ size)`` is ``src``; None otherwise."""
    if node.op != "call_function" or node.target not in (_SLICE, _SCATTER):
        return None
    if node.target is _SLICE:
        args = bind_args(node, _SLICE_ARGS, _SLICE_DEFAULTS)
        value = args["input"]
    else:
        args = bind_args(node, ("input", "src", *_SLICE_ARGS[1:]), _SLICE_DEFAULTS)
        value = args["src"]
    data, dim, start, end, step = (args[k] for k in _SLICE_ARGS)
    shape = shape_of(data)
    if (shape is None or not isinstance(value, Node) or shape_of(value) != shape
            or not isinstance(dim, int) or step != 1 or start not in (None, 0)):
        return None
    if end is None or (isinstance(end, int) and end > _INT_MAX_DIV_2):
        return value
    whole = isinstance(end, int) and end >= shape[dim] and shape_specialized(data, dim)
    return value if whole else None


# --- chains of linear ops back to a shared input --------------------------------------------


@dataclass(frozen=True)
class Branch:
    """``term = kernel(input)`` through ``nodes`` (term first); ``kernel`` None: identity.

    ``stop`` says why the walk back did not go further than ``input`` (a reason from
    :func:`lift`), or None.
    """

    term: Node
    input: Node
    kernel: Kernel | None
    nodes: tuple[Node, ...]
    has_conv: bool
    origin: str
    stop: str | None = None


def branch_of(gm: GraphModule, term: Node, consumer: Node) -> Branch:
    """Walk back from ``term`` through linear ops read only along the chain, composing them.

    The walk stops at a node read elsewhere too (typically the shared input), at a non-linear
    op, or where composing would not be exact.
    """
    if sole_user(term) is not consumer:
        return Branch(term, term, None, (), False, term.name)
    kernel: Kernel | None = None
    nodes: list[Node] = []
    has_conv, origin, current, stop = False, term.name, term, None
    while True:
        step = lift(gm, current)
        if isinstance(step, str):
            stop = step
            break
        if step is None or (nodes and sole_user(current) is not nodes[-1]):
            break
        combined = step.kernel if kernel is None else compose(step.kernel, kernel)
        if isinstance(combined, str):
            stop = combined
            break
        kernel = combined
        nodes.append(current)
        if step.is_conv and not has_conv:
            origin = step.origin
        has_conv = has_conv or step.is_conv
        current = step.input
    return Branch(term, current, kernel, tuple(nodes), has_conv, origin, stop)


def negated(branch: Branch, shape: tuple[int, ...]) -> Branch:
    """``branch`` subtracted: its kernel (the identity if it has none) negated."""
    kernel = branch.kernel if branch.kernel is not None else identity_for(shape)
    return Branch(branch.term, branch.input, negate(kernel), branch.nodes, branch.has_conv,
                  branch.origin, branch.stop)


# --- sums of branches -----------------------------------------------------------------------


def _add_sign(node: Node) -> float | None:
    """The sign (times ``alpha``) of the second operand of a binary add/sub of two activations:
    ``a + b`` → 1, ``a − b`` → −1, ``torch.add(a, b, alpha=2)`` → 2; None for other nodes."""
    kind = _arith_kind(node)
    if kind not in ("add", "sub") or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    if not all(isinstance(a, Node) and a.op != "get_attr" for a in node.args):
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return float(alpha) if kind == "add" else -float(alpha)


def is_sum(node: Node) -> bool:
    """``a + b`` or ``a − b`` of two activations (operator, torch or method spelling)."""
    return _add_sign(node) is not None


@dataclass(frozen=True)
class Term:
    """An addend of a tree of adds and subtractions: ``sign · node``, read by ``reader``."""

    node: Node
    reader: Node
    sign: float


def sum_terms(root: Node) -> tuple[list[Term], list[Node]]:
    """The signed addends of a tree of binary adds/subtractions (inner ones read only by the
    tree), each with the node that reads it, and the adds themselves."""
    terms: list[Term] = []
    adds: list[Node] = []

    def visit(node: Node, sign: float) -> None:
        adds.append(node)
        second = _add_sign(node)
        for arg, factor in zip(node.args, (1.0, second), strict=True):
            if is_sum(arg) and sole_user(arg) is node:
                visit(arg, sign * factor)
            else:
                terms.append(Term(arg, node, sign * factor))

    visit(root, 1.0)
    return terms, adds


def scaled(kernel: Kernel, factor: float) -> Kernel:
    """``factor · kernel(x)``: exact for ±1 (a sign flip); other factors round once, as the
    unfused ``alpha`` multiplication does."""
    if factor == 1.0:
        return kernel
    if factor == -1.0:
        return negate(kernel)
    return Kernel(kernel.weight * factor, kernel.bias * factor, kernel.stride, kernel.padding,
                  kernel.dilation, kernel.groups)


# --- zero padding ---------------------------------------------------------------------------

_PAD_ARGS = ("input", "pad", "mode", "value")
_PAD_DEFAULTS = {"mode": "constant", "value": None}
_PAD_FUNCTIONS = {F.pad, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default}


def zero_pad(gm: GraphModule, node: Node) -> tuple[Node, tuple[int, ...]] | None:
    """``(input, per-axis padding)`` of a symmetric constant zero pad of the spatial axes."""
    if node.op == "call_function" and node.target in _PAD_FUNCTIONS:
        names = ("input", "pad", "value") if node.target is \
            torch.ops.aten.constant_pad_nd.default else _PAD_ARGS
        args = bind_args(node, names, _PAD_DEFAULTS)
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
    if not isinstance(data, Node) or shape is None or _has_node(pads):
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


@dataclass(frozen=True)
class BorderFill:
    """A zero pad whose padded border strips are all overwritten with one per-channel value.

    ``result`` holds the filled tensor: the pad itself when the strips are written in place
    (``y[:, :, :p] = v``; ``aten.copy_`` into an ``aten.slice`` of it in a training-IR
    export), or the last ``aten.slice_scatter`` of the chain an inference-IR export writes
    instead. ``nodes`` are the writes and the views and copies they go through.
    """

    value: Tensor
    result: Node
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class _Write:
    """One write into a padded tensor: ``tensor[index] = value``, spelled by ``nodes``."""

    nodes: tuple[Node, ...]
    index: Any
    value: Any


def border_fill(gm: GraphModule, pad: Node) -> BorderFill | None:
    """``pad`` with a per-channel value written over every padded border strip, if so.

    Recognizes ``y = F.pad(x, [p]*2d); y[:, :, :p] = v; y[:, :, -p:] = v; ...`` (DBB's
    BN-and-pad layer) with ``v`` a constant broadcasting per channel, in the three ways a graph
    spells it: item assignment, ``aten.copy_`` into slices, a chain of ``aten.slice_scatter``.
    """
    found = zero_pad(gm, pad)
    writes = _writes(pad)
    if found is None or not writes or not writes[1]:
        return None
    result, items = writes
    data, padding = found
    shape = shape_of(pad)
    if shape is None:
        return None
    spatial = len(padding)
    covered: set[tuple[int, str]] = set()
    value = None
    for item in items:
        constant = _constant_through(gm, item.value)
        vector = None if constant is None else _per_channel(constant, len(shape), shape[1])
        if vector is None or not isinstance(item.index, tuple):
            return None
        if value is not None and not torch.equal(vector, value):
            return None
        value = vector
        strip = _border_strip(item.index, padding, spatial)
        if strip is None:
            return None
        covered.add(strip)
    needed = {(axis, side) for axis in range(spatial) if padding[axis]
              for side in ("low", "high")}
    if covered != needed or value is None:
        return None
    nodes = tuple(n for item in items for n in item.nodes)
    if result is pad and not _written_before_read(pad, nodes):
        return None
    return BorderFill(value, result, nodes)


def overwritten(node: Node) -> bool:
    """True when something writes into ``node``'s tensor (item assignment, an in-place op on
    it or a view of it) or scatters into a copy of it."""
    return written_in_place(node) or any(
        u.op == "call_function" and u.target is _SCATTER and u.args[0] is node
        for u in node.users)


def setitem_users(node: Node) -> list[Node]:
    """The ``node[index] = value`` writes into ``node``."""
    return [u for u in node.users if u.op == "call_function" and u.target is operator.setitem
            and u.args and u.args[0] is node]


def _writes(pad: Node) -> tuple[Node, list[_Write]] | None:
    """The node holding ``pad`` after its writes, and the writes; None when something writes
    into it in another way (a write through other views, several scatter chains)."""
    items = [_Write((u,), u.args[1], u.args[2]) for u in setitem_users(pad)]
    for user in pad.users:
        if user.op != "call_function" or user.target is not _SLICE or user.args[0] is not pad:
            continue
        if not written_in_place(user):
            continue
        copies = list(user.users)
        copy = copies[0] if len(copies) == 1 else None
        if (copy is None or copy.target is not torch.ops.aten.copy_.default
                or copy.args[0] is not user or len(copy.args) != 2 or copy.kwargs):
            return None
        items.append(_Write((user, copy), _slice_index(user), copy.args[1]))
    written = {n for item in items for n in item.nodes}
    if any(_aten_view(u) and written_in_place(u) for u in pad.users if u not in written):
        return None  # written through another view
    result = pad
    while True:
        scatters = [u for u in result.users if u.op == "call_function"
                    and u.target is _SCATTER and u.args[0] is result]
        if not scatters:
            return result, items
        if len(scatters) > 1 or (result is pad and items):
            return None  # in place and functional writes mixed: not a form we know
        write = _scatter_write(scatters[0], result)
        if write is None:
            return None
        items.append(write)
        result = scatters[0]


def _aten_view(node: Node) -> bool:
    """An aten op whose result aliases its input (``slice``, ``view``, ``select``, ...)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in target._schema.returns)


def _scatter_write(scatter: Node, base: Node) -> _Write | None:
    """``slice_scatter(base, src, dim, start, end)`` as ``base[index] = value``: ``src`` is
    the value, or ``copy(base[index], value)`` (how ``run_decompositions`` writes
    ``base[index].copy_(value)``)."""
    args = bind_args(scatter, ("input", "src", "dim", "start", "end", "step"),
                     {"dim": 0, "start": None, "end": None, "step": 1})
    index = _slice_index(scatter, args)
    src = args["src"]
    if (isinstance(src, Node) and src.op == "call_function"
            and src.target is torch.ops.aten.copy.default and len(src.args) == 2):
        view = src.args[0]
        if (isinstance(view, Node) and view.op == "call_function" and view.target is _SLICE
                and view.args[0] is base and _slice_index(view) == index):
            return _Write((scatter, src, view), index, src.args[1])
    return _Write((scatter,), index, src)


def _slice_index(node: Node, args: dict | None = None) -> tuple | None:
    """An ``aten.slice``/``slice_scatter``'s selection as a Python index tuple (an open end
    as ``None``)."""
    if args is None:
        args = bind_args(node, _SLICE_ARGS, _SLICE_DEFAULTS)
    shape = shape_of(node.args[0]) if isinstance(node.args[0], Node) else None
    dim, start, end, step = args["dim"], args["start"], args["end"], args["step"]
    if shape is None or not isinstance(dim, int) or _has_node([start, end, step]):
        return None
    if end is not None and end > _INT_MAX_DIV_2:
        end = None
    return (slice(None),) * (dim % len(shape)) + (slice(start, end, None if step == 1 else step),)


def _written_before_read(pad: Node, writes: tuple[Node, ...]) -> bool:
    """True when every write into ``pad`` comes before every other reader of it."""
    written = set(writes)
    readers = [u for u in pad.users if u not in written]
    return all(w < r for w in writes for r in readers)


def _constant_through(gm: GraphModule, arg: Any, depth: int = 0) -> Any:
    """The value of ``arg`` when it is a constant, or pure aten ops (``view``, ``expand``) of
    constants, evaluated; None otherwise. A size read on the way (``expand`` to a dynamic
    batch) is the recorded one: a fill is accepted only if it is one value per channel, which
    expanding it to other sizes does not change."""
    value = constant_value(gm, arg)
    if value is not None or not isinstance(arg, Node) or depth > _CONSTANT_DEPTH:
        return value
    target = arg.target
    if target is torch.ops.aten.sym_size.int and isinstance(arg.args[0], Node):
        shape = shape_of(arg.args[0])
        return None if shape is None else shape[arg.args[1]]
    if (arg.op != "call_function" or not isinstance(target, torch._ops.OpOverload)
            or target._schema.is_mutable):
        return None
    known: dict[Node, Any] = {}
    for node in arg.all_input_nodes:
        known[node] = _constant_through(gm, node, depth + 1)
        if known[node] is None:
            return None
    args = torch.fx.node.map_arg(arg.args, known.__getitem__)
    kwargs = torch.fx.node.map_arg(arg.kwargs, known.__getitem__)
    with torch.no_grad():
        return target(*args, **kwargs)


_CONSTANT_DEPTH = 8


def _per_channel(value: Any, rank: int, channels: int) -> Tensor | None:
    """The ``channels`` values a constant written into an ``N×C×…`` tensor holds, one per
    channel, when it is equal along every other axis; None otherwise."""
    if not isinstance(value, Tensor):
        return torch.full((channels,), float(value), dtype=FOLD_DTYPE)
    if value.dim() > rank:
        return None
    aligned = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    if aligned.shape[1] not in (1, channels):
        return None
    first = aligned[(0, slice(None), *(0,) * (rank - 2))]
    broadcast = first.reshape(1, -1, *(1,) * (rank - 2)).expand_as(aligned)
    if not torch.equal(aligned, broadcast):
        return None
    return first.expand(channels).clone()


def _border_strip(index: tuple, padding: tuple[int, ...], spatial: int) -> tuple[int, str] | None:
    """``(axis, 'low'|'high')`` if ``index`` selects exactly one padded border strip."""
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (2 + spatial - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (2 + spatial - len(index))
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


# --- lowering a kernel back to a layer ------------------------------------------------------


def kernel_module(kernel: Kernel, like: Tensor) -> nn.Module:
    """A fresh ``nn.Conv*d`` holding ``kernel``, in the dtype and device of ``like``."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[kernel.spatial_dims]
    module = new_layer(cls, kernel.in_channels, kernel.out_channels, kernel.kernel_size,
                       kernel.stride, kernel.padding, kernel.dilation, kernel.groups, bias=True,
                       dtype=like.dtype)
    module.weight = frozen_parameter(kernel.weight.to(like))
    module.bias = frozen_parameter(kernel.bias.to(like))
    return module


def linear_kernel(weight: Tensor, bias: Tensor | None, dims: int = 1) -> Kernel:
    """A linear layer ``(C_out, C_in)`` as a 1×…×1 conv with ``dims`` spatial axes: on
    ``N×C_in×1…1`` they compute the same, so the conv algebra applies to linear layers too."""
    return Kernel.of(weight.reshape(*weight.shape, *(1,) * dims), bias, (1,) * dims,
                     (0,) * dims, (1,) * dims, 1)


def linear_module(kernel: Kernel, like: Tensor) -> nn.Linear:
    """A fresh ``nn.Linear`` holding a 1×…×1 ``kernel`` (densified to one group)."""
    dense = regroup(kernel, 1)
    module = new_layer(nn.Linear, dense.in_channels, dense.out_channels, dtype=like.dtype)
    weight = dense.weight.reshape(dense.out_channels, dense.in_channels)
    module.weight = frozen_parameter(weight.to(like))
    module.bias = frozen_parameter(dense.bias.to(like))
    return module


def weight_like(gm: GraphModule, nodes) -> Tensor:
    """A conv weight among ``nodes``: the merged conv takes its dtype and device."""
    for node in nodes:
        layer = layer_view(gm, node)
        if layer is not None:
            return layer.weight
    raise AssertionError("a merge always involves a conv")


def identity_for(shape: tuple[int, ...]) -> Kernel:
    """The identity on a tensor of ``shape``, as a depthwise 1×…×1 kernel."""
    channels, dims = shape[1], len(shape) - 2
    return identity_kernel(channels, 1, dims, groups=channels)


def kernel_area(kernel: Kernel | None) -> int:
    return 0 if kernel is None else math.prod(kernel.kernel_size)


# --- layout ops: where a channel axis goes ---------------------------------------------------

_PERMUTES = {"permute", torch.permute, torch.ops.aten.permute.default}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes,
               torch.ops.aten.transpose.int}
_FLATTENS = {"flatten", torch.flatten}
_RESHAPES = {"reshape", "view", "reshape_as", "view_as", torch.reshape,
             torch.ops.aten.view.default, torch.ops.aten.reshape.default,
             torch.ops.aten._unsafe_view.default}
_IDENTITIES = {"contiguous", torch.ops.aten.clone.default}


def _layout_target(node: Node) -> Any:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return node.target
    if node.op == "call_module" and isinstance(
            node.graph.owning_module.get_submodule(node.target), nn.Flatten):
        return nn.Flatten
    return None


def is_layout(node: Node) -> bool:
    """True for an op that only rearranges its input's elements (permute, transpose, flatten,
    reshape, view, contiguous)."""
    target = _layout_target(node)
    if target is None:
        return False
    try:
        return target in _PERMUTES | _TRANSPOSES | _FLATTENS | _RESHAPES | _IDENTITIES or (
            target is nn.Flatten)
    except TypeError:  # an unhashable target
        return False


def map_axis(node: Node, axis: int) -> int | None:
    """The axis of ``node``'s output that holds, element for element, what ``axis`` of its
    input holds (same size, same positions), for every input size; None when no axis does.

    Permutes and transposes move axes; ``flatten(start, end)`` and squeezes shift the axes
    after the range; a reshape keeps only a *last* axis that stays last with its size (its
    row-major stride is 1 in both, whatever the other sizes). Any other reshape could mix the
    axis with others at other input sizes, so it maps nowhere.
    """
    in_shape, out_shape = shape_of(node.args[0]) if node.args else None, shape_of(node)
    if in_shape is None or out_shape is None:
        return None
    rank = len(in_shape)
    axis %= rank
    target = _layout_target(node)
    args = list(node.args[1:])
    if _has_node(args) or any(_has_node(v) for v in node.kwargs.values()):
        return None  # axes computed at run time
    if target in _IDENTITIES:
        return axis
    if target in _PERMUTES:
        dims = node.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(
            args[0], (list, tuple)) else args)
        dims = [d % rank for d in dims]
        return dims.index(axis) if axis in dims else None
    if target in _TRANSPOSES:
        first, second = (a % rank for a in args[:2])
        return second if axis == first else first if axis == second else axis
    if target in _FLATTENS or target is nn.Flatten:
        if target is nn.Flatten:
            module = node.graph.owning_module.get_submodule(node.target)
            start, end = module.start_dim, module.end_dim
        else:
            bound = bind_args(node, ("input", "start_dim", "end_dim"),
                              {"start_dim": 0, "end_dim": -1})
            start, end = bound["start_dim"], bound["end_dim"]
        start, end = start % rank, end % rank
        if axis < start:
            return axis
        if axis > end:
            return axis - (end - start)
        return None  # merged with its neighbours
    if target in _RESHAPES:
        if axis == rank - 1 and out_shape[-1] == in_shape[-1]:
            return len(out_shape) - 1
        return None
    return None


def layout_chain(start: Node, stop: Node | None = None) -> list[Node]:
    """The layout ops from ``start`` forward, each the sole reader of the one before (the
    first reading ``start``), up to but not including ``stop`` or the first other op."""
    chain, current = [], start
    while True:
        user = sole_user(current)
        if user is None or user is stop or not is_layout(user) or user.args[0] is not current:
            return chain
        chain.append(user)
        current = user


def map_axis_through(chain: list[Node], axis: int) -> int | None:
    """:func:`map_axis` through every op of ``chain``, in order."""
    for node in chain:
        if axis is None:
            return None
        axis = map_axis(node, axis)
    return axis


def replay(gm: GraphModule, chain: list[Node], data: Node) -> Node:
    """The ops of ``chain`` applied again, in order, to ``data`` (insert where the caller
    says); each copy keeps the recorded shape of the op it copies."""
    current = data
    for node in chain:
        current_args = (current, *node.args[1:])
        copied = gm.graph.create_node(node.op, node.target, current_args, dict(node.kwargs))
        for key in ("tensor_meta", "type"):
            if key in node.meta:
                copied.meta[key] = node.meta[key]
        current = copied
    return current


CONCATS = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}


def channel_concat(gm: GraphModule, node: Node) -> list[Any] | None:
    """The items of ``node`` if it concatenates ``N×C×…`` tensors along the channel axis 1."""
    if node.op != "call_function" or node.target not in CONCATS:
        return None
    args = bind_args(node, ("tensors", "dim"), {"dim": 0})
    items, dim, shape = args["tensors"], args["dim"], shape_of(node)
    if not isinstance(items, (list, tuple)) or shape is None or len(shape) < 2:
        return None
    if not isinstance(dim, int) or dim % len(shape) != 1:
        return None
    return list(items)
