"""Remove ops that compute the identity in eval mode.

``nn.Identity``; dropout in every spelling (``nn.Dropout*``, ``F.dropout*``, ``torch.dropout``,
``aten.dropout``) when not training or with ``p = 0``; ``x * 1``, ``1 * x``, ``x / 1``,
``x + 0``, ``0 + x`` (the start of ``sum([...])``), ``x - 0`` on a floating-point ``x``; and
*dead code*: an op whose result nothing reads and whose call has no effect (no in-place write,
random draw or assert; a module only if it is one of torch.nn's own, in eval mode), e.g. a
detection head's training-only branch that eval mode computes and drops.
Custom modules such as stochastic depth (drop path) that return their input in eval mode
vanish already during tracing, since fx traces through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from repfuse.graph import arith_kind, bind_args, describe, dtype_of, is_impure
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


@dataclass(frozen=True)
class RemoveNoops(Pass):
    """Drop identities, eval-mode dropout and arithmetic with a neutral scalar."""

    name: ClassVar[str] = "remove_noops"
    summary: ClassVar[str] = (
        "remove nn.Identity, eval-mode dropout and x*1, x/1, x+0, x-0"
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
        return self._neutral_arithmetic(node, rewriter)

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
