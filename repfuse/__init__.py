"""repfuse: exact structural reparameterization and fusion of PyTorch models, from the graph.

The API a deploy script uses::

    import repfuse
    fused = repfuse.fuse(model, example_inputs)          # a torch.fx.GraphModule
    report = repfuse.verify(model, fused, example_inputs)
    assert report.passed

Passes one by one: ``gm = repfuse.trace(model, x); repfuse.passes.fold_batchnorm(gm)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.fx import GraphModule

from repfuse import passes
from repfuse.capture import ExampleInputs, trace
from repfuse.errors import (
    CaptureError,
    LoadError,
    RepfuseError,
    UnsafeLoadError,
    VerificationError,
)
from repfuse.io import load_model, save_model
from repfuse.passes import DEFAULT_PIPELINE, PassResult, history, run_pipeline

__version__ = "0.1.0"


def fuse(
    model: nn.Module,
    example_inputs: ExampleInputs,
    passes: Sequence[str] | str | None = None,
) -> GraphModule:
    """Fuse a copy of ``model`` (in eval mode) with the exact passes; ``model`` is not changed.

    ``passes`` names the passes to run (default :data:`repfuse.passes.DEFAULT_PIPELINE`).
    The returned GraphModule computes the same outputs; ``repfuse.history(fused)`` lists the
    rewrites applied and the candidates declined, with reasons.
    """
    gm = trace(model, example_inputs)
    run_pipeline(gm, passes)
    return gm


from repfuse.verify import EquivalenceReport, verify  # noqa: E402  (verify imports capture)

__all__ = [
    "DEFAULT_PIPELINE", "CaptureError", "EquivalenceReport", "LoadError", "PassResult",
    "RepfuseError", "UnsafeLoadError", "VerificationError", "fuse", "history", "load_model",
    "passes", "run_pipeline", "save_model", "trace", "verify",
]
