"""Eager CPU latency of train form, repfuse's fused form and the hand-written deploy form.

    .venv/bin/python benchmarks/bench_reparam.py [--models repvgg_a0,mobileone_s0] [--repeat 30]

The three are timed in one process, interleaved round by round (repfuse.bench.time_models).
The deploy form gets repfuse's fused weights (load_by_structure), so all three compute the
same function. Prints a Markdown table; recorded results live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from repfuse.bench import time_models
from repfuse.convert import convert, example_input
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, get_spec


def bench_model(name: str, batch: int, repeat: int) -> dict:
    train = create_model(name)
    x = example_input((batch, *get_spec(name).input_shape[1:]), train)
    start = time.perf_counter()
    result = convert(train, x, verify=None, name=name)
    convert_s = time.perf_counter() - start
    deploy = load_by_structure(create_model(name, deploy=True), result.fused, x).eval()
    timings = time_models({"train": train, "fused": result.fused, "deploy": deploy}, (x,),
                          repeat=repeat)
    return {"model": name, "batch": batch, "convert_s": convert_s,
            **{f"{k}_ms": t.median_ms for k, t in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="repvgg_a0,mobileone_s0")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | batch | convert (s) | train (ms) | fused (ms) | deploy (ms) "
          "| train/fused | deploy/fused |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench_model(name, batch, args.repeat)
            print(f"| {name} | {batch} | {r['convert_s']:.2f} | {r['train_ms']:.1f} | "
                  f"{r['fused_ms']:.1f} | {r['deploy_ms']:.1f} | "
                  f"{r['train_ms'] / r['fused_ms']:.2f}x | "
                  f"{r['deploy_ms'] / r['fused_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
