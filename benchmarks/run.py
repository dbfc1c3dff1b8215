"""repfuse side by side with its peers: latency, ONNX nodes, numerical error, conversion cost.

    .venv/bin/python benchmarks/run.py [--models repvgg_a0,mobileone_s0] [--batches 1,8]
        [--repeat 30] [--min-repeat 5] [--budget 6] [--warmup 1] [--threads N]
        [--skip-onnx] [--skip-memory] [--opset 17] [--onnx-dir DIR] [--json results.json]

For each zoo model (``repfuse.models.list_models()``, randomized BN statistics as
``create_model`` gives them), on the CPU, at each batch size, on one seeded N(0, 1) input:

**Forms.** ``train``: the model as built. ``repfuse``: ``repfuse.convert.convert(model, x,
verify=None)`` (default pipeline), converted at that batch. ``deploy``: the hand-written deploy
form (``get_spec(name).supports_deploy``) holding repfuse's weights via ``load_by_structure``,
so it computes the same function; where the default pipeline's layout differs from the deploy
form's (horizontal fusion, streamline merging), the weights come from repfuse without
``merge_siblings`` or from BN folding only (``peers.DEPLOY_WEIGHT_SOURCES``; the JSON says
which). ``fx fuse``: ``torch.fx.experimental.optimization.fuse(model)``, the torch peer, which
folds Conv-BN / Linear-BN pairs only.

**Eager latency** (ms): median over rounds in which the forms run one after the other,
interleaved (``repfuse.bench.time_models``: A B C D, D C B A, ...), under inference mode with
``--threads`` torch threads. Ratios: ``train/repfuse`` (the speed-up), ``repfuse/deploy``
(target ≤ 1.02: the hand-written form is the limit), ``fx fuse/repfuse`` (> 1: repfuse is
faster than the torch peer).

**onnxruntime latency** (ms): train, repfuse and deploy forms each exported the same way
(``repfuse.export.onnx_model``, static shapes of the input, then onnxsim: ``peers.export_forms``;
repfuse's fused as ``repfuse convert -o MODEL.onnx`` does, with ``repfuse.export.ONNX_PIPELINE``:
no horizontal fusion, which onnxruntime runs slower) and run in onnxruntime CPU sessions
with all graph optimizations (``ORT_ENABLE_ALL``),
sequential execution, intra-op threads = ``--threads``, no spinning between runs (each session
has its own thread pool); timed interleaved like eager. Ratios ``repfuse/deploy`` (target
≤ 1.02) and ``train/repfuse``. onnxruntime folds Conv+BN itself, so the train-form ONNX of a
plain Conv-BN net is already close to repfuse's; branch merging is what it cannot do.

**Rounds.** Per timing group (one model, one batch, eager or onnxruntime), each form first runs
once for the error table, then ``--warmup`` rounds; the cheapest warm-up round's wall time ``c``
sets the number of timed rounds: ``min(--repeat, max(--min-repeat, floor(--budget / c)))``.
Cheap models get ``--repeat`` rounds, the 224×224 models at batch 8 ``--min-repeat`` to a few
more (the tables show it), so a group takes about ``--budget`` seconds, at most
``(2 + --min-repeat) · c``. The full default run (37 models, batches 1 and 8) is estimated at
about 20 minutes on an idle 2-core machine. On a machine other jobs are loading, 2 threads per
process lose whole time slices at each op's thread barrier and the many-op train forms suffer
most; ``--threads 1`` keeps the ratios meaningful there.

**ONNX nodes** (at the first batch): ``train`` as exported, ``train + onnxsim``, ``repfuse``
(after onnxsim, what ``repfuse convert -o MODEL.onnx`` writes), ``deploy`` (after onnxsim), and
the op types whose count changes from train + onnxsim to repfuse.

**Numerical error**: ``max|y - ref| / max|ref|`` of each form's output against the train form
run in float64 on the same input (per output tensor, the largest over the outputs:
``repfuse.bench.max_rel_between``, as ``repfuse bench`` and the verifier), the worst over the
batch sizes run: train, repfuse, fx fuse
and deploy in float32 in eager, and the three ONNX forms in onnxruntime (optimizations on).
repfuse folds in float64 and casts once; fx fuse folds in float32.

**Conversion**: ``trace + passes`` is ``Conversion.seconds`` at the first batch (capture plus
the pass pipeline, no verification); ``verify`` is the wall time of ``repfuse.verify.verify``
(default options: three batches, float64 and float32 runs, localization) on that model pair,
and whether it passed; ``peak memory`` is the conversion's peak RSS minus the RSS once model and
input were built, measured in a fresh Python process per model (``peers.conversion_peak_memory``:
Linux's peak RSS ``VmHWM`` is reset right before the conversion, so the number is that
conversion's own high-water mark; ``≤`` marks an upper bound where the reset is unavailable).

A step that fails for a model (e.g. the ONNX export of ``branchynet_tiny``, whose Python branch
on tensor values cannot be exported) puts its one-line reason in its cell; the run goes on.
``--json PATH`` writes every raw number (rewritten after each model). Progress goes to stderr,
the Markdown tables to stdout. When ``timm`` is installed, a few timm models with
reparameterizable blocks are added with ``timm.utils.reparameterize_model`` as a peer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (beside this script; benchmarks/ is not a package)

from repfuse.bench import max_rel_between, time_models  # noqa: E402
from repfuse.convert import Conversion, convert, example_input  # noqa: E402
from repfuse.export import DEFAULT_OPSET, ONNX_PIPELINE  # noqa: E402
from repfuse.models import create_model, get_spec, list_models  # noqa: E402
from repfuse.verify import verify  # noqa: E402

EAGER_FORMS = ("train", "fused", "deploy", "fx_fuse")
ONNX_FORMS = ("train", "fused", "deploy")
ERROR_FORMS = ("train", "fused", "fx_fuse", "deploy")  # the error table's eager columns
FORM_LABELS = {"train": "train", "fused": "repfuse", "deploy": "deploy", "fx_fuse": "fx fuse",
               "timm": "timm reparam"}
CELL_REASON_LIMIT = 90


@dataclass(frozen=True)
class Settings:
    """How :func:`bench_model` measures (see the module docstring for the rounds rule)."""

    batches: tuple[int, ...] = (1, 8)
    repeat: int = 30
    min_repeat: int = 5
    budget_s: float = 6.0
    warmup: int = 1
    threads: int = 1
    onnx: bool = True
    memory: bool = True
    opset: int = DEFAULT_OPSET


# --- measuring ----------------------------------------------------------------------------------


def attempt(failures: dict[str, str], key: str, step: Callable, *args):
    """``step(*args)``, or None with its one-line reason stored under ``failures[key]``."""
    try:
        return step(*args)
    except Exception as exc:  # a failing step is a result of the benchmark, not the end of it
        failures[key] = peers.first_line(exc)
        return None


def timed_rounds(runners: Mapping[str, Callable], x: Tensor, settings: Settings) -> int:
    """Warm up, and derive the number of timed rounds from the cheapest warm-up round."""
    cost = float("inf")
    with torch.inference_mode():
        for _ in range(max(1, settings.warmup)):
            start = time.perf_counter()
            for runner in runners.values():
                runner(x)
            cost = min(cost, time.perf_counter() - start)
    by_budget = int(settings.budget_s / cost) if cost > 0 else settings.repeat
    return min(settings.repeat, max(settings.min_repeat, by_budget))


def measure_group(
    runners: Mapping[str, Callable], x: Tensor, reference: list[Tensor], settings: Settings,
    failures: dict[str, str],
) -> dict:
    """Error against ``reference`` of each runner's output on ``x``, then the latency of those
    that ran, interleaved. A runner that fails to run is left out with its reason."""
    errors, working = {}, {}
    for form, runner in runners.items():
        outputs = attempt(failures, form, peers.outputs_of, runner, x)
        if outputs is None:
            continue
        error = attempt(failures, form, max_rel_between, reference, outputs)
        if error is not None:
            errors[form], working[form] = error, runner
    group = {"rounds": 0, "ms": {}, "min_ms": {}, "error": errors, "failures": failures}
    if not working:
        return group
    rounds = timed_rounds(working, x, settings)
    timings = time_models(working, (x,), warmup=0, repeat=rounds)
    group.update(rounds=rounds, ms={k: t.median_ms for k, t in timings.items()},
                 min_ms={k: t.min_ms for k, t in timings.items()})
    return group


def converted(model: nn.Module, x: Tensor, name: str) -> tuple[Conversion, list[str]]:
    """repfuse's default conversion, without verification, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conversion = convert(model, x, verify=None, name=name)
    notes = sorted({str(w.message).splitlines()[0] for w in caught})
    return conversion, notes


def timed_verify(train: nn.Module, fused: nn.Module, x: Tensor) -> dict:
    """``repfuse.verify.verify`` with default options: wall time, verdict, worst error."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(train, fused, x)
    seconds = time.perf_counter() - start
    return {"verify_s": seconds, "verify_passed": report.passed,
            "verify_max_rel": max(run.worst.max_rel for run in report.runs)}


def peer_forms(name: str, train: nn.Module, fused: nn.Module, x: Tensor,
               failures: dict[str, str]) -> tuple[dict[str, nn.Module], str | None]:
    """The deploy form (where the model has one) and the fx-fuse form, built once per model,
    and the pipeline the deploy form's weights came from."""
    forms, source = {}, None
    if get_spec(name).supports_deploy:
        built = attempt(failures, "deploy", peers.deploy_form, name, train, fused, x)
        if built is not None:
            forms["deploy"], source = built
    fx_fused = attempt(failures, "fx_fuse", peers.fx_fuse, train)
    if fx_fused is not None:
        forms["fx_fuse"] = fx_fused
    return forms, source


def onnx_group(name: str, batch: int, models: dict[str, nn.Module], x: Tensor,
               reference: list[Tensor], settings: Settings, folder: Path,
               failures: dict[str, str]) -> dict:
    """Export the forms, open onnxruntime sessions, and measure them like the eager forms.
    ``failures`` holds why forms are missing from ``models``; export failures are added."""
    opset = peers.opset_for(name, settings.opset)
    exported = peers.export_forms(models, x, folder, f"{name}.b{batch}", opset)
    failures.update(exported.errors)
    runners = {}
    for form, export in exported.exports.items():
        runner = attempt(failures, form, peers.OrtRunner, export.path, settings.threads)
        if runner is not None:
            runners[form] = runner
    group = measure_group(runners, x, reference, settings, failures)
    group["nodes"] = exported.node_counts()
    group["opset"] = opset
    group["files"] = {form: str(e.path) for form, e in exported.exports.items()}
    notes = {form: e.note for form, e in exported.exports.items() if e.note}
    if notes:
        group["onnxsim_notes"] = notes
    return group


def bench_batch(name: str, train: nn.Module, x: Tensor, conversion: Conversion,
                peer: dict[str, nn.Module], peer_failures: dict[str, str], settings: Settings,
                folder: Path | None, progress: Callable[[str], None]) -> dict:
    """One model at one batch size (``x``): eager forms and, optionally, onnxruntime.
    ``peer_failures`` says why a deploy or fx-fuse form is missing from ``peer``."""
    batch = x.shape[0]
    reference = peers.float64_reference(train, x)
    forms = {"train": train, "fused": conversion.fused, **peer}
    progress(f"b{batch}: eager ({', '.join(FORM_LABELS[f] for f in forms)})")
    record = {"batch": batch, "convert_s": conversion.seconds,
              "rewrites": conversion.passes.counts(),
              "eager": measure_group(forms, x, reference, settings, dict(peer_failures))}
    if settings.onnx and folder is not None:
        progress(f"b{batch}: ONNX export and onnxruntime")
        onnx_models = {form: forms[form] for form in ONNX_FORMS if form in forms}
        if conversion.passes.counts().get("merge_siblings"):
            # what `repfuse convert -o MODEL.onnx` writes: no horizontal fusion for onnxruntime
            onnx_models["fused"] = convert(train, x, passes=list(ONNX_PIPELINE), verify=None,
                                           name=name).fused
            record["onnx_pipeline"] = "without merge_siblings"
        missing = {k: v for k, v in peer_failures.items() if k in ONNX_FORMS}
        record["onnx"] = onnx_group(name, batch, onnx_models, x, reference, settings, folder,
                                    missing)
    return record


def bench_model(name: str, settings: Settings, folder: Path | None,
                progress: Callable[[str], None] = lambda message: None) -> dict:
    """Everything the tables show for zoo model ``name`` (see the module docstring). Step
    failures are recorded as one-line reasons (``failures``, and per group), never raised."""
    spec = get_spec(name)
    record: dict = {"model": name, "input_shape": list(spec.input_shape),
                    "supports_deploy": spec.supports_deploy, "failures": {}, "batches": {}}
    failures = record["failures"]
    train = create_model(name)
    peer: dict[str, nn.Module] | None = None
    peer_failures: dict[str, str] = {}
    for batch in settings.batches:
        x = example_input((batch, *spec.input_shape[1:]), train)
        progress(f"b{batch}: converting")
        converted_here = attempt(failures, f"b{batch}", converted, train, x, name)
        if converted_here is None:
            continue
        conversion, notes = converted_here
        if peer is None:  # the deploy and fx-fuse forms do not depend on the batch size
            peer, record["deploy_weights"] = peer_forms(name, train, conversion.fused, x,
                                                        peer_failures)
            failures.update(peer_failures)
        if "conversion" not in record:
            record["conversion"] = {"seconds": conversion.seconds, "warnings": notes,
                                    "rewrites": sum(conversion.passes.counts().values()),
                                    "capture": conversion.capture.to_dict()}
            progress(f"b{batch}: verify")
            checked = attempt(failures, "verify", timed_verify, train, conversion.fused, x)
            record["conversion"].update(checked or {})
        result = attempt(failures, f"b{batch}", bench_batch, name, train, x, conversion, peer,
                         peer_failures, settings, folder, progress)
        if result is not None:
            record["batches"][str(batch)] = result
        del conversion, converted_here
        gc.collect()
    if settings.memory:
        progress("peak memory (fresh process)")
        memory = attempt(failures, "memory", peers.conversion_peak_memory, name,
                         settings.threads)
        if memory is not None:
            record["memory"] = memory
    return record


def bench_timm_model(name: str, settings: Settings, progress: Callable[[str], None]) -> dict:
    """A timm model (random weights and BN statistics): train, repfuse, timm's own
    ``reparameterize_model`` and fx fuse, eager only."""
    record: dict = {"model": f"timm:{name}", "failures": {}, "batches": {}}
    train = attempt(record["failures"], "create", peers.timm_model, name)
    if train is None:
        return record
    shape = tuple(getattr(train, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    peer = {}
    for form, build in (("timm", peers.timm_reparameterize), ("fx_fuse", peers.fx_fuse)):
        built = attempt(record["failures"], form, build, train)
        if built is not None:
            peer[form] = built
    for batch in settings.batches:
        progress(f"b{batch}")
        entry = attempt(record["failures"], f"b{batch}", timm_batch, name, train,
                        example_input((batch, *shape), train), peer, settings, record["failures"])
        if entry is not None:
            record["batches"][str(batch)] = entry
    return record


def timm_batch(name: str, train: nn.Module, x: Tensor, peer: dict[str, nn.Module],
               settings: Settings, failures: dict[str, str]) -> dict:
    """A timm model at one batch size: repfuse converts it, then all forms run eager."""
    conversion = attempt(failures, "fused", converted, train, x, name)
    forms = {"train": train, **({"fused": conversion[0].fused} if conversion else {}), **peer}
    reference = peers.float64_reference(train, x)
    missing = {k: v for k, v in failures.items() if k in ("fused", "timm", "fx_fuse")}
    return {"batch": x.shape[0], "eager": measure_group(forms, x, reference, settings, missing)}


# --- tables -------------------------------------------------------------------------------------


def short(reason: str) -> str:
    reason = reason.replace("|", "/")
    if len(reason) > CELL_REASON_LIMIT:
        reason = reason[: CELL_REASON_LIMIT - 1] + "…"
    return f"failed: {reason}"


def ms_cell(group: dict, form: str) -> str:
    if form in group["ms"]:
        ms = group["ms"][form]
        return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"
    if form in group["failures"]:
        return short(group["failures"][form])
    return "n/a"


def ratio_cell(group: dict, numerator: str, denominator: str) -> str:
    ms = group["ms"]
    if numerator in ms and denominator in ms:
        return f"{ms[numerator] / ms[denominator]:.2f}"
    return "–"


def batch_rows(records: list[dict], group_key: str):
    """``(record, batch, group, None)`` per model and batch, or ``(record, batch, None,
    reason)`` where nothing of the group could be timed."""
    for record in records:
        if not record["batches"]:
            reasons = "; ".join(f"{k}: {v}" for k, v in record["failures"].items())
            yield record, None, None, short(reasons or "no batch ran")
            continue
        for batch, entry in record["batches"].items():
            group = entry.get(group_key)
            if group is None:
                reason = record["failures"].get(f"b{batch}", "not measured")
                yield record, batch, None, short(reason)
            elif not group["ms"]:
                reasons = dict.fromkeys(group["failures"].values())
                yield record, batch, None, short("; ".join(reasons) or "nothing ran")
            else:
                yield record, batch, group, None


def timing_table(records: list[dict], group_key: str, header: str,
                 row_cells: Callable[[dict], list[str]]) -> list[str]:
    """A Markdown table of one timing group per model and batch: ``header`` names the columns
    after model, batch and rounds; ``row_cells(group)`` gives their cells."""
    columns = header.count("|") + 1
    lines = [f"| model | batch | rounds | {header} |",
             "|---|---:|---:|" + "---:|" * columns]
    for record, batch, group, failed in batch_rows(records, group_key):
        if group is None:
            lines.append(f"| {record['model']} | {batch or '–'} | {failed} |"
                         + " |" * columns)
            continue
        lines.append(f"| {record['model']} | {batch} | {group['rounds']} | "
                     + " | ".join(row_cells(group)) + " |")
    return lines


def eager_table(records: list[dict]) -> list[str]:
    return timing_table(
        records, "eager", "train (ms) | repfuse (ms) | deploy (ms) | fx fuse (ms) "
        "| train/repfuse | repfuse/deploy | fx fuse/repfuse",
        lambda group: [ms_cell(group, f) for f in EAGER_FORMS] + [
            ratio_cell(group, "train", "fused"), ratio_cell(group, "fused", "deploy"),
            ratio_cell(group, "fx_fuse", "fused")])


def onnx_table(records: list[dict]) -> list[str]:
    return timing_table(
        records, "onnx", "train (ms) | repfuse (ms) | deploy (ms) | repfuse/deploy "
        "| train/repfuse",
        lambda group: [ms_cell(group, f) for f in ONNX_FORMS] + [
            ratio_cell(group, "fused", "deploy"), ratio_cell(group, "train", "fused")])


def first_onnx_group(record: dict) -> dict | None:
    for entry in record["batches"].values():
        if "onnx" in entry:
            return entry["onnx"]
    return None


def nodes_table(records: list[dict]) -> list[str]:
    lines = ["| model | train | train + onnxsim | repfuse | deploy "
             "| changed ops (train + onnxsim → repfuse) |",
             "|---|---:|---:|---:|---:|---|"]
    for record in records:
        group = first_onnx_group(record)
        if group is None:
            lines.append(f"| {record['model']} | – | – | – | – | not exported |")
            continue
        nodes = group["nodes"]
        totals = [str(sum(nodes[k].values())) if k in nodes else "–"
                  for k in ("train", "train_onnxsim", "repfuse", "deploy")]
        reasons = {group["failures"][k] for k in ("train", "fused") if k in group["failures"]}
        changed = peers.changed_ops(nodes) if "repfuse" in nodes else ""
        if reasons:
            changed = "; ".join(filter(None, [changed, short("; ".join(sorted(reasons)))]))
        lines.append(f"| {record['model']} | " + " | ".join(totals) + f" | {changed} |")
    return lines


def worst_errors(record: dict, group_key: str) -> tuple[dict[str, float], dict[str, str]]:
    """The worst error per form over the batches, and the failures of forms with none."""
    worst: dict[str, float] = {}
    failures: dict[str, str] = {}
    for entry in record["batches"].values():
        group = entry.get(group_key)
        if group is None:
            continue
        for form, error in group["error"].items():
            worst[form] = max(error, worst.get(form, 0.0))
        failures.update(group["failures"])
    return worst, {k: v for k, v in failures.items() if k not in worst}


def error_cell(errors: dict[str, float], failures: dict[str, str], form: str) -> str:
    """The error, or ``failed`` (the latency tables give the reason), or ``n/a``."""
    if form in errors:
        return f"{errors[form]:.1e}"
    return "failed" if form in failures else "n/a"


def error_table(records: list[dict]) -> list[str]:
    lines = ["| model | train f32 | repfuse f32 | fx fuse f32 | deploy f32 | ORT train "
             "| ORT repfuse | ORT deploy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        eager, eager_failed = worst_errors(record, "eager")
        ort, ort_failed = worst_errors(record, "onnx")
        cells = [error_cell(eager, eager_failed, f) for f in ERROR_FORMS]
        cells += [error_cell(ort, ort_failed, f) for f in ONNX_FORMS]
        lines.append(f"| {record['model']} | " + " | ".join(cells) + " |")
    return lines


def conversion_table(records: list[dict]) -> list[str]:
    lines = ["| model | rewrites | trace + passes (s) | verify (s) | verified (max rel) "
             "| peak memory (MiB) |",
             "|---|---:|---:|---:|---|---:|"]
    for record in records:
        conv, failures = record.get("conversion", {}), record["failures"]
        seconds = f"{conv['seconds']:.2f}" if "seconds" in conv else "–"
        rewrites = str(conv.get("rewrites", "–"))
        if "verify_s" in conv:
            verdict = "passed" if conv["verify_passed"] else "FAILED"
            verify_s = f"{conv['verify_s']:.2f}"
            verified = f"{verdict} ({conv['verify_max_rel']:.1e})"
        else:
            verify_s, verified = "–", short(failures["verify"]) if "verify" in failures else "–"
        memory = record.get("memory")
        if memory is not None:
            bound = "" if memory["method"] == "VmHWM reset" else "≤ "
            peak = f"{bound}{memory['peak_mib']:.1f}"
        else:
            peak = short(failures["memory"]) if "memory" in failures else "–"
        lines.append(f"| {record['model']} | {rewrites} | {seconds} | {verify_s} | {verified} "
                     f"| {peak} |")
    return lines


def deploy_source_lines(records: list[dict]) -> list[str]:
    """Which models' deploy forms hold weights from a pipeline other than repfuse's default."""
    other = [f"{r['model']} ({r['deploy_weights']})" for r in records
             if r.get("deploy_weights") and not r["deploy_weights"].startswith("repfuse,")]
    if not other:
        return []
    return ["Deploy forms whose layer layout differs from repfuse's default output hold the "
            "weights of a shorter pipeline: " + ", ".join(other) + ".", ""]


def memory_line(records: list[dict]) -> str:
    methods = sorted({r["memory"]["method"] for r in records if "memory" in r})
    if not methods:
        return ""
    return ("Peak memory: the conversion's peak RSS minus the RSS once model and batch-1 input "
            "were built, in a fresh Python process per model after a warm-up conversion of a "
            f"one-conv model (method: {', '.join(methods)}).\n")


def target_lines(records: list[dict]) -> list[str]:
    """How many rows meet repfuse/deploy ≤ 1.02, eager and onnxruntime, and the worst."""
    lines = []
    for key, label in (("eager", "eager"), ("onnx", "onnxruntime")):
        ratios = [(entry[key]["ms"]["fused"] / entry[key]["ms"]["deploy"],
                   f"{record['model']} b{batch}")
                  for record in records for batch, entry in record["batches"].items()
                  if key in entry and {"fused", "deploy"} <= set(entry[key]["ms"])]
        if not ratios:
            continue
        met = sum(1 for r, _ in ratios if r <= 1.02)
        worst, where = max(ratios)
        lines.append(f"- {label}: repfuse/deploy ≤ 1.02 in {met} of {len(ratios)} rows; "
                     f"worst {worst:.3f} ({where}).")
    return lines


def timm_table(records: list[dict]) -> list[str]:
    def cells(group: dict) -> list[str]:
        errors = [error_cell(group["error"], group["failures"], f) for f in ("fused", "timm")]
        return ([ms_cell(group, f) for f in ("train", "fused", "timm", "fx_fuse")]
                + [ratio_cell(group, "fused", "timm")] + errors)

    return timing_table(
        records, "eager", "train (ms) | repfuse (ms) | timm reparam (ms) | fx fuse (ms) "
        "| repfuse/timm | repfuse f32 err | timm f32 err", cells)


def machine_line(threads: int) -> str:
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo
                     if line.startswith("model name")]
        if names:
            processor += f", {names[0]}"
    except OSError:
        pass
    return f"machine: {processor}, {os.cpu_count()} cores; {threads} threads"


def versions_line() -> str:
    import onnx
    import onnxruntime
    import onnxsim

    return (f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"onnx {onnx.__version__}, onnxsim {onnxsim.__version__}, "
            f"Python {platform.python_version()}")


def render(records: list[dict], timm_records: list[dict] | None, settings: Settings,
           command: str, wall_s: float) -> str:
    out = [f"Command: `{command}`", "",
           f"{versions_line()}; {machine_line(settings.threads)}; wall time "
           f"{wall_s / 60:.1f} min. Rounds: min(repeat {settings.repeat}, max(min-repeat "
           f"{settings.min_repeat}, budget {settings.budget_s:g} s / one warm round)).", "",
           "### Eager latency (median ms)", "", *eager_table(records), "",
           *deploy_source_lines(records)]
    if settings.onnx:
        out += ["### onnxruntime latency (median ms, ORT_ENABLE_ALL)", "",
                *onnx_table(records), "", "### ONNX nodes", "", *nodes_table(records), ""]
    out += ["### Numerical error vs the float64 train form (max rel, worst over batches)", "",
            *error_table(records), "", "### Conversion", "", *conversion_table(records), "",
            memory_line(records),
            "### Targets", "", *target_lines(records), ""]
    if timm_records is None:
        available = peers.timm_available()
        out += ["timm: skipped (run interrupted)" if available else "timm not installed: skipped",
                ""]
    else:
        out += ["### timm models, with timm.utils.reparameterize_model", "",
                *timm_table(timm_records), ""]
    return "\n".join(out)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=30, help="most timed rounds per group")
    parser.add_argument("--min-repeat", type=int, default=5, help="fewest timed rounds")
    parser.add_argument("--budget", type=float, default=6.0,
                        help="seconds of timed rounds aimed at per group")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds per group")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-memory", action="store_true",
                        help="no fresh-process peak-memory measurement")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--onnx-dir", type=Path, help="keep the ONNX files here")
    parser.add_argument("--json", type=Path, help="write all raw numbers here")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(batches=tuple(int(b) for b in args.batches.split(",")),
                    repeat=args.repeat, min_repeat=min(args.min_repeat, args.repeat),
                    budget_s=args.budget, warmup=args.warmup, threads=args.threads,
                    onnx=not args.skip_onnx, memory=not args.skip_memory, opset=args.opset)


def write_json(path: Path, settings: Settings, command: str, records: list[dict],
               timm_records: list[dict] | None) -> None:
    data = {"command": command, "versions": versions_line(),
            "machine": machine_line(settings.threads), "settings": asdict(settings),
            "models": records, "timm": timm_records}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    temporary.replace(path)


def reporter(started: float, tag: str) -> Callable[[str], None]:
    """A progress printer: seconds since ``started``, ``tag``, the message, on stderr."""

    def progress(message: str) -> None:
        elapsed = time.perf_counter() - started
        print(f"{elapsed:7.0f}s {tag} {message}", file=sys.stderr, flush=True)

    return progress


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    names = args.models.split(",") if args.models else [s.name for s in list_models()]
    for name in names:
        try:
            get_spec(name)  # an unknown name fails now, not after an hour
        except KeyError as exc:
            sys.exit(f"error: {exc.args[0]}")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv]) if argv is None else (
        shlex.join(["benchmarks/run.py", *argv]))
    started = time.perf_counter()
    with warnings.catch_warnings():  # the first conversion's lazy imports are not the model's
        warnings.simplefilter("ignore")
        peers.warm_up_conversion()
    records: list[dict] = []
    timm_records: list[dict] | None = None
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="repfuse-bench-") as scratch:
        folder = args.onnx_dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for index, name in enumerate(names, 1):
                model_start = time.perf_counter()
                progress = reporter(started, f"[{index}/{len(names)}] {name}")
                records.append(bench_model(name, settings, folder, progress))
                progress(f"done in {time.perf_counter() - model_start:.0f} s")
                if args.json:
                    write_json(args.json, settings, command, records, timm_records)
        except KeyboardInterrupt:  # print the tables of the models done so far
            print(f"interrupted: {len(records)} of {len(names)} models done", file=sys.stderr)
            command += f"  (interrupted after {len(records)} of {len(names)} models)"
            interrupted = True
        if peers.timm_available() and not interrupted:
            timm_records = []
            for name in peers.TIMM_MODELS:
                timm_records.append(
                    bench_timm_model(name, settings, reporter(started, f"timm {name}")))
        elif not peers.timm_available():
            print("timm not installed: skipped", file=sys.stderr)
    wall_s = time.perf_counter() - started
    if args.json:
        write_json(args.json, settings, command, records, timm_records)
    print(render(records, timm_records, settings, command, wall_s))


if __name__ == "__main__":
    main()
