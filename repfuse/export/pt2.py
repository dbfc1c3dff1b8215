"""``.pt2``: a ``torch.export`` program, checked as ``torch.export.load`` gives it back.

A dynamic axis is a ``torch.export.Dim``: axis 0 is ``batch``, shared by every input; any other
axis gets its own dimension per input. The program is traced at twice the example's size on
each dynamic axis, since torch.export specializes a size of 1 to the constant 1. A model
specialized to its example's shapes keeps its shape guards (torch.export evaluates them on the
symbolic sizes); a dynamic axis they pin is refused first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from repfuse.capture import ExampleInputs
from repfuse.errors import ExportError, first_line
from repfuse.export.base import (
    ExportResult,
    FileExport,
    check_dynamic,
    input_axes,
    native_output_silenced,
)
from repfuse.io import load_model
from repfuse.verify import DEFAULT_VERIFY, VerifyOptions


def export_pt2(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.pt2",
    *,
    reference: nn.Module | None = None,
    dynamic_batch: bool = False,
    dynamic_axes: Sequence[int] | None = None,
    verify: VerifyOptions = DEFAULT_VERIFY,
    reference_name: str = "reference",
    force: bool = False,
) -> ExportResult:
    """Export ``fused`` with ``torch.export``, save it, check it loaded with
    ``torch.export.load``, write it. Every input is passed to the program (one per forward
    parameter); dynamic axes as the module docstring says."""
    job = FileExport.of(fused, example_inputs, path, reference=reference, verify=verify,
                        reference_name=reference_name, force=force,
                        dynamic_batch=dynamic_batch, dynamic_axes=dynamic_axes)
    check_dynamic(job.model, job.example, job.axes)
    inputs, dynamic_shapes = job.check_inputs, None  # traced at the size it is checked at
    if job.axes:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple(
            {a: batch if a == 0 else torch.export.Dim(f"input{i}_axis{a}", min=2) for a in own}
            for i, own in enumerate(input_axes(inputs, job.axes)))
    try:
        with native_output_silenced():  # it prints the graph when it fails
            program = torch.export.export(job.model, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {first_line(exc)}") from exc

    def save(artifact: Path) -> nn.Module:
        torch.export.save(program, artifact)
        return load_model(str(artifact)).module  # through torch.export.load

    return job.write("pt2", save, {**job.dynamic_details, "exporter": "torch.export.export",
                                   "run_by": "torch.export.load"})
