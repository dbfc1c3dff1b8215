"""repfuse: exact structural reparameterization and fusion of PyTorch models, from the graph.

The API a deploy script uses::

    import repfuse
    fused = repfuse.fuse(model, example_inputs)          # a torch.fx.GraphModule *
    report = repfuse.verify(model, fused, example_inputs)
    assert report.passed

Passes one by one: ``gm = repfuse.trace(model, x); repfuse.passes.fold_batchnorm(gm)``.

(*) or, for a model whose forward cannot be traced as a whole, a copy with its largest
traceable submodules fused (``repfuse.capture_info(fused)`` says which and why).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from repfuse import passes
from repfuse.capture import (
    CaptureInfo,
    ExampleInputs,
    RepfuseWarning,
    capture,
    capture_info,
    check_runs,
    fuse_parts,
    trace,
)
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
    *,
    allow_costlier: bool = False,
) -> nn.Module:
    """Fuse a copy of ``model`` (in eval mode) with the exact passes; ``model`` is not changed.

    ``passes`` names the passes to run (default :data:`repfuse.passes.DEFAULT_PIPELINE`).
    ``allow_costlier`` also applies exact merges that the cost model says do not pay (e.g.
    sibling convs of different kernel sizes, zero-padded to one kernel).
    The result computes the same outputs; ``repfuse.history(fused)`` lists the rewrites
    applied and the candidates declined, with reasons.

    The result is a ``torch.fx.GraphModule`` when the whole model traces (if only specialized
    to the example input's shapes, ``repfuse.capture_info(fused).specialized`` says where).
    Otherwise it is a copy of ``model`` whose largest traceable submodules are fused
    GraphModules, and ``repfuse.capture_info(fused).skipped`` lists the modules kept as eager
    Python, with reasons (a :class:`RepfuseWarning` says so too).

    The fused model is run once on ``example_inputs`` before it is returned; if it does not
    run, :class:`RepfuseError` names the module and node where it fails.
    """
    captured = capture(model, example_inputs)
    fuse_parts(captured.module,
               lambda gm: run_pipeline(gm, passes, allow_costlier=allow_costlier))
    check_runs(captured.module, example_inputs)
    if captured.info.partial:
        skipped = "; ".join(f"{s.describe()}: {s.reason}" for s in captured.info.skipped)
        warnings.warn(f"fused only the traceable parts of {type(model).__name__}; kept eager: "
                      f"{skipped}", RepfuseWarning, stacklevel=2)
    return captured.module


from repfuse.quant import QuantReport, quant_report  # noqa: E402  (imports passes, capture)
from repfuse.verify import EquivalenceReport, verify  # noqa: E402  (verify imports capture)

__all__ = [
    "DEFAULT_PIPELINE", "CaptureError", "CaptureInfo", "EquivalenceReport", "LoadError",
    "PassResult", "RepfuseError", "RepfuseWarning", "UnsafeLoadError", "VerificationError",
    "capture_info", "fuse", "history", "load_model", "passes", "run_pipeline", "save_model",
    "trace", "verify",
    "QuantReport", "quant_report",
]
