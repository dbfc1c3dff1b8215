"""The whole job in one call: capture, fuse, measure, verify. The CLI is a thin layer over it."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from repfuse.capture import ExampleInputs, as_input_tuple, trace
from repfuse.cost import GraphCost, graph_cost
from repfuse.passes import PassResult, run_pipeline
from repfuse.verify import EquivalenceReport, verify


@dataclass
class Conversion:
    """A fused model with everything known about how it was made and how it compares."""

    fused: GraphModule
    passes: PassResult
    cost_before: GraphCost
    cost_after: GraphCost
    seconds: float  # tracing + passes (not verification)
    report: EquivalenceReport | None

    def to_dict(self) -> dict:
        """The ``conversion`` section of a JSON report."""
        return {
            **self.passes.to_dict(),
            "seconds": self.seconds,
            "cost": {"before": self.cost_before.to_dict(), "after": self.cost_after.to_dict()},
        }

    def report_dict(self) -> dict:
        """The full JSON report: the equivalence report plus a ``conversion`` section."""
        base = self.report.to_dict() if self.report is not None else {}
        return {**base, "conversion": self.to_dict()}


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
) -> Conversion:
    """Fuse ``model`` and, if ``check``, verify the result against ``model`` itself."""
    inputs = as_input_tuple(example_inputs)
    start = time.perf_counter()
    captured = trace(model, inputs)
    traced_at = time.perf_counter()
    fused = copy.deepcopy(captured)
    copied_at = time.perf_counter()
    result = run_pipeline(fused, passes)
    seconds = (time.perf_counter() - copied_at) + (traced_at - start)
    report = None
    if check:
        report = verify(model, fused, inputs, batches=batches, seed=seed, rtol=rtol, atol=atol,
                        reference_name=name, candidate_name=f"{name} (fused)")
    return Conversion(fused, result, graph_cost(captured), graph_cost(fused), seconds, report)


def example_input(shape: tuple[int, ...], like: nn.Module, seed: int = 0) -> Tensor:
    """A seeded N(0, 1) tensor of ``shape`` in the model's floating dtype and device."""
    dtype, device = torch.float32, torch.device("cpu")
    for tensor in (*like.parameters(), *like.buffers()):
        if tensor.is_floating_point():
            dtype, device = tensor.dtype, tensor.device
            break
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
