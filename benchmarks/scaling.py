"""Conversion time against network depth: RepVGG stacks of 100 to 3,200 blocks.

    .venv/bin/python benchmarks/scaling.py [--blocks 100,200,400,800,1600,3200] [--repeat 3]

Each network is a plain ``nn.Sequential`` of RepVGG blocks (3x3 conv-BN + 1x1 conv-BN + BN
identity, summed, then tanh, which keeps 3,200 blocks of random weights finite; 8 channels, 8x8
input, randomized BN statistics), so the graph grows linearly with the block count: 8 nodes per
block. For each depth the script reports the best of
``--repeat`` conversions (``repfuse.convert(..., verify=None)``: capture with shape propagation,
then the default pipeline), split into capture and passes, and the time per captured graph node.
A pipeline whose work is proportional to the graph keeps the time per node flat; the last line
gives the ratio largest/smallest time per node over the depths (target: within 1.3x).
Runs single-threaded: the tensors are tiny, and the number to watch is Python work per node.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from repfuse.capture import capture
from repfuse.models import randomize_bn_stats
from repfuse.models.repvgg import RepVGGBlock
from repfuse.passes import run_pipeline

CHANNELS = 8
SIZE = 8


def repvgg_stack(blocks: int, seed: int = 0) -> nn.Module:
    """``blocks`` RepVGG blocks of :data:`CHANNELS` channels in sequence, eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(*(RepVGGBlock(CHANNELS, CHANNELS, activation=nn.Tanh)
                           for _ in range(blocks)))
    return randomize_bn_stats(model, seed).eval()


def time_conversion(blocks: int, repeat: int) -> dict:
    """Best-of-``repeat`` capture and pipeline seconds for a stack of ``blocks`` blocks."""
    model = repvgg_stack(blocks)
    x = torch.randn(1, CHANNELS, SIZE, SIZE)
    capture(model, (x,))  # the first capture in a process also pays for imports and caches
    best = {"capture_s": float("inf"), "passes_s": float("inf")}
    for _ in range(repeat):
        start = time.perf_counter()
        captured = capture(model, (x,))
        captured_at = time.perf_counter()
        result = run_pipeline(captured.module)
        done = time.perf_counter()
        best["capture_s"] = min(best["capture_s"], captured_at - start)
        best["passes_s"] = min(best["passes_s"], done - captured_at)
        nodes = len(captured.module.graph.nodes)
    rewrites = len(result.rewrites)
    with torch.no_grad():  # the fused stack must still compute the same function
        error = (captured.module(x) - model(x)).abs().max().item()
    return {"blocks": blocks, "rewrites": rewrites, **best, "nodes_after": nodes,
            "nodes_before": _traced_nodes(model), "max_abs_error": error}


def _traced_nodes(model: nn.Module) -> int:
    return len(torch.fx.symbolic_trace(model).graph.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="100,200,400,800,1600,3200")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread\n")
    print("| blocks | nodes before → after | rewrites | capture (s) | passes (s) | total (s) "
          "| µs per node | max abs error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_node = []
    for blocks in (int(b) for b in args.blocks.split(",")):
        row = time_conversion(blocks, args.repeat)
        total = row["capture_s"] + row["passes_s"]
        per_node.append(total / row["nodes_before"])
        print(f"| {blocks} | {row['nodes_before']} → {row['nodes_after']} | {row['rewrites']} | "
              f"{row['capture_s']:.3f} | {row['passes_s']:.3f} | {total:.3f} | "
              f"{per_node[-1] * 1e6:.1f} | {row['max_abs_error']:.1e} |", flush=True)
    print(f"\ntime per node, largest / smallest: {max(per_node) / min(per_node):.2f}x")


if __name__ == "__main__":
    main()
