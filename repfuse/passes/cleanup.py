"""Remove ops that compute the identity in eval mode.

``nn.Identity``; dropout in every spelling (``nn.Dropout*``, ``F.dropout*``, ``torch.dropout``,
``aten.dropout``) when not training or with ``p = 0``; ``x * 1``, ``1 * x``, ``x / 1``,
``x + 0``, ``0 + x`` (the start of ``sum([...])``), ``x - 0`` on a floating-point ``x``; and
*dead code*: an op whose result nothing reads and whose call has no effect (no in-place write,
random draw or assert; a module only if it is one of torch.nn's own, in eval mode), e.g. a
detection head's training-only branch that eval mode computes and drops.
Custom modules such as stochastic depth (drop path) that return their input in eval mode
vanish already during tracing, since fx traces through them.

An exported program spells copies that only keep a value apart: ``aten.clone`` (what
``contiguous()`` and eval dropout become after ``run_decompositions``) and ``aten.alias``.
Each is the identity on values; it is removed when nothing writes in place into it or into
its input (then no later write could tell the copy from the original), and when no view reads
a copy that lays the values out anew (``aten.view`` needs the copy's strides). Likewise a pure
aten op repeated on the same operands (``view(x, s)`` twice) is the first one again, an
``aten.slice`` of a whole axis is its input, and an ``aten.slice_scatter`` into a whole axis
is what it scatters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from repfuse.graph import (
    arith_kind,
    aten_view,
    bind_args,
    describe,
    dtype_of,
    is_impure,
    pure_aten,
    written_in_place,
)
from repfuse.lift import whole_slice_value
from repfuse.passes.base import Decline, Pass, Rewrite, Rewriter

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {
    F.dropout: ("input", "p", "training", "inplace"),
    F.dropout1d: ("input", "p", "training", "inplace"),
    F.dropout2d: ("input", "p", "training", "inplace"),
    F.dropout3d: ("input", "p", "training", "inplace"),
    F.alpha_dropout: ("input", "p", "training", "inplace"),
    F.feature_alpha_dropout: ("input", "p", "training", "inplace"),
    torch.dropout: ("input", "p", "training"),
    torch.ops.aten.dropout.default: ("input", "p", "training"),
}
# Functional dropout defaults to training=True: only an explicit False (or p = 0) is a no-op.
_DROPOUT_DEFAULTS = {"p": 0.5, "training": True, "inplace": False}
_NEUTRAL = {"mul": 1, "div": 1, "add": 0, "sub": 0}
_COPIES = {torch.ops.aten.clone.default, torch.ops.aten.alias.default}


@dataclass(frozen=True)
class RemoveNoops(Pass):
    """Drop identities, eval-mode dropout and arithmetic with a neutral scalar."""

    name: ClassVar[str] = "remove_noops"
    summary: ClassVar[str] = (
        "remove nn.Identity, eval-mode dropout, x*1, x/1, x+0, x-0, and in exported programs "
        "copies (aten.clone/alias) and ops repeated on the same operands"
    )

    def visit(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        gm = rewriter.gm
        if not node.users and _removable(gm, node):
            return rewriter.remove(self.name, node, f"{describe(node, gm)} computes a value "
                                                    "nothing reads: removed")
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, (nn.Identity, *_DROPOUT_MODULES)):
                return None
            if len(node.args) != 1 or not isinstance(node.args[0], Node):
                return None
            if module.training and not isinstance(module, nn.Identity) and module.p > 0:
                return self.decline(node, f"{describe(node, gm)} is in training mode")
            return rewriter.bypass(self.name, node, node.args[0], f"{describe(node, gm)} removed")
        if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            args = bind_args(node, _DROPOUT_FUNCTIONS[node.target], _DROPOUT_DEFAULTS)
            if not isinstance(args["input"], Node):
                return None
            if args["training"] is not False and args["p"] != 0:
                return self.decline(node, f"{describe(node, gm)} is called with training="
                                          f"{args['training']!r}, so it is not a no-op")
            return rewriter.bypass(self.name, node, args["input"],
                                   f"{describe(node, gm)} removed")
        if node.op == "call_function" and node.target in _COPIES:
            return self._copy(node, rewriter)
        whole = whole_slice_value(node)
        if whole is not None:
            return rewriter.bypass(self.name, node, whole,
                                   f"{describe(node, gm)} removed: it spans the whole axis")
        repeated = self._repeated(node, rewriter) if pure_aten(node) else None
        return repeated or self._neutral_arithmetic(node, rewriter)

    def _repeated(self, node: Node, rewriter: Rewriter) -> Rewrite | None:
        """An aten op applied again to the same operands computes the same value: its readers
        read the first result (an exported ``nn.Linear`` on ``N×T×C`` views its input anew for
        each of the Q, K and V layers; one view lets them be seen as siblings)."""
        inputs = node.all_input_nodes
        if not inputs:
            return None
        for other in inputs[0].users:
            if other is node or other.target is not node.target or not other < node:
                continue
            if not (_same_operands(other.args, node.args)
                    and _same_operands(other.kwargs, node.kwargs)):
                continue
            if written_in_place(node) or written_in_place(other):
                return None
            gm = rewriter.gm
            return rewriter.bypass(self.name, node, other, f"{describe(node, gm)} removed: it "
                                                           f"computes {describe(other, gm)} again")
        return None

    def _copy(self, node: Node, rewriter: Rewriter) -> Rewrite | Decline | None:
        data = node.args[0] if node.args else None
        if not isinstance(data, Node) or dtype_of(node) != dtype_of(data):
            return None
        if _restrides(node, data) and any(_is_view(u) for u in node.users):
            return None  # the copy lays the data out for the view that reads it
        label = describe(node, rewriter.gm)
        for tensor in (node, data):
            if written_in_place(tensor):
                return self.decline(node, f"{label} stays: {describe(tensor, rewriter.gm)} "
                                          "is written in place, so the copy may differ")
        return rewriter.bypass(self.name, node, data, f"{label} removed")

    def _neutral_arithmetic(self, node: Node, rewriter: Rewriter) -> Rewrite | None:
        kind = arith_kind(node)
        if kind is None or len(node.args) != 2 or node.kwargs:
            return None
        data, const = node.args
        if kind in ("add", "mul") and not isinstance(data, Node):
            const, data = data, const  # 0 + x (as in sum([...])) and 1 * x
        if not isinstance(data, Node) or isinstance(const, bool):
            return None
        if not isinstance(const, (int, float)) or const != _NEUTRAL[kind]:
            return None
        dtype = dtype_of(data)
        if dtype is None or not dtype.is_floating_point or dtype_of(node) != dtype:
            return None  # x * 1.0 on an integer tensor changes its dtype
        return rewriter.bypass(self.name, node, data, f"{describe(node, rewriter.gm)} removed")


def _removable(gm, node: Node) -> bool:
    """True for a dead node that may go: no effect of its call is lost."""
    if node.op not in ("call_function", "call_method", "call_module") or is_impure(node):
        return False
    if node.op != "call_module":
        return True
    module = gm.get_submodule(node.target)
    own = type(module).__module__.startswith("torch.nn.modules")
    hooked = any(getattr(module, name, None) for name in ("_forward_hooks",
                                                           "_forward_pre_hooks"))
    return own and not module.training and not hooked


def _same_operands(first: Any, second: Any) -> bool:
    """Equal arguments: the same nodes, equal plain values (a tensor is never assumed equal)."""
    if isinstance(first, Node) or isinstance(second, Node):
        return first is second
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(
            _same_operands(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(
            _same_operands(first[k], second[k]) for k in first)
    if isinstance(first, Tensor) or isinstance(second, Tensor):
        return False
    return type(first) is type(second) and first == second


def _restrides(copy: Node, data: Node) -> bool:
    """True when ``copy`` may lay the values out differently from ``data`` (``contiguous()``
    after a permute), as shape propagation recorded them, or when that is unknown."""
    strides = [getattr(n.meta.get("tensor_meta"), "stride", None) for n in (copy, data)]
    return strides[0] is None or strides[0] != strides[1]


def _is_view(node: Node) -> bool:
    """An op whose result aliases its input (``aten.view`` needs compatible strides)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return aten_view(node)
    return node.op != "output"
