"""Refusing inputs too large for this machine before allocating anything.

A huge ``--input-shape`` (``1,3,20000,20000``) would otherwise be drawn, run in float64 and
compared until the kernel kills the process (exit 137, no message). :func:`check_memory`
estimates the peak first, from a run of the model on the meta device (shapes only, no memory),
and refuses with the numbers when it exceeds what is available.

The estimate of verification's peak, in float64 (8 bytes per element), is

    3 · parameters (the model and two float64 copies)
    + 4 · the largest activation (a layer's input and output, a residual kept alive, slack)
    + 2 · the inputs of every batch (float64 and deployment dtype)

which undercounts nothing the verifier keeps at once except localization's activations, run
only on failure. Models the meta device cannot run (a branch on tensor values) are estimated
from their parameters and inputs alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from torch import Tensor, nn

from repfuse.errors import RepfuseError

_F64 = 8  # bytes per float64 element
_GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Verification's estimated peak, and the largest activation (where, how large)."""

    peak_bytes: int
    largest_activation_bytes: int
    largest_at: str | None  # the module that outputs it; None when the meta run failed

    def describe(self) -> str:
        where = f" at '{self.largest_at}'" if self.largest_at else ""
        return (f"about {self.peak_bytes / _GIB:.1f} GiB (largest activation "
                f"{self.largest_activation_bytes / _GIB:.2f} GiB{where}, in float64)")


def available_bytes() -> int | None:
    """Memory this process may still use: the least of the system's available memory and the
    cgroup's limit minus its usage; None when neither can be read."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            candidates.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer on the meta device, without copying data."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                           requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo).eval()


def _largest_activation(model: nn.Module, shapes: Sequence[Sequence[int]],
                        dtypes: Sequence[torch.dtype]) -> tuple[int, str | None]:
    """The most elements any module outputs on inputs of ``shapes``, and that module's path."""
    meta = _meta_copy(model)
    largest: list = [0, None]
    paths = {id(m): path for path, m in meta.named_modules()}

    def record(module: nn.Module, args: object, output: object) -> None:
        leaves = output if isinstance(output, (tuple, list)) else (output,)
        for leaf in leaves:
            if isinstance(leaf, Tensor) and leaf.numel() > largest[0]:
                largest[0], largest[1] = leaf.numel(), paths.get(id(module)) or "(the model)"

    handles = [m.register_forward_hook(record) for m in meta.modules()]
    inputs = [torch.empty(tuple(s), dtype=d, device="meta") for s, d in zip(shapes, dtypes,
                                                                            strict=True)]
    try:
        with torch.no_grad():
            meta(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0], largest[1]


def estimate_memory(model: nn.Module, shapes: Sequence[Sequence[int]], batches: int = 3,
                    dtypes: Sequence[torch.dtype] | None = None) -> MemoryEstimate:
    """Estimate verification's peak memory for inputs of ``shapes`` (see the module
    docstring)."""
    dtypes = list(dtypes) if dtypes is not None else [torch.float32] * len(shapes)
    params = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    inputs = sum(prod(s) for s in shapes)
    try:
        largest, where = _largest_activation(model, shapes, dtypes)
    except Exception:  # the meta device cannot run it (a branch on values, a custom op)
        largest, where = inputs, None
    largest = max(largest, max((prod(s) for s in shapes), default=0))
    peak = _F64 * (3 * params + 4 * largest + 2 * batches * inputs)
    return MemoryEstimate(peak, _F64 * largest, where)


def check_memory(model: nn.Module, shapes: Sequence[Sequence[int]], batches: int = 3,
                 dtypes: Sequence[torch.dtype] | None = None, *,
                 available: int | None = None) -> MemoryEstimate:
    """Refuse inputs of ``shapes`` whose estimated peak exceeds the memory available (or
    ``available`` bytes), with a one-line :class:`RepfuseError` saying how much each needs."""
    estimate = estimate_memory(model, shapes, batches, dtypes)
    free = available if available is not None else available_bytes()
    if free is not None and estimate.peak_bytes > free:
        shown = ", ".join(str(list(s)) for s in shapes)
        raise RepfuseError(
            f"inputs of shape {shown} need {estimate.describe()} to verify, but "
            f"{free / _GIB:.1f} GiB is available: use a smaller --input-shape (or fewer "
            "batches)"
        )
    return estimate
