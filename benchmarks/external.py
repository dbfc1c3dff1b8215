"""repfuse against each library's own deploy form, on the external corpus (tests/external).

    .venv-ext/bin/python benchmarks/external.py [--models repvgg_a0,yolov8n.yaml]
        [--rounds 30] [--warmup 3] [--threads 1] [--out table.md] [--json results.json]

Runs in the external tier's environment (``scripts/test-external`` builds ``.venv-ext``: timm,
torchvision, ultralytics). For every corpus model (``tests/external/corpus.py``: random
weights, random BatchNorm statistics, its corpus input size, batch 1) it builds, fuses and
measures the model exactly as the tier does (``harness.evaluate``: float64 and float32 fusion,
the float64 reference, the deploy form: timm's ``reparameterize_model``, ultralytics'
``fuse()``, torch.fx's conv-BN fuse for torchvision models that trace, else the eager model),
then times the float32 repfuse-fused model against the float32 deploy form on the same input:
``--warmup`` rounds, then ``--rounds`` rounds, each running both once, in alternating order
(A B, B A, ...), under inference mode with ``--threads`` torch threads. Per round the ratio
repfuse / deploy; the table gives the median of each model's times and the median of the
per-round ratios (target: <= 1.02; a ratio per round cancels the load other processes put on a
shared machine better than a ratio of medians).

The Markdown table (stdout, or ``--out``) has, per model: BatchNorm and conv calls of the
original -> repfuse / deploy form (counted while the model runs), the float64 error of the
fused model against the unfused one (for a model chaotic in float64: the worst of its blocks,
fused alone), the float32 error against the original's own float32 noise floor, the latencies
and their ratio, and what went wrong (conversion failure, parts kept eager). ``--json`` writes
every measurement. Nothing is asserted here: the tier asserts, this script reports.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "external"))

from corpus import CORPUS, Spec  # noqa: E402
from harness import F32_FACTOR, F64_LIMIT, evaluate, first_line  # noqa: E402

TARGET_RATIO = 1.02


def time_pair(fused, deploy, inputs, rounds: int, warmup: int) -> dict:
    """Median ms of each model and the median per-round ratio fused/deploy, interleaved."""
    fused_ms, deploy_ms, ratios = [], [], []
    with torch.inference_mode():
        for index in range(warmup + rounds):
            order = [(fused, fused_ms), (deploy, deploy_ms)]
            if index % 2:
                order.reverse()
            elapsed = {}
            for model, _ in order:
                start = time.perf_counter()
                model(*inputs)
                elapsed[id(model)] = (time.perf_counter() - start) * 1e3
            if index < warmup:
                continue
            fused_ms.append(elapsed[id(fused)])
            deploy_ms.append(elapsed[id(deploy)])
            ratios.append(elapsed[id(fused)] / elapsed[id(deploy)])
    return {"fused_ms": statistics.median(fused_ms), "deploy_ms": statistics.median(deploy_ms),
            "ratio": statistics.median(ratios), "rounds": rounds}


def measure(spec: Spec, rounds: int, warmup: int) -> dict:
    models: dict = {}
    try:
        result = evaluate(spec, keep=models)
    except Exception as exc:  # building the model itself failed: report it, go on
        return {"id": spec.id, "error": first_line(exc)}
    row = result.to_dict()
    # where the deploy form drops outputs, time repfuse's fusion of the same outputs
    fused = models.get("fused_same_outputs") or models.get("fused")
    if models.get("fused") is not None and models.get("deploy") is not None:
        try:
            row["timing"] = time_pair(fused, models["deploy"], models["inputs"], rounds, warmup)
        except Exception as exc:
            row["timing_error"] = first_line(exc)
    return row


def _count(before: int, after: int, deploy: int) -> str:
    def show(n: int) -> str:
        return "–" if n < 0 else str(n)

    return f"{show(before)} → {show(after)} / {show(deploy)}"


def _float64(row: dict) -> str:
    if row.get("failure"):
        return "–"
    if row["chaotic"]:
        worst = max((b["error"] for b in row["blocks"]), default=math.inf)
        mark = "" if worst <= F64_LIMIT else " ✗"
        return f"chaotic ({row['sensitivity']:.0e}); blocks ≤ {worst:.1e}{mark}"
    mark = "" if row["error64"] <= F64_LIMIT else " ✗"
    return f"{row['error64']:.1e}{mark}"


def _float32(row: dict) -> str:
    if row.get("failure"):
        return "–"
    mark = "" if row["error32"] <= F32_FACTOR * row["floor32"] else " ✗"
    return f"{row['error32']:.1e} / {row['floor32']:.1e}{mark}"


def _notes(row: dict) -> str:
    notes = []
    if row.get("failure"):
        notes.append(row["failure"])
    if row.get("deploy_outputs"):
        notes.append(f"the deploy form returns {len(row['deploy_outputs'])} of the model's "
                     f"outputs; repfuse asked for those: {row['conv_after_same_outputs']} convs, "
                     "timed so")
    if row.get("partial"):
        notes.append(f"{len(row['skipped'])} part(s) kept eager")
    if row.get("timing_error"):
        notes.append(f"timing failed: {row['timing_error']}")
    timing = row.get("timing")
    if timing and timing["ratio"] > TARGET_RATIO:
        notes.append(f"slower than the deploy form (target ≤ {TARGET_RATIO})")
    convs = row["conv_after_same_outputs"] if row.get("deploy_outputs") else row["conv_after"]
    if not row.get("failure") and convs > row["conv_deploy"] >= 0:
        notes.append("more convs than the deploy form")
    if not row.get("failure") and row["bn_foldable"]:
        notes.append(f"{len(row['bn_foldable'])} foldable BN left")
    return "; ".join(notes).replace("|", "\\|")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | deploy form | BN: original → repfuse / deploy | conv: original → repfuse "
        "/ deploy | float64 error | float32 error / noise floor | repfuse ms | deploy ms | "
        "ratio | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['id']} | – | – | – | – | – | – | – | – | "
                         f"building failed: {row['error']} |")
            continue
        timing = row.get("timing") or {}
        fused_ms = f"{timing['fused_ms']:.2f}" if timing else "–"
        deploy_ms = f"{timing['deploy_ms']:.2f}" if timing else "–"
        ratio = f"{timing['ratio']:.2f}" if timing else "–"
        lines.append(
            f"| {row['id']} | {row['deploy']} | "
            f"{_count(row['bn_before'], row['bn_after'], row['bn_deploy'])} | "
            f"{_count(row['conv_before'], row['conv_after'], row['conv_deploy'])} | "
            f"{_float64(row)} | {_float32(row)} | {fused_ms} | {deploy_ms} | {ratio} | "
            f"{_notes(row)} |")
    timed = [r["timing"]["ratio"] for r in rows if r.get("timing")]
    if timed:
        met = sum(1 for r in timed if r <= TARGET_RATIO)
        lines.append("")
        lines.append(f"{len(rows)} models, {len(timed)} timed; ratio repfuse/deploy: median "
                     f"{statistics.median(timed):.2f}, {met} of {len(timed)} within "
                     f"{TARGET_RATIO}.")
    return "\n".join(lines) + "\n"


def versions() -> str:
    return ", ".join(f"{name} {version(name)}"
                     for name in ("torch", "torchvision", "timm", "ultralytics"))


def selected(names: str | None) -> list[Spec]:
    if not names:
        return list(CORPUS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [s for s in CORPUS if s.id in wanted or s.name in wanted]
    unknown = set(wanted) - {s.id for s in chosen} - {s.name for s in chosen}
    if unknown:
        raise SystemExit(f"not in the corpus: {', '.join(sorted(unknown))}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated corpus ids or names (default: all)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows = []
    for spec in selected(args.models):
        start = time.perf_counter()
        rows.append(measure(spec, args.rounds, args.warmup))
        print(f"{spec.id}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    table = f"{versions()}; {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds"
    table += "\n\n" + markdown(rows)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    else:
        print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
