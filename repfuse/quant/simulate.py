"""A simulated INT8 model: a float64 GraphModule with fake-quantized weights and activations.

Where onnxruntime's static QDQ quantization puts a quantize/dequantize pair, approximately:
the graph inputs, the data input and the output of every conv/linear layer, and the output of
every elementwise sum (a residual add, a branch sum). Activation ranges are the min/max over the
calibration batches (onnxruntime's MinMax calibration); weights are symmetric INT8 per tensor
or per output channel (:mod:`repfuse.quant.fakequant`). Biases stay in float64: onnxruntime
quantizes them to int32 with the product of the input and weight scales, whose error is far
below the weights'.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_leaves

from repfuse.graph import arith_kind, fetch_attr, layer_view
from repfuse.quant.fakequant import quantize_activation, quantize_weight, sqnr_db

F64 = torch.float64
Batch = tuple[Tensor, ...]


class _Watch(Interpreter):
    """Runs the graph and hands every watched node's tensor output to ``visit``, which may
    return a replacement (the fake-quantized value)."""

    def __init__(self, gm: GraphModule, watched: set[Node],
                 visit: Callable[[Node, Tensor], Tensor | None]) -> None:
        super().__init__(gm)
        self.watched = watched
        self.visit = visit

    def run_node(self, n: Node):
        out = super().run_node(n)
        if n in self.watched and isinstance(out, Tensor) and out.is_floating_point():
            replaced = self.visit(n, out)
            if replaced is not None:
                return replaced
        return out


def quant_points(gm: GraphModule) -> list[Node]:
    """The nodes whose outputs a static QDQ quantization quantizes (see the module doc)."""
    points: dict[Node, None] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            points[node] = None
        elif layer_view(gm, node) is not None:
            points[layer_view(gm, node).input] = None
            points[node] = None
        elif arith_kind(node) == "add" and sum(isinstance(a, Node) for a in node.args) == 2:
            points[node] = None
    return list(points)


def run_float64(gm: GraphModule, batches: Sequence[Batch]) -> list[Tensor]:
    """The outputs of ``gm`` (float64) for each batch, flattened to one tensor per batch."""
    with torch.no_grad():
        return [_flat(gm(*(_f64(t) for t in batch))) for batch in batches]


def calibrate(gm: GraphModule, batches: Sequence[Batch]) -> dict[Node, tuple[float, float]]:
    """``(min, max)`` of every quantization point over ``batches``."""
    ranges: dict[Node, tuple[float, float]] = {}

    def observe(node: Node, value: Tensor) -> None:
        lo, hi = float(value.min()), float(value.max())
        old = ranges.get(node)
        ranges[node] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    watch = _Watch(gm, set(quant_points(gm)), observe)
    with torch.no_grad():
        for batch in batches:
            watch.run(*(_f64(t) for t in batch))
    return ranges


def fake_quantized(gm: GraphModule, per_channel: bool) -> GraphModule:
    """A float64 copy of ``gm`` whose conv/linear weights are fake-quantized to INT8."""
    copied = copy.deepcopy(gm).to(F64)
    with torch.no_grad():
        for node in copied.graph.nodes:
            layer = layer_view(copied, node)
            if layer is None:
                continue
            axis = 1 if layer.kind == "conv_transpose" else 0
            quantized = quantize_weight(layer.weight, per_channel, axis)
            if layer.module_path is not None:
                copied.get_submodule(layer.module_path).weight.copy_(quantized)
            else:
                fetch_attr(copied, layer.attr_nodes[0].target).copy_(quantized)
    return copied


@dataclass(frozen=True)
class SimulatedSQNR:
    """End-to-end SQNR (dB) of the simulated INT8 model against the float64 one."""

    per_tensor_db: float
    per_channel_db: float
    points: int  # activation quantization points


def simulate_int8(gm: GraphModule, batches: Sequence[Batch]) -> SimulatedSQNR:
    """Calibrate on ``batches``, then run the fake-INT8 model (per-tensor and per-channel
    weights, INT8 activations) on the same batches and compare with float64."""
    float_model = copy.deepcopy(gm).to(F64).eval()
    reference = torch.cat(run_float64(float_model, batches))
    ranges = calibrate(float_model, batches)
    results = []
    for per_channel in (False, True):
        quantized = fake_quantized(float_model, per_channel)
        by_name = {n.name: n for n in quantized.graph.nodes}
        limits = {by_name[n.name]: r for n, r in ranges.items()}

        def fake(node: Node, value: Tensor, limits=limits) -> Tensor:
            lo, hi = limits[node]
            return quantize_activation(value, lo, hi)

        watch = _Watch(quantized, set(limits), fake)
        outputs = []
        with torch.no_grad():
            for batch in batches:
                outputs.append(_flat(watch.run(*(_f64(t) for t in batch))))
        results.append(sqnr_db(reference, torch.cat(outputs)))
    return SimulatedSQNR(results[0], results[1], len(ranges))


def _f64(t: Tensor) -> Tensor:
    return t.to(F64) if t.is_floating_point() else t


def _flat(out) -> Tensor:
    leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
    return torch.cat([t.detach().to(F64).reshape(-1) for t in leaves])
