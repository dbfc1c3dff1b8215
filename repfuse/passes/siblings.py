"""Horizontal fusion: sibling layers that read one tensor run as one wider layer, then split.

Deep Rebirth's *branch merging* (Li et al., AAAI 2018): convs ``A_1 … A_n`` reading the same
``x`` (GoogLeNet's 1×1 convs at the head of an Inception module) are the rows of one conv
``A = concat(A_1 … A_n)``, so ``A_i(x) = split(A(x))[i]``. The stacked kernel is
:func:`repfuse.algebra.concat`, exact under its alignment conditions: equal stride and input
channels, and for each sibling ``P − p = (K − k)/2`` per axis once centred in the largest
kernel. Linear layers on the same tensor (self-attention's Q/K/V projections) are the same case
with the channels on the last axis.

Merging siblings of one geometry keeps the MACs and reads ``x`` once instead of ``n`` times;
siblings of different kernel sizes (or groupings) would be zero-padded (or densified) to a
common kernel, which costs MACs, so they merge only when :func:`repfuse.cost.pays` agrees or the
``allow_costlier`` option is set. Siblings whose outputs are added or concatenated were merged
into one conv by ``merge_branches`` already: this pass runs after the others reach their fixed
point (stage 2, after ``prune_dead``), so it never splits what could have been summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule, Node

from repfuse.algebra import Kernel, concat
from repfuse.cost import NodeCost, layer_cost, nodes_cost, pays
from repfuse.graph import LayerView, describe, layer_view, read_count, shape_of
from repfuse.lift import (
    LinearStep,
    kernel_module,
    lift,
    linear_kernel,
    linear_module,
    numeric_padding,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter


@dataclass(frozen=True)
class _Sibling:
    node: Node
    step: LinearStep | None  # for a conv
    origin: str
    layer: LayerView

    @property
    def kernel(self) -> Kernel:
        if self.step is not None:
            return self.step.kernel
        # A linear layer is a 1-tap conv over its last axis: the same stacking applies.
        return linear_kernel(self.layer.weight, self.layer.bias)

    @property
    def shape_kernel(self) -> Kernel:
        """The kernel's shape and settings on the meta device (no weights copied)."""
        if self.step is not None:
            return self.step.shape_kernel
        bias = None if self.layer.bias is None else self.layer.bias.to("meta")
        return linear_kernel(self.layer.weight.to("meta"), bias)  # meta tensors in, meta out


def _conv_siblings(gm: GraphModule, source: Node) -> list[_Sibling]:
    siblings = []
    for user in source.users:
        step = lift(gm, user)
        if not isinstance(step, LinearStep) or not step.is_conv or step.input is not source:
            continue
        if read_count(user, source) != 1:
            continue
        siblings.append(_Sibling(user, step, step.origin, layer_view(gm, user)))
    return siblings


def _linear_siblings(gm: GraphModule, source: Node) -> list[_Sibling]:
    siblings = []
    for user in source.users:
        layer = layer_view(gm, user)
        if layer is None or layer.kind != "linear" or layer.input is not source:
            continue
        if read_count(user, source) != 1:
            continue
        siblings.append(_Sibling(user, None, layer.origin_paths()[0], layer))
    return siblings


def _in_graph_order(siblings: list[_Sibling], source: Node) -> list[_Sibling]:
    """``siblings`` sorted by position (fx keeps users in order of creation, not position);
    walks from ``source`` to the last of them."""
    pending = {s.node: s for s in siblings}
    ordered = []
    current = source.next
    while pending:
        if current in pending:
            ordered.append(pending.pop(current))
        current = current.next
    return ordered


def _geometry(sibling: _Sibling) -> tuple:
    layer = sibling.layer
    return (layer.kernel_size, layer.stride, numeric_padding(layer) if layer.kind == "conv"
            else None, layer.dilation, layer.groups)


@dataclass(frozen=True)
class MergeSiblings(Pass):
    """Run sibling convs (or linears) on one tensor as one wider layer followed by split."""

    name: ClassVar[str] = "merge_siblings"
    summary: ClassVar[str] = (
        "run sibling convs (or linears) that read one tensor as one wider layer followed by a "
        "split (Deep Rebirth branch merging; GoogLeNet's 1x1s, attention's Q/K/V)"
    )
    stage: ClassVar[int] = 2
    allow_costlier: bool = False

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if len(node.users) < 2 or shape_of(node) is None:
            return None
        gm = rewriter.gm
        for siblings, dim in ((_conv_siblings(gm, node), 1), (_linear_siblings(gm, node), -1)):
            if len(siblings) >= 2:
                return self._merge(node, _in_graph_order(siblings, node), dim, rewriter)
        return None

    def _merge(self, source: Node, siblings: list[_Sibling], dim: int,
               rewriter: Rewriter) -> Rewrite | Decline:
        gm = rewriter.gm
        label = f"siblings of {describe(source, gm)}:"
        by_geometry: dict[tuple, list[_Sibling]] = {}
        for sibling in siblings:
            by_geometry.setdefault(_geometry(sibling), []).append(sibling)
        group = max(by_geometry.values(), key=len)
        if self.allow_costlier or len(group) < 2:
            group = siblings
        names = ", ".join(describe(s.node, gm) for s in group)
        # priced from shapes first: the stacked kernel of dilated convs (ASPP) expands densely
        shaped = concat([s.shape_kernel for s in group])
        if isinstance(shaped, str):
            return self.decline(source, f"{label} {names} stay separate: {shaped}")
        like = group[0].layer.weight
        before = nodes_cost(gm, (s.node for s in group))
        after = self._merged_cost(source, shaped, group, dim, like.element_size())
        costlier = pays(before, after)
        if costlier is not None and not self.allow_costlier:
            return self.decline(source, f"{label} {names} stay separate: merging costs more: "
                                        f"{costlier}")
        merged = concat([s.kernel for s in group])
        if dim == 1:
            module = kernel_module(merged, like)
        else:
            module = linear_module(merged, like)
        sizes = [s.layer.out_channels for s in group]
        return rewriter.replace_with_split(
            self.name, roots=[s.node for s in group], sizes=sizes, dim=dim,
            replaced=[s.node for s in group], module=module, args=(source,),
            module_path=group[0].origin,
            detail=f"{len(group)} siblings {names} of {describe(source, gm)} run as one "
                   "layer, then split",
        )

    @staticmethod
    def _merged_cost(source: Node, merged: Kernel, group: list[_Sibling], dim: int,
                     itemsize: int) -> NodeCost:
        out_shape = list(shape_of(group[0].node))
        out_shape[dim] = merged.out_channels
        weight_shape = tuple(merged.weight.shape)
        if dim != 1:
            weight_shape = weight_shape[:2]
        return layer_cost(weight_shape, shape_of(source), tuple(out_shape), itemsize)
