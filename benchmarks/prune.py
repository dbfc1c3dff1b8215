"""Exact pruning on the sparse zoo models: MACs and latency before and after ``prune_dead``,
next to Torch-Pruning removing the same channels.

    .venv/bin/python benchmarks/prune.py [--models slim_vgg_tiny,...] [--batches 1,16]
        [--repeat 40] [--threads 1] [--skip-onnx] [--json results.json]

For each sparse zoo model (``repfuse.models.sparse``: network slimming, pruned heads), on the
CPU, at each batch size, on one seeded N(0, 1) input:

**Forms.** ``train``: the model as built. ``unpruned``: repfuse's default pipeline without
``prune_dead`` (BN folds, merges). ``pruned``: the default pipeline (``prune_dead`` included).
The ratio pruned/unpruned isolates what pruning buys. ``pruned ×8``: ``prune_dead`` with
``multiple_of=8``, keeping every pruned width a multiple of 8 (onnxruntime's CPU convs work on
channel blocks of 8 or 16). ``TP same``: Torch-Pruning
(``torch_pruning.DependencyGraph``) removing from the train form exactly the output channels
``prune_dead`` removed, with its dependency groups (BN, following layers, residual partners):
the same channel count, but the constants those channels carried are dropped instead of folded
into the readers' biases. ``TP slimming``: Torch-Pruning removing every channel whose BN has
``γ = 0`` (network slimming's rule), through the BN's group. A Torch-Pruning form is left out,
with its reason, where Torch-Pruning is not installed or fails on the model.

**MACs**: every multiply-accumulate of one forward at batch 1, counted by
``torch.utils.flop_counter.FlopCounterMode`` (convs, linears and the attention products alike;
FLOPs / 2). **Channels**: output channels of all conv/linear layers; **heads** removed from the
rewrites' records.

**Error**: ``max|y - ref| / max|ref|`` against the train form in float64 (``repfuse.bench.
max_rel_between``), float32 forms in eager, the worst over the batch sizes.

**Latency** (median ms): eager under inference mode, and onnxruntime (``ORT_ENABLE_ALL``, the
ONNX as ``repfuse convert -o MODEL.onnx`` writes it: without horizontal fusion, then onnxsim;
``peers.export_forms``), the forms of one group run interleaved (``repfuse.bench.time_models``)
in the same process, ``--repeat`` rounds after ``--warmup``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (beside this script; benchmarks/ is not a package)

from repfuse.bench import max_rel_between, time_models  # noqa: E402
from repfuse.convert import convert  # noqa: E402
from repfuse.graph import layer_view  # noqa: E402
from repfuse.models import create_model, get_spec  # noqa: E402
from repfuse.passes import DEFAULT_PIPELINE, PruneDead, history  # noqa: E402
from repfuse.passes.prune import CHANNELS_KEY  # noqa: E402

SPARSE_MODELS = ("slim_vgg_tiny", "slim_resnet_tiny", "resnet_tiny_dead_addend",
                 "vit_pruned_heads_tiny", "mha_pruned_heads_tiny")
UNPRUNED = tuple(p for p in DEFAULT_PIPELINE if p != "prune_dead")
# prune_dead keeping every pruned width a multiple of 8 (onnxruntime's channel blocks)
ALIGNED = tuple(PruneDead(multiple_of=8) if p == "prune_dead" else p for p in DEFAULT_PIPELINE)
# What `repfuse convert -o MODEL.onnx` runs: no horizontal fusion (onnxruntime runs it slower)
ONNX_PRUNED = tuple(p for p in DEFAULT_PIPELINE if p != "merge_siblings")
ONNX_UNPRUNED = tuple(p for p in ONNX_PRUNED if p != "prune_dead")
ONNX_ALIGNED = tuple(p for p in ALIGNED if p != "merge_siblings")


def macs_of(model: Callable, x: Tensor) -> int:
    """Multiply-accumulates of one forward (FLOPs / 2, every op FlopCounterMode knows).
    ``nn.MultiheadAttention``'s fast path and the fused CPU kernels of
    ``scaled_dot_product_attention`` are ops the counter does not know: while counting, the
    first is off and attention runs as its math (matmuls), so every product is counted."""
    counter = FlopCounterMode(display=False)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]):
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() // 2


def channels_of(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += module.out_channels
        elif isinstance(module, nn.Linear):
            total += module.out_features
        elif isinstance(module, nn.MultiheadAttention):
            total += 3 * module.embed_dim  # q, k, v; its out_proj is an nn.Linear child
    return total


def heads_removed(fused: nn.Module) -> int:
    """Heads removed, from the rewrites' records (``heads [1, 3] of ...``)."""
    count = 0
    for rewrite in history(fused).rewrites:
        if rewrite.pass_name != "prune_dead":
            continue
        for part in rewrite.detail.split("heads [")[1:]:
            if "of 'matmul" in part or "MultiheadAttention" in part or "scaled_dot" in part:
                listed = part.split("]")[0]
                count += len([h for h in listed.split(",") if h.strip()])
                break  # the same heads are listed once per product: count them once
    return count


def removed_channels(train: nn.Module, x: Tensor) -> tuple[dict[str, list[int]], list[str]]:
    """Per conv/linear path of the train form, the output channels ``prune_dead`` removes
    (read from the pruned graph's record of the original channel numbers), and the pruned
    layers that have no such path (an attention module rewritten into its projections)."""
    gm = convert(train, x, passes=list(ONNX_PRUNED), verify=None).fused
    removed, unmapped = {}, []
    modules = dict(train.named_modules())
    for node in gm.graph.nodes:
        kept = node.meta.get(CHANNELS_KEY)
        layer = layer_view(gm, node) if kept is not None else None
        path = layer.module_path if layer is not None else None
        if path is None or path not in modules:
            if kept is not None:
                unmapped.append(str(node.target))
            continue
        original = modules[path]
        count = getattr(original, "out_channels", getattr(original, "out_features", None))
        gone = sorted(set(range(count)) - set(kept))
        if gone:
            removed[path] = gone
    kept_paths = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    unmapped += [path for path, module in modules.items()
                 if isinstance(module, nn.MultiheadAttention) and path not in kept_paths]
    return removed, unmapped


# --- Torch-Pruning -----------------------------------------------------------------------------


def torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return tp


def tp_same_channels(train: nn.Module, x: Tensor, removed: dict[str, list[int]],
                     unmapped: list[str]) -> nn.Module:
    """Torch-Pruning removing exactly ``removed`` (path -> output channels) from a copy."""
    tp = torch_pruning()
    if tp is None:
        raise RuntimeError("torch_pruning not installed")
    if unmapped:
        raise RuntimeError(f"heads of nn.MultiheadAttention ({unmapped[0]}, ...) have no "
                           "train-form layer to give Torch-Pruning")
    if not removed:
        raise RuntimeError("prune_dead removed no channel: nothing to match")
    model = copy.deepcopy(train).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    modules = dict(model.named_modules())
    done: set[nn.Module] = set()
    for path, channels in removed.items():
        module = modules[path]
        if module in done:
            continue  # pruned with an earlier group (a residual partner)
        prune = (tp.prune_linear_out_channels if isinstance(module, nn.Linear)
                 else tp.prune_conv_out_channels)
        group = graph.get_pruning_group(module, prune, idxs=channels)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"Torch-Pruning refuses the group of {path}")
        outputs = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        done.update(dep.target.module for dep, _ in group if dep.handler in outputs)
        group.prune()
    return model


def tp_slimming(train: nn.Module, x: Tensor) -> nn.Module:
    """Torch-Pruning removing every channel whose BN has γ = 0, through the BN's group."""
    tp = torch_pruning()
    if tp is None:
        raise RuntimeError("torch_pruning not installed")
    model = copy.deepcopy(train).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise RuntimeError("no BatchNorm: network slimming's rule does not apply")
    if not any(bool(bn.weight.detach().eq(0).any()) for bn in norms):
        raise RuntimeError("no BN has γ = 0")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for bn in norms:
        channels = bn.weight.detach().eq(0).nonzero().flatten().tolist()
        if not channels or len(channels) == bn.num_features:
            continue
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=channels)
        if not graph.check_pruning_group(group):
            raise RuntimeError("Torch-Pruning refuses a group")
        group.prune()
    return model


# --- one model ----------------------------------------------------------------------------------


def attempt(failures: dict[str, str], key: str, step: Callable, *args):
    try:
        return step(*args)
    except Exception as exc:  # a failing peer is a result of the benchmark, not its end
        failures[key] = peers.first_line(exc)
        return None


def bench_model(name: str, args: argparse.Namespace, folder: Path | None,
                progress: Callable[[str], None]) -> dict:
    spec = get_spec(name)
    train = create_model(name)
    x1 = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0))
    failures: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unpruned = convert(train, x1, passes=list(UNPRUNED), verify=None).fused
        pruned = convert(train, x1, passes=list(DEFAULT_PIPELINE), verify=None).fused
        aligned = convert(train, x1, passes=list(ALIGNED), verify=None).fused
        removed, unmapped = removed_channels(train, x1)
        forms: dict[str, nn.Module] = {"train": train, "unpruned": unpruned, "pruned": pruned,
                                       "aligned": aligned}
        same = attempt(failures, "tp_same", tp_same_channels, train, x1, removed, unmapped)
        if same is not None:
            forms["tp_same"] = same
        slim = attempt(failures, "tp_slimming", tp_slimming, train, x1)
        if slim is not None:
            forms["tp_slimming"] = slim
    record = {
        "model": name, "failures": failures,
        "macs": {f: macs_of(m, x1) for f, m in forms.items()},
        "channels": {f: channels_of(m) for f, m in forms.items()},
        "heads_removed": heads_removed(pruned),
        "removed_by_layer": {p: len(c) for p, c in removed.items()},
        "error": {}, "eager": {}, "onnx": {},
    }
    for batch in args.batches:
        x = torch.randn((batch, *spec.input_shape[1:]),
                        generator=torch.Generator().manual_seed(batch))
        reference = peers.float64_reference(train, x)
        outputs = {f: peers.outputs_of(m, x) for f, m in forms.items()}
        for form, out in outputs.items():
            error = max_rel_between(reference, out)
            record["error"][form] = max(error, record["error"].get(form, 0.0))
        progress(f"{name} b{batch}: eager")
        timings = time_models(forms, (x,), warmup=args.warmup, repeat=args.repeat)
        record["eager"][batch] = {f: t.median_ms for f, t in timings.items()}
        record.setdefault("eager_min", {})[batch] = {f: t.min_ms for f, t in timings.items()}
        if folder is not None:
            progress(f"{name} b{batch}: onnxruntime")
            record["onnx"][batch] = onnx_timings(name, train, x, forms, reference, folder, args,
                                                 failures)
    return record


def onnx_timings(name: str, train: nn.Module, x: Tensor, forms: dict[str, nn.Module],
                 reference: list[Tensor], folder: Path, args: argparse.Namespace,
                 failures: dict[str, str]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "unpruned": convert(train, x, passes=list(ONNX_UNPRUNED), verify=None).fused,
            "pruned": convert(train, x, passes=list(ONNX_PRUNED), verify=None).fused,
            "aligned": convert(train, x, passes=list(ONNX_ALIGNED), verify=None).fused,
        }
        if "tp_same" in forms:
            models["tp_same"] = forms["tp_same"]
    exported = peers.export_forms(models, x, folder, f"{name}.b{x.shape[0]}",
                                  peers.opset_for(name, 17))
    failures.update({f"onnx_{k}": v for k, v in exported.errors.items()})
    runners = {form: peers.OrtRunner(e.path, args.threads) for form, e in
               exported.exports.items()}
    errors = {form: max_rel_between(reference, peers.outputs_of(r, x))
              for form, r in runners.items()}
    timings = time_models(runners, (x,), warmup=args.warmup, repeat=args.repeat)
    return {"ms": {f: t.median_ms for f, t in timings.items()},
            "min_ms": {f: t.min_ms for f, t in timings.items()}, "error": errors,
            "nodes": {f: sum(e.nodes.values()) for f, e in exported.exports.items()}}


# --- tables ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


def render(records: list[dict], args: argparse.Namespace, command: str, wall_s: float) -> str:
    out = [f"Command: `{command}`", "", f"{versions()}; threads {args.threads}; wall time "
           f"{wall_s / 60:.1f} min; {args.repeat} interleaved rounds after {args.warmup} "
           "warm-up rounds.", "",
           "### What prune_dead removes (batch 1 MACs, FlopCounterMode)", "",
           "| model | channels unpruned → pruned (×8) | heads removed | MACs unpruned | MACs "
           "pruned | pruned/unpruned (×8) | error pruned (f32) |",
           "|---|---|---|---|---|---|---|"]
    for r in records:
        c, m = r["channels"], r["macs"]
        out.append(f"| {r['model']} | {c['unpruned']} → {c['pruned']} ({c['aligned']}) | "
                   f"{r['heads_removed']} | {m['unpruned']:,} | {m['pruned']:,} | "
                   f"{_ratio(m['pruned'], m['unpruned'])} "
                   f"({_ratio(m['aligned'], m['unpruned'])}) | {r['error']['pruned']:.1e} |")
    out += ["", "### Latency (median ms; ratio of medians, and of minimums) before and after, "
            "same run, interleaved", "",
            "| model | batch | eager unpruned | eager pruned | ratio (min) | ORT unpruned "
            "| ORT pruned | ratio (min) | ORT pruned ×8 | ratio (min) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for batch, eager in r["eager"].items():
            low = r.get("eager_min", {}).get(batch, {})
            ort_group = r["onnx"].get(batch, {})
            ort, ort_low = ort_group.get("ms", {}), ort_group.get("min_ms", {})
            out.append(f"| {r['model']} | {batch} | {_ms(eager.get('unpruned'))} | "
                       f"{_ms(eager.get('pruned'))} | "
                       f"{_ratio(eager.get('pruned'), eager.get('unpruned'))} "
                       f"({_ratio(low.get('pruned'), low.get('unpruned'))}) | "
                       f"{_ms(ort.get('unpruned'))} | {_ms(ort.get('pruned'))} | "
                       f"{_ratio(ort.get('pruned'), ort.get('unpruned'))} "
                       f"({_ratio(ort_low.get('pruned'), ort_low.get('unpruned'))}) | "
                       f"{_ms(ort.get('aligned'))} | "
                       f"{_ratio(ort.get('aligned'), ort.get('unpruned'))} "
                       f"({_ratio(ort_low.get('aligned'), ort_low.get('unpruned'))}) |")
    out += ["", "### Next to Torch-Pruning (error vs the float64 train form; MACs at batch 1)",
            "", "| model | form | channels | MACs | error | eager ms (batch 1) |",
            "|---|---|---|---|---|---|"]
    for r in records:
        first = next(iter(r["eager"].values()), {})
        for form, label in (("pruned", "repfuse prune_dead"), ("tp_same", "TP same channels"),
                            ("tp_slimming", "TP slimming (all γ = 0)")):
            if form not in r["channels"]:
                reason = r["failures"].get(form, "not run")
                out.append(f"| {r['model']} | {label} | – | – | {reason} | – |")
                continue
            out.append(f"| {r['model']} | {label} | {r['channels'][form]} | "
                       f"{r['macs'][form]:,} | {r['error'][form]:.1e} | {_ms(first.get(form))} |")
    return "\n".join(out)


def versions() -> str:
    import onnxruntime

    try:
        tp_version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        tp_version = "not installed"
    return (f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"torch-pruning {tp_version}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SPARSE_MODELS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python benchmarks/prune.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = None if args.skip_onnx else Path(tmp)
        for name in args.models.split(","):
            records.append(bench_model(name, args, folder, progress))
            if args.json:
                args.json.write_text(json.dumps(records, indent=1))
    print(render(records, args, command, time.perf_counter() - started))


if __name__ == "__main__":
    main()
