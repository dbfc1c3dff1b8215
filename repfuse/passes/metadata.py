"""Resolve reads of a tensor's rank, compute Python arithmetic on constants, drop dead asserts.

Real model code checks its inputs: timm's ``BatchNormAct2d`` runs
``torch._assert(x.ndim == 4, ...)`` before normalizing, and traced, that is three nodes reading
the rank of the conv output ``x``. The rank of every tensor of a traced graph is fixed once the
ranks of its inputs are (every op maps ranks to ranks), so:

- ``x.ndim``, ``x.dim()``, ``x.ndimension()`` become the recorded rank, a Python int;
- a Python function of constants only (``4 == 4``, ``c // 2``) becomes its value;
- ``torch._assert(True, message)`` is removed: it can never fire.

Exact on every input with the ranks of the example: the graph then starts with a check of those
ranks (added once, the first time a rank is resolved), so an input of another rank fails as
it would have failed before. Reads of *sizes* (``x.shape``, ``x.size(2)``) stay: sizes change
with the input, and they do not block a fold (the rewriter moves them to the tensor that
stands for the one they read, or declines).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import Node

from repfuse.graph import SCALAR_FUNCTIONS, describe, reads_rank_only, shape_of
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

GUARD_META = "repfuse_guard"  # on nodes of the input checks this pass adds
_RANK_GUARDED = "repfuse_rank_guard"  # on gm.meta once the inputs' ranks are checked


@dataclass(frozen=True)
class ResolveMetadata(Pass):
    """Replace rank reads by their value, evaluate scalar arithmetic, drop dead asserts."""

    name: ClassVar[str] = "resolve_metadata"
    summary: ClassVar[str] = (
        "replace reads of a tensor's rank (x.ndim, x.dim()) by their value, evaluate Python "
        "arithmetic on constants, and remove asserts that are then always true"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if node.meta.get(GUARD_META):
            return None
        if node.op == "call_function" and node.target is torch._assert:
            return self._dead_assert(node, rewriter)
        data = node.args[0] if node.args else None
        if isinstance(data, Node) and reads_rank_only(node, data):
            return self._rank(node, data, rewriter)
        if node.op == "call_function" and node.target in SCALAR_FUNCTIONS:
            return self._scalar(node, rewriter)
        return None

    def _rank(self, node: Node, data: Node, rewriter: Rewriter) -> Rewrite | None:
        shape = shape_of(data)
        if shape is None:
            return None
        if data.op != "get_attr":  # a weight's rank is fixed; an activation's follows inputs
            _guard_input_ranks(rewriter)
        return rewriter.inline_value(
            self.name, node, len(shape),
            f"{describe(node, rewriter.gm)}: the rank of {describe(data, rewriter.gm)} is "
            f"{len(shape)}")

    def _scalar(self, node: Node, rewriter: Rewriter) -> Rewrite | None:
        if node.all_input_nodes or not node.users:
            return None
        try:
            value = node.target(*node.args, **node.kwargs)
        except Exception:  # e.g. 1 // 0: the model raises at run time, and so will the graph
            return None
        if not _plain(value):
            return None
        return rewriter.inline_value(self.name, node, value,
                                     f"{describe(node, rewriter.gm)} is {value!r}")

    def _dead_assert(self, node: Node, rewriter: Rewriter) -> Rewrite | None:
        condition = node.args[0] if node.args else node.kwargs.get("condition")
        if condition is not True or node.users:
            return None
        return rewriter.remove(self.name, node,
                               f"{describe(node, rewriter.gm)} always holds: removed")


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


def _guard_input_ranks(rewriter: Rewriter) -> None:
    """Once per graph: check at its start that every tensor input has the example's rank."""
    gm = rewriter.gm
    if gm.meta.get(_RANK_GUARDED):
        return
    gm.meta[_RANK_GUARDED] = True
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    if first is None:
        return
    with gm.graph.inserting_before(first):
        for node in placeholders:
            shape = shape_of(node)
            if shape is None:
                continue
            rank = gm.graph.call_method("dim", (node,))
            same = gm.graph.call_function(operator.eq, (rank, len(shape)))
            check = gm.graph.call_function(torch._assert, (
                same, f"repfuse fixed the ranks of this model's tensors for input "
                      f"'{node.name}' of rank {len(shape)}; convert it again for other ranks"))
            for added in (rank, same, check):
                added.meta[GUARD_META] = True
                rewriter.index.on_create(added)
