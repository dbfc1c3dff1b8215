"""The ops no exact pass merges, listed with the reason, for reports.

Deep Rebirth also merges max pooling and LRN into neighbouring convs, but only by *retraining*
the merged layer: the result approximates the original. repfuse's default passes rewrite only
what is mathematically equal, so these ops stay; :func:`not_mergeable` names each one so a report
can say why the fused model still has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from repfuse.graph import origin_paths_of

_MAX_POOL = ("max pooling", "max is not linear, so no convolution computes it (Deep Rebirth "
                            "merges it only by retraining, an approximation)")
_LRN = ("local response normalization", "it divides by a power of a local sum of squares, "
                                        "which is not linear")
_ACTIVATION = ("activation", "it is not linear; only affine ops merge into a conv (the linear "
                             "layers on either side of it stay separate)")

_MODULES: dict[type, tuple[str, str]] = {
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                     nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _MAX_POOL),
    nn.LocalResponseNorm: _LRN,
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU,
                     nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
                     nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Softmax,
                     nn.LogSoftmax, nn.Tanhshrink, nn.Threshold), _ACTIVATION),
}
_FUNCTIONS: dict[object, tuple[str, str]] = {
    **dict.fromkeys((F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.adaptive_max_pool3d), _MAX_POOL),
    F.local_response_norm: _LRN,
    **dict.fromkeys((F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
                     F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
                     torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.softmax,
                     torch.softmax, F.log_softmax, F.prelu), _ACTIVATION),
}
aten = torch.ops.aten
# The same ops as an exported program spells them (training and inference IR).
_FUNCTIONS.update({
    **dict.fromkeys((aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                     aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
                     aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default,
                     aten.adaptive_max_pool3d.default), _MAX_POOL),
    **dict.fromkeys((aten.relu.default, aten.relu_.default, aten.relu6.default,
                     aten.hardtanh.default, aten.hardtanh_.default, aten.leaky_relu.default,
                     aten.elu.default, aten.selu.default, aten.celu.default, aten.gelu.default,
                     aten.silu.default, aten.silu_.default, aten.mish.default,
                     aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
                     aten.sigmoid.default, aten.tanh.default, aten.softplus.default,
                     aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
                     aten._log_softmax.default, aten.prelu.default,
                     aten._prelu_kernel.default), _ACTIVATION),
})
_METHODS: dict[str, tuple[str, str]] = dict.fromkeys(
    ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax"),
    _ACTIVATION,
)


@dataclass(frozen=True)
class NotMergeable:
    """An op that stays in the fused graph because no exact rewrite removes it."""

    node: str
    op: str  # e.g. "MaxPool2d", "relu"
    kind: str  # "max pooling" | "local response normalization" | "activation"
    reason: str
    module_paths: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "kind": self.kind, "reason": self.reason,
                "module_paths": list(self.module_paths)}


def classify(gm: GraphModule, node: Node) -> tuple[str, tuple[str, str]] | None:
    """``(op name, (kind, reason))`` for a max pool, LRN or activation node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        found = _MODULES.get(type(module))
        return None if found is None else (type(module).__name__, found)
    if node.op == "call_function":
        found = _FUNCTIONS.get(node.target)
        return None if found is None else (getattr(node.target, "__name__", "?"), found)
    if node.op == "call_method":
        found = _METHODS.get(node.target)
        return None if found is None else (node.target, found)
    return None


def not_mergeable(gm: GraphModule) -> list[NotMergeable]:
    """Every max pooling, LRN and activation in ``gm``, with why no exact pass merges it."""
    found = []
    for node in gm.graph.nodes:
        classified = classify(gm, node)
        if classified is None:
            continue
        op, (kind, reason) = classified
        found.append(NotMergeable(node.name, op, kind, f"{kind} is not mergeable exactly: "
                                                       f"{reason}", origin_paths_of(node)))
    return found


def summarize(items: list[NotMergeable]) -> list[dict]:
    """One entry per op: ``{"op", "kind", "count", "reason", "nodes"}``, most frequent first."""
    by_op: dict[str, list[NotMergeable]] = {}
    for item in items:
        by_op.setdefault(item.op, []).append(item)
    return [
        {"op": op, "kind": group[0].kind, "count": len(group), "reason": group[0].reason,
         "nodes": [g.node for g in group]}
        for op, group in sorted(by_op.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]
