"""ONNX: torch.onnx's TorchScript-based exporter, onnxsim, and a check in onnxruntime.

``torch.onnx.export(..., dynamo=False)`` needs no ``onnxscript`` and exports fx GraphModules
reliably. The result is simplified with onnxsim and run back in onnxruntime with graph
optimizations disabled (``ORT_DISABLE_ALL``), so the check sees the exported graph itself, not
what onnxruntime makes of it. :attr:`ExportResult.onnx_nodes` holds ONNX node counts by op type
of the train-form export, the same after onnxsim, and ours after onnxsim: exporting in eval
mode folds a BatchNorm into the conv before it, but a BatchNorm on an identity branch and the
adds of parallel branches stay, and only reparameterization removes them.

Inputs are named after the model's forward parameters (``x``; ``image``, ``extra``), outputs
after their place in the result (``output`` for one tensor, ``output_0``, ... for a tuple, the
keys for a dict: ``logits``, ``features``), in the order :func:`repfuse.verify.flatten_outputs`
gives, which is the order the check compares them in.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repfuse.capture import ExampleInputs, as_input_tuple
from repfuse.errors import ExportError, first_line
from repfuse.export.base import (
    ExportResult,
    FileExport,
    check_dynamic,
    dynamic_axes_of,
    input_axes,
    native_output_silenced,
    prepared,
    refuse_value_branches,
    without_guards,
)
from repfuse.io import OnnxModel, forward_parameters
from repfuse.passes import DEFAULT_PIPELINE, Pass
from repfuse.passes.prune import PruneDead
from repfuse.verify import DEFAULT_VERIFY, VerifyOptions, flatten_outputs

DEFAULT_OPSET = 17

# The passes for a model headed for onnxruntime: the default pipeline without horizontal fusion,
# and exact pruning that keeps every pruned width a multiple of 8.
# - A sibling merge leaves conv -> Split -> activations; onnxruntime materializes the Split, can
#   no longer fuse each conv with its activation, and reorders around it to and from its blocked
#   layout. Measured (benchmarks/RESULTS.md, issue 8): GoogLeNet's ONNX 8-15% slower than
#   without the merges, ResNet-50's 8-12% (one merge), slower than the train form's own ONNX. In
#   eager PyTorch the split outputs are views and the merge pays (GoogLeNet 1.06x at batch 1).
# - onnxruntime's CPU convs work on blocks of 8 channels (NCHWc): 49 channels run as slowly as
#   64. Measured (benchmarks/RESULTS.md, "Exact pruning"): the pruned sparse CNNs gained nothing
#   in onnxruntime with odd widths (x0.93-1.16), x0.74-0.85 with widths a multiple of 8, for a
#   few more MACs (x0.55 instead of x0.48 on the slimmed VGG); attention gained alike. Keeping a
#   dead channel is exact, so the function is the same either way.
ONNX_PIPELINE: tuple[str | Pass, ...] = tuple(
    PruneDead(multiple_of=8) if p == "prune_dead" else p
    for p in DEFAULT_PIPELINE if p != "merge_siblings")


def input_names(model: nn.Module, count: int) -> list[str]:
    """ONNX input names: the forward's parameter names, ``input_<i>`` where there are none."""
    names, _ = forward_parameters(model)
    names = names[:count]
    if len(names) < count or len(set(names)) < count:
        return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
    return names


def output_names(result: object) -> list[str]:
    """ONNX output names from the result's structure: ``output``, ``output_0``, ``logits``,
    ``aux.0`` (see the module docstring)."""
    paths = [name.removeprefix("output") for name, _ in flatten_outputs(result)]
    if paths == [""]:
        return ["output"]
    names = []
    for path in paths:
        keys = re.findall(r"\[(.*?)\]", path)
        parts = [k.strip("'\"") for k in keys]
        name = ".".join(parts)
        if all(k.isdigit() for k in keys):
            name = "output_" + "_".join(parts)
        names.append(re.sub(r"[^\w.]", "_", name) or "output")
    if len(set(names)) < len(names):
        return [f"output_{i}" for i in range(len(names))]
    return names


def onnx_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    dynamic_axes: Sequence[int] | None = None,
):
    """``model`` (an eval-mode copy of it) as an ``onnx.ModelProto``, by the TorchScript-based
    exporter; inputs and outputs named as the module docstring says, ``dynamic_axes`` (and
    axis 0 with ``dynamic_batch``) symbolic."""
    model, _ = prepared(model, None)
    return _onnx_of_eval_copy(model, as_input_tuple(example_inputs), opset,
                              dynamic_axes_of(dynamic_batch, dynamic_axes))


def _onnx_of_eval_copy(model: nn.Module, inputs: tuple[Tensor, ...], opset: int,
                       axes: Sequence[int]):
    # onnx is imported where an ONNX file is made: loading it costs every command a second.
    import onnx

    check_dynamic(model, inputs, axes)
    model = without_guards(model)
    with torch.no_grad():
        result = model(*inputs)
    names_in, names_out = input_names(model, len(inputs)), output_names(result)
    dynamic = None
    if axes:
        dynamic = {name: {a: ("batch" if a == 0 else f"{name}_{a}") for a in own}
                   for name, own in zip(names_in, input_axes(inputs, axes), strict=True)}
        if 0 in axes:
            dynamic.update({name: {0: "batch"} for name, (_, leaf) in
                            zip(names_out, flatten_outputs(result), strict=True) if leaf.dim()})
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught, native_output_silenced():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, which
            # needs onnxscript; it still exports fx GraphModules reliably.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, inputs, buffer, dynamo=False, opset_version=opset,
                input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export (opset {opset}) failed: {first_line(exc)}") from exc
    refuse_value_branches(caught, "torch.onnx.export")
    return onnx.load_from_string(buffer.getvalue())


def simplify_onnx(model) -> tuple[Any, str | None]:
    """``model`` simplified by onnxsim, and ``None``; or ``model`` itself and why not."""
    from onnxsim import simplify  # imported here for the same reason as onnx

    try:
        with native_output_silenced(1), native_output_silenced(2):
            simplified, ok = simplify(model)
    except Exception as exc:
        return model, f"onnxsim failed: {first_line(exc)}"
    if not ok:
        return model, "onnxsim's own check failed; the unsimplified model was kept"
    return simplified, None


def onnx_node_counts(model) -> dict[str, int]:
    """Nodes of the ONNX graph by op type (``{"Conv": 7, "Relu": 7, ...}``), sorted by name."""
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


def export_onnx(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.onnx",
    *,
    reference: nn.Module | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    dynamic_axes: Sequence[int] | None = None,
    simplify: bool = True,
    count_train_nodes: bool = True,
    verify: VerifyOptions = DEFAULT_VERIFY,
    reference_name: str = "reference",
    force: bool = False,
) -> ExportResult:
    """Export ``fused`` to ONNX, simplify it with onnxsim, check it in onnxruntime, write it.

    The check runs the written graph in onnxruntime with graph optimizations disabled against
    ``reference`` (the original model; default ``fused``) in float64, at the tolerance of the
    model's dtype, on the example input and seeded batches (``verify``); with dynamic axes
    (``dynamic_batch`` is axis 0) at twice the example's size on each. When
    ``count_train_nodes``, the reference is exported the same way too, for
    :attr:`ExportResult.onnx_nodes`. Neither model is modified (the exporter runs eval-mode
    copies).
    """
    job = FileExport.of(fused, example_inputs, path, reference=reference, verify=verify,
                        reference_name=reference_name, force=force,
                        dynamic_batch=dynamic_batch, dynamic_axes=dynamic_axes)
    ours, note = _onnx_of_eval_copy(job.model, job.example, opset, job.axes), None
    if simplify:
        ours, note = simplify_onnx(ours)
    details: dict[str, Any] = {
        "opset": opset, **job.dynamic_details,
        "simplified": simplify and note is None,
        "exporter": "torch.onnx.export(dynamo=False)",
        "run_by": "onnxruntime, graph optimizations disabled",
        "inputs": input_names(job.model, len(job.example)),
    }
    if note:
        details["note"] = note
    nodes: dict[str, dict[str, int]] = {}
    if count_train_nodes and reference is not None:
        try:
            with warnings.catch_warnings():  # the train form is exported only to be counted
                warnings.simplefilter("ignore")
                train = _onnx_of_eval_copy(job.reference, job.example, opset, job.axes)
            nodes["train"] = onnx_node_counts(train)
            nodes["train_onnxsim"] = onnx_node_counts(simplify_onnx(train)[0])
        except ExportError as exc:
            details["train_export_error"] = str(exc)
    nodes["repfuse"] = onnx_node_counts(ours)
    details["outputs"] = [o.name for o in ours.graph.output]

    def save(artifact: Path) -> nn.Module:
        artifact.write_bytes(ours.SerializeToString())
        return OnnxModel.from_file(artifact)

    return job.write("onnx", save, details, onnx_nodes=nodes)
