"""The quantization readiness report: what INT8 (and float16) will do to a fused model.

Merging branches and folding batch norms changes how weights spread over channels: a channel
whose batch norm had a tiny running variance gets its weights multiplied by ``γ/√(σ²+ε)``,
which can put it orders of magnitude above its neighbours, and per-tensor INT8 then has only a
few levels left for every other channel. :func:`quant_report` measures this on the fused model
in float64, before anyone quantizes:

- per layer (no data needed): per-output-channel weight ranges ``max |W[c]|``, the max/median
  ratio, the SQNR of symmetric INT8 per-tensor and per-channel quantization (computed by
  quantizing, :mod:`repfuse.quant.fakequant`), outlier channels, the batch norms whose small
  running variance (or large ``γ``) inflated them (read through the rewrite provenance in the
  original model), float16 overflow/underflow and subnormal biases;
- the same weight figures after exact cross-layer equalization (the ``equalize`` pass), run on
  a copy;
- with calibration inputs: activation ranges per layer, and the end-to-end SQNR of a simulated
  INT8 model (:mod:`repfuse.quant.simulate`) for the train form (batch norms folded per branch,
  as every exporter does), the fused form and the equalized form.

The report is data (:class:`QuantReport`, ``to_dict()`` for JSON); rendering is in
:mod:`repfuse.quant.render`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm

from repfuse.capture import propagate_shapes, trace
from repfuse.equalization import output_channel_ranges, range_ratio
from repfuse.errors import RepfuseError
from repfuse.graph import LayerView, layer_view, origin_paths_of
from repfuse.passes import run_passes, run_pipeline
from repfuse.passes.equalize import Equalize, layer_weights
from repfuse.quant.fakequant import (
    F64,
    FLOAT16_MAX,
    channel_sqnr_db,
    float16_counts,
    subnormal_count,
    weight_sqnr_db,
)
from repfuse.quant.simulate import Batch, _Watch, as_float64, simulate_int8
from repfuse.verify.compare import json_float

SCHEMA_VERSION = 1
# What the train form becomes in any deployment: batch norms folded into their own branch.
TRAIN_FOLDS = ("remove_noops", "fold_batchnorm", "fold_scale_bias")


@dataclass(frozen=True)
class Thresholds:
    """When the report flags something."""

    sqnr_db: float = 30.0  # INT8 weight SQNR below this is flagged (~5 effective bits)
    outlier_factor: float = 8.0  # a channel range this many times the median is an outlier
    inflation_factor: float = 4.0  # a BN scale this many times its median inflated a channel


@dataclass(frozen=True)
class BatchNormCause:
    """A batch norm whose scale ``γ/√(σ²+ε)`` inflated an outlier channel of a fused layer."""

    batchnorm: str  # module path in the original model
    channel: int
    running_var: float
    median_running_var: float
    eps: float
    gamma: float
    factor: float  # |γ|/√(σ²+ε) of this channel
    median_factor: float
    cause: str  # "running_var" (σ² far below the median) or "gamma"

    def describe(self) -> str:
        if self.cause == "running_var":
            why = (f"running_var {self.running_var:.3g} (median {self.median_running_var:.3g},"
                   f" eps {self.eps:.3g})")
        else:
            why = f"gamma {self.gamma:.3g}"
        return (f"channel {self.channel}: {why} of '{self.batchnorm}' scales it by "
                f"{self.factor:.3g} ({self.factor / self.median_factor:.3g}x the median)")

    def to_dict(self) -> dict:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class LayerQuant:
    """The weight figures of one conv/linear layer."""

    node: str
    module: str  # module path in the model, or the weight's owner for a functional layer
    module_paths: tuple[str, ...]  # original module paths it stands for (provenance)
    kind: str
    weight_shape: tuple[int, ...]
    channel_ranges: tuple[float, ...]  # max |W| per output channel
    range_ratio: float  # max / median of channel_ranges
    sqnr_per_tensor_db: float
    sqnr_per_channel_db: float
    # median over output channels of each channel's SQNR under the per-tensor scale: what a
    # typical channel keeps when one outlier sets the scale
    median_channel_sqnr_db: float
    outlier_channels: tuple[int, ...]
    batchnorm_causes: tuple[BatchNormCause, ...]
    float16: dict[str, int]  # weight_/bias_ overflow, underflow, subnormal
    subnormal_biases: int  # in the layer's own dtype
    flags: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        return {
            "node": self.node, "module": self.module, "module_paths": list(self.module_paths),
            "kind": self.kind, "weight_shape": list(self.weight_shape),
            "channel_ranges": [json_float(r) for r in self.channel_ranges],
            "range_ratio": json_float(self.range_ratio),
            "sqnr_per_tensor_db": json_float(self.sqnr_per_tensor_db),
            "sqnr_per_channel_db": json_float(self.sqnr_per_channel_db),
            "median_channel_sqnr_db": json_float(self.median_channel_sqnr_db),
            "outlier_channels": list(self.outlier_channels),
            "batchnorm_causes": [c.to_dict() for c in self.batchnorm_causes],
            "float16": dict(self.float16), "subnormal_biases": self.subnormal_biases,
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class ActivationRange:
    """What one layer reads and writes over the calibration inputs (float64)."""

    node: str
    module: str
    input_min: float
    input_max: float
    output_min: float
    output_max: float
    channel_ratio: float  # max / median of the output's per-channel max |a|
    float16_overflow: bool  # some input or output value beyond float16's range

    def to_dict(self) -> dict:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FormSQNR:
    """End-to-end SQNR of a simulated INT8 model of one form against its float64 output."""

    form: str  # "train" | "fused" | "equalized"
    per_tensor_db: float
    per_channel_db: float
    quant_points: int
    note: str = ""

    def to_dict(self) -> dict:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class QuantReport:
    """The quantization readiness of a fused model (see the module docstring)."""

    model: str
    thresholds: Thresholds
    layers: list[LayerQuant]
    equalized: list[LayerQuant]  # the same layers after ``equalize`` (same order)
    equalization: dict  # {"rewrites": [...], "declined": [...]} of the equalize run
    activations: list[ActivationRange] = field(default_factory=list)
    forms: list[FormSQNR] = field(default_factory=list)
    batches: int = 0
    notes: list[str] = field(default_factory=list)
    calibration: str = ""  # where the calibration batches came from ("" without any)

    @property
    def flagged(self) -> list[LayerQuant]:
        return [layer for layer in self.layers if layer.flagged]

    def worst(self, per_channel: bool = False, equalized: bool = False) -> LayerQuant | None:
        """The layer with the lowest INT8 weight SQNR (fused or equalized form)."""
        layers = self.equalized if equalized else self.layers
        key = "sqnr_per_channel_db" if per_channel else "sqnr_per_tensor_db"
        return min(layers, key=lambda layer: getattr(layer, key), default=None)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "kind": "quant_report", "model": self.model,
            "thresholds": asdict(self.thresholds), "batches": self.batches,
            "calibration": self.calibration,
            "layers": [layer.to_dict() for layer in self.layers],
            "equalized": [layer.to_dict() for layer in self.equalized],
            "equalization": self.equalization,
            "activations": [a.to_dict() for a in self.activations],
            "forms": [f.to_dict() for f in self.forms],
            "flagged": [layer.node for layer in self.flagged],
            "notes": list(self.notes),
        }


# --- weights ---------------------------------------------------------------------------------


def _batchnorm_causes(
    original: nn.Module | None, paths: Sequence[str], ranges: Tensor,
    outliers: Sequence[int], thresholds: Thresholds,
) -> list[BatchNormCause]:
    """The batch norms among ``paths`` (read in ``original``) whose scale for an outlier
    channel is ``inflation_factor`` times their median scale or more."""
    if original is None or not outliers:
        return []
    causes = []
    for path in paths:
        try:
            bn = original.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(bn, _BatchNorm) or bn.running_var is None:
            continue
        if bn.num_features != ranges.numel():
            continue  # folded into the input side of a layer: another channel axis
        var = bn.running_var.detach().to(F64)
        gamma = (torch.ones_like(var) if bn.weight is None
                 else bn.weight.detach().to(F64))
        factor = gamma.abs() / torch.sqrt(var + bn.eps)
        median_factor, median_var = float(factor.median()), float(var.median())
        if median_factor == 0:
            continue
        for channel in outliers:
            ratio = float(factor[channel]) / median_factor
            if ratio < thresholds.inflation_factor:
                continue
            # the variance is the cause when it alone accounts for the inflation
            var_ratio = math.sqrt((median_var + bn.eps) / (float(var[channel]) + bn.eps))
            cause = "running_var" if var_ratio >= thresholds.inflation_factor else "gamma"
            causes.append(BatchNormCause(
                path, channel, float(var[channel]), median_var, float(bn.eps),
                float(gamma[channel]), float(factor[channel]), median_factor, cause))
    return causes


def layer_quant(gm: GraphModule, node: Node, original: nn.Module | None = None,
                thresholds: Thresholds = Thresholds(),
                stored: LayerView | None = None) -> LayerQuant:
    """The weight figures of the conv/linear layer at ``node`` (see :class:`LayerQuant`).

    ``stored`` is the same layer as the model keeps it (``gm`` may be a float64 copy): its
    tensors, in their own dtype, are checked for float16 range and subnormal values.
    """
    view = layer_view(gm, node)
    if view is None:
        raise RepfuseError(f"{node.format_node()} is not a conv/linear layer")
    stored = stored or view
    weights = layer_weights(view)
    ranges = output_channel_ranges(weights)
    axis = 1 if view.kind == "conv_transpose" else 0
    per_tensor = weight_sqnr_db(weights.weight, per_channel=False)
    per_channel = weight_sqnr_db(weights.weight, per_channel=True, axis=axis)
    median_channel = float(channel_sqnr_db(weights.weight, False, axis).median())
    median = float(ranges.median())
    outliers = [c for c, r in enumerate(ranges.tolist())
                if median > 0 and r >= thresholds.outlier_factor * median]
    paths = origin_paths_of(node)
    causes = _batchnorm_causes(original, paths, ranges, outliers, thresholds)
    fp16 = {f"weight_{k}": v for k, v in float16_counts(stored.weight).items()}
    bias = stored.bias if stored.bias is not None else torch.zeros(0)
    fp16.update({f"bias_{k}": v for k, v in float16_counts(bias).items()})
    subnormal_biases = subnormal_count(bias)

    flags = []
    if per_tensor < thresholds.sqnr_db:
        flags.append(f"INT8 per-tensor weight SQNR {per_tensor:.1f} dB < "
                     f"{thresholds.sqnr_db:g} dB")
    if per_channel < thresholds.sqnr_db:
        flags.append(f"INT8 per-channel weight SQNR {per_channel:.1f} dB < "
                     f"{thresholds.sqnr_db:g} dB")
    if median_channel < thresholds.sqnr_db <= per_tensor:
        flags.append(f"the median channel keeps {median_channel:.1f} dB under the per-tensor "
                     f"INT8 scale (< {thresholds.sqnr_db:g} dB)")
    if outliers:
        shown = ", ".join(map(str, outliers[:8])) + (" ..." if len(outliers) > 8 else "")
        flags.append(f"{len(outliers)} outlier channels (range >= "
                     f"{thresholds.outlier_factor:g}x the median): {shown}")
    flags.extend(cause.describe() for cause in causes)
    for part in ("weight", "bias"):
        for what in ("overflow", "underflow"):
            count = fp16[f"{part}_{what}"]
            if count:
                flags.append(f"{count} {part} values {what} float16")
    if subnormal_biases:
        flags.append(f"{subnormal_biases} subnormal biases in {stored.bias.dtype}")
    return LayerQuant(
        node=node.name, module=view.module_path or (paths[0] if paths else node.name),
        module_paths=paths, kind=view.kind, weight_shape=tuple(view.weight.shape),
        channel_ranges=tuple(ranges.tolist()), range_ratio=range_ratio(ranges),
        sqnr_per_tensor_db=per_tensor, sqnr_per_channel_db=per_channel,
        median_channel_sqnr_db=median_channel,
        outlier_channels=tuple(outliers), batchnorm_causes=tuple(causes), float16=fp16,
        subnormal_biases=subnormal_biases, flags=tuple(flags),
    )


def _layer_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if layer_view(gm, n) is not None]


# --- activations -----------------------------------------------------------------------------


def activation_ranges(gm: GraphModule, batches: Sequence[Batch]) -> list[ActivationRange]:
    """Per conv/linear layer: the range of what it reads and writes over ``batches``."""
    layers = {n: layer_view(gm, n) for n in _layer_nodes(gm)}
    inputs = {view.input for view in layers.values()}
    seen: dict[Node, list] = {}  # node -> [min, max, per-channel max |a|]

    def observe(node: Node, value: Tensor) -> None:
        lo, hi = float(value.min()), float(value.max())
        per_channel = None
        if node in layers:
            axis = -1 if layers[node].kind == "linear" else 1
            moved = value.detach().abs().movedim(axis, 0)
            per_channel = moved.reshape(moved.shape[0], -1).amax(dim=1)
        old = seen.get(node)
        if old is None:
            seen[node] = [lo, hi, per_channel]
            return
        old[0], old[1] = min(old[0], lo), max(old[1], hi)
        if per_channel is not None:
            old[2] = torch.maximum(old[2], per_channel)

    watch = _Watch(gm, set(layers) | inputs, observe)
    with torch.no_grad():
        for batch in batches:
            watch.run(*as_float64(batch))
    out = []
    for node, view in layers.items():
        if node not in seen or view.input not in seen:
            continue
        in_lo, in_hi, _ = seen[view.input]
        lo, hi, per_channel = seen[node]
        overflow = max(abs(in_lo), abs(in_hi), abs(lo), abs(hi)) > FLOAT16_MAX
        out.append(ActivationRange(
            node.name, view.module_path or node.name, in_lo, in_hi, lo, hi,
            range_ratio(per_channel), overflow))
    return out


# --- the report ------------------------------------------------------------------------------


def _batches(inputs) -> list[Batch]:
    if inputs is None:
        return []
    if isinstance(inputs, Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple) and all(isinstance(t, Tensor) for t in inputs):
        return [inputs]
    return [(b,) if isinstance(b, Tensor) else tuple(b) for b in inputs]


def _graphs(model: nn.Module, batches: list[Batch]) -> tuple[GraphModule, GraphModule]:
    """The model as a GraphModule in its own dtype, and a float64 copy with shapes."""
    if isinstance(model, GraphModule):
        source = model
    elif batches:
        source = trace(model, batches[0])
    else:
        raise RepfuseError("quant_report needs a GraphModule (e.g. from repfuse.fuse) or "
                           "inputs to trace the model with")
    gm = copy.deepcopy(source).to(F64).eval()
    if batches:  # equalize reads shapes; a loaded .pt has none
        propagate_shapes(gm, list(as_float64(batches[0])))
    return source, gm


def quant_report(
    model: nn.Module,
    inputs: Tensor | Batch | Sequence[Tensor | Batch] | None = None,
    *,
    original: nn.Module | None = None,
    name: str | None = None,
    thresholds: Thresholds = Thresholds(),
    equalize: bool = True,
    calibration: str = "",
) -> QuantReport:
    """Measure how INT8 (and float16) will treat the fused ``model``, in float64.

    ``model`` is the fused model (a GraphModule from :func:`repfuse.fuse`; any other module is
    traced on the first batch of ``inputs``). ``original``, the train-form model it was fused
    from, lets the report read the batch norms named by the rewrite provenance (to say which
    one inflated an outlier channel) and simulate the train form. ``inputs``: calibration
    batches (a tensor, a tuple of tensors, or a list of either); without them only the weight
    part is measured. ``equalize=False`` leaves out the equalized form (its weight figures and
    its simulated INT8 model). ``calibration`` says where ``inputs`` came from, for the report.
    Neither model is modified.
    """
    batches = _batches(inputs)
    source, fused = _graphs(model, batches)
    stored = {n.name: layer_view(source, n) for n in source.graph.nodes}
    layers = [layer_quant(fused, n, original, thresholds, stored.get(n.name))
              for n in _layer_nodes(fused)]

    equalized_gm, equalized, equalization = None, [], {}
    if equalize:
        equalized_gm = copy.deepcopy(fused)
        result = run_passes(equalized_gm, [Equalize()])
        equalized = [layer_quant(equalized_gm, n, None, thresholds)
                     for n in _layer_nodes(equalized_gm)]
        equalization = {"rewrites": [r.to_dict() for r in result.rewrites],
                        "declined": [d.to_dict() for d in result.declined]}
    notes = []
    if original is None and any(layer.outlier_channels for layer in layers):
        notes.append("outlier channels found: pass the original model to trace them to the "
                     "batch norms that caused them")
    report = QuantReport(name or type(model).__name__, thresholds, layers, equalized,
                         equalization, batches=len(batches), notes=notes,
                         calibration=calibration if batches else "")
    if not batches:
        return report
    report.activations = activation_ranges(fused, batches)
    if original is not None:
        train = trace(copy.deepcopy(original).to(F64).eval(), as_float64(batches[0]))
        run_pipeline(train, TRAIN_FOLDS)
        sim = simulate_int8(train, batches)
        report.forms.append(FormSQNR("train", sim.per_tensor_db, sim.per_channel_db,
                                     sim.points, "batch norms folded per branch"))
    for form, gm in (("fused", fused), ("equalized", equalized_gm)):
        if gm is None:
            continue
        sim = simulate_int8(gm, batches)
        report.forms.append(FormSQNR(form, sim.per_tensor_db, sim.per_channel_db, sim.points))
    return report
