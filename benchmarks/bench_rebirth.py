"""Deep Rebirth merging: MACs and eager CPU latency before/after, side by side.

    .venv/bin/python benchmarks/bench_rebirth.py [--models googlenet,vgg_avgpool] [--repeat 30]

For each model (randomized BN statistics) and batch size, four forms are timed in one process,
interleaved round by round (repfuse.bench.time_models): the train form; repfuse without the
stage-1 horizontal fusion (``merge_siblings``); repfuse's default pipeline; and the
hand-written deploy form (BN folded by hand) with repfuse's BN-folded weights, where the model
has one.
Prints a Markdown table; recorded results live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from repfuse.bench import time_models
from repfuse.convert import convert, example_input
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, get_spec
from repfuse.passes import DEFAULT_PIPELINE


def bench_model(name: str, batch: int, repeat: int) -> dict:
    train = create_model(name)
    x = example_input((batch, *get_spec(name).input_shape[1:]), train)
    full = convert(train, x, verify=None, name=name)
    no_siblings = [p for p in DEFAULT_PIPELINE if p != "merge_siblings"]
    partial = convert(train, x, passes=no_siblings, verify=None, name=name)
    models = {"train": train, "no_siblings": partial.fused, "fused": full.fused}
    if get_spec(name).supports_deploy:  # its BN is folded by hand: give it BN-folded weights
        folded = convert(train, x, passes="remove_noops,fold_batchnorm", verify=None).fused
        models["deploy"] = load_by_structure(create_model(name, deploy=True), folded, x).eval()
    timings = time_models(models, (x,), repeat=repeat)
    return {"model": name, "batch": batch, "convert_s": full.seconds,
            "macs_before": full.cost_before.macs, "macs_after": full.cost_after.macs,
            "siblings": full.passes.counts().get("merge_siblings", 0),
            **{f"{k}_ms": t.median_ms for k, t in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="googlenet,inception_v3,vgg_avgpool")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | batch | GMACs before → after | sibling merges | train (ms) | "
          "fused w/o siblings (ms) | fused (ms) | deploy (ms) | train/fused | "
          "w/o siblings/fused |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench_model(name, batch, args.repeat)
            deploy = f"{r['deploy_ms']:.1f}" if "deploy_ms" in r else "–"
            print(f"| {name} | {batch} | {r['macs_before'] / 1e9:.3f} → "
                  f"{r['macs_after'] / 1e9:.3f} | {r['siblings']} | {r['train_ms']:.1f} | "
                  f"{r['no_siblings_ms']:.1f} | {r['fused_ms']:.1f} | {deploy} | "
                  f"{r['train_ms'] / r['fused_ms']:.2f}x | "
                  f"{r['no_siblings_ms'] / r['fused_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
