"""The whole job in one call: capture, fuse, measure, verify. The CLI is a thin layer over it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from repfuse.capture import (
    CaptureInfo,
    ExampleInputs,
    as_input_tuple,
    capture,
    fuse_parts,
    parts_of,
)
from repfuse.cost import GraphCost, graph_cost
from repfuse.passes import PassResult, run_pipeline
from repfuse.passes.nonlinear import NotMergeable, not_mergeable, summarize
from repfuse.verify import EquivalenceReport, InputSet, verify
from repfuse.verify.inputs import draw

if TYPE_CHECKING:
    from repfuse.export import ExportResult


@dataclass
class Conversion:
    """A fused model with everything known about how it was made and how it compares."""

    fused: nn.Module  # a GraphModule, unless only parts of the model could be traced
    passes: PassResult
    cost_before: GraphCost
    cost_after: GraphCost
    seconds: float  # tracing + passes (not verification)
    report: EquivalenceReport | None
    exports: list[ExportResult] = field(default_factory=list)  # checked exports, in order
    not_mergeable: list[NotMergeable] = field(default_factory=list)  # ops that stay, and why
    capture: CaptureInfo = field(default_factory=CaptureInfo)  # partial? specialized?

    def to_dict(self) -> dict:
        """The ``conversion`` section of a JSON report."""
        return {
            **self.passes.to_dict(),
            "seconds": self.seconds,
            "cost": {"before": self.cost_before.to_dict(), "after": self.cost_after.to_dict(),
                     "by_pass": self.cost_by_pass()},
            "not_mergeable": summarize(self.not_mergeable),
            **self.capture.to_dict(),  # partial, parts, skipped, specialized, dropped_hooks
        }

    def cost_by_pass(self) -> list[dict]:
        """Per pass, in pipeline order: rewrites, and the estimated MACs/params/bytes after
        the rewrites of that pass and the passes before it (the passes interleave node by
        node, so this attributes each rewrite's cost change to its pass)."""
        rows = []
        macs, params, moved = self.cost_before.macs, self.cost_before.params, self.cost_before.bytes
        counts = self.passes.counts()
        for name, change in self.passes.cost_change_by_pass().items():
            macs, params, moved = macs + change.macs, params + change.params, moved + change.bytes
            rows.append({"pass": name, "rewrites": counts.get(name, 0), "macs": macs,
                         "params": params, "bytes": moved})
        return rows

    def report_dict(self) -> dict:
        """The full JSON report: the equivalence report plus a ``conversion`` section, and an
        ``export`` list (one entry per checked export) when there were exports; ``passed``
        then also requires every export's check to pass."""
        base = self.report.to_dict() if self.report is not None else {}
        report = {**base, "conversion": self.to_dict()}
        if self.exports:
            report["export"] = [export.to_dict() for export in self.exports]
            if "passed" in report:
                report["passed"] = report["passed"] and all(e.passed for e in self.exports)
        return report


def convert(
    model: nn.Module,
    example_inputs: ExampleInputs,
    passes: list[str] | str | None = None,
    *,
    check: bool = True,
    batches: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "model",
    allow_costlier: bool = False,
    distribution: str = "normal",
    verify_inputs: InputSet | Sequence[ExampleInputs] | None = None,
) -> Conversion:
    """Fuse ``model`` and, if ``check``, verify the result against ``model`` itself.

    ``allow_costlier`` also applies exact merges the cost model says do not pay. Verification
    runs on ``verify_inputs`` (the user's batches) when given, else on the example and
    ``batches - 1`` seeded draws from ``distribution``; see :func:`repfuse.verify.verify`.
    """
    inputs = as_input_tuple(example_inputs)
    start = time.perf_counter()
    captured = capture(model, inputs)  # a copy of the model: the passes rewrite it in place
    traced_at = time.perf_counter()
    cost_before = _cost(captured.module)
    fused = captured.module
    counted_at = time.perf_counter()
    result = fuse_parts(fused, lambda gm: run_pipeline(gm, passes, allow_costlier=allow_costlier))
    seconds = (time.perf_counter() - counted_at) + (traced_at - start)
    report = None
    if check:
        report = verify(model, fused, inputs, batches=batches, seed=seed, rtol=rtol, atol=atol,
                        reference_name=name, candidate_name=f"{name} (fused)",
                        distribution=distribution, inputs=verify_inputs)
    return Conversion(fused, result, cost_before, _cost(fused), seconds, report,
                      not_mergeable=[op for _, gm in parts_of(fused) for op in not_mergeable(gm)],
                      capture=captured.info)


def _cost(module: nn.Module) -> GraphCost:
    """The cost of a captured model: of its one graph, or summed over its traced parts."""
    parts = [graph_cost(gm) for _, gm in parts_of(module)]
    if len(parts) == 1:
        return parts[0]
    total = GraphCost()
    for part in parts:
        total = GraphCost(**{f.name: getattr(total, f.name) + getattr(part, f.name)
                             for f in fields(GraphCost)})
    return total


def example_input(
    shape: tuple[int, ...], like: nn.Module, seed: int = 0, distribution: str = "normal"
) -> Tensor:
    """A seeded tensor of ``shape`` (N(0, 1), or U[0, 1) for ``distribution="uniform"``) in
    the model's floating dtype and device."""
    dtype, device = torch.float32, torch.device("cpu")
    for tensor in (*like.parameters(), *like.buffers()):
        if tensor.is_floating_point():
            dtype, device = tensor.dtype, tensor.device
            break
    generator = torch.Generator().manual_seed(seed)
    return draw(shape, generator, distribution).to(dtype).to(device)
