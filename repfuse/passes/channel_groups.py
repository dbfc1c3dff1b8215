"""Channel dependency groups: which channels of a graph must be removed together, what value
each carries, and who reads it.

A *region* is a set of tensors whose channels correspond through the ops between them: a
residual add joins its addends channel by channel, a concatenation lays its inputs side by side,
a split cuts one into pieces, BN and activations keep channels, a grouped conv ties each group's
inputs to its outputs, and in attention the Q/K/V projections, the scores and the output of one
*head* go together. A region ends at the dense conv/linear layers that write it (*producers*)
and read it (*readers*), and at anything else that reads it (a LayerNorm, the model output):
those *keep* every channel they touch.

Each channel of each tensor is a *slot*; the ops above make slots equal (union-find), and an
equivalence class is one *channel* of the region: removed from every tensor at once, or kept.
A class may go when every reader either ignores it (an all-zero weight column) or reads a value
it can take into its bias: a value that is the same everywhere and on every input (a
*constant*), read by a linear layer or a conv that does not pad with zeros (or the value is 0).
Constants start at producer filters that are all zero (the channel is the bias), BN/scale with
a zero scale, or grouped conv filters that are all zero, and flow through pointwise ops
(``f(b)``), pools, adds of constants, and attention (``softmax(·) V`` is ``V`` when ``V`` is the
same for every token). Where a value varies, the reason is kept, to say why a class stays.

Layouts: the channels of a tensor may lie on one axis (``N×C×H×W``, or ``N×L×C`` tokens) or on
several (``N×heads×L×d`` after a head split): a *layout* lists the ``(axis, size)`` pairs whose
row-major flat index is the channel number, most significant first.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from repfuse.algebra import FOLD_DTYPE
from repfuse.channels import (
    all_normal,
    grouped_output_constants,
    zero_channels,
    zero_output_channels,
)
from repfuse.graph import (
    LayerView,
    batchnorm_view,
    bind_args,
    describe,
    fetch_attr,
    layer_view,
    read_count,
    shape_of,
)
from repfuse.lift import CONCATS, affine_op

Layout = tuple[tuple[int, int], ...]  # ((axis, size), ...), most significant first

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Hardshrink, nn.Softshrink,
    nn.LogSigmoid,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, torch.clamp, torch.clip, torch.abs,
    torch.neg, operator.neg, torch.square, torch.exp, torch.erf,
}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "abs", "neg", "square",
                       "exp", "erf", "contiguous"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_ARITH = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
          operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}
_ARITH_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze,
                      torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_PERMUTE_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes, torch.t}
_PERMUTE_METHODS = {"transpose", "permute", "swapaxes", "t"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_SOFTMAX = {torch.softmax, F.softmax}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm}
_SPLITS = {torch.split: "split", torch.chunk: "chunk", torch.unbind: "unbind"}
_SPLIT_METHODS = {"split": "split", "chunk": "chunk", "unbind": "unbind"}
# Reads of a tensor's metadata rather than its values.
_META_METHODS = {"size", "dim"}
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """Why a channel's value varies: it comes from ``origin``; ``via`` is the join (an add)
    where a constant met it, ``note`` a sentence when the op itself made it vary."""

    origin: Node
    via: Node | None = None
    note: str = ""


@dataclass
class Values:
    """Per flat channel of one tensor: constant or not, the constant (float64), and why not."""

    const: Tensor  # bool
    value: Tensor  # float64, 0 where not constant
    why: list[Live | None]

    @classmethod
    def live(cls, channels: int, reason: Live) -> Values:
        return cls(torch.zeros(channels, dtype=torch.bool),
                   torch.zeros(channels, dtype=FOLD_DTYPE), [reason] * channels)

    @classmethod
    def constants(cls, const: Tensor, value: Tensor, reason: Live) -> Values:
        const = const.to(torch.bool).cpu()
        value = torch.where(const, value.to(FOLD_DTYPE).cpu(), torch.zeros((), dtype=FOLD_DTYPE))
        return cls(const, value, [None if c else reason for c in const.tolist()])

    def copy(self) -> Values:
        return Values(self.const.clone(), self.value.clone(), list(self.why))

    def make_constant(self, mask: Tensor, value: Tensor) -> None:
        """Mark the channels of ``mask`` constant, holding ``value`` there."""
        self.const = self.const | mask
        self.value = torch.where(mask, value, self.value)
        self.why = [None if m else w for m, w in zip(mask.tolist(), self.why, strict=True)]


# --- layouts ---------------------------------------------------------------------------------


def flat_size(layout: Layout) -> int:
    return math.prod(size for _, size in layout)


def _axis(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def probe_tensor(values: Tensor, layout: Layout, rank: int, dtype: torch.dtype) -> Tensor:
    """``values`` (one per flat channel) as a tensor of ``rank`` axes: the layout's axes hold
    the channels, every other axis has size 1 (so ops broadcast it)."""
    sizes = [size for _, size in layout]
    axes = [axis for axis, _ in layout]
    t = values.to(dtype).reshape(sizes)
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    t = t.permute(order).contiguous()
    shape = [1] * rank
    for axis, size in layout:
        shape[axis] = size
    return t.reshape(shape)


def read_probe(t: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`probe_tensor` on an op's result: per flat channel, whether the
    value is the same along every other axis, and that value (float64)."""
    axes = [axis for axis, _ in layout]
    others = [a for a in range(t.dim()) if a not in axes]
    t64 = t.detach().to(FOLD_DTYPE)
    high = t64.amax(dim=others, keepdim=True) if others else t64
    low = t64.amin(dim=others, keepdim=True) if others else t64
    same = (high == low) & torch.isfinite(high)
    order = sorted(range(len(axes)), key=lambda i: axes[i])  # axis order -> significance
    inverse = [order.index(i) for i in range(len(axes))]
    squeeze_shape = [t.shape[a] for a in sorted(axes)]

    def flat(x: Tensor) -> Tensor:
        return x.reshape(squeeze_shape).permute(inverse).reshape(-1)

    return flat(same), flat(high)


def reshape_groups(src: Sequence[int], dst: Sequence[int]
                   ) -> list[tuple[list[int], list[int]]] | None:
    """Pair the axes of a reshape from ``src`` to ``dst`` into groups of equal element count
    (each group is a run of axes on either side), or None if the sizes do not pair up."""
    a = [1]
    for size in src:
        a.append(a[-1] * size)
    b = [1]
    for size in dst:
        b.append(b[-1] * size)
    if a[-1] != b[-1] or 0 in src:
        return None
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        i2, j2 = i, j
        if i2 < len(src):
            i2 += 1
        else:
            j2 += 1
        while a[i2] != b[j2]:
            if a[i2] < b[j2]:
                if i2 == len(src):
                    return None
                i2 += 1
            else:
                if j2 == len(dst):
                    return None
                j2 += 1
        groups.append((list(range(i, i2)), list(range(j, j2))))
        i, j = i2, j2
    return groups


def map_through_reshape(layout: Layout, src: Sequence[int], dst: Sequence[int]
                        ) -> Layout | str:
    """The layout of a reshape's result (shape ``dst``) whose input (shape ``src``) has
    ``layout``; a reason when the reshape mixes channels with other axes or reorders them."""
    groups = reshape_groups(src, dst)
    if groups is None:
        return "its shapes do not pair up"
    position = {axis: i for i, (axis, _) in enumerate(layout)}
    pieces: list[tuple[int, Layout]] = []  # (significance of the first entry, new entries)
    covered = 0
    for src_axes, dst_axes in groups:
        channel = [a for a in src_axes if a in position]
        if not channel:
            continue
        if any(src[a] > 1 and a not in position for a in src_axes):
            return "it merges channels with another axis"
        order = [position[a] for a in channel]
        if order != list(range(order[0], order[0] + len(order))):
            return "it flattens channel axes out of order (a channel shuffle)"
        entries = tuple((a, dst[a]) for a in dst_axes if dst[a] > 1)
        if not entries and flat_size(tuple((a, src[a]) for a in channel)) > 1:
            return "its channel axes vanish"
        if not entries:
            entries = ((dst_axes[0], 1),) if dst_axes else ()
        covered += len(channel)
        pieces.append((order[0], entries))
    if covered != len(layout):
        return "its channel axes do not pair up"
    pieces.sort()
    return tuple(entry for _, entries in pieces for entry in entries)


# --- rules: how an op relates the channels of its tensors -------------------------------------


class Rule:
    """How ``node`` relates the channels of its output to those of its data inputs."""

    node: Node

    def inputs(self) -> list[Node]:
        """The data inputs that may carry the output's channels."""
        raise NotImplementedError

    def layouts(self, known: dict[Node, Layout], probe: Callable[[Node], Layout | None]
                ) -> dict[Node, Layout] | str:
        """Layouts of the output and of every member input, from those ``known`` (at least one);
        a reason when the op does not keep channels apart."""
        raise NotImplementedError

    def links(self, layouts: dict[Node, Layout]) -> Iterable[tuple[Node, Tensor, Node, Tensor]]:
        """Pairs of equal slots: ``(node_a, flat_a, node_b, flat_b)``."""
        raise NotImplementedError

    def value(self, layouts: dict[Node, Layout], values: dict[Node, Values]) -> Values:
        raise NotImplementedError


def _aligned_axis(axis: int, out_rank: int, in_rank: int) -> int:
    return axis - (out_rank - in_rank)


def _broadcast_layouts(node: Node, members: list[Node], known: dict[Node, Layout]
                       ) -> dict[Node, Layout] | str:
    """Layouts of ``node`` and its broadcast operands ``members`` (right-aligned), from any one
    known; operands of size 1 on the channel axes are not members (left out)."""
    out_shape = shape_of(node)
    if out_shape is None:
        return "its shape is unknown"
    rank = len(out_shape)
    out_layout = known.get(node)
    if out_layout is None:
        for member in members:
            if member in known:
                shape = shape_of(member)
                shift = rank - len(shape)
                out_layout = tuple((a + shift, s) for a, s in known[member])
                break
    if out_layout is None:
        return "no operand has a known layout"
    result = {node: out_layout}
    for member in members:
        shape = shape_of(member)
        if shape is None:
            return f"the shape of {member.name} is unknown"
        mapped = []
        for axis, size in out_layout:
            a = _aligned_axis(axis, rank, len(shape))
            here = shape[a] if a >= 0 else 1
            if here == size:
                mapped.append((a, size))
            elif here == 1:
                mapped.append(None)
            else:
                return f"{member.name} does not line up with the channels"
        if all(m is not None for m in mapped):
            result[member] = tuple(mapped)
        elif any(m is not None for m in mapped):
            return f"{member.name} broadcasts over only some channel axes"
    return result


def _identity_links(node: Node, members: Iterable[Node], layouts: dict[Node, Layout]):
    channels = flat_size(layouts[node])
    everything = torch.arange(channels)
    for member in members:
        if member in layouts:
            yield node, everything, member, everything


def _combine_live(node: Node, parts: list[Values], channels: int) -> list[Live | None]:
    """Why each channel of a join (add, cat along another axis) varies: a constant meeting a
    varying operand names the join and where the variation comes from."""
    why: list[Live | None] = []
    for c in range(channels):
        reasons = [p.why[c] for p in parts if p.why[c] is not None]
        if not reasons:
            why.append(None)
            continue
        first = reasons[0]
        some_const = any(p.why[c] is None for p in parts)
        why.append(Live(first.origin, node, first.note) if some_const and first.via is None
                   else first)
    return why


@dataclass
class Pointwise(Rule):
    """An op applied to each element on its own (activation, BN, scale/bias, add/mul of
    activations, dropout in eval mode), or along non-channel axes only (pooling, softmax over
    tokens). ``kind``: 'unary' | 'affine' | 'binary' | 'pool' | 'softmax'."""

    node: Node
    members: list[Node]
    kind: str
    gm: GraphModule
    arith: str = ""  # for 'binary': add | sub | mul | div
    padded_mean: bool = False  # a pool averaging zero padding into border windows
    softmax_dim: int | None = None

    def inputs(self) -> list[Node]:
        return self.members

    def layouts(self, known, probe):
        result = _broadcast_layouts(self.node, self.members, known)
        if isinstance(result, str):
            return result
        rank = len(shape_of(self.node))
        channel_axes = {a for a, _ in result[self.node]}
        if self.kind == "pool" and any(a >= 2 for a in channel_axes):
            return "it pools over a channel axis"
        if self.kind == "softmax" and self.softmax_dim is not None and _axis(
                self.softmax_dim, rank) in channel_axes:
            return "it normalizes across channels"
        if self.kind != "binary" and self.members[0] not in result:
            return "its input broadcasts over the channels"
        return self._constants_sliceable(result[self.node], rank) or result

    def _constants_sliceable(self, layout: Layout, rank: int) -> str | None:
        """Why a constant operand cannot be cut to the kept channels, or None."""
        if self.node.target in (F.batch_norm, torch.ops.aten.batch_norm.default):
            return None if len(layout) == 1 and layout[0][0] == 1 else (
                "it normalizes axis 1, not the channels")
        for attr in self.node.all_input_nodes:
            if attr.op != "get_attr":
                continue
            value = fetch_attr(self.gm, attr.target)
            if not isinstance(value, Tensor):
                continue
            spans = [(a, s) for a, s in layout
                     if 0 <= a - (rank - value.dim()) and value.shape[a - (rank - value.dim())] > 1]
            if spans and len(layout) > 1:
                return "a constant operand spans several channel axes"
        if self.node.op == "call_module":
            module = self.gm.get_submodule(self.node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and layout[0][0] != 1:
                return "it normalizes axis 1, not the channels"
            if isinstance(module, nn.PReLU) and module.num_parameters > 1 and (
                    len(layout) != 1 or layout[0][0] != 1):
                return "its per-channel slopes are on axis 1, not the channels"
        return None

    def links(self, layouts):
        return _identity_links(self.node, self.members, layouts)

    def value(self, layouts, values):
        layout = layouts[self.node]
        channels = flat_size(layout)
        present = [m for m in self.members if m in layouts]
        parts = [values[m] for m in present]
        all_const = torch.ones(channels, dtype=torch.bool)
        for part in parts:
            all_const &= part.const
        if self.kind == "pool":
            const = all_const.clone()
            if self.padded_mean:
                const &= parts[0].value.eq(0)
            why = list(parts[0].why)
            note = (f"the zero-padded average pool {describe(self.node, self.gm)} makes it "
                    "uneven at the borders")
            for c in range(channels):
                if all_const[c] and not const[c]:
                    why[c] = Live(self.node, None, note)
            return Values(const, torch.where(const, parts[0].value, 0.0).to(FOLD_DTYPE), why)
        if self.kind == "softmax":
            n = shape_of(self.node)[_axis(self.softmax_dim, len(shape_of(self.node)))]
            return Values(all_const, torch.where(all_const, torch.full(
                (channels,), 1.0 / n, dtype=FOLD_DTYPE), 0.0), list(parts[0].why))
        if self.kind == "binary" and len(present) < len(self.members):
            outside = next(m for m in self.members if m not in layouts)
            all_const = torch.zeros(channels, dtype=torch.bool)  # a broadcast activation
            reason = Live(outside, self.node)
            return self._zero_product(Values.live(channels, reason), parts, layouts)
        const = all_const.clone()
        result = torch.zeros(channels, dtype=FOLD_DTYPE)
        evaluated = self._evaluate(layouts, values, all_const)
        if evaluated is not None:
            same, out = evaluated
            const &= same
            result = torch.where(const, out, torch.zeros((), dtype=FOLD_DTYPE))
        else:
            const[:] = False
        why = _combine_live(self.node, parts, channels)
        note = f"{describe(self.node, self.gm)} adds something that varies along another axis"
        for c in range(channels):
            if why[c] is None and not const[c]:
                why[c] = Live(self.node, None, note)
        out = Values(const, result, why)
        if self.kind == "affine":
            out = self._zero_scale(out, layouts, parts[0])
        if self.kind == "binary" and self.arith == "mul":
            out = self._zero_product(out, parts, layouts)
        return out

    def _zero_product(self, out: Values, parts: list[Values], layouts) -> Values:
        """``0 · x = 0`` for a varying ``x``: a product with a constant-zero factor."""
        if self.arith != "mul":
            return out
        zero = torch.zeros_like(out.const)
        for part in parts:
            zero |= part.const & part.value.eq(0)
        if bool(zero.any()):
            out.make_constant(zero, torch.zeros((), dtype=FOLD_DTYPE))
        return out

    def _zero_scale(self, out: Values, layouts, part: Values) -> Values:
        """An affine op whose scale is 0 on a channel outputs its shift there, whatever the
        input (BN with ``γ = 0``: network slimming)."""
        layout = layouts[self.node]
        if len(layout) != 1:
            return out
        op = affine_op(self.gm, self.node)
        if op is None or isinstance(op, str):
            return out
        affine = op.along(layout[0][0], shape_of(self.members[0]), flat_size(layout))
        if isinstance(affine, str):
            return out
        zero = affine.scale.eq(0) & ~out.const
        if bool(zero.any()):
            out.make_constant(zero, affine.shift)
        return out

    def _evaluate(self, layouts, values, all_const) -> tuple[Tensor, Tensor] | None:
        """Run the op on tensors holding each member's constants (other axes of size 1)."""
        if not bool(all_const.any()):
            return None
        layout = layouts[self.node]
        rank = len(shape_of(self.node))
        substitutes = {}
        for member in self.members:
            if member not in layouts:
                return None
            member_rank = len(shape_of(member))
            dtype = getattr(member.meta.get("tensor_meta"), "dtype", FOLD_DTYPE)
            substitutes[member] = probe_tensor(values[member].value, layouts[member],
                                               member_rank, dtype)
        try:
            with torch.no_grad():
                result = evaluate(self.gm, self.node, substitutes)
        except Exception:  # an op that cannot run on the probe: treat its result as varying
            return None
        if not isinstance(result, Tensor) or result.dim() != rank:
            return None
        return read_probe(result, layout)


def evaluate(gm: GraphModule, node: Node, substitutes: dict[Node, Tensor]) -> Any:
    """Run ``node``'s op with ``substitutes`` for its data inputs and the values of its
    ``get_attr`` inputs."""

    def arg(value):
        if isinstance(value, Node):
            if value in substitutes:
                return substitutes[value]
            if value.op == "get_attr":
                return fetch_attr(gm, value.target)
            raise ValueError(f"{value.name} has no value")
        return value

    args = torch.fx.node.map_aggregate(node.args, arg)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, arg)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


@dataclass
class Relabel(Rule):
    """A layout op: the same channels, the same flat numbers, on other axes."""

    node: Node
    source: Node

    def inputs(self):
        return [self.source]

    def links(self, layouts):
        return _identity_links(self.node, [self.source], layouts)

    def value(self, layouts, values):
        return values[self.source].copy()


@dataclass
class Reshape(Relabel):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: channels regrouped along axes."""

    def layouts(self, known, probe):
        src, dst = shape_of(self.source), shape_of(self.node)
        if src is None or dst is None:
            return "its shapes are unknown"
        if self.source in known:
            out = map_through_reshape(known[self.source], src, dst)
            return out if isinstance(out, str) else {self.source: known[self.source],
                                                     self.node: out}
        back = map_through_reshape(known[self.node], dst, src)
        return back if isinstance(back, str) else {self.source: back,
                                                   self.node: known[self.node]}


@dataclass
class Permute(Relabel):
    """transpose/permute: output axis ``k`` is input axis ``order[k]``; channels keep their
    flat numbers."""

    order: tuple[int, ...]

    def layouts(self, known, probe):
        if self.source in known:
            inverse = {src: k for k, src in enumerate(self.order)}
            layout = known[self.source]
            return {self.source: layout,
                    self.node: tuple((inverse[a], s) for a, s in layout)}
        layout = known[self.node]
        return {self.node: layout, self.source: tuple((self.order[a], s) for a, s in layout)}


@dataclass
class Reduce(Rule):
    """mean/sum/amax/amin over non-channel axes."""

    node: Node
    source: Node
    dims: tuple[int, ...]
    keepdim: bool
    kind: str

    def inputs(self):
        return [self.source]

    def layouts(self, known, probe):
        rank = len(shape_of(self.source))
        dims = sorted({_axis(d, rank) for d in self.dims})

        def forward(axis: int) -> int:
            return axis if self.keepdim else axis - sum(1 for d in dims if d < axis)

        if self.source in known:
            layout = known[self.source]
            if any(a in dims for a, _ in layout):
                return "it reduces across channels"
            return {self.source: layout, self.node: tuple((forward(a), s) for a, s in layout)}
        kept = [a for a in range(rank) if self.keepdim or a not in dims]
        layout = known[self.node]
        back = tuple((kept[a] if not self.keepdim else a, s) for a, s in layout)
        if any(a in dims for a, _ in back):
            return "it reduces across channels"
        return {self.node: layout, self.source: back}

    def links(self, layouts):
        return _identity_links(self.node, [self.source], layouts)

    def value(self, layouts, values):
        part = values[self.source]
        value = part.value.clone()
        if self.kind == "sum":
            shape = shape_of(self.source)
            rank = len(shape)
            value = value * math.prod(shape[_axis(d, rank)] for d in set(self.dims))
        return Values(part.const.clone(), value, list(part.why))


@dataclass
class Concat(Rule):
    """torch.cat: along a channel axis, inputs sit side by side; along another axis, channel
    ``c`` of every input is channel ``c`` of the result."""

    node: Node
    items: list[Node]
    dim: int

    def inputs(self):
        return self.items

    def _along_channels(self, layout: Layout, rank: int) -> bool:
        return any(a == _axis(self.dim, rank) for a, _ in layout)

    def layouts(self, known, probe):
        shape = shape_of(self.node)
        if shape is None or any(shape_of(i) is None for i in self.items):
            return "its shapes are unknown"
        rank = len(shape)
        dim = _axis(self.dim, rank)
        seed = next(n for n in [self.node, *self.items] if n in known)
        layout = known[seed]
        if self._along_channels(layout, rank):
            if len(layout) != 1:
                return "it concatenates along one of several channel axes"
            result = {self.node: ((dim, shape[dim]),)}
            for item in self.items:
                result[item] = ((dim, shape_of(item)[dim]),)
            return result
        result = {n: layout for n in [self.node, *self.items]}
        return result

    def offsets(self, layouts) -> list[int]:
        rank = len(shape_of(self.node))
        if not self._along_channels(layouts[self.node], rank):
            return [0] * len(self.items)
        starts, total = [], 0
        for item in self.items:
            starts.append(total)
            total += shape_of(item)[_axis(self.dim, rank)]
        return starts

    def links(self, layouts):
        for item, start in zip(self.items, self.offsets(layouts), strict=True):
            channels = flat_size(layouts[item])
            yield self.node, torch.arange(start, start + channels), item, torch.arange(channels)

    def value(self, layouts, values):
        rank = len(shape_of(self.node))
        if self._along_channels(layouts[self.node], rank):
            const = torch.cat([values[i].const for i in self.items])
            value = torch.cat([values[i].value for i in self.items])
            why = [w for i in self.items for w in values[i].why]
            return Values(const, value, why)
        parts = [values[i] for i in self.items]
        const = parts[0].const.clone()
        for part in parts[1:]:
            const &= part.const & part.value.eq(parts[0].value)
        value = torch.where(const, parts[0].value, torch.zeros((), dtype=FOLD_DTYPE))
        why = _combine_live(self.node, parts, len(const))
        for c in range(len(const)):
            if why[c] is None and not const[c]:
                why[c] = Live(self.node, None, "its inputs hold different constants")
        return Values(const, value, why)


@dataclass
class Piece(Rule):
    """One piece of a tensor: ``split``/``chunk``/``unbind`` then ``[i]``, or ``x[i]``,
    ``x[:, a:b]``. Along a channel axis, its channels are a run of the source's."""

    node: Node
    source: Node
    dim: int
    start: int  # first index along dim
    length: int  # extent along dim in the source; 0 for unbind (the axis disappears)
    split: Node | None  # the split/chunk/unbind node, when there is one

    def inputs(self):
        return [self.source]

    def layouts(self, known, probe):
        src = shape_of(self.source)
        if src is None or shape_of(self.node) is None:
            return "its shapes are unknown"
        rank = len(src)
        dim = _axis(self.dim, rank)
        removed = self.length == 0

        def forward(axis: int) -> int:
            return axis - 1 if removed and axis > dim else axis

        def backward(axis: int) -> int:
            return axis + 1 if removed and axis >= dim else axis

        if self.source in known:
            layout = known[self.source]
        elif probe(self.source) is not None:
            layout = probe(self.source)
        else:
            out = known[self.node]
            layout = tuple((backward(a), s) for a, s in out)
            if removed:
                return "an unbind piece does not show the source's channel layout"
        axes = [a for a, _ in layout]
        if dim not in axes:
            return {self.source: layout, self.node: tuple((forward(a), s) for a, s in layout)}
        if removed:
            if axes[0] != dim:
                return "it selects along a channel axis that is not the outermost"
            return {self.source: layout,
                    self.node: tuple((forward(a), s) for a, s in layout[1:])}
        if len(layout) != 1:
            return "it cuts one of several channel axes"
        return {self.source: layout, self.node: ((dim, self.length),)}

    def _offset(self, layouts) -> int:
        layout = layouts[self.source]
        rank = len(shape_of(self.source))
        dim = _axis(self.dim, rank)
        axes = [a for a, _ in layout]
        if dim not in axes:
            return 0
        if self.length == 0:
            return self.start * flat_size(layout[1:])
        return self.start

    def links(self, layouts):
        channels = flat_size(layouts[self.node])
        start = self._offset(layouts)
        if self._within(layouts):
            yield self.node, torch.arange(channels), self.source, torch.arange(start,
                                                                              start + channels)
        else:
            everything = torch.arange(channels)
            yield self.node, everything, self.source, everything

    def _within(self, layouts) -> bool:
        rank = len(shape_of(self.source))
        return _axis(self.dim, rank) in [a for a, _ in layouts[self.source]]

    def value(self, layouts, values):
        part = values[self.source]
        channels = flat_size(layouts[self.node])
        if self._within(layouts):
            start = self._offset(layouts)
            window = slice(start, start + channels)
            return Values(part.const[window].clone(), part.value[window].clone(),
                          part.why[window])
        return part.copy()


@dataclass
class GroupedConv(Rule):
    """A conv with ``groups > 1``: each group's outputs read only that group's inputs, so the
    two go together (a depthwise conv: one channel in, its outputs)."""

    node: Node
    layer: LayerView
    gm: GraphModule

    def inputs(self):
        return [self.layer.input]

    def layouts(self, known, probe):
        out = ((1, self.layer.out_channels),)
        inp = ((1, self.layer.in_channels),)
        if known.get(self.node, out) != out or known.get(self.layer.input, inp) != inp:
            return "its channels are not on axis 1"
        return {self.node: out, self.layer.input: inp}

    def links(self, layouts):
        groups = self.layer.groups
        out_per, in_per = self.layer.out_channels // groups, self.layer.in_channels // groups
        for g in range(groups):
            outs = torch.arange(g * out_per, (g + 1) * out_per)
            ins = torch.arange(g * in_per, (g + 1) * in_per)
            yield self.node, outs, self.node, outs[:1].expand(out_per)
            yield self.node, outs[:1].expand(in_per), self.layer.input, ins

    def value(self, layouts, values):
        part = values[self.layer.input]
        layer = self.layer
        const, value = grouped_output_constants(
            layer.weight, layer.bias, part.const, part.value, groups=layer.groups,
            pads_with_zeros=layer.pads_with_zeros())
        out_per = layer.out_channels // layer.groups
        in_per = layer.in_channels // layer.groups
        dead = zero_output_channels(layer.weight, layer.groups).cpu()
        note = (f"{describe(self.node, self.gm)} pads with zeros, which makes a constant "
                "uneven at the borders")
        why: list[Live | None] = []
        for o in range(layer.out_channels):
            if const[o]:
                why.append(None)
                continue
            group = o // out_per
            inputs = range(group * in_per, (group + 1) * in_per)
            live = next((part.why[i] for i in inputs if part.why[i] is not None), None)
            why.append(live if live is not None and not dead[o] else Live(self.node, None, note))
        return Values(const.cpu(), value.cpu(), why)


@dataclass
class MatMul(Rule):
    """``A @ B`` batched over attention heads: everything of head ``h`` (its queries, keys,
    scores, values and output) is one channel group. ``softmax(S) @ V`` equals ``V`` on every
    head and channel where ``V`` is the same for every token (the softmax rows sum to 1)."""

    node: Node
    left: Node
    right: Node
    gm: GraphModule
    stochastic_left: bool  # left is a softmax over its last axis
    attention: bool = False  # scaled_dot_product_attention(q, k, v): left = q, right = v
    key: Node | None = None

    def inputs(self):
        return [n for n in (self.left, self.key, self.right) if n is not None]

    def layouts(self, known, probe):
        shapes = {n: shape_of(n) for n in [self.node, *self.inputs()]}
        if any(s is None or len(s) < 3 for s in shapes.values()):
            return "it is not a batched product of known shapes"
        found = {n: known.get(n) or probe(n) for n in self.inputs()}
        rank = len(shapes[self.node])
        heads: set[tuple[int, int]] = set()
        for n, layout in found.items():
            if layout is None:
                continue
            shift = rank - len(shapes[n])
            for axis, size in layout:
                if axis < len(shapes[n]) - 2:
                    heads.add((axis + shift, size))
        if len(heads) != 1:
            return "its operands share no single head axis"
        head_axis, head_count = next(iter(heads))
        if head_count < 2:
            return "it has one head"
        result: dict[Node, Layout] = {}
        for n, layout in found.items():
            shape = shapes[n]
            local = head_axis - (rank - len(shape))
            if layout is None:
                if local >= 0 and shape[local] == head_count:
                    return f"{n.name} has heads but no known channel layout"
                continue
            if local < 0 or layout[0] != (local, head_count):
                return "the head axis is not the outermost channel axis of every operand"
            result[n] = layout
        out_layout: Layout = ((head_axis, head_count),)
        right = result.get(self.right)
        last = len(shapes[self.right]) - 1
        if right is not None and any(a == last for a, _ in right):
            out_layout = out_layout + ((rank - 1, shapes[self.node][-1]),)
        if known.get(self.node, out_layout) != out_layout:
            return "its output's channel layout does not match its operands'"
        result[self.node] = out_layout
        return result

    def links(self, layouts):
        head_count = layouts[self.node][0][1]
        for n in [self.node, *self.inputs()]:
            if n not in layouts:
                continue
            per_head = flat_size(layouts[n]) // head_count
            for h in range(head_count):
                slots = torch.arange(h * per_head, (h + 1) * per_head)
                yield self.node, torch.full_like(slots, h * (
                    flat_size(layouts[self.node]) // head_count)), n, slots

    def value(self, layouts, values):
        out_layout = layouts[self.node]
        channels = flat_size(out_layout)
        head_count = out_layout[0][1]
        per_head = channels // head_count
        right = values.get(self.right) if self.right in layouts else None
        left = values.get(self.left) if self.left in layouts else None
        const = torch.zeros(channels, dtype=torch.bool)
        value = torch.zeros(channels, dtype=FOLD_DTYPE)
        why: list[Live | None] = []
        right_last = right is not None and len(out_layout) > 1
        for c in range(channels):
            h = c // per_head
            reason = None
            if right is not None and right_last:
                right_per = len(right.const) // head_count
                j = c - h * per_head
                slot = h * right_per + j
                if right.const[slot] and (self.stochastic_left or right.value[slot] == 0):
                    const[c] = True
                    value[c] = right.value[slot]
                else:
                    reason = right.why[slot] or Live(self.left, None, "the attention weights "
                                                     "do not sum to one")
            else:
                source = left if left is not None else right
                reason = (source.why[0] if source is not None and source.why else None) or Live(
                    self.node, None, "it is a product of activations")
            why.append(None if const[c] else reason)
        return Values(const, value, why)


@dataclass
class Layer:
    """A dense conv, transposed conv or linear layer at the edge of a region."""

    node: Node
    view: LayerView

    @property
    def in_axis(self) -> int:
        if self.view.kind == "linear":
            return len(shape_of(self.view.input)) - 1
        return 1

    @property
    def out_axis(self) -> int:
        if self.view.kind == "linear":
            return len(shape_of(self.node)) - 1
        return 1

    @property
    def transposed(self) -> bool:
        return self.view.kind == "conv_transpose"

    def _zero_channels(self) -> tuple[Tensor, Tensor]:
        return weight_fact(self.view.weight, ("zero", self.view.groups, self.transposed),
                           lambda w: tuple(m.cpu() for m in zero_channels(
                               w, self.view.groups, self.transposed)))

    def zero_rows(self) -> Tensor:
        return self._zero_channels()[0]

    def zero_columns(self) -> Tensor:
        return self._zero_channels()[1]

    def values(self) -> Values:
        const = self.zero_rows()
        bias = self.view.bias
        value = torch.zeros(len(const), dtype=FOLD_DTYPE) if bias is None else (
            bias.detach().to(FOLD_DTYPE).cpu())
        return Values.constants(const, value, Live(self.node))


# What a weight's values tell (all normal? which filters are zero?), per tensor, for as long as
# the tensor is not changed in place: a layer is visited several times during a pipeline, and
# scanning a 100M-entry weight costs a tenth of a second. Keyed by identity (tensors compare
# elementwise); an entry goes with its tensor.
_FACTS: dict[int, tuple[weakref.ref, int, dict]] = {}


def weight_fact(weight: Tensor, key: Hashable, compute: Callable[[Tensor], Any]) -> Any:
    """``compute(weight)``, remembered for ``weight`` under ``key`` until it changes."""
    entry = _FACTS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        ident = id(weight)
        entry = (weakref.ref(weight, lambda _: _FACTS.pop(ident, None)), weight._version, {})
        _FACTS[ident] = entry
    facts = entry[2]
    if key not in facts:
        facts[key] = compute(weight)
    return facts[key]


def weight_all_normal(weight: Tensor | None) -> bool:
    """:func:`repfuse.channels.all_normal`, remembered per tensor."""
    if weight is None:
        return True
    return weight_fact(weight, "all_normal", all_normal)


def dense_layer(gm: GraphModule, node: Node) -> Layer | None:
    """``node`` as a layer whose channels can be sliced freely (one group), or None."""
    view = layer_view(gm, node)
    if view is None or view.groups != 1:
        return None
    if shape_of(node) is None or shape_of(view.input) is None:
        return None
    return Layer(node, view)


# --- which op is which ------------------------------------------------------------------------


def _data_nodes(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def rule_for(gm: GraphModule, node: Node) -> Rule | str | None:
    """The rule of the op computing ``node``; None for a dense layer or an op that is not a
    channel op (a reason string when it looks like one but cannot be handled)."""
    if shape_of(node) is None:
        return None
    if node.op == "call_module":
        return _module_rule(gm, node)
    if node.op == "call_function":
        return _function_rule(gm, node)
    if node.op == "call_method":
        return _method_rule(gm, node)
    return None


def _single_input(node: Node) -> Node | None:
    data = _data_nodes(node)
    if len(data) != 1 or not node.args or node.args[0] is not data[0]:
        return None
    return data[0]


def _module_rule(gm: GraphModule, node: Node) -> Rule | str | None:
    module = gm.get_submodule(node.target)
    data = _single_input(node)
    if data is None or node.kwargs:
        return None
    view = layer_view(gm, node)
    if view is not None:
        if view.kind == "conv" and view.groups > 1:
            return GroupedConv(node, view, gm)
        return None
    bn = batchnorm_view(gm, node)
    if bn is not None:
        if bn.training or bn.running_mean is None:
            return None
        return Pointwise(node, [data], "affine", gm)
    if isinstance(module, _DROPOUT_MODULES):
        return Pointwise(node, [data], "unary", gm) if not module.training else None
    if isinstance(module, _ACTIVATION_MODULES):
        return Pointwise(node, [data], "unary", gm)
    if isinstance(module, _POOL_MODULES):
        padded = (isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
                  and _any_padding(module.padding) and module.count_include_pad)
        return Pointwise(node, [data], "pool", gm, padded_mean=padded)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim is not None:
        return Pointwise(node, [data], "softmax", gm, softmax_dim=module.dim)
    if isinstance(module, (nn.Flatten, nn.Unflatten)):
        return Reshape(node, data)
    return None


def _any_padding(padding) -> bool:
    values = padding if isinstance(padding, (list, tuple)) else (padding,)
    return any(p != 0 for p in values)


def _function_rule(gm: GraphModule, node: Node) -> Rule | str | None:
    target = node.target
    if target is operator.getitem:
        return _piece_rule(node)
    view = layer_view(gm, node)
    if view is not None:
        if view.kind == "conv" and view.groups > 1:
            return GroupedConv(node, view, gm)
        return None
    if target in _ARITH:
        return _arith_rule(gm, node, _ARITH[target])
    if target in CONCATS:
        args = bind_args(node, ("tensors", "dim"), {"dim": 0})
        items = args["tensors"]
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, Node) for i in items):
            return None
        if not isinstance(args["dim"], int):
            return None
        return Concat(node, list(items), args["dim"])
    if target in (F.batch_norm, torch.ops.aten.batch_norm.default):
        bn = batchnorm_view(gm, node)
        if bn is None or bn.training or bn.running_mean is None:
            return None
        return Pointwise(node, [bn.input], "affine", gm)
    if target in _POOL_FUNCTIONS:
        data = _single_input(node)
        if data is None:
            return None
        padded = False
        if target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            args = bind_args(node, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                    "count_include_pad"), {"padding": 0,
                                                           "count_include_pad": True})
            padded = _any_padding(args["padding"]) and args["count_include_pad"]
        return Pointwise(node, [data], "pool", gm, padded_mean=padded)
    data = _single_input(node)
    if target in _ACTIVATION_FUNCTIONS:
        if data is None or node.kwargs.get("inplace"):
            return None
        return Pointwise(node, [data], "unary", gm)
    if target in _SOFTMAX:
        if data is None:
            return None
        args = bind_args(node, ("input", "dim"), {"dim": None})
        if not isinstance(args["dim"], int):
            return None
        return Pointwise(node, [data], "softmax", gm, softmax_dim=args["dim"])
    if target in _RESHAPE_FUNCTIONS:
        source = _reshape_source(node)
        return Reshape(node, source) if source is not None else None
    if target in _PERMUTE_FUNCTIONS:
        return _permute_rule(node, data, target.__name__, node.args[1:])
    if target in (torch.mean, torch.sum, torch.amax, torch.amin):
        return _reduce_rule(node, data, target.__name__, node.args[1:], node.kwargs)
    if target in _MATMUL:
        return _matmul_rule(gm, node)
    if target is F.scaled_dot_product_attention:
        return _sdpa_rule(gm, node)
    return None


def _reshape_source(node: Node) -> Node | None:
    """The tensor a reshape reads; its other arguments are sizes (numbers, or numbers read
    from shapes), which the reshape's recorded output shape already tells."""
    source = node.args[0] if node.args else None
    if not isinstance(source, Node) or source.op == "get_attr" or shape_of(source) is None:
        return None
    return source


def _method_rule(gm: GraphModule, node: Node) -> Rule | str | None:
    target = node.target
    if target in _ARITH_METHODS:
        return _arith_rule(gm, node, _ARITH_METHODS[target])
    if target in _RESHAPE_METHODS:
        source = _reshape_source(node)
        return Reshape(node, source) if source is not None else None
    data = _single_input(node)
    if data is None:
        return None
    if target in _ACTIVATION_METHODS:
        return Pointwise(node, [data], "unary", gm)
    if target == "softmax":
        args = bind_args(node, ("self", "dim"), {"dim": None})
        if not isinstance(args["dim"], int):
            return None
        return Pointwise(node, [data], "softmax", gm, softmax_dim=args["dim"])
    if target in _PERMUTE_METHODS:
        return _permute_rule(node, data, target, node.args[1:])
    if target in _REDUCE:
        return _reduce_rule(node, data, target, node.args[1:], node.kwargs)
    if target in ("matmul", "bmm"):
        return _matmul_rule(gm, node)
    return None


def _arith_rule(gm: GraphModule, node: Node, kind: str) -> Rule | None:
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    first, second = node.args
    data = [a for a in (first, second) if isinstance(a, Node) and a.op != "get_attr"]
    if not data:
        return None
    if len(data) == 2:
        if kind == "div" or node.kwargs:
            return None
        return Pointwise(node, data, "binary", gm, arith=kind)
    other = second if data[0] is first else first
    if isinstance(other, Node) and other.op != "get_attr":
        return None
    if kind == "div" and data[0] is second:
        return Pointwise(node, data, "unary", gm)  # c / x: pointwise, not affine
    return Pointwise(node, data, "affine", gm, arith=kind)


def _permute_rule(node: Node, data: Node | None, name: str, rest: Sequence[Any]
                  ) -> Rule | None:
    shape = shape_of(data) if data is not None else None
    if shape is None:
        return None
    rank = len(shape)
    order = list(range(rank))
    if name in ("transpose", "swapaxes"):
        if len(rest) != 2 or not all(isinstance(d, int) for d in rest):
            return None
        a, b = (_axis(d, rank) for d in rest)
        order[a], order[b] = order[b], order[a]
    elif name == "t":
        if rank != 2:
            return None
        order = [1, 0]
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        order = [_axis(d, rank) for d in dims]
    return Permute(node, data, tuple(order))


def _reduce_rule(node: Node, data: Node | None, name: str, rest: Sequence[Any],
                 kwargs: dict) -> Rule | None:
    if data is None:
        return None
    dims = kwargs.get("dim", rest[0] if rest else None)
    keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
    if dims is None or kwargs.get("dtype") is not None:
        return None
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    if not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        return None
    return Reduce(node, data, dims, keepdim, name)


def _is_row_softmax(node: Node, gm: GraphModule) -> bool:
    rule = rule_for(gm, node)
    shape = shape_of(node)
    return (isinstance(rule, Pointwise) and rule.kind == "softmax" and shape is not None
            and _axis(rule.softmax_dim, len(shape)) == len(shape) - 1
            and not (node.op == "call_module"
                     and isinstance(gm.get_submodule(node.target), nn.LogSoftmax)))


def _matmul_rule(gm: GraphModule, node: Node) -> Rule | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if not all(isinstance(a, Node) and a.op != "get_attr" for a in (left, right)):
        return None
    return MatMul(node, left, right, gm, _is_row_softmax(left, gm))


def _sdpa_rule(gm: GraphModule, node: Node) -> Rule | None:
    args = bind_args(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                            "scale", "enable_gqa"),
                     {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                      "enable_gqa": False})
    q, k, v = args["query"], args["key"], args["value"]
    if not all(isinstance(a, Node) for a in (q, k, v)):
        return None
    if args["dropout_p"] != 0 or args["enable_gqa"]:
        return None
    if isinstance(args["attn_mask"], Node):
        mask_shape = shape_of(args["attn_mask"])
        if mask_shape is None or (len(mask_shape) >= 3 and mask_shape[-3] != 1):
            return None  # a mask per head would have to be sliced too
    return MatMul(node, q, v, gm, True, attention=True, key=k)


def _piece_rule(node: Node) -> Rule | None:
    source, index = node.args
    if not isinstance(source, Node):
        return None
    if source.op in ("call_function", "call_method") and _split_kind(source) is not None:
        return _split_piece(node, source, index)
    shape = shape_of(source)
    if shape is None or shape_of(node) is None:
        return None
    if isinstance(index, int):
        return Piece(node, source, 0, index % shape[0], 0, None)
    if not isinstance(index, tuple) or not all(isinstance(i, slice) for i in index):
        return None
    cut = [(axis, item) for axis, item in enumerate(index) if item != slice(None)]
    if len(cut) != 1:
        return None if cut else None
    axis, item = cut[0]
    if item.step not in (None, 1):
        return None
    start, stop, _ = item.indices(shape[axis])
    if stop <= start:
        return None
    return Piece(node, source, axis, start, stop - start, None)


def _split_kind(node: Node) -> str | None:
    if node.op == "call_function":
        return _SPLITS.get(node.target)
    if node.op == "call_method":
        return _SPLIT_METHODS.get(node.target)
    return None


def split_sizes(split: Node) -> tuple[Node, int, list[int]] | None:
    """``(source, dim, sizes)`` of a split/chunk/unbind node from its recorded shapes
    (``sizes`` empty for unbind)."""
    kind = _split_kind(split)
    names = {"split": ("tensor", "split_size_or_sections", "dim"),
             "chunk": ("input", "chunks", "dim"), "unbind": ("input", "dim")}[kind]
    args = bind_args(split, names, {"dim": 0})
    source, dim = args[names[0]], args["dim"]
    metas = split.meta.get("tensor_meta")
    if not isinstance(source, Node) or not isinstance(dim, int) or not isinstance(
            metas, (list, tuple)):
        return None
    shape = shape_of(source)
    if shape is None:
        return None
    dim = _axis(dim, len(shape))
    if kind == "unbind":
        return source, dim, []
    return source, dim, [int(m.shape[dim]) for m in metas]


def _split_piece(node: Node, split: Node, index: Any) -> Rule | None:
    found = split_sizes(split)
    if found is None or not isinstance(index, int):
        return None
    source, dim, sizes = found
    if not sizes:
        return Piece(node, source, dim, index, 0, split)
    index %= len(sizes)
    return Piece(node, source, dim, sum(sizes[:index]), sizes[index], split)


# --- regions ----------------------------------------------------------------------------------


@dataclass
class Keep:
    """A tensor whose every channel must stay, and why."""

    node: Node
    reason: str


@dataclass
class Region:
    """The tensors whose channels are tied to a starting tensor's, and their edges."""

    gm: GraphModule
    layouts: dict[Node, Layout] = field(default_factory=dict)
    rules: dict[Node, Rule] = field(default_factory=dict)
    producers: dict[Node, Layer] = field(default_factory=dict)  # output node -> layer
    readers: dict[Node, Layer] = field(default_factory=dict)  # layer node -> layer
    keep: list[Keep] = field(default_factory=list)
    splits: set[Node] = field(default_factory=set)
    failure: str | None = None  # the region could not be mapped
    _probed: dict[Node, Layout | None] = field(default_factory=dict)


MAX_REGION_NODES = 20_000


def explore(gm: GraphModule, start: Node, layout: Layout) -> Region:
    """The region of ``start`` (whose channels lie as ``layout`` says)."""
    region = Region(gm)
    queue: deque[Node] = deque()

    def assign(node: Node, new: Layout) -> None:
        old = region.layouts.get(node)
        if old is None:
            if flat_size(new) != _channels_in_shape(node, new):
                region.failure = f"the channel layout of {describe(node, gm)} is inconsistent"
                return
            region.layouts[node] = new
            queue.append(node)
        elif old != new:
            region.failure = (f"{describe(node, gm)} holds channels along different axes on "
                              "different paths")

    assign(start, layout)
    while queue and region.failure is None:
        if len(region.layouts) > MAX_REGION_NODES:
            region.failure = "the region is too large"
            break
        node = queue.popleft()
        _producer_side(region, node, assign)
        if region.failure is None:
            _consumer_side(region, node, assign)
    return region


def _channels_in_shape(node: Node, layout: Layout) -> int:
    shape = shape_of(node)
    if shape is None or any(a >= len(shape) or shape[a] != s for a, s in layout):
        return -1
    return flat_size(layout)


def _producer_side(region: Region, node: Node, assign) -> None:
    gm = region.gm
    layout = region.layouts[node]
    if node.op == "placeholder":
        region.keep.append(Keep(node, "it is an input of the model"))
        return
    layer = dense_layer(gm, node)
    if layer is not None:
        if layout != ((layer.out_axis, layer.view.out_channels),):
            region.keep.append(Keep(node, f"{describe(node, gm)} writes its channels on "
                                          "another axis"))
        else:
            region.producers[node] = layer
        return
    rule = rule_for(gm, node)
    if not isinstance(rule, Rule):
        region.keep.append(Keep(node, f"it is computed by {describe(node, gm)}, which "
                                      "prune_dead cannot slice"))
        return
    _apply_rule(region, rule, {node: layout}, assign)


def _apply_rule(region: Region, rule: Rule, known: dict[Node, Layout], assign) -> bool:
    result = rule.layouts(known, lambda n: probe_layout(region, n))
    if isinstance(result, str):
        for node in known:
            region.keep.append(Keep(node, f"{describe(rule.node, region.gm)} keeps it: "
                                          f"{result}"))
        return False
    region.rules[rule.node] = rule
    for node, layout in result.items():
        assign(node, layout)
    if isinstance(rule, Piece) and rule.split is not None:
        region.splits.add(rule.split)
    return True


def probe_layout(region: Region, node: Node, depth: int = 0) -> Layout | None:
    """The layout ``node`` gets from the layers that write it (through channel ops), or None
    when no layer writes it."""
    if node in region.layouts:
        return region.layouts[node]
    if node in region._probed:
        return region._probed[node]
    region._probed[node] = None  # breaks cycles, answers "unknown" meanwhile
    gm = region.gm
    found: Layout | None = None
    layer = dense_layer(gm, node)
    if layer is not None:
        found = ((layer.out_axis, layer.view.out_channels),)
    elif depth < 64:
        rule = rule_for(gm, node)
        if isinstance(rule, Rule):
            known = {}
            for source in rule.inputs():
                layout = probe_layout(region, source, depth + 1)
                if layout is not None:
                    known[source] = layout
                    break
            if known:
                result = rule.layouts(known, lambda n: probe_layout(region, n, depth + 1))
                if not isinstance(result, str):
                    found = result.get(node)
    region._probed[node] = found
    return found


def _consumer_side(region: Region, node: Node, assign) -> None:
    gm = region.gm
    layout = region.layouts[node]
    for user in list(node.users):
        if region.failure is not None:
            return
        if user.op == "output":
            region.keep.append(Keep(node, "it is an output of the model"))
            continue
        meta = _metadata_read(user, layout, len(shape_of(node)))
        if meta is not None:
            if meta:
                region.keep.append(Keep(node, f"its channel count is read by "
                                              f"{describe(user, gm)}"))
            continue
        if _inplace(gm, user) and len(node.users) > 1:
            region.keep.append(Keep(node, f"{describe(user, gm)} changes it in place while "
                                          "others read it"))
            continue
        layer = dense_layer(gm, user)
        if layer is not None and layer.view.input is node and read_count(user, node) == 1:
            if layout != ((layer.in_axis, layer.view.in_channels),):
                region.keep.append(Keep(node, f"{describe(user, gm)} reads it along another "
                                              "axis"))
            else:
                region.readers[user] = layer
            continue
        if _split_kind(user) is not None:
            _split_users(region, node, user, assign)
            continue
        rule = rule_for(gm, user)
        if isinstance(rule, Rule) and node in rule.inputs():
            if user in region.rules:
                continue
            _apply_rule(region, rule, {node: layout}, assign)
            continue
        region.keep.append(Keep(node, f"{describe(user, gm)} reads it and "
                                      f"{_why_not_channel_op(gm, user)}"))


def _split_users(region: Region, node: Node, split: Node, assign) -> None:
    gm = region.gm
    others = [u for u in split.users if u.op != "call_function" or u.target is not
              operator.getitem]
    if others or split_sizes(split) is None:
        region.keep.append(Keep(node, f"the pieces of {describe(split, gm)} are not read "
                                      "one by one"))
        return
    for item in split.users:
        rule = rule_for(gm, item)
        if not isinstance(rule, Rule):
            region.keep.append(Keep(node, f"{describe(item, gm)} is not a piece prune_dead "
                                          "can follow"))
            continue
        if item not in region.rules:
            _apply_rule(region, rule, {node: region.layouts[node]}, assign)


def _why_not_channel_op(gm: GraphModule, node: Node) -> str:
    view = layer_view(gm, node)
    if view is not None:
        return "is a layer prune_dead cannot slice (grouped transposed conv or weights read " \
               "twice)"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)):
            return "mixes channels"
    if node.op == "call_function" and node.target in (F.layer_norm, F.group_norm,
                                                       F.local_response_norm):
        return "mixes channels"
    return "is not a channel op prune_dead can slice"


def _inplace(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    return bool(node.kwargs.get("inplace"))


def _metadata_read(user: Node, layout: Layout, rank: int) -> bool | None:
    """None if ``user`` reads values; else whether it reads a channel axis's size."""
    channel_axes = {a for a, _ in layout}
    if user.op == "call_method" and user.target in _META_METHODS:
        if user.target == "dim":
            return False
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        if dim is None:
            return _shape_items_read(user, channel_axes, rank)
        return isinstance(dim, int) and _axis(dim, rank) in channel_axes or not isinstance(
            dim, int)
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        name = user.args[1]
        if name in _META_ATTRS:
            return _shape_items_read(user, channel_axes, rank) if name == "shape" else False
    return None


def _shape_items_read(shape_node: Node, channel_axes: set[int], rank: int) -> bool:
    for use in shape_node.users:
        if use.op == "call_function" and use.target is operator.getitem and isinstance(
                use.args[1], int):
            if _axis(use.args[1], rank) in channel_axes:
                return True
            continue
        return True  # the whole shape goes somewhere
    return False


# --- the channels of a region: union-find over slots -----------------------------------------


class Slots:
    """Union-find over ``(tensor, flat channel)`` slots of a region."""

    def __init__(self, region: Region) -> None:
        self.base: dict[Node, int] = {}
        total = 0
        for node, layout in region.layouts.items():
            self.base[node] = total
            total += flat_size(layout)
        self.parent = list(range(total))

    def find(self, slot: int) -> int:
        parent = self.parent
        root = slot
        while parent[root] != root:
            root = parent[root]
        while parent[slot] != root:
            parent[slot], slot = root, parent[slot]
        return root

    def union_many(self, a: Node, flat_a: Tensor, b: Node, flat_b: Tensor) -> None:
        base_a, base_b = self.base[a], self.base[b]
        for x, y in zip(flat_a.tolist(), flat_b.tolist(), strict=True):
            ra, rb = self.find(base_a + x), self.find(base_b + y)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def classes_of(self, node: Node, channels: int) -> list[int]:
        base = self.base[node]
        return [self.find(base + c) for c in range(channels)]


def graph_order(gm: GraphModule) -> dict[Node, int]:
    return {node: i for i, node in enumerate(gm.graph.nodes)}


def compute_values(region: Region, order: dict[Node, int]) -> dict[Node, Values]:
    """The value of every channel of every tensor of the region, in graph order."""
    values: dict[Node, Values] = {}
    for node in sorted(region.layouts, key=order.__getitem__):
        channels = flat_size(region.layouts[node])
        if node in region.producers:
            values[node] = region.producers[node].values()
        elif node in region.rules:
            rule = region.rules[node]
            missing = [m for m in rule.inputs() if m in region.layouts and m not in values]
            if missing:  # an input after its reader: not a graph in order
                values[node] = Values.live(channels, Live(node))
                continue
            values[node] = rule.value(region.layouts, values)
        else:
            values[node] = Values.live(channels, Live(node))
    return values
