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

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from repfuse.algebra import (
    Kernel,
    bias_padding_reason,
    compose,
    compose_reason,
    composed_weight_shape,
    concat,
    on_meta,
    padding_reason,
    parallel_sum,
    scaled,
)
from repfuse.cost import layer_cost, nodes_cost, pays
from repfuse.graph import (
    describe,
    layer_view,
    meta_with_size,
    origin_paths_of,
    other_users,
    shape_of,
    sole_user,
)
from repfuse.lift import (
    AvgPool,
    BorderFill,
    Branch,
    LinearStep,
    Term,
    avgpool_of,
    border_fill,
    branch_of,
    channel_concat,
    identity_for,
    is_sum,
    kernel_area,
    kernel_module,
    lift,
    linear_kernel,
    linear_module,
    numeric_padding,
    overwritten,
    sum_terms,
    weight_like,
    zero_pad,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

# --- the sum and concat merge pass -----------------------------------------------------------


@dataclass(frozen=True)
class MergeBranches(Pass):
    """Merge linear branches on one input that are summed or concatenated into one conv.

    The merged conv is priced from shapes first (:func:`repfuse.algebra.on_meta`). Padding
    small kernels to the largest one is the price these merges always pay (one conv instead of
    several and a join); expanding *dilated* kernels densely to align them with others (a 1×1
    beside a 3×3 of dilation 12, ASPP) can multiply the MACs, so such a merge stays when it
    costs more MACs than the branches, unless ``allow_costlier``.
    """

    name: ClassVar[str] = "merge_branches"
    summary: ClassVar[str] = (
        "merge conv/BN/identity/avg-pool/crop branches of one input that are added, "
        "subtracted or concatenated along channels into one conv (RepVGG, ACNet, DBB, "
        "MobileOne, RepLKNet, FastViT)"
    )
    allow_costlier: bool = False

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if is_sum(node):
            root, user = node, sole_user(node)
            while user is not None and is_sum(user):
                root, user = user, sole_user(user)
            if root is not node and root in rewriter.pending:
                return None  # the tree's outermost add is still to come and merges it all
            return self._merge_sum(root, rewriter)
        items = channel_concat(node)
        if items is not None:
            return self._merge_concat(node, items, rewriter)
        return None

    def _merge_sum(self, root: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        shape = shape_of(root)
        if shape is None or len(shape) < 3:
            return None
        terms, adds = sum_terms(root)
        branches = [(branch_of(gm, t.node, t.reader), t) for t in terms]
        groups: dict[Node, list[tuple[Branch, Term]]] = {}
        for branch, term in branches:
            if shape_of(branch.term) == shape:
                groups.setdefault(branch.input, []).append((branch, term))
        mergeable = [g for g in groups.values()
                     if len(g) > 1 and any(b.has_conv for b, _ in g)]
        if not mergeable:
            return self._explain_stops(root, [b for b, _ in branches], "sum", gm)
        group = max(mergeable, key=len)
        kernels = [scaled(b.kernel if b.kernel is not None else identity_for(shape), t.sign)
                   for b, t in group]
        names = ", ".join(describe(b.term, gm) for b, _ in group)
        label = f"branches {names} of the sum {describe(root, gm)} stay"
        reason = self._price(gm, [b for b, _ in group], parallel_sum, kernels, root)
        if reason is not None:
            return self.decline(root, f"{label}: {reason}")
        merged = parallel_sum(kernels)
        merged_terms = {id(b.term) for b, _ in group}
        rest = [t for t in terms if id(t.node) not in merged_terms]
        return self._rewrite(rewriter, root, [b for b, _ in group], adds, merged,
                             _add_terms(gm, root, rest), f"sum of {len(group)} branches {names}")

    def _merge_concat(self, cat: Node, items: list, rewriter: Rewriter
                      ) -> Rewrite | Decline | None:
        gm = rewriter.gm
        shape = shape_of(cat)
        if len(shape) < 3:
            return None
        branches = [
            branch_of(gm, item, cat) if isinstance(item, Node) else None for item in items
        ]
        run = _longest_run(branches)
        if run is None:
            return self._explain_stops(cat, [b for b in branches if b is not None], "concat",
                                       gm)
        start, stop = run
        group = branches[start:stop]
        names = ", ".join(describe(b.term, gm) for b in group)
        kernels = [b.kernel for b in group]
        reason = self._price(gm, group, concat, kernels, cat)
        if reason is not None:
            return self.decline(cat, f"concatenated branches {names} stay: {reason}")
        merged = concat(kernels)
        before, after = list(items[:start]), list(items[stop:])

        def wrap(new: Node) -> Node:
            if not before and not after:
                return new
            new.meta["tensor_meta"] = meta_with_size(cat.meta["tensor_meta"], 1,
                                                     merged.out_channels)
            joined = gm.graph.call_function(torch.cat, ([*before, new, *after], 1))
            joined.meta["tensor_meta"] = cat.meta["tensor_meta"]
            return joined

        return self._rewrite(rewriter, cat, group, [cat], merged, wrap,
                             f"concat of {len(group)} branches {names}")

    def _price(self, gm: GraphModule, group: list[Branch], combine: Callable,
               kernels: list[Kernel], join: Node) -> str | None:
        """Why the merge of ``kernels`` by ``combine`` stays (not exact, a crop left over, or
        more MACs than the branches), decided on the meta device; None when it goes ahead."""
        shaped = combine([on_meta(k) for k in kernels])
        if isinstance(shaped, str):
            return shaped
        reason = padding_reason(shaped)
        densified = any(d > common and size > 1 for k in kernels for d, common, size in zip(
            k.dilation, shaped.dilation, k.kernel_size, strict=True))
        if reason is not None or self.allow_costlier or not densified:
            return reason
        in_shape, out_shape = shape_of(group[0].input), list(shape_of(join))
        out_shape[1] = shaped.out_channels
        before = nodes_cost(gm, (n for b in group for n in b.nodes if layer_view(gm, n)))
        after = layer_cost(tuple(shaped.weight.shape), in_shape, tuple(out_shape),
                           kernels[0].weight.element_size())
        if after.macs > before.macs:
            return (f"merging expands dilated kernels densely and costs more: "
                    f"{pays(before, after)}")
        return None

    def _explain_stops(self, join: Node, branches: list[Branch], kind: str,
                       gm: GraphModule) -> Decline | None:
        """A decline when a branch of ``join`` stopped at a linear op that cannot be lifted
        (e.g. a conv padding by reflection), so no group formed; None when nothing did."""
        stopped = [b for b in branches if b.stop is not None]
        if not stopped:
            return None
        reasons = "; ".join(dict.fromkeys(b.stop for b in stopped))
        paths = tuple(dict.fromkeys(p for b in stopped for p in origin_paths_of(b.input)))
        return Decline(self.name, join.name, f"the branches of the {kind} "
                                             f"{describe(join, gm)} do not merge: {reasons}",
                       paths)

    def _rewrite(
        self, rewriter: Rewriter, root: Node, group: list[Branch], joins: list[Node],
        merged: Kernel, wrap: Callable[[Node], Node] | None, detail: str,
    ) -> Rewrite:
        gm = rewriter.gm
        like = weight_like(gm, (n for b in group for n in b.nodes))
        replaced = [*joins, *(n for b in group for n in b.nodes)]
        origin = max((b for b in group if b.has_conv), key=lambda b: kernel_area(b.kernel))
        return rewriter.replace_with_module(
            self.name, root=root, replaced=replaced, module=kernel_module(merged, like),
            args=(group[0].input,), module_path=origin.origin, detail=detail, wrap=wrap,
        )


def _add_terms(gm: GraphModule, root: Node, rest: list[Term]) -> Callable[[Node], Node] | None:
    """A ``wrap`` adding the terms left out of a merge back to the merged conv, each with its
    sign: ``new + t``, ``new − t`` or ``torch.add(new, t, alpha=a)``."""
    if not rest:
        return None

    def wrap(new: Node) -> Node:
        result = new
        for term in rest:
            if term.sign == 1.0:
                result = gm.graph.call_function(operator.add, (result, term.node))
            elif term.sign == -1.0:
                result = gm.graph.call_function(operator.sub, (result, term.node))
            else:
                result = gm.graph.call_function(torch.add, (result, term.node),
                                                {"alpha": term.sign})
            result.meta["tensor_meta"] = root.meta.get("tensor_meta")
        return result

    return wrap


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
            return self._linear_pair(node, rewriter)
        if isinstance(second, str):
            return self._unliftable_after_conv(node, second, gm)
        first = lift(gm, second.input)
        if not isinstance(first, LinearStep) or not (first.is_conv or second.is_conv):
            return None
        if not _is_pool_or_conv(gm, first, second):
            return None  # BN/scale next to a conv: the fold passes' business; a crop alone
            # is no conv
        label = f"{describe(first.node, gm)} -> {describe(node, gm)}"
        if sole_user(first.node) is not node:
            return self.decline(node, f"{label} stay: {other_users(gm, first.node, node)}")
        reason = compose_reason(first.kernel, second.kernel)
        if reason is not None:
            return self.decline(node, f"{label} stay: {reason}")
        like = weight_like(gm, (first.node, node))
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
            module=kernel_module(combined, like), args=(first.input,), module_path=origin,
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
            return self.decline(node, f"{label} stay: {other_users(gm, first.node, node)}")
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

    def _unliftable_after_conv(self, node: Node, reason: str,
                               gm: GraphModule) -> Decline | None:
        """A conv followed by a pool or conv that is no convolution (a pool in ceil_mode, a
        conv padding by reflection): the pair stays, and why."""
        if avgpool_of(gm, node) is None and layer_view(gm, node) is None:
            return None  # e.g. a BN in training mode: the fold passes say why
        data = node.args[0] if node.args else None
        first = lift(gm, data) if isinstance(data, Node) else None
        if not isinstance(first, LinearStep) or not first.is_conv:
            return None
        return self.decline(node, f"{describe(data, gm)} -> {describe(node, gm)} stay: {reason}")


def _is_pool_or_conv(gm: GraphModule, first: LinearStep, second: LinearStep) -> bool:
    return all(step.is_conv or avgpool_of(gm, step.node) is not None
               for step in (first, second))


# --- padding ------------------------------------------------------------------------------------


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
        found = zero_pad(gm, node)
        if found is None:
            return None
        fill = border_fill(gm, node)
        if fill is not None:
            return self._pad_with_bias(node, found, fill, rewriter)
        if overwritten(node):
            return self.decline(node, f"{describe(node, gm)} is overwritten in place in a way "
                                      "that is not a per-channel border fill")
        user = sole_user(node)
        pool = None if user is None else avgpool_of(gm, user)
        if pool is not None and pool.input is node:
            return self._into_avgpool(node, found, pool, rewriter)
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

    def _into_avgpool(self, pad: Node, found, pool: AvgPool,
                      rewriter: Rewriter) -> Rewrite | Decline:
        """``avg_pool(zero_pad(x, q), p)`` counting padding is ``avg_pool(x, p + q)``."""
        gm = rewriter.gm
        data, padding = found
        user, dims = pool.node, pool.dims
        label = f"zero pad {describe(pad, gm)} before {describe(user, gm)} stays"
        if len(padding) != dims:
            return self.decline(pad, f"{label}: it pads {len(padding)} axes, the pool {dims}")
        reason = pool.settings_reason()
        if reason is None and not pool.count_include_pad:
            reason = "it does not count padding, but the zeros of the pad are counted"
        if reason is not None:
            return self.decline(pad, f"{label}: the pool is not a convolution: {reason}")
        size = pool.size()
        total = tuple(a + b for a, b in zip(pool.padding_tuple(), padding, strict=True))
        if any(2 * t > k for t, k in zip(total, size, strict=True)):
            return self.decline(pad, f"{label}: the pool would need padding {list(total)}, "
                                     f"more than half its kernel {list(size)} (PyTorch's limit)")
        cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
        module = cls(size, pool.stride_tuple(), total, count_include_pad=True)
        path = user.target if user.op == "call_module" else user.name
        return rewriter.replace_with_module(
            self.name, root=user, replaced=[pad, user], module=module, args=(data,),
            module_path=path, detail=f"zero pad {describe(pad, gm)} folded into "
                                     f"{describe(user, gm)}",
        )

    def _pad_with_bias(self, pad: Node, found, fill: BorderFill,
                       rewriter: Rewriter) -> Rewrite | Decline:
        gm = rewriter.gm
        data, padding = found
        label = describe(pad, gm)
        layer = layer_view(gm, data)
        step = lift(gm, data)
        if layer is None or not isinstance(step, LinearStep) or not step.is_conv or (
                sole_user(data) is not pad):
            return self.decline(pad, f"{label} pads with a per-channel value, but its input is "
                                     "not a conv read only here")
        reason = bias_padding_reason(step.kernel, fill.value)
        if reason is not None:
            return self.decline(pad, f"{label} pads with a per-channel value after "
                                     f"{describe(data, gm)}, but {reason}")
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_channels)
        module = replace(layer, padding=padding).build(layer.weight.clone(), bias.clone())
        return rewriter.replace_with_module(
            self.name, root=fill.result, replaced=[data, pad, *fill.nodes], module=module,
            args=(layer.input,), module_path=layer.module_path or layer.origin_paths()[0],
            detail=f"{describe(data, gm)} padded with its own bias by {label}: padding moved "
                   "before the 1x1 conv",
        )
