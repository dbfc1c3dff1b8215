"""repfuse: exact structural reparameterization and fusion of PyTorch models, from the graph.

The whole job in one call (what ``repfuse convert`` runs)::

    import repfuse
    result = repfuse.convert(model, x, outputs=["model.onnx", "report.html"],
                             verify=repfuse.VerifyOptions(batches=3))
    assert result.passed                   # verified, and every export checked
    result.fused                           # a torch.fx.GraphModule *

Or step by step, as a deploy script does::

    fused = repfuse.fuse(model, example_inputs)          # the fusion step of convert
    report = repfuse.verify(model, fused, example_inputs)
    assert report.passed

Passes one by one: ``gm = repfuse.trace(model, x); repfuse.passes.fold_batchnorm(gm)``.
Exporters: :mod:`repfuse.export`; the side-by-side benchmark: :mod:`repfuse.bench`.

(*) or, for a model whose forward cannot be traced as a whole, a copy with its largest
traceable submodules fused (``repfuse.capture_info(fused)`` says which and why).
"""

from __future__ import annotations

from repfuse import bench, export, passes
from repfuse._version import __version__
from repfuse.capture import (
    CaptureInfo,
    RepfuseWarning,
    capture_info,
    trace,
)
from repfuse.convert import (
    Approximation,
    Conversion,
    DeployForm,
    EmitCode,
    ExportOptions,
    QuantOptions,
    convert,
    fuse,
)
from repfuse.errors import (
    CaptureError,
    ExportError,
    LoadError,
    ModelStructureError,
    RepfuseError,
    UnknownModelError,
    UnsafeLoadError,
    VerificationError,
)
from repfuse.io import load_model, save_model
from repfuse.passes import DEFAULT_PIPELINE, PassResult, history, run_pipeline
from repfuse.quant import QuantReport, quant_report
from repfuse.verify import EquivalenceReport, VerifyOptions, verify

__all__ = [
    "DEFAULT_PIPELINE", "Approximation", "CaptureError", "CaptureInfo", "Conversion",
    "DeployForm", "EmitCode", "EquivalenceReport", "ExportError", "ExportOptions", "LoadError",
    "ModelStructureError", "PassResult", "QuantOptions", "QuantReport", "RepfuseError",
    "RepfuseWarning", "UnknownModelError",
    "UnsafeLoadError", "VerificationError", "VerifyOptions", "__version__", "bench",
    "capture_info", "convert", "export", "fuse", "history", "load_model", "passes",
    "quant_report", "run_pipeline", "save_model", "trace", "verify",
]
