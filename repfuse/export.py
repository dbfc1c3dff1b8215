"""Exporting a fused model: ONNX, torch.export, TorchScript, Python source, deploy-form weights.

Every exporter builds its artifact in a scratch folder, loads it back the way a deployment would,
checks it against the float64 reference with :func:`repfuse.verify.verify`, and only then copies
it into place with :func:`repfuse.io.atomic_write` (temporary file, then rename). A failed check
writes nothing unless ``force=True``; an error leaves nothing half-written.

==============  ==========================================================================
output          loaded back with, for the check
==============  ==========================================================================
``.onnx``       onnxruntime, graph optimizations disabled (``ORT_DISABLE_ALL``), so the
                check sees the exported graph itself, not what onnxruntime makes of it
``.pt2``        ``torch.export.load`` (a ``torch.export`` program)
``.ts``         ``torch.jit.load`` (``torch.jit.script``, or ``torch.jit.trace`` when the
                graph cannot be scripted)
code folder     importing the emitted ``model.py`` (plain PyTorch) and its ``weights.pt``
deploy ``.pt``  a fresh instance of the user's deploy-form class, ``load_state_dict`` of the
                written state dict with ``strict=True``
==============  ==========================================================================

The reference is the original (unfused) model; its float64 run is the truth every artifact is
held to, in the artifact's own dtype with that dtype's tolerance
(:data:`repfuse.verify.compare.DEFAULT_TOLERANCES`). Without a reference the fused model itself
is used, which checks the export but not the fusion.

ONNX goes through the TorchScript-based ``torch.onnx.export(..., dynamo=False)``: it needs no
``onnxscript`` and exports fx GraphModules reliably. The result is simplified with onnxsim.
:class:`ExportResult` then holds ONNX node counts by op type of the train-form export, the same
after onnxsim, and ours after onnxsim: exporting in eval mode folds a BatchNorm into the conv
before it, but a BatchNorm on an identity branch and the adds of parallel branches stay, and
only reparameterization removes them.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import importlib.util
import inspect
import io
import keyword
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from repfuse.capture import ExampleInputs, as_input_tuple
from repfuse.errors import LoadError, RepfuseError
from repfuse.graph import with_fx_codegen
from repfuse.io import atomic_write, build_arch, import_factory
from repfuse.passes import DEFAULT_PIPELINE
from repfuse.verify import EquivalenceReport, eval_mode, verify

DEFAULT_OPSET = 17

# The passes for a model headed for onnxruntime: the default pipeline without horizontal fusion.
# A sibling merge leaves conv -> Split -> activations; onnxruntime materializes the Split, can no
# longer fuse each conv with its activation, and reorders around it to and from its blocked
# layout. Measured (benchmarks/RESULTS.md, issue 8): GoogLeNet's ONNX 8-15% slower than without
# the merges, ResNet-50's 8-12% (one merge), slower than the train form's own ONNX. In eager
# PyTorch the split outputs are views and the merge pays (GoogLeNet 1.06x at batch 1).
ONNX_PIPELINE: tuple[str, ...] = tuple(p for p in DEFAULT_PIPELINE if p != "merge_siblings")
CODE_FILE, WEIGHTS_FILE = "model.py", "weights.pt"

# ONNX tensor element types onnxruntime reports, as torch dtypes.
_ORT_DTYPES = {
    "tensor(float)": torch.float32, "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32, "tensor(int16)": torch.int16, "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
}


class ExportError(RepfuseError):
    """A fused model could not be exported in the asked format."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@dataclass
class ExportResult:
    """An exported artifact, the check of it loaded back, and whether it was written.

    Attributes:
        format: ``"onnx"``, ``"pt2"``, ``"torchscript"``, ``"code"`` or ``"deploy_state_dict"``.
        path: The file written (the folder, for ``"code"``).
        check: The artifact as loaded back, against the float64 reference.
        written: Whether it was written: the check passed, or ``force`` was given.
        details: Format-specific facts (opset, exporter, dynamic batch, files, ...).
        onnx_nodes: ONNX node counts by op type, for ``"onnx"``: ``"train"`` (the reference
            exported the same way), ``"train_onnxsim"`` (that after onnxsim) and ``"repfuse"``
            (the fused model after onnxsim, which is what was written).
    """

    format: str
    path: Path
    check: EquivalenceReport
    written: bool
    details: dict[str, Any] = field(default_factory=dict)
    onnx_nodes: dict[str, dict[str, int]] | None = None

    @property
    def passed(self) -> bool:
        return self.check.passed

    def to_dict(self) -> dict:
        """One entry of the ``export`` list of a JSON report."""
        out = {"format": self.format, "path": str(self.path), "passed": self.passed,
               "written": self.written, **self.details}
        if self.onnx_nodes is not None:
            out["onnx_nodes"] = self.onnx_nodes
        out["check"] = self.check.to_dict()
        return out

    def summary_lines(self) -> list[str]:
        """The verdict with the worst error, and for ONNX the node counts."""
        run = self.check.runs[-1]
        worst = run.worst
        status = "ok" if self.passed else "FAIL"
        how = self.details.get("run_by", self.format)
        lines = [
            f"{self.format} {self.path}: {status}  max rel {worst.max_rel:.3e}  max abs "
            f"{worst.max_abs:.3e} in {run.dtype} vs the float64 reference ({how}; "
            f"rtol {run.tolerance.rtol:g}, atol {run.tolerance.atol:g})"
        ]
        if self.onnx_nodes:
            lines.append("onnx nodes: " + describe_node_counts(self.onnx_nodes))
        return lines


def describe_node_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``train 35, train+onnxsim 35, repfuse 17 (Conv 14->7, Add 9->0)``: totals, then the op
    types whose count differs between the last two."""
    labels = {"train": "train", "train_onnxsim": "train+onnxsim", "repfuse": "repfuse"}
    totals = ", ".join(f"{labels.get(k, k)} {sum(v.values())}" for k, v in counts.items())
    if "train_onnxsim" not in counts or "repfuse" not in counts:
        return totals
    before, after = counts["train_onnxsim"], counts["repfuse"]
    changed = [f"{op} {before.get(op, 0)}->{after.get(op, 0)}"
               for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]
    return f"{totals} ({', '.join(changed)})" if changed else totals


# --- inputs ------------------------------------------------------------------------------------


def _example_inputs(gm: nn.Module, example_inputs: ExampleInputs | None) -> tuple[Tensor, ...]:
    """``example_inputs``, or seeded N(0, 1) tensors of the shapes recorded at capture."""
    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    metas = []
    if isinstance(gm, GraphModule):
        metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"]
    if not metas or any(m is None or not m.dtype.is_floating_point for m in metas):
        raise ExportError("pass example_inputs: the model has no recorded floating input shapes")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m.dtype)
                 for m in metas)


def _doubled_batch(example: tuple[Tensor, ...], seed: int = 0) -> tuple[Tensor, ...]:
    """Each input followed by as many seeded N(0, 1) samples: batch ``2N``.

    A dynamic batch axis is checked, and traced by torch.export, at a batch size other than the
    example's: torch.export specializes a batch of 1 to the constant 1.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for t in example:
        if t.ndim == 0 or not t.is_floating_point():
            raise ExportError("a dynamic batch needs floating inputs with a batch axis")
        extra = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)
        out.append(torch.cat([t, extra]))
    return tuple(out)


@dataclass(frozen=True)
class CheckOptions:
    """How exports are checked: the options of :func:`repfuse.verify.verify`. ``inputs``
    (the user's batches) replace the example and the random batches when given."""

    batches: int = 3
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    reference_name: str = "reference"
    distribution: str = "normal"
    inputs: Any = None


def _checked_export(
    fmt: str,
    destinations: Mapping[str, Path],
    build: Callable[[Path], nn.Module],
    *,
    reference: nn.Module,
    check_inputs: tuple[Tensor, ...],
    options: CheckOptions,
    force: bool,
    path: Path,
    details: dict[str, Any],
    onnx_nodes: dict[str, dict[str, int]] | None = None,
) -> ExportResult:
    """Build the files named by ``destinations`` in a scratch folder (``build`` writes them and
    returns the artifact loaded back), check it, and copy each file into place atomically."""
    with tempfile.TemporaryDirectory(prefix="repfuse-export-") as scratch_name:
        scratch = Path(scratch_name)
        candidate = build(scratch)
        with warnings.catch_warnings():
            # converting a loaded TorchScript module to float64 reads each parameter's .grad
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
            check = verify(reference, candidate, check_inputs, batches=options.batches,
                           seed=options.seed, rtol=options.rtol, atol=options.atol,
                           reference_name=options.reference_name,
                           candidate_name=f"{path.name} ({fmt})",
                           distribution=options.distribution, inputs=options.inputs,
                           # an artifact has no rewrite record to localize a divergence with
                           localize_divergence=False)
        written = check.passed or force
        if written:
            for name, destination in destinations.items():
                source = scratch / name
                atomic_write(destination, lambda tmp, src=source: shutil.copyfile(src, tmp))
    return ExportResult(fmt, path, check, written, details, onnx_nodes)


# --- ONNX --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _native_output_silenced(fd: int = 1) -> Iterator[None]:
    """Point file descriptor ``fd`` (1: stdout, 2: stderr) at /dev/null for the duration.

    Native code writes there directly: when an export fails, torch's ONNX exporter logs its
    whole IR graph from C++ to stdout (its log switch is left on by ``setup_onnx_logging``,
    which tests the function object ``_jit_is_onnx_log_enabled`` instead of calling it), and
    onnxsim warns on stderr about each op it could not constant-fold. Errors are raised as
    exceptions and say enough; stdout carries ``--json`` output.
    """
    try:
        (sys.stdout if fd == 1 else sys.stderr).flush()
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):  # no usable descriptor: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _io_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def onnx_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
):
    """``model`` (in eval mode) as an ``onnx.ModelProto``, by the TorchScript-based exporter.

    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several), outputs likewise
    ``output``; with ``dynamic_batch`` axis 0 of each is the symbolic ``batch``.
    """
    import onnx

    inputs = as_input_tuple(example_inputs)
    with torch.no_grad():
        outputs = [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
    input_names, output_names = _io_names("input", len(inputs)), _io_names("output", len(outputs))
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught, _native_output_silenced():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, which
            # needs onnxscript; it still exports fx GraphModules reliably.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, inputs, buffer, dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export (opset {opset}) failed: {_first_line(exc)}") from exc
    _refuse_value_branches(caught, "torch.onnx.export")
    return onnx.load_from_string(buffer.getvalue())


def _refuse_value_branches(caught: list[warnings.WarningMessage], exporter: str) -> None:
    """Tracing runs Python control flow once: a branch on a tensor (an early exit) is recorded
    as the branch the example input took, and the artifact would silently compute that branch
    for every input. Refuse instead, unless the branch is one of torch's own argument checks
    (``F.affine_grid`` compares sizes). Re-emit the other warnings."""
    torch_dir = os.path.dirname(torch.__file__)
    for warning in caught:
        if (
            issubclass(warning.category, torch.jit.TracerWarning)
            and "Python boolean" in str(warning.message)
            and not os.path.abspath(warning.filename).startswith(torch_dir)
        ):
            where = f"{os.path.basename(warning.filename)}:{warning.lineno}"
            raise ExportError(f"{exporter} traced a Python branch on a tensor ({where}) and "
                              "would keep only the branch the example input took; the model's "
                              "control flow cannot be exported this way")
    for warning in caught:
        if not issubclass(warning.category, (torch.jit.TracerWarning, DeprecationWarning)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)


def simplify_onnx(model) -> tuple[Any, str | None]:
    """``model`` simplified by onnxsim, and ``None``; or ``model`` itself and why not."""
    from onnxsim import simplify

    try:
        with _native_output_silenced(1), _native_output_silenced(2):
            simplified, ok = simplify(model)
    except Exception as exc:
        return model, f"onnxsim failed: {_first_line(exc)}"
    if not ok:
        return model, "onnxsim's own check failed; the unsimplified model was kept"
    return simplified, None


def onnx_node_counts(model) -> dict[str, int]:
    """Nodes of the ONNX graph by op type (``{"Conv": 7, "Relu": 7, ...}``), sorted by name."""
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


class OnnxModel(nn.Module):
    """An ONNX model run by onnxruntime, callable like a module: tensors in, tensors out.

    Graph optimizations are disabled, so what runs is the exported graph itself. Inputs are
    cast to the element types the model declares; outputs come back as CPU tensors (one
    tensor, or a tuple for several outputs). Converting the module to another dtype changes
    nothing: the model computes in its own types. Its deployment dtype (what
    :func:`repfuse.verify.verify` reads from the first floating buffer) is that of its first
    floating input. Deep copies share the session.
    """

    def __init__(self, session, name: str = "onnx model") -> None:
        super().__init__()
        self.session = session
        self.name = name
        self.input_dtypes = [self._dtype(meta) for meta in session.get_inputs()]
        floating = [d for d in self.input_dtypes if d.is_floating_point]
        dtype = floating[0] if floating else torch.float32
        self.register_buffer("deploy_dtype_marker", torch.empty(0, dtype=dtype), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> OnnxModel:
        """Load ``path`` into an onnxruntime session with graph optimizations disabled."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LoadError(f"cannot load '{path}' as an ONNX model: {_first_line(exc)}") from exc
        return cls(session, Path(path).name)

    def _dtype(self, meta) -> torch.dtype:
        if meta.type not in _ORT_DTYPES:
            raise LoadError(f"{self.name}: input '{meta.name}' has type {meta.type}, which "
                            "repfuse cannot feed")
        return _ORT_DTYPES[meta.type]

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The first input's shape, a symbolic first (batch) axis read as 1; ``None`` when
        another axis is symbolic."""
        shape = self.session.get_inputs()[0].shape
        dims = [1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
        return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        metas = self.session.get_inputs()
        if len(inputs) != len(metas):
            raise RepfuseError(f"{self.name} takes {len(metas)} inputs, got {len(inputs)}")
        feeds = {meta.name: t.detach().to("cpu", dtype).contiguous().numpy()
                 for meta, t, dtype in zip(metas, inputs, self.input_dtypes, strict=True)}
        outputs = tuple(torch.from_numpy(array) for array in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs

    def __deepcopy__(self, memo: dict) -> OnnxModel:
        clone = type(self)(self.session, self.name)
        clone.train(self.training)
        return clone


def export_onnx(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.onnx",
    *,
    reference: nn.Module | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplify: bool = True,
    count_train_nodes: bool = True,
    options: CheckOptions = CheckOptions(),
    force: bool = False,
) -> ExportResult:
    """Export ``fused`` to ONNX, simplify it with onnxsim, check it in onnxruntime, write it.

    The check runs the written graph in onnxruntime with graph optimizations disabled against
    ``reference`` (the original model; default ``fused``) in float64, at the tolerance of the
    model's dtype, on the example input and seeded batches (``options``); with
    ``dynamic_batch`` at twice the example's batch size. When ``count_train_nodes``, the
    reference is exported the same way too, for :attr:`ExportResult.onnx_nodes`.
    """
    path = Path(path)
    example = _example_inputs(fused, example_inputs)
    reference = fused if reference is None else reference
    ours, note = onnx_model(fused, example, opset=opset, dynamic_batch=dynamic_batch), None
    if simplify:
        ours, note = simplify_onnx(ours)
    details: dict[str, Any] = {
        "opset": opset, "dynamic_batch": dynamic_batch, "simplified": simplify and note is None,
        "exporter": "torch.onnx.export(dynamo=False)",
        "run_by": "onnxruntime, graph optimizations disabled",
    }
    if note:
        details["note"] = note
    nodes: dict[str, dict[str, int]] = {}
    if count_train_nodes and reference is not fused:
        try:
            with warnings.catch_warnings():  # the train form is exported only to be counted
                warnings.simplefilter("ignore")
                train = onnx_model(reference, example, opset=opset, dynamic_batch=dynamic_batch)
            nodes["train"] = onnx_node_counts(train)
            nodes["train_onnxsim"] = onnx_node_counts(simplify_onnx(train)[0])
        except ExportError as exc:
            details["train_export_error"] = str(exc)
    nodes["repfuse"] = onnx_node_counts(ours)

    def build(scratch: Path) -> nn.Module:
        artifact = scratch / path.name
        artifact.write_bytes(ours.SerializeToString())
        return OnnxModel.from_file(artifact)

    check_inputs = _doubled_batch(example, options.seed) if dynamic_batch else example
    return _checked_export("onnx", {path.name: path}, build, reference=reference,
                           check_inputs=check_inputs, options=options, force=force, path=path,
                           details=details, onnx_nodes=nodes)


# --- torch.export and TorchScript --------------------------------------------------------------


def export_pt2(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.pt2",
    *,
    reference: nn.Module | None = None,
    dynamic_batch: bool = False,
    options: CheckOptions = CheckOptions(),
    force: bool = False,
) -> ExportResult:
    """Export ``fused`` with ``torch.export``, save it, check it loaded with
    ``torch.export.load``, write it. With ``dynamic_batch`` axis 0 of every input is the
    dynamic dimension ``batch``, traced and checked at twice the example's batch size."""
    from repfuse.io import load_model

    path = Path(path)
    example = _example_inputs(fused, example_inputs)
    reference = fused if reference is None else reference
    inputs, dynamic_shapes = example, None
    if dynamic_batch:
        inputs = _doubled_batch(example, options.seed)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        # it prints the graph when it fails
        with _native_output_silenced(), eval_mode(fused):
            program = torch.export.export(fused, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {_first_line(exc)}") from exc

    def build(scratch: Path) -> nn.Module:
        artifact = scratch / path.name
        torch.export.save(program, artifact)
        return load_model(str(artifact)).module  # through torch.export.load

    details = {"dynamic_batch": dynamic_batch, "exporter": "torch.export.export",
               "run_by": "torch.export.load"}
    return _checked_export("pt2", {path.name: path}, build, reference=reference,
                           check_inputs=inputs, options=options, force=force, path=path,
                           details=details)


def torchscript_module(model: nn.Module, example_inputs: ExampleInputs) -> tuple[Any, str]:
    """``model`` as TorchScript and how: ``torch.jit.script``, else ``torch.jit.trace``, which
    records the ops run on ``example_inputs``; a trace through a Python branch on tensor values
    is refused, and the export check tells whether the rest sufficed."""
    inputs = as_input_tuple(example_inputs)
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export; the format is still asked for.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            scriptable = with_fx_codegen(model) if isinstance(model, GraphModule) else model
            return torch.jit.script(scriptable), "torch.jit.script"
        except Exception as exc:
            script_error = _first_line(exc)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, inputs)
    except Exception as exc:
        raise ExportError(f"cannot make TorchScript: torch.jit.script failed ({script_error}) and "
                          f"so did torch.jit.trace ({_first_line(exc)})") from exc
    _refuse_value_branches(caught, f"torch.jit.trace (torch.jit.script failed: {script_error})")
    return traced, "torch.jit.trace"


def export_torchscript(
    fused: nn.Module,
    example_inputs: ExampleInputs | None = None,
    path: str | Path = "model.ts",
    *,
    reference: nn.Module | None = None,
    dynamic_batch: bool = False,
    options: CheckOptions = CheckOptions(),
    force: bool = False,
) -> ExportResult:
    """Script (or trace) ``fused``, save it, check it loaded with ``torch.jit.load``, write it.
    With ``dynamic_batch`` the check runs at twice the example's batch size."""
    path = Path(path)
    example = _example_inputs(fused, example_inputs)
    reference = fused if reference is None else reference
    with eval_mode(fused):
        script, how = torchscript_module(fused, example)

    def build(scratch: Path) -> nn.Module:
        artifact = scratch / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(script, str(artifact))
            return torch.jit.load(str(artifact), map_location="cpu")

    check_inputs = _doubled_batch(example, options.seed) if dynamic_batch else example
    details = {"dynamic_batch": dynamic_batch, "exporter": how, "run_by": "torch.jit.load"}
    return _checked_export("torchscript", {path.name: path}, build, reference=reference,
                           check_inputs=check_inputs, options=options, force=force, path=path,
                           details=details)


# Exporters by output extension; ``.pt`` (the GraphModule itself) is repfuse.io.save_model.
EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    ".onnx": export_onnx, ".pt2": export_pt2, ".ts": export_torchscript,
}
OUTPUT_TYPES = (".pt", *EXPORTERS)


def check_output_path(path: str | Path) -> Path:
    """``path`` if its extension names an output type repfuse writes, else an error."""
    path = Path(path)
    if path.suffix not in OUTPUT_TYPES:
        raise ExportError(f"unsupported output type '{path.suffix}' for '{path}' (use "
                          f"{', '.join(OUTPUT_TYPES[:-1])} or {OUTPUT_TYPES[-1]})")
    return path


# --- Python source -----------------------------------------------------------------------------


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _FlatNames:
    """Attribute names for module paths: ``layer1.0.conv1`` -> ``layer1_0_conv1``, unique,
    never a keyword or an ``nn.Module`` attribute."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}
        self.taken: set[str] = set()

    def __call__(self, path: str) -> str:
        if path in self.by_path:
            return self.by_path[path]
        base = re.sub(r"\W", "_", path) or "attr"
        if base[0].isdigit():
            base = f"m_{base}"
        if keyword.iskeyword(base) or hasattr(nn.Module, base) or base == "training":
            base = f"{base}_"
        name, index = base, 1
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        self.by_path[path] = name
        return name


def _literal(value: Any, what: str) -> str:
    """``repr(value)`` when it reads back as ``value``, else an error naming ``what``."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise ExportError(f"cannot write {what} = {text} as Python source")
    return text


def _constructor(path: str, module: nn.Module) -> str:
    """``nn.Conv2d(in_channels=3, ...)``: the call that rebuilds ``module``'s configuration.

    Arguments are read from the attributes of the same name (``bias`` from whether there is
    one); those equal to the default are left out. :func:`_check_configuration` later compares
    the rebuilt module's attributes with the original's.
    """
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls or list(module.children()):
        raise ExportError(
            f"cannot write code for module '{path}' ({cls.__module__}.{cls.__qualname__}): "
            "only torch.nn layers without submodules are written as source"
        )
    args = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (
            parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD
        ):
            continue
        if not hasattr(module, name):
            if parameter.default is parameter.empty:
                raise ExportError(f"cannot write code for module '{path}' ({cls.__name__}): "
                                  f"its constructor argument '{name}' is not an attribute")
            continue
        value = getattr(module, name)
        if isinstance(parameter.default, bool) and (value is None or isinstance(value, Tensor)):
            value = value is not None  # bias=True/False: the tensor itself is in the weights
        if _is_default(value, parameter.default):
            continue
        args.append(f"{name}={_literal(value, f'{path}.{name}')}")
    return f"nn.{cls.__name__}({', '.join(args)})"


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is what ``default`` becomes in the module: itself, or a tuple of it
    (``dilation=1`` is stored as ``(1, 1)``)."""
    if default is inspect.Parameter.empty:
        return False
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(type(v) is type(default) and v == default for v in value)
    return type(value) is type(default) and value == default


def _assignment(target: str, call: str, indent: str = " " * 8) -> list[str]:
    """``self.x = nn.Conv2d(...)`` on one line, or wrapped within 100 columns."""
    line = f"{indent}{target} = {call}"
    if len(line) <= 100:
        return [line]
    head, _, args = call.partition("(")
    lines, current = [f"{indent}{target} = {head}("], indent + " " * 4
    for arg in _split_args(args[:-1]):
        piece = f"{arg}, "
        if len(current) + len(piece) > 100 and current.strip():
            lines.append(current.rstrip())
            current = indent + " " * 4
        current += piece
    lines.append(current.rstrip().rstrip(","))
    lines.append(f"{indent})")
    return lines


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated pieces of ``text`` (commas inside brackets do not split)."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:index].strip())
            start = index + 1
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _import_lines(global_objects: Mapping[str, Any], source: str) -> list[str]:
    """Imports for the names the generated forward uses; nothing from repfuse."""
    from torch.fx.graph import _custom_builtins

    lines = []
    for name, obj in sorted(global_objects.items()):
        if name == "torch" or not re.search(rf"\b{re.escape(name)}\b", source):
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
            continue
        if getattr(builtins, name, None) is obj:
            continue
        module = getattr(obj, "__module__", None) or ""
        qualname = getattr(obj, "__qualname__", "")
        module = "operator" if module == "_operator" else module
        importable = (
            module and qualname.isidentifier() and not module.startswith("repfuse")
            and getattr(importlib.import_module(module), qualname, None) is obj
        )
        if not importable:
            raise ExportError(f"the fused graph calls {module}.{qualname}, which generated code "
                              "cannot import")
        alias = "" if qualname == name else f" as {name}"
        lines.append(f"from {module} import {qualname}{alias}")
    return lines


@dataclass
class PythonSource:
    """A fused GraphModule as Python source plus the state dict its class loads."""

    source: str
    state_dict: dict[str, Tensor]
    modules: dict[str, tuple[str, nn.Module]]  # attribute -> (original path, module)


def python_source(
    gm: GraphModule,
    class_name: str = "FusedModel",
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    description: str = "a fused model",
) -> PythonSource:
    """``gm`` as the source of a plain ``nn.Module`` class that needs only torch.

    Every module and tensor the graph uses becomes an attribute with a flat name
    (``layer1.0.conv1`` -> ``layer1_0_conv1``); ``forward`` is fx's code for the graph; a
    ``load()`` function builds the class and loads ``weights.pt`` from beside the file with
    ``torch.load(weights_only=True)`` and ``load_state_dict(assign=True)``, which keeps the
    weights' dtype.
    """
    if not isinstance(gm, GraphModule):
        raise ExportError(f"cannot write code for a {type(gm).__name__}: only a model captured as "
                          "one graph can be written as source (this one keeps eager Python parts)")
    if not class_name.isidentifier() or keyword.iskeyword(class_name):
        raise ExportError(f"class name '{class_name}' is not a Python identifier")
    flat = _FlatNames()
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    modules: dict[str, tuple[str, nn.Module]] = {}
    tensors: dict[str, tuple[str, Tensor]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            name = flat(node.target)
            modules[name] = (node.target, gm.get_submodule(node.target))
            node.target = name
        elif node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if not isinstance(value, Tensor):
                raise ExportError(f"cannot write attribute '{node.target}' "
                                  f"({type(value).__name__}) as Python source")
            name = flat(node.target)
            tensors[name] = (node.target, value)
            node.target = name
    code = graph.python_code(root_module="self")
    # fx frees each value after its last use (`;  x = None`); a reader does not need that.
    forward = re.sub(r";  (?:\w+ = )+None$", "", code.src.strip("\n"), flags=re.MULTILINE)
    forward = "\n".join(f"    {line}".rstrip() for line in forward.rstrip().splitlines())

    init = []
    state: dict[str, Tensor] = {}
    for name, (path, module) in modules.items():
        init += _assignment(f"self.{name}", _constructor(path, module))
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for name, (_, tensor) in tensors.items():
        empty = f"torch.empty({tuple(tensor.shape)}, dtype={tensor.dtype})"
        if isinstance(tensor, nn.Parameter):
            frozen = "" if tensor.requires_grad else ", requires_grad=False"
            init += _assignment(f"self.{name}", f"nn.Parameter({empty}{frozen})")
        else:
            init.append(f"        self.register_buffer({name!r}, {empty})")
        state[name] = tensor
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    shapes = input_shapes or []
    example = ", ".join(f"torch.randn({', '.join(map(str, s))})" for s in shapes) or "x"
    imports = ["import torch", "from torch import nn", *_import_lines(code.globals, forward)]
    source = _CODE_TEMPLATE.format(
        description=description, version=_version(), class_name=class_name, example=example,
        weights=WEIGHTS_FILE, imports="\n".join(dict.fromkeys(imports)),
        init="\n".join(init) or "        pass", forward=forward,
    )
    return PythonSource(source, state, modules)


def _version() -> str:
    from repfuse import __version__

    return __version__


_CODE_TEMPLATE = '''"""{class_name}: {description}, written by repfuse {version}.

Plain PyTorch: this file needs torch, not repfuse. The weights are in {weights} beside it.

    from model import load
    model = load()  # eval mode
    y = model({example})
"""

from pathlib import Path

{imports}

WEIGHTS = Path(__file__).with_name("{weights}")


class {class_name}(nn.Module):
    def __init__(self) -> None:
        super().__init__()
{init}

{forward}


def load(weights: str | Path = WEIGHTS, map_location: str = "cpu") -> {class_name}:
    """{class_name} with the weights in ``weights``, in eval mode."""
    model = {class_name}()
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.eval()
'''


def _import_file(path: Path) -> Any:
    """Import the Python file ``path`` as a fresh module (not left in ``sys.modules``)."""
    name = f"repfuse_emitted_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up while executing
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _configuration(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, Tensor)}


def _check_configuration(emitted: nn.Module, modules: Mapping[str, tuple[str, nn.Module]]):
    """Each rebuilt layer has the type and public attributes of the layer it stands for."""
    for name, (path, original) in modules.items():
        rebuilt = getattr(emitted, name)
        if type(rebuilt) is not type(original):
            raise ExportError(f"emitted layer '{name}' is a {type(rebuilt).__name__}, but "
                              f"'{path}' is a {type(original).__name__}")
        expected, actual = _configuration(original), _configuration(rebuilt)
        for key in sorted(set(expected) | set(actual)):
            if expected.get(key) != actual.get(key):
                raise ExportError(
                    f"cannot write code for module '{path}' ({type(original).__name__}): its "
                    f"constructor does not reproduce {key}={expected.get(key)!r}"
                )


def emit_code(
    gm: GraphModule,
    directory: str | Path,
    example_inputs: ExampleInputs | None = None,
    *,
    reference: nn.Module | None = None,
    class_name: str = "FusedModel",
    description: str = "a fused model",
    options: CheckOptions = CheckOptions(),
    force: bool = False,
) -> ExportResult:
    """Write ``gm`` as readable Python source ``model.py`` plus ``weights.pt`` into
    ``directory``: a plain ``nn.Module`` class that loads and runs with only torch installed.

    Before writing, the emitted file is imported, its ``load()`` called, each rebuilt layer's
    configuration compared with the original's, and the result checked against ``reference``
    (default ``gm``) like every export. Existing ``model.py``/``weights.pt`` are replaced;
    other files in ``directory`` are left alone.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"'{directory}' is a file; --emit-code needs a folder")
    example = _example_inputs(gm, example_inputs)
    reference = gm if reference is None else reference
    emitted = python_source(gm, class_name, input_shapes=[tuple(t.shape) for t in example],
                            description=description)

    def build(scratch: Path) -> nn.Module:
        torch.save(emitted.state_dict, scratch / WEIGHTS_FILE)
        (scratch / CODE_FILE).write_text(emitted.source, encoding="utf-8")
        try:
            model = _import_file(scratch / CODE_FILE).load()
        except Exception as exc:
            raise ExportError(f"the emitted code does not load: {_first_line(exc)} "
                              "(a bug in repfuse's code writer)") from exc
        _check_configuration(model, emitted.modules)
        return model

    # weights first: a model.py never refers to weights that are not there yet
    destinations = {WEIGHTS_FILE: directory / WEIGHTS_FILE, CODE_FILE: directory / CODE_FILE}
    details = {"files": [CODE_FILE, WEIGHTS_FILE], "class": class_name,
               "run_by": f"importing {CODE_FILE}"}
    return _checked_export("code", destinations, build, reference=reference,
                           check_inputs=example, options=options, force=force, path=directory,
                           details=details)


# --- deploy-form weights -----------------------------------------------------------------------


def check_deploy_arch(spec: str) -> None:
    """Raise unless ``spec`` names a zoo model with a deploy form or an importable factory."""
    if ":" in spec:
        import_factory(spec, option="--deploy-arch")
        return
    from repfuse.models import list_models

    zoo = {s.name: s for s in list_models()}
    if spec not in zoo:
        raise ExportError(f"--deploy-arch must be package.module:factory or a zoo model "
                          f"name, got '{spec}'")
    if not zoo[spec].supports_deploy:
        raise ExportError(f"zoo model '{spec}' has no hand-written deploy form")


def build_deploy_model(spec: str) -> nn.Module:
    """The deploy-form model ``spec`` names: a zoo model with a hand-written deploy form
    (``repvgg_a0``), or ``package.module:factory`` called with no arguments."""
    check_deploy_arch(spec)
    if ":" not in spec:
        from repfuse.models import create_model

        return create_model(spec, deploy=True, randomize_bn=False)
    return build_arch(spec, option="--deploy-arch")


def export_deploy_state_dict(
    fused: nn.Module,
    example_inputs: ExampleInputs | None,
    path: str | Path,
    deploy_arch: str | Callable[[], nn.Module],
    *,
    reference: nn.Module | None = None,
    options: CheckOptions = CheckOptions(),
    force: bool = False,
) -> ExportResult:
    """Load ``fused``'s weights into the user's deploy-form model by structure
    (:func:`repfuse.models.load_by_structure`: conv/linear layers paired in execution order,
    shapes and hyperparameters checked), and write that model's state dict.

    ``deploy_arch`` is a spec for :func:`build_deploy_model` or a factory. The check loads the
    written state dict with ``torch.load(weights_only=True)`` into a fresh deploy model
    (``strict=True``) and compares it with ``reference`` (default ``fused``).
    """
    from repfuse.models import load_by_structure

    path = Path(path)
    example = _example_inputs(fused, example_inputs)
    reference = fused if reference is None else reference
    name = deploy_arch if isinstance(deploy_arch, str) else getattr(
        deploy_arch, "__qualname__", repr(deploy_arch))

    def new_deploy_model() -> nn.Module:
        if isinstance(deploy_arch, str):
            return build_deploy_model(deploy_arch).eval()
        model = deploy_arch()
        if not isinstance(model, nn.Module):
            raise ExportError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval()

    deploy = new_deploy_model()
    try:
        load_by_structure(deploy, fused, example)
    except Exception as exc:
        raise ExportError(f"the fused weights do not fit --deploy-arch {name}: "
                          f"{_first_line(exc)}") from exc
    state = {k: v.detach().cpu() for k, v in deploy.state_dict().items()}

    def build(scratch: Path) -> nn.Module:
        torch.save(state, scratch / path.name)
        fresh = new_deploy_model()
        fresh.load_state_dict(torch.load(scratch / path.name, weights_only=True), strict=True)
        return fresh

    details = {"deploy_arch": name, "deploy_class": type(deploy).__name__,
               "run_by": f"{type(deploy).__name__}.load_state_dict(strict=True)"}
    return _checked_export("deploy_state_dict", {path.name: path}, build, reference=reference,
                           check_inputs=example, options=options, force=force, path=path,
                           details=details)
