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
from repfuse.quant.fakequant import F64, quantize_activation, quantize_weight, sqnr_db

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
        layer = layer_view(gm, node)
        if node.op == "placeholder":
            points[node] = None
        elif layer is not None:
            points[layer.input] = None
            points[node] = None
        elif arith_kind(node) == "add" and sum(isinstance(a, Node) for a in node.args) == 2:
            points[node] = None
    return list(points)


def as_float64(batch: Batch) -> Batch:
    """``batch`` with its floating-point tensors in float64 (integer tensors as they are)."""
    return tuple(t.to(F64) if t.is_floating_point() else t for t in batch)


def _outputs(watch: _Watch, batches: Sequence[Batch]) -> Tensor:
    """The outputs of ``watch``'s graph on every batch (float64), flattened into one tensor."""
    with torch.no_grad():
        return torch.cat([_flat(watch.run(*as_float64(batch))) for batch in batches])


def calibrate(gm: GraphModule, batches: Sequence[Batch]
              ) -> tuple[dict[Node, tuple[float, float]], Tensor]:
    """``(min, max)`` of every quantization point over ``batches``, and the outputs of
    ``gm`` on them (flattened into one tensor): the calibration run is the float64 run."""
    ranges: dict[Node, tuple[float, float]] = {}

    def observe(node: Node, value: Tensor) -> None:
        lo, hi = float(value.min()), float(value.max())
        old = ranges.get(node)
        ranges[node] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    outputs = _outputs(_Watch(gm, set(quant_points(gm)), observe), batches)
    return ranges, outputs


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
    ranges, reference = calibrate(float_model, batches)
    results = []
    for per_channel in (False, True):
        quantized = fake_quantized(float_model, per_channel)
        by_name = {n.name: n for n in quantized.graph.nodes}
        limits = {by_name[n.name]: r for n, r in ranges.items()}

        def fake(node: Node, value: Tensor, limits=limits) -> Tensor:
            lo, hi = limits[node]
            return quantize_activation(value, lo, hi)

        outputs = _outputs(_Watch(quantized, set(limits), fake), batches)
        results.append(sqnr_db(reference, outputs))
    return SimulatedSQNR(results[0], results[1], len(ranges))


def _flat(out) -> Tensor:
    leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
    return torch.cat([t.detach().to(F64).reshape(-1) for t in leaves])
