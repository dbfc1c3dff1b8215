"""Evaluate subgraphs that read only constants, once, at conversion time.

A node whose every input is a ``get_attr`` (a parameter, buffer or traced constant), or a plain
value computed from the metadata of one (``w.size(0)``, ``w.device``, ``w.shape[1] // 2``), and
whose op is pure computes the same tensor on every call; so does an aten op of an exported
program that builds a tensor from plain values alone (``aten.arange``, ``aten.full``).
Replacing it by a buffer holding that tensor is exact (it is the very value the model
computes, in its own dtype). This exposes constants that other passes need, e.g. DBB's
BN-and-pad value ``β − μ·γ/√(σ² + ε)``, its identity-based 1×1 kernel ``w + id.to(w.device)``,
or a weight-standardized kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from repfuse.graph import (
    describe,
    fetch_attr,
    is_impure,
    is_metadata_helper,
    mutates,
    pure_aten,
)
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

# Larger results are left to be computed at run time (a folded broadcast could be huge).
MAX_CONSTANT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace pure ops on constants by a buffer with their value."""

    name: ClassVar[str] = "fold_constants"
    summary: ClassVar[str] = (
        "evaluate pure ops whose inputs are all parameters/buffers/constants into one tensor"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if node.op not in ("call_function", "call_method"):
            return None
        if not node.all_input_nodes and not _aten_factory(node):
            return None
        if is_metadata_helper(node):
            return None  # a plain value: folded into the tensor op that reads it
        if is_impure(node) or any(mutates(user, node) for user in node.users):
            return None  # random, in place, or its value is changed in place later
        gm = rewriter.gm
        known: dict[Node, Any] = {}
        if not all(_constant(gm, n, known) for n in node.all_input_nodes):
            return None
        args = map_arg(node.args, known.__getitem__)
        kwargs = map_arg(node.kwargs, known.__getitem__)
        try:
            with torch.no_grad():
                value = _call(node, args, kwargs)
        except Exception as exc:  # the model would fail the same way at run time
            return self.decline(node, f"{describe(node, gm)} fails on its constant inputs: "
                                      f"{type(exc).__name__}")
        if not isinstance(value, Tensor) or value.numel() > MAX_CONSTANT_ELEMENTS:
            return None
        value = value.detach().clone()
        weights = [t for n in node.all_input_nodes
                   if isinstance(t := known[n], nn.Parameter)]
        parameter = None
        if weights:  # e.g. a standardized or stacked kernel: a parameter of the fused model
            trainable = any(w.requires_grad for w in weights)
            parameter = nn.Parameter(value, requires_grad=trainable and value.is_floating_point())
        return rewriter.replace_with_constant(
            self.name, node, value, detail=f"{describe(node, gm)} evaluated once",
            parameter=parameter,
        )


def _constant(gm: GraphModule, node: Node, known: dict[Node, Any]) -> bool:
    """True (with its value in ``known``) when ``node`` reads a constant, or computes a plain
    value from constants' metadata and plain values only."""
    if node in known:
        return True
    if node.op == "get_attr":
        known[node] = fetch_attr(gm, node.target)
        return True
    if not is_metadata_helper(node):
        return False
    if not all(_constant(gm, n, known) for n in node.all_input_nodes):
        return False
    try:
        known[node] = _call(node, map_arg(node.args, known.__getitem__),
                            map_arg(node.kwargs, known.__getitem__))
    except Exception:
        return False
    return True


def _aten_factory(node: Node) -> bool:
    """An aten op that builds a tensor from plain values alone, deterministically: what an
    exported program writes for a constant computed in Python (``arange``, ``full``, ...)."""
    return pure_aten(node) and len(node.target._schema.returns) == 1


def _call(node: Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)
