"""Exporting a fused model: ONNX, torch.export, TorchScript, Python source, deploy-form weights.

One module per format; every exporter builds its artifact in a scratch folder, loads it back the
way a deployment would, checks it against the float64 reference with
:meth:`repfuse.verify.VerifyOptions.run` (the path ``repfuse verify`` takes), and only then
copies it into place atomically (:func:`repfuse.export.base.checked_export`). A failed check
writes nothing unless ``force=True``; an error leaves nothing half-written.

==============  ==========================================================================
output          loaded back with, for the check
==============  ==========================================================================
``.onnx``       onnxruntime, graph optimizations disabled (:mod:`repfuse.export.onnx`)
``.pt2``        ``torch.export.load`` (:mod:`repfuse.export.pt2`)
``.ts``         ``torch.jit.load`` (:mod:`repfuse.export.torchscript`)
code folder     importing the emitted ``model.py`` and its ``weights.pt``
                (:mod:`repfuse.export.code`)
deploy ``.pt``  a fresh instance of the user's deploy-form class, ``load_state_dict`` of the
                written state dict with ``strict=True`` (:mod:`repfuse.export.deploy`)
==============  ==========================================================================

The reference is the original (unfused) model; its float64 run is the truth every artifact is
held to, in the artifact's own dtype with that dtype's tolerance
(:data:`repfuse.verify.compare.DEFAULT_TOLERANCES`). Without a reference the fused model itself
is used, which checks the export but not the fusion. Every exporter runs eval-mode copies: the
models given are never modified.

A new file format is a module here with an ``export_<format>(fused, example_inputs, path, *,
reference, dynamic_axes, verify, reference_name, force)`` function (its flow, from those
arguments to the checked write, is :class:`repfuse.export.base.FileExport`'s), and one entry in
:data:`EXPORTERS`; ``repfuse convert -o`` and :func:`repfuse.convert` then write it.
"""

from __future__ import annotations

from collections.abc import Callable

from repfuse.errors import ExportError
from repfuse.export.base import ExportResult
from repfuse.export.code import CODE_FILE, WEIGHTS_FILE, PythonSource, emit_code, python_source
from repfuse.export.deploy import build_deploy_model, export_deploy_state_dict, load_by_structure
from repfuse.export.onnx import (
    DEFAULT_OPSET,
    ONNX_PIPELINE,
    export_onnx,
    onnx_model,
    onnx_node_counts,
    simplify_onnx,
)
from repfuse.export.pt2 import export_pt2
from repfuse.export.torchscript import export_torchscript, torchscript_module
from repfuse.io import OnnxModel
from repfuse.verify.render import describe_node_counts

# Exporters by output extension; ``.pt`` (the GraphModule itself) is repfuse.io.save_model.
EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    ".onnx": export_onnx, ".pt2": export_pt2, ".ts": export_torchscript,
}
OUTPUT_TYPES = (".pt", *EXPORTERS)

__all__ = [
    "CODE_FILE", "DEFAULT_OPSET", "EXPORTERS", "ONNX_PIPELINE", "OUTPUT_TYPES", "WEIGHTS_FILE",
    "ExportError", "ExportResult", "OnnxModel", "PythonSource", "build_deploy_model",
    "describe_node_counts", "emit_code", "export_deploy_state_dict",
    "export_onnx", "export_pt2", "export_torchscript", "load_by_structure", "onnx_model",
    "onnx_node_counts", "python_source", "simplify_onnx", "torchscript_module",
]
