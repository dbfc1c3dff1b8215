"""ONNX node counts of every zoo model: train-form export, the same after onnxsim, and repfuse's.

    .venv/bin/python benchmarks/onnx_nodes.py [--models repvgg_a0,dbb_resnet18] [--small]
                                              [--opset 17] [--batches 1]

Each model is exported the same way twice (``peers.export_forms``, shared with
``benchmarks/run.py``: ``repfuse.export.onnx_model``, torch.onnx's TorchScript-based exporter,
eval mode, constant folding, then onnxsim): the train form as it is, and repfuse's fused form.
Eval-mode export already folds a BatchNorm into the conv before it, and onnxsim folds what it
can; neither merges parallel branches. repfuse's ONNX (after onnxsim) is also run in
onnxruntime with graph optimizations disabled against the float64 train form (the ``max rel``
column, float32 tolerance 1e-5). ``changed ops`` lists the op types whose count differs between
the train form after onnxsim and repfuse. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import changed_ops, export_forms, opset_for  # noqa: E402  (beside this script)

import repfuse  # noqa: E402
from repfuse.capture import RepfuseWarning  # noqa: E402
from repfuse.convert import example_input  # noqa: E402
from repfuse.export import DEFAULT_OPSET, OnnxModel  # noqa: E402
from repfuse.models import create_model, get_spec, list_models  # noqa: E402
from repfuse.verify import verify  # noqa: E402


def count_model(name: str, opset: int, batches: int, folder: Path) -> dict:
    model = create_model(name)
    x = example_input(get_spec(name).input_shape, model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepfuseWarning)
        fused = repfuse.fuse(model, x)
    exported = export_forms({"train": model, "fused": fused}, x, folder, name,
                            opset_for(name, opset))
    if "fused" not in exported.exports:
        return {"model": name, "error": exported.errors["fused"]}
    # what export_onnx checks: the written file, optimizations off, vs the float64 train form
    check = verify(model, OnnxModel.from_file(exported.exports["fused"].path), x,
                   batches=batches, localize_divergence=False)
    seconds = time.perf_counter() - start
    return {"model": name, "nodes": exported.node_counts(), "passed": check.passed,
            "max_rel": check.runs[-1].worst.max_rel, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--small", action="store_true",
                        help="only models whose example input has at most 40k elements")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--batches", type=int, default=1, help="batches of the onnxruntime check")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else [s.name for s in list_models()]
    if args.small:
        names = [n for n in names if math.prod(get_spec(n).input_shape) <= 40_000]
    print(f"torch {torch.__version__}, opset {args.opset}\n")
    print("| model | train | train + onnxsim | repfuse | changed ops (train + onnxsim → repfuse) "
          "| max rel (onnxruntime) |")
    print("|---|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            r = count_model(name, args.opset, args.batches, Path(scratch))
            if "error" in r:
                print(f"| {name} | – | – | – | not exported: {r['error']} | – |", flush=True)
                continue
            totals = [sum(r["nodes"][k].values()) if k in r["nodes"] else "–"
                      for k in ("train", "train_onnxsim", "repfuse")]
            verdict = "" if r["passed"] else " FAIL"
            print(f"| {name} | {totals[0]} | {totals[1]} | {totals[2]} | "
                  f"{changed_ops(r['nodes'])} | {r['max_rel']:.1e}{verdict} |", flush=True)


if __name__ == "__main__":
    main()
