"""What the benchmark scripts share: the peers repfuse is compared with, and how each is measured.

Imported by ``benchmarks/run.py`` and ``benchmarks/onnx_nodes.py`` (benchmarks/ is not a
package: those scripts run from their folder's parent and find this module beside them).

- forms of one model: repfuse's fused form, the hand-written deploy form holding repfuse's
  weights (:func:`deploy_form`), ``torch.fx.experimental.optimization.fuse`` (:func:`fx_fuse`);
- ONNX: every form exported the same way (:func:`export_forms`: ``repfuse.export.onnx_model``,
  then onnxsim), node counts by op type, and onnxruntime sessions with all graph optimizations
  on (:class:`OrtRunner`);
- the float64 reference the error measure ``max|y - ref| / max|ref|`` is taken against
  (:func:`float64_reference`; the measure is ``repfuse.bench.max_rel_between``, the same as
  ``repfuse bench`` and the verifier use);
- peak memory of a conversion, measured in a fresh process (:func:`conversion_peak_memory`).
"""

from __future__ import annotations

import copy
import gc
import json
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from repfuse.convert import convert, example_input
from repfuse.export import onnx_model, onnx_node_counts, simplify_onnx
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, get_spec, load_fused_state_dict
from repfuse.passes import DEFAULT_PIPELINE

# ONNX opset each model needs at least (AffineGrid entered ONNX in opset 20).
MIN_OPSET = {"stn_tiny": 20}

# repfuse pipelines whose result is tried, in order, as the deploy form's weights: the default;
# without horizontal fusion (one conv + split where the deploy form has several convs); BN
# folding only (the Deep Rebirth deploy forms keep the pools that streamline merging removes).
DEPLOY_WEIGHT_SOURCES: dict[str, list[str] | None] = {
    "repfuse": None,
    "repfuse w/o merge_siblings": [p for p in DEFAULT_PIPELINE if p != "merge_siblings"],
    "BN fold only": ["remove_noops", "fold_batchnorm"],
}


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: a table cell."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def opset_for(name: str, opset: int) -> int:
    return max(opset, MIN_OPSET.get(name, 0))


# --- forms of one model -------------------------------------------------------------------------


def deploy_form(name: str, train: nn.Module, fused: nn.Module, x: Tensor) -> tuple[nn.Module, str]:
    """The hand-written deploy form of zoo model ``name`` holding repfuse's weights, and where
    they came from (a key of :data:`DEPLOY_WEIGHT_SOURCES`, and how they were loaded).

    Each source is loaded with :func:`load_by_structure` (layers paired in execution order,
    shapes and hyperparameters checked), or else by name with :func:`load_fused_state_dict`
    (a model captured in parts cannot be traced as a whole, but keeps its paths). Either way
    the deploy form computes the train form's function; the caller measures that against the
    float64 reference. Raises ``ValueError`` with the last reason when no source fits.
    """
    reason = "no pipeline tried"
    for source, passes in DEPLOY_WEIGHT_SOURCES.items():
        weights = fused if passes is None else convert(train, x, passes=passes, verify=None).fused
        loaders = {"by structure": lambda deploy, w=weights: load_by_structure(deploy, w, x),
                   "by name": lambda deploy, w=weights: load_fused_state_dict(
                       deploy, w.state_dict())}
        for how, load in loaders.items():
            try:
                deploy = load(create_model(name, deploy=True))
            except (ValueError, RuntimeError) as exc:
                reason = first_line(exc)
                continue
            return deploy.eval(), f"{source}, {how}"
    raise ValueError(f"no repfuse form fits the deploy form ({reason})")


def fx_fuse(model: nn.Module) -> nn.Module:
    """The torch peer: ``torch.fx.experimental.optimization.fuse`` on an eval-mode copy. It
    folds a BatchNorm into the Conv/Linear right before it, nothing else."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def outputs_of(model, x: Tensor) -> list[Tensor]:
    """The tensor leaves of ``model(x)`` in order (a module, or an :class:`OrtRunner`)."""
    with torch.inference_mode():
        return [t for t in tree_leaves(model(x)) if isinstance(t, Tensor)]


def float64_reference(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The train form deep-copied to float64, run on ``x`` in float64: the truth."""
    return outputs_of(copy.deepcopy(model).double().eval(), x.double())


# --- ONNX ---------------------------------------------------------------------------------------


@dataclass
class OnnxExport:
    """One form exported to ONNX and simplified: the written file and its node counts by op
    type before (``raw_nodes``) and after onnxsim (``nodes``); ``note`` says why onnxsim's
    result was not used, if it was not."""

    path: Path
    raw_nodes: dict[str, int]
    nodes: dict[str, int]
    note: str | None = None


@dataclass
class OnnxForms:
    """:func:`export_forms`' result: the exports that worked and why the others did not."""

    exports: dict[str, OnnxExport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def node_counts(self) -> dict[str, dict[str, int]]:
        """Node counts by op type, keyed as in ``ExportResult.onnx_nodes``: ``train`` (as
        exported), ``train_onnxsim``, ``repfuse`` (fused, after onnxsim), and ``deploy``
        (after onnxsim) when that form was exported."""
        counts = {}
        if "train" in self.exports:
            counts["train"] = self.exports["train"].raw_nodes
            counts["train_onnxsim"] = self.exports["train"].nodes
        if "fused" in self.exports:
            counts["repfuse"] = self.exports["fused"].nodes
        if "deploy" in self.exports:
            counts["deploy"] = self.exports["deploy"].nodes
        return counts


def export_forms(
    forms: dict[str, nn.Module], x: Tensor, folder: Path, stem: str, opset: int
) -> OnnxForms:
    """Export each form the same way: ``repfuse.export.onnx_model`` (TorchScript-based
    exporter, eval mode, constant folding, static shapes of ``x``), then onnxsim, the path
    ``repfuse convert -o MODEL.onnx`` takes. Writes ``{stem}.{form}.onnx`` (simplified) into
    ``folder``; a form that cannot be exported gets a one-line reason instead."""
    result = OnnxForms()
    for form, model in forms.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = onnx_model(model, x, opset=opset)
        except Exception as exc:  # the exporter fails in many ways; the reason is the result
            result.errors[form] = first_line(exc)
            continue
        simplified, note = simplify_onnx(raw)
        path = folder / f"{stem}.{form}.onnx"
        path.write_bytes(simplified.SerializeToString())
        result.exports[form] = OnnxExport(path, onnx_node_counts(raw),
                                          onnx_node_counts(simplified), note)
    return result


def changed_ops(nodes: dict[str, dict[str, int]]) -> str:
    """``Add 9→0, Conv 14→7``: op types whose count differs from train + onnxsim to repfuse."""
    if "train_onnxsim" not in nodes:
        return "(train form not exported)"
    before, after = nodes["train_onnxsim"], nodes["repfuse"]
    return ", ".join(f"{op} {before.get(op, 0)}→{after.get(op, 0)}"
                     for op in sorted(set(before) | set(after))
                     if before.get(op, 0) != after.get(op, 0)) or "none"


class OrtRunner:
    """An ONNX file in an onnxruntime CPU session, called like a module on one tensor.

    Graph optimizations: all (``ORT_ENABLE_ALL``); sequential execution; ``threads`` intra-op
    threads, one inter-op thread. Intra-op threads do not spin while waiting for work: each
    session has its own pool, and sessions timed in turn would otherwise spin against each
    other on a small machine.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> list[Tensor]:
        arrays = self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})
        return [torch.from_numpy(a) for a in arrays]


# --- peak memory --------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS: Linux ≥ 4.0 takes ``5``
    written to /proc/self/clear_refs. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


@dataclass(frozen=True)
class PeakMemory:
    """Peak RSS during a call above the RSS just before it, that RSS, and the method."""

    increase_mib: float
    before_mib: float
    method: str


def peak_rss_increase(run: Callable[[], object]) -> tuple[object, PeakMemory]:
    """Call ``run()``; return its result and the peak RSS during the call above the RSS just
    before it.

    Method ``VmHWM reset``: Linux's peak RSS is reset to the current RSS right before the call,
    so the number is exactly the call's own high-water mark. Where that is unavailable,
    ``ru_maxrss``: the process's lifetime peak, an upper bound (exact if the call set it).
    """
    gc.collect()
    before = _status_kib("VmRSS")
    reset = before is not None and _reset_peak_rss()
    result = run()
    if reset:
        peak, method = _status_kib("VmHWM"), "VmHWM reset"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        before = before if before is not None else 0
        method = "ru_maxrss (upper bound)"
    return result, PeakMemory((peak - before) / 1024, before / 1024, method)


def warm_up_conversion() -> None:
    """Convert a one-conv model once: the code repfuse and torch import lazily on a first
    conversion is then loaded, and not counted as a conversion's memory or time."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()).eval()
    x = torch.randn(1, 2, 4, 4)
    convert(model, x)


def _conversion_peak_child(name: str, threads: int) -> None:
    """In a fresh process: build ``name`` and its batch-1 example, then convert it while
    measuring; print one JSON line."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm_up_conversion()
    model = create_model(name)
    x = example_input(get_spec(name).input_shape, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conversion, peak = peak_rss_increase(lambda: convert(model, x, verify=None, name=name))
    print(json.dumps({"peak_mib": peak.increase_mib, "method": peak.method,
                      "model_rss_mib": peak.before_mib, "seconds": conversion.seconds}))


def conversion_peak_memory(name: str, threads: int, timeout: float = 300.0) -> dict:
    """Peak memory of ``convert(model, x, verify=None)`` for zoo model ``name`` at its batch-1
    example, measured in a fresh Python process (so memory freed earlier by other models cannot
    be reused unseen): the peak RSS during the conversion minus the RSS once the model and its
    input were built (:func:`peak_rss_increase`), after one warm-up conversion of a one-conv
    model so that lazily imported code is not counted. Also the conversion time there."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import peers; peers._conversion_peak_child({name!r}, {threads})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring process failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- timm (optional) ----------------------------------------------------------------------------

# timm models with reparameterizable blocks, tried when timm is installed.
TIMM_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_model(name: str) -> nn.Module:
    """A timm model, random init (``pretrained=False``), random BN statistics, eval mode."""
    import timm

    from repfuse.models import randomize_bn_stats

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
    return randomize_bn_stats(model).eval()


def timm_reparameterize(model: nn.Module) -> nn.Module:
    """timm's own peer: ``timm.utils.reparameterize_model`` on a copy."""
    from timm.utils import reparameterize_model

    return reparameterize_model(copy.deepcopy(model).eval())
