"""Evaluate subgraphs that read only constants, once, at conversion time.

A node whose every tensor input is a ``get_attr`` (a parameter, buffer or traced constant) and
whose op is pure computes the same tensor on every call. Replacing it by a buffer holding that
tensor is exact (it is the very value the model computes, in its own dtype). This exposes
constants that other passes need, e.g. DBB's BN-and-pad value ``β − μ·γ/√(σ² + ε)`` or a
weight-standardized kernel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.fx import Node
from torch.fx.node import map_arg

from repfuse.graph import describe, fetch_attr
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

# Ops that mutate, draw random numbers or touch global state: never evaluated ahead of time.
_IMPURE_FUNCTIONS = {operator.setitem, torch.rand, torch.randn, torch.randint, torch.randperm,
                     torch.bernoulli, torch.normal, torch.multinomial, torch.dropout,
                     torch.nn.functional.dropout}
# Larger results are left to be computed at run time (a folded broadcast could be huge).
MAX_CONSTANT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace pure ops on constants by a buffer with their value."""

    name: ClassVar[str] = "fold_constants"
    summary: ClassVar[str] = (
        "evaluate pure ops whose inputs are all parameters/buffers/constants into one buffer"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return None
        if any(n.op != "get_attr" for n in node.all_input_nodes):
            return None
        if node.target in _IMPURE_FUNCTIONS or (
            isinstance(node.target, str) and node.target.endswith("_")
        ):
            return None
        gm = rewriter.gm
        args = map_arg(node.args, lambda n: fetch_attr(gm, n.target))
        kwargs = map_arg(node.kwargs, lambda n: fetch_attr(gm, n.target))
        try:
            with torch.no_grad():
                value = _call(node, args, kwargs)
        except Exception as exc:  # the model would fail the same way at run time
            return self.decline(node, f"{describe(node, gm)} fails on its constant inputs: "
                                      f"{type(exc).__name__}")
        if not isinstance(value, Tensor) or value.numel() > MAX_CONSTANT_ELEMENTS:
            return None
        return rewriter.replace_with_constant(
            self.name, node, value.detach().clone(),
            detail=f"{describe(node, gm)} evaluated once",
        )


def _call(node: Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)
