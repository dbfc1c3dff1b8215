"""Conversion time and eager CPU latency, original vs fused, measured side by side.

    .venv/bin/python benchmarks/bench_fold.py [--models resnet18,resnet50] [--repeat 30]

For each model: the time to capture and fuse (best of 3), then both models timed in one
process, interleaved round by round (repfuse.bench.time_models), at batch 1 and batch 8.
Prints a Markdown table; recorded results live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from repfuse.bench import time_models
from repfuse.convert import convert, example_input
from repfuse.models import create_model, get_spec


def bench_model(name: str, batch: int, repeat: int) -> dict:
    model = create_model(name)
    shape = (batch, *get_spec(name).input_shape[1:])
    x = example_input(shape, model)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        result = convert(model, x, verify=None, name=name)
        seconds.append(time.perf_counter() - start)
    timings = time_models({"original": model, "fused": result.fused}, (x,), repeat=repeat)
    before, after = result.cost_before, result.cost_after
    return {
        "model": name, "batch": batch, "convert_s": min(seconds),
        "bn_before": before.ops.get("BatchNorm2d", 0) + before.ops.get("BatchNorm1d", 0),
        "bn_after": after.ops.get("BatchNorm2d", 0) + after.ops.get("BatchNorm1d", 0),
        "ops_before": sum(before.ops.values()), "ops_after": sum(after.ops.values()),
        "original_ms": timings["original"].median_ms, "fused_ms": timings["fused"].median_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vgg11_bn")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}\n")
    print("| model | batch | convert (s) | BN before→after | ops before→after | original (ms) "
          "| fused (ms) | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench_model(name, batch, args.repeat)
            print(f"| {r['model']} | {r['batch']} | {r['convert_s']:.2f} | "
                  f"{r['bn_before']}→{r['bn_after']} | {r['ops_before']}→{r['ops_after']} | "
                  f"{r['original_ms']:.1f} | {r['fused_ms']:.1f} | "
                  f"{r['original_ms'] / r['fused_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
