"""Side-by-side eager latency: models timed in one process, interleaved round by round.

Interleaving (A, B, B, A, ...) keeps slow drifts of the machine (frequency, other load) from
favouring one model; the ratio of medians is the number to quote, not the absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "runs": self.runs}


def time_models(
    models: Mapping[str, nn.Module],
    inputs: tuple[Tensor, ...],
    *,
    warmup: int = 3,
    repeat: int = 20,
) -> dict[str, Timing]:
    """Median and min wall time of ``model(*inputs)`` per model, interleaved, under no_grad."""
    names = list(models)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                models[name](*inputs)
        for round_index in range(repeat):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                models[name](*inputs)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: Timing(statistics.median(s), min(s), len(s)) for name, s in samples.items()
    }
