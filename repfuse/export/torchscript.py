"""``.ts``: TorchScript, by ``torch.jit.script`` or else ``torch.jit.trace``, checked as
``torch.jit.load`` gives it back.

A scripted model runs at any size (and a specialized model's shape guards are scripted with it);
a traced one records the ops run on the example, so a trace through a Python branch on tensor
values is refused, and shape guards are left out of a trace (they would be recorded as
constants), after refusing a dynamic axis they pin.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from repfuse.capture import ExampleInputs, as_input_tuple
from repfuse.errors import ExportError, first_line
from repfuse.export.base import (
    ExportResult,
    FileExport,
    check_dynamic,
    prepared,
    refuse_value_branches,
    without_guards,
)
from repfuse.graph import with_fx_codegen
from repfuse.verify import DEFAULT_VERIFY, VerifyOptions


def torchscript_module(model: nn.Module, example_inputs: ExampleInputs) -> tuple[Any, str]:
    """``model`` (an eval-mode copy) as TorchScript and how: ``torch.jit.script``, else
    ``torch.jit.trace``, which records the ops run on ``example_inputs``; a trace through a
    Python branch on tensor values is refused, and the export check tells whether the rest
    sufficed."""
    model, _ = prepared(model, None)
    return _script_eval_copy(model, as_input_tuple(example_inputs))


def _script_eval_copy(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Any, str]:
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export; the format is still asked for.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            scriptable = with_fx_codegen(model) if isinstance(model, GraphModule) else model
            return torch.jit.script(scriptable), "torch.jit.script"
        except Exception as exc:
            script_error = first_line(exc)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(without_guards(model), inputs)
    except Exception as exc:
        raise ExportError(f"cannot make TorchScript: torch.jit.script failed ({script_error}) and "
                          f"so did torch.jit.trace ({first_line(exc)})") from exc
    refuse_value_branches(caught, f"torch.jit.trace (torch.jit.script failed: {script_error})")
    return traced, "torch.jit.trace"


def export_torchscript(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.ts",
    *,
    reference: nn.Module | None = None,
    dynamic_batch: bool = False,
    dynamic_axes: Sequence[int] | None = None,
    verify: VerifyOptions = DEFAULT_VERIFY,
    reference_name: str = "reference",
    force: bool = False,
) -> ExportResult:
    """Script (or trace) ``fused``, save it, check it loaded with ``torch.jit.load``, write it.
    With dynamic axes (``dynamic_batch`` is axis 0) the check runs at twice the example's size
    on each."""
    job = FileExport.of(fused, example_inputs, path, reference=reference, verify=verify,
                        reference_name=reference_name, force=force,
                        dynamic_batch=dynamic_batch, dynamic_axes=dynamic_axes)
    check_dynamic(job.model, job.example, job.axes)
    script, how = _script_eval_copy(job.model, job.example)

    def save(artifact: Path) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(script, str(artifact))
            return torch.jit.load(str(artifact), map_location="cpu")

    return job.write("torchscript", save, {**job.dynamic_details, "exporter": how,
                                           "run_by": "torch.jit.load"})
