"""Approximate pruning from Python, opt-in and labelled: :func:`prune_below`.

``repfuse.fuse`` removes only what is exactly dead (``prune_dead``). After sparsity training,
many channels are *nearly* dead: BN ``|γ|`` of 1e-4 rather than 0. :func:`prune_below` treats
channels under a threshold as dead (the ``prune_below`` pass, marked approximate), lets
``prune_dead`` remove them, and measures what that costs: the output error of the pruned model
against the original run in float64. Nothing here is exact; every rewrite it adds says
``exact=False`` in the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repfuse.capture import ExampleInputs, as_input_tuple, capture, fuse_parts, parts_of
from repfuse.cost import graph_cost
from repfuse.graph import layer_view
from repfuse.passes import DEFAULT_PIPELINE, Pass, PassResult, history, run_pipeline
from repfuse.passes.prune import PruneBelow
from repfuse.verify import eval_copy, flatten_outputs
from repfuse.verify.inputs import random_batches


@dataclass
class ApproximatePruning:
    """The result of :func:`prune_below`: the pruned model and what it costs in accuracy."""

    fused: nn.Module
    threshold: float
    by: str  # "gamma" | "norm"
    passes: PassResult
    channels_before: int  # output channels of all conv/linear layers
    channels_after: int
    macs_before: int
    macs_after: int
    max_rel_error: float  # max |ref - pruned| / max |ref| per output, over the check inputs
    max_abs_error: float
    approximate: bool = True

    @property
    def approximate_rewrites(self) -> int:
        return sum(1 for r in self.passes.rewrites if not r.exact)

    def to_dict(self) -> dict:
        return {
            "approximate": True, "threshold": self.threshold, "by": self.by,
            "approximate_rewrites": self.approximate_rewrites,
            "channels": {"before": self.channels_before, "after": self.channels_after},
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "max_rel_error": self.max_rel_error, "max_abs_error": self.max_abs_error,
        }


def prune_below(
    model: nn.Module,
    example_inputs: ExampleInputs,
    threshold: float,
    *,
    by: str = "gamma",
    passes: Sequence[str | Pass] | None = None,
    check_inputs: Sequence[ExampleInputs] | None = None,
) -> ApproximatePruning:
    """APPROXIMATE: fuse a copy of ``model`` (default pipeline, or ``passes``) with channels
    whose BN ``|γ| < threshold`` (``by="gamma"``) or whose conv/linear filter has L2 norm
    ``< threshold`` (``by="norm"``) treated as constant, and measure the output error against
    ``model`` in float64 on ``check_inputs`` (default: the example inputs and two seeded
    N(0, 1) draws of their shapes). ``model`` is not changed.
    """
    inputs = as_input_tuple(example_inputs)
    captured = capture(model, inputs)
    channels_before, macs_before = _size(captured.module)
    pipeline = [*(passes or DEFAULT_PIPELINE), PruneBelow(threshold=threshold, by=by)]
    fuse_parts(captured.module, lambda gm: run_pipeline(gm, pipeline))
    fused = captured.module
    channels_after, macs_after = _size(fused)
    batches = ([as_input_tuple(b) for b in check_inputs] if check_inputs
               else random_batches(inputs, 3, seed=0))  # seeds 1 and 2 after the example
    max_rel, max_abs = _output_error(model, fused, batches)
    return ApproximatePruning(fused, threshold, by, history(fused), channels_before,
                              channels_after, macs_before, macs_after, max_rel, max_abs)


def _size(module: nn.Module) -> tuple[int, int]:
    channels = macs = 0
    for _, gm in parts_of(module):
        macs += graph_cost(gm).macs
        for node in gm.graph.nodes:
            layer = layer_view(gm, node)
            if layer is not None:
                channels += layer.out_channels
    return channels, macs


def _output_error(model: nn.Module, fused: nn.Module,
                  batches: Sequence[tuple[Tensor, ...]]) -> tuple[float, float]:
    """Max relative (to max |ref| per output) and absolute error, both run in float64."""
    reference = eval_copy(model, torch.float64)
    candidate = eval_copy(fused, torch.float64)
    max_rel = max_abs = 0.0
    with torch.no_grad():
        for batch in batches:
            as64 = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in batch)
            expected = flatten_outputs(reference(*as64))
            actual = flatten_outputs(candidate(*as64))
            for (_, e), (_, a) in zip(expected, actual, strict=True):
                diff = float((e - a).abs().max())
                scale = float(e.abs().max()) or 1.0
                max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return max_rel, max_abs
