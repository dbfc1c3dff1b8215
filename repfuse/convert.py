"""The whole job in one call: check the destinations, capture, fuse, verify, export, report.

:func:`convert` is repfuse's one entry point; ``repfuse convert``, ``inspect`` and ``bench`` only
parse options into it and print what it returns, a :class:`Conversion`. :func:`fuse` is its
fusion step alone. In order:

1. every destination is checked (``outputs``: model files, reports, a code folder, deploy
   weights) before any work, so a bad one never leaves others half done;
2. the model is checked: finite weights, no negative BatchNorm variance, no submodule named
   like a GraphModule attribute, memory for the inputs;
3. capture and fusion (:func:`fuse`), on an eval-mode copy;
4. verification against the model itself (:class:`~repfuse.verify.VerifyOptions`); for a
   conversion with approximate rewrites (``prune_below``) the same comparison is the
   *measurement* of its error, and its verdict is APPROXIMATE (:class:`Approximation`);
5. each output is written, if verification passed (or ``force``): ``.pt`` (the GraphModule,
   loaded back before it is renamed into place), ``.onnx``/``.pt2``/``.ts``, a code folder
   (:class:`EmitCode`), deploy-form weights (:class:`DeployForm`), each export checked by the
   same verification path first (:mod:`repfuse.export`);
6. reports (``.json``/``.md``/``.html``), rendered from the same object, with the
   quantization readiness report when asked (:class:`QuantOptions`).

The user's model is never modified: every run is on an eval-mode copy, and a model in training
mode is converted (and checked) in eval mode, which a note says.
"""

from __future__ import annotations

import platform
import shlex
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from repfuse._version import __version__
from repfuse.capture import (
    CaptureInfo,
    ExampleInputs,
    RepfuseWarning,
    as_input_tuple,
    capture,
    check_runs,
    fuse_parts,
    parts_of,
)
from repfuse.cost import GraphCost, graph_cost
from repfuse.errors import ExportError, RepfuseError
from repfuse.export import (
    DEFAULT_OPSET,
    EXPORTERS,
    ONNX_PIPELINE,
    OUTPUT_TYPES,
    ExportResult,
    emit_code,
    export_deploy_state_dict,
)
from repfuse.io import (
    OnnxModel,
    check_arch_spec,
    check_destination,
    check_folder_destination,
    save_model,
)
from repfuse.io import sha256_of as file_sha256
from repfuse.memory import check_memory
from repfuse.passes import DEFAULT_PIPELINE, Pass, PassResult, Rewrite, resolve, run_pipeline
from repfuse.passes.nonlinear import NotMergeable, not_mergeable, summarize
from repfuse.passes.prune import PruneBelow
from repfuse.quant import QuantReport, Thresholds, quant_report
from repfuse.verify import (
    DEFAULT_VERIFY,
    EquivalenceReport,
    InputSet,
    ProgressCallback,
    VerifyOptions,
    check_finite_model,
)
from repfuse.verify.compare import json_float
from repfuse.verify.inputs import draw
from repfuse.verify.render import REPORT_SUFFIXES, write_report

# --- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmitCode:
    """An output of :func:`convert`: the fused model as Python source (``model.py``, a plain
    ``nn.Module`` class) and its weights (``weights.pt``) in the folder ``path``."""

    path: str | Path
    class_name: str = "FusedModel"


@dataclass(frozen=True)
class DeployForm:
    """An output of :func:`convert`: the fused weights loaded by structure into the deploy-form
    model ``arch`` (``package.module:factory``, a zoo name such as ``repvgg_a0``, or a
    factory), whose state dict is written to ``path`` (``.pt``)."""

    path: str | Path
    arch: str | Callable[[], nn.Module]


Output = str | Path | EmitCode | DeployForm


@dataclass(frozen=True)
class ExportOptions:
    """How model files are exported: the ONNX ``opset`` (default 17) and the input axes that
    vary (``dynamic_axes``, of every input that has them; 0 is the batch; negative counts from
    the end). A specialized model refuses a dynamic axis its Python read."""

    opset: int | None = None
    dynamic_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.opset is not None and self.opset < 7:
            raise ExportError(f"ONNX opset must be at least 7, got {self.opset}")


DEFAULT_EXPORT = ExportOptions()


@dataclass(frozen=True)
class QuantOptions:
    """Add the quantization readiness report (:func:`repfuse.quant.quant_report`) of the fused
    model to a conversion: ``inputs`` are the calibration batches (an
    :class:`~repfuse.verify.InputSet` or a list of batches; ``None``: the weight figures only,
    no activations or simulated INT8 model), ``equalize`` includes the equalized form."""

    inputs: InputSet | Sequence[ExampleInputs] | None = None
    equalize: bool = True
    thresholds: Thresholds = field(default_factory=Thresholds)

    def run(self, fused: nn.Module, original: nn.Module, name: str) -> QuantReport:
        if not isinstance(fused, GraphModule):
            raise RepfuseError(f"the quantization readiness report reads one graph, but {name} "
                               "was fused in parts (its forward keeps eager Python): not "
                               "supported")
        if isinstance(self.inputs, InputSet):
            batches, source = self.inputs.batches, self.inputs.source
        else:
            batches = [as_input_tuple(b) for b in self.inputs or ()]
            source = f"{len(batches)} batches given" if batches else ""
        return quant_report(fused, batches or None, original=original, name=name,
                            thresholds=self.thresholds, equalize=self.equalize,
                            calibration=source)


@dataclass(frozen=True)
class _Planned:
    """An output, classified and with its destination checked."""

    kind: str  # "model" (.pt), an EXPORTERS suffix's format, "code", "deploy" or "report"
    path: Path
    spec: Any = None


def plan_outputs(outputs: Sequence[Output], export: ExportOptions = DEFAULT_EXPORT,
                 inputs: Sequence[Path] = ()) -> list[_Planned]:
    """Classify ``outputs`` and check every destination before any work: each folder exists
    and takes a file, no output is an input file (``inputs``) or named twice, and the export
    options apply to some output."""
    planned = []
    for output in outputs:
        if isinstance(output, EmitCode):
            planned.append(_Planned("code", check_folder_destination(Path(output.path)),
                                    output))
            continue
        if isinstance(output, DeployForm):
            path = Path(output.path)
            if path.suffix != ".pt":
                raise RepfuseError(f"deploy-form weights are a state dict: use a .pt output, "
                                   f"not '{path}'")
            if isinstance(output.arch, str):
                check_arch_spec(output.arch, "--deploy-arch", deploy=True)
            planned.append(_Planned("deploy", check_destination(path), output))
            continue
        path = Path(output)
        if path.suffix.lower() in REPORT_SUFFIXES:
            planned.append(_Planned("report", check_destination(path)))
        elif path.suffix in OUTPUT_TYPES:
            planned.append(_Planned("model" if path.suffix == ".pt" else path.suffix,
                                    check_destination(path)))
        else:
            kinds = ", ".join((*OUTPUT_TYPES, *REPORT_SUFFIXES))
            raise RepfuseError(f"unsupported output type '{path.suffix}' for '{path}' (use "
                               f"{kinds}, or EmitCode/DeployForm)")
    resolved = [p.path.resolve() for p in planned]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise RepfuseError(f"'{planned[index].path}' is given as two outputs")
        if any(path == Path(i).resolve() for i in inputs):
            raise RepfuseError(f"refusing to overwrite the input '{planned[index].path}'; "
                               "choose another output")
    kinds = {p.kind for p in planned}
    if export.opset is not None and ".onnx" not in kinds:
        raise RepfuseError("--opset applies to an .onnx output")
    if export.dynamic_axes and not kinds & {".onnx", ".pt2", ".ts"}:
        raise RepfuseError("--dynamic-batch applies to .onnx, .pt2 and .ts outputs (as does "
                           "--dynamic-axes)")
    return planned


# --- the result ---------------------------------------------------------------------------------


@dataclass
class Conversion:
    """A fused model with everything known about how it was made, how it compares, and what
    was written. :meth:`report_dict` is the report every renderer draws."""

    fused: nn.Module  # a GraphModule, unless only parts of the model could be traced
    passes: PassResult
    cost_before: GraphCost
    cost_after: GraphCost
    seconds: float  # tracing + passes (not verification)
    report: EquivalenceReport | None  # the fused model against the original; None: not run
    exports: list[ExportResult] = field(default_factory=list)  # checked exports, in order
    not_mergeable: list[NotMergeable] = field(default_factory=list)  # ops that stay, and why
    capture: CaptureInfo = field(default_factory=CaptureInfo)  # partial? specialized?
    name: str = "model"
    source: str = ""  # where the model came from, for the summary ("zoo model resnet18")
    input_shapes: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)  # each file: path, kind, written, ...
    provenance: dict = field(default_factory=dict)
    approximate: Approximation | None = None  # set when a rewrite is not exact (prune_below)
    quant: QuantReport | None = None  # the quantization readiness report, when asked for

    @property
    def verified(self) -> bool:
        """Verification passed or was not run; for an approximate conversion, its measured
        error is within the tolerance given, or no tolerance was given
        (:attr:`Approximation.passed`)."""
        if self.approximate is not None:
            return self.approximate.passed
        return self.report is None or self.report.passed

    @property
    def passed(self) -> bool:
        """Verification (when run; see :attr:`verified`) and every export check passed."""
        return self.verified and all(export.passed for export in self.exports)

    def to_dict(self) -> dict:
        """The ``conversion`` section of a JSON report."""
        return {
            **self.passes.to_dict(),
            "seconds": self.seconds,
            "input_shapes": self.input_shapes,
            "cost": {"before": self.cost_before.to_dict(), "after": self.cost_after.to_dict(),
                     "by_pass": self.cost_by_pass()},
            "not_mergeable": summarize(self.not_mergeable),
            **self.capture.to_dict(),  # partial, parts, skipped, specialized, dropped_hooks
        }

    def cost_by_pass(self) -> list[dict]:
        """Per pass, in pipeline order: rewrites, and the estimated MACs/params/bytes after
        the rewrites of that pass and the passes before it (the passes interleave node by
        node, so this attributes each rewrite's cost change to its pass)."""
        rows = []
        macs, params, moved = self.cost_before.macs, self.cost_before.params, self.cost_before.bytes
        counts = self.passes.counts()
        for name, change in self.passes.cost_change_by_pass().items():
            macs, params, moved = macs + change.macs, params + change.params, moved + change.bytes
            rows.append({"pass": name, "rewrites": counts.get(name, 0), "macs": macs,
                         "params": params, "bytes": moved})
        return rows

    def report_dict(self) -> dict:
        """The full JSON report: the equivalence report (when verified) plus ``kind``,
        ``model``, ``source``, ``notes``, a ``conversion`` section, an ``export`` list (one
        entry per checked export), ``outputs`` (each file written or not, with its SHA-256)
        and ``provenance``; ``approximate`` when a rewrite is not exact, ``quant`` with the
        quantization readiness report. ``passed`` is :attr:`passed`.

        ``kind`` is ``convert`` when verified, ``quant`` for a quantization report without
        verification (``repfuse quant-report``), else ``inspect``."""
        base = self.report.to_dict() if self.report is not None else {}
        kind = "convert" if self.report is not None else (
            "quant" if self.quant is not None else "inspect")
        report = {"kind": kind, **base, "model": self.name, "source": self.source or self.name,
                  "notes": list(self.notes), "conversion": self.to_dict()}
        if self.approximate is not None:
            report["approximate"] = self.approximate.to_dict()
        if "passed" in report:
            report["passed"] = self.passed
        if self.exports:
            report["export"] = [export.to_dict() for export in self.exports]
        if self.quant is not None:
            report["quant"] = self.quant.to_dict()
        report["outputs"] = list(self.outputs)
        report["provenance"] = dict(self.provenance)
        return report


@dataclass
class Approximation:
    """What makes a result approximate and what that costs: the rewrites that are not exact
    (``exact=False``: ``prune_below``) and the output error measured against the original run
    in float64 (``measured``: the verifier's comparison, float64 and the deployment dtype).

    An approximate result is never called equivalent: its verdict is APPROXIMATE. It passes
    (exit code 0, outputs written) unless a tolerance was given (``rtol``/``atol`` of
    :class:`~repfuse.verify.VerifyOptions`, ``--rtol``/``--atol``) and the measured error
    exceeds it: an approximation is what was asked for, and the tolerance is the error the
    user accepts.
    """

    rewrites: list[Rewrite]
    measured: EquivalenceReport
    tolerance_given: bool

    @property
    def passed(self) -> bool:
        return not self.tolerance_given or self.measured.passed

    @property
    def max_rel_error(self) -> float:
        """The worst output's max relative error in float64 against the float64 original."""
        return self.measured.float64.worst.max_rel

    def to_dict(self) -> dict:
        """The ``approximate`` section of a report."""
        errors = []
        for run in self.measured.runs:
            worst = run.worst
            errors.append({"dtype": run.dtype, "max_rel": json_float(worst.max_rel),
                           "max_abs": json_float(worst.max_abs),
                           "sqnr_db": json_float(worst.sqnr_db)})
        tolerance = self.measured.runs[0].tolerance
        return {
            "exact": False,
            "passes": list(dict.fromkeys(r.pass_name for r in self.rewrites)),
            "rewrites": [{"pass": r.pass_name, "node": r.node,
                          "module_paths": list(r.module_paths), "detail": r.detail}
                         for r in self.rewrites],
            "max_rel_error": errors[0]["max_rel"], "max_abs_error": errors[0]["max_abs"],
            "errors": errors, "measured_on": self.measured.inputs,
            "tolerance": ({"rtol": tolerance.rtol, "atol": tolerance.atol}
                          if self.tolerance_given else None),
            "within_tolerance": self.measured.passed if self.tolerance_given else None,
            "passed": self.passed,
        }


def verify_candidate(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: ExampleInputs | None,
    verify: VerifyOptions,
    *,
    rewrites: Sequence[Rewrite] = (),
    reference_name: str = "reference",
    candidate_name: str = "candidate",
    progress: ProgressCallback | None = None,
) -> tuple[EquivalenceReport, Approximation | None]:
    """Verify ``candidate`` against ``reference`` (``repfuse verify`` and :func:`convert`).

    When ``rewrites`` (the candidate's history) hold approximate ones, the comparison is the
    measurement of its error (:class:`Approximation`), returned beside the report; it is not
    localized unless ``verify.localize`` asks (the first approximate rewrite diverges by
    design).
    """
    inexact = [r for r in rewrites if not r.exact]
    if inexact and verify.localize is None:
        verify = verify.with_(localize=False)
    report = verify.run(reference, candidate, inputs, reference_name=reference_name,
                        candidate_name=candidate_name, progress=progress)
    if not inexact:
        return report, None
    tolerance_given = verify.rtol is not None or verify.atol is not None
    return report, Approximation(inexact, report, tolerance_given)


def verify_report(report: EquivalenceReport, approximate: Approximation | None) -> dict:
    """The report dict of ``repfuse verify``: the equivalence report, and for an approximate
    candidate its ``approximate`` section, with ``passed`` from :attr:`Approximation.passed`."""
    data = {"kind": "verify", **report.to_dict()}
    if approximate is not None:
        data["approximate"] = approximate.to_dict()
        data["passed"] = approximate.passed
    return data


def made_by(command: Sequence[str] | None = None,
               files: Mapping[str, str | Path] | None = None) -> dict:
    """What made a report: versions, the command line (None from Python), the time (UTC), and
    the SHA-256 of each input file by role (``{"model": "w.pt", "inputs": "batches.pt"}``)."""
    listed = [{"role": role, "path": str(path), "sha256": file_sha256(path)}
              for role, path in (files or {}).items() if path is not None and Path(path).exists()]
    return {
        "repfuse": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "command": None if command is None else shlex.join(command),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": listed,
    }


# --- checks before the work ---------------------------------------------------------------------

# Attribute names a GraphModule sets or defines: a submodule by such a name cannot be kept on
# the fused model (torch.fx fails with "cannot assign 'dict' as child module 'meta'").
_GRAPH_MODULE_NAMES = frozenset(
    {n for n in dir(GraphModule) if n not in dir(nn.Module)}
    | {"meta", "_graph", "_code", "_tracer_cls", "_tracer_extras"})


def check_model(model: nn.Module) -> list[str]:
    """Refuse a model that cannot be converted meaningfully, with a one-line error naming the
    culprit; return notes on what was assumed (training mode)."""
    if not isinstance(model, nn.Module):
        raise RepfuseError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OnnxModel):
        raise RepfuseError(f"'{model.name}' is an ONNX model: it runs in onnxruntime and cannot "
                           "be fused (it can be the REFERENCE of `repfuse verify`)")
    check_finite_model(model, "model")
    for name, child in model.named_children():
        if name in _GRAPH_MODULE_NAMES:
            raise RepfuseError(
                f"submodule '{name}' ({type(child).__name__}) has the name of an attribute "
                f"torch.fx.GraphModule needs ('{name}'), so the fused model cannot hold it: "
                "rename the submodule"
            )
    if any(m.training for m in model.modules()):
        return ["the model is in training mode: repfuse converts and checks its eval mode "
                "(BatchNorm running statistics, dropout off), as it will be deployed"]
    return []


def _captured(model: nn.Module, inputs: tuple[Tensor, ...]):
    try:
        return capture(model, inputs)
    except TypeError as exc:  # a GraphModule part with a child named like its attributes
        if "as child module" not in str(exc):
            raise
        name = str(exc).rsplit("'", 2)[-2] if str(exc).count("'") >= 2 else "?"
        raise RepfuseError(f"a submodule named '{name}' has the name of an attribute "
                           "torch.fx.GraphModule needs, so the fused model cannot hold it: "
                           "rename the submodule") from exc


# --- fusion, the first step ---------------------------------------------------------------------


@dataclass
class _Fused:
    module: nn.Module
    passes: PassResult
    cost_before: GraphCost
    seconds: float
    capture: CaptureInfo


def _fuse(model: nn.Module, inputs: tuple[Tensor, ...],
          passes: Sequence[str | Pass] | str | None, allow_costlier: bool) -> _Fused:
    resolve(passes, allow_costlier=allow_costlier)  # an unknown pass fails before any work
    start = time.perf_counter()
    captured = _captured(model, inputs)  # a copy of the model: the passes rewrite it in place
    traced_at = time.perf_counter()
    cost_before = _cost(captured.module)
    counted_at = time.perf_counter()
    result = fuse_parts(captured.module,
                        lambda gm: run_pipeline(gm, passes, allow_costlier=allow_costlier))
    seconds = (time.perf_counter() - counted_at) + (traced_at - start)
    check_runs(captured.module, inputs)  # a fused model always runs, or this names where not
    return _Fused(captured.module, result, cost_before, seconds, captured.info)


def fuse(
    model: nn.Module,
    example_inputs: ExampleInputs,
    passes: Sequence[str | Pass] | str | None = None,
    *,
    allow_costlier: bool = False,
) -> nn.Module:
    """Fuse a copy of ``model`` (in eval mode) with the exact passes; ``model`` is not changed.

    The fusion step of :func:`convert`, without verification or outputs. ``passes`` names the
    passes to run (default :data:`repfuse.passes.DEFAULT_PIPELINE`). ``allow_costlier`` also
    applies exact merges that the cost model says do not pay (e.g. sibling convs of different
    kernel sizes, zero-padded to one kernel). The result computes the same outputs;
    ``repfuse.history(fused)`` lists the rewrites applied and the candidates declined, with
    reasons.

    The result is a ``torch.fx.GraphModule`` when the whole model traces (if only specialized
    to the example input's shapes, ``repfuse.capture_info(fused).specialized`` says where).
    Otherwise it is a copy of ``model`` whose largest traceable submodules are fused
    GraphModules, and ``repfuse.capture_info(fused).skipped`` lists the modules kept as eager
    Python, with reasons (a :class:`RepfuseWarning` says so too).
    """
    inputs = as_input_tuple(example_inputs)
    check_model(model)
    fused = _fuse(model, inputs, passes, allow_costlier)
    if fused.capture.partial:
        skipped = "; ".join(f"{s.describe()}: {s.reason}" for s in fused.capture.skipped)
        warnings.warn(f"fused only the traceable parts of {type(model).__name__}; kept eager: "
                      f"{skipped}", RepfuseWarning, stacklevel=2)
    return fused.module


# --- the whole job ------------------------------------------------------------------------------


def convert(
    model: nn.Module,
    inputs: ExampleInputs,
    outputs: Sequence[Output] = (),
    *,
    passes: Sequence[str | Pass] | str | None = None,
    allow_costlier: bool = False,
    prune_below: float | None = None,
    prune_by: str | None = None,
    verify: VerifyOptions | None = DEFAULT_VERIFY,
    export: ExportOptions = DEFAULT_EXPORT,
    quant: QuantOptions | None = None,
    force: bool = False,
    name: str = "model",
    source: str | None = None,
    provenance: dict | None = None,
    input_files: Sequence[str | Path] = (),
    notes: Sequence[str] = (),
    progress: ProgressCallback | None = None,
) -> Conversion:
    """Fuse ``model``, verify the result against ``model`` itself, write ``outputs``.

    ``inputs`` are the example inputs (a tensor or a tuple, one per forward parameter), traced
    with and verified on (see :class:`~repfuse.verify.VerifyOptions`; ``verify=None`` skips
    verification). ``outputs`` are paths chosen by extension (``.pt`` the fused GraphModule,
    ``.onnx``, ``.pt2``, ``.ts``; ``.json``, ``.md``, ``.html`` reports) or :class:`EmitCode` /
    :class:`DeployForm`; they are written only if verification passed, or with ``force``, and
    every export is checked first. Without ``passes``, an ``.onnx`` output leaves horizontal
    fusion out and keeps pruned widths a multiple of 8 (:data:`repfuse.export.ONNX_PIPELINE`).
    ``allow_costlier`` also applies exact merges the cost model says do not pay.

    ``prune_below=T`` adds the APPROXIMATE ``prune_below`` pass (``prune_by``: ``"gamma"``,
    the default, or ``"norm"``) to the pipeline: the result is labelled approximate
    (``Conversion.approximate``), its error against the original is measured (also with
    ``verify=None``), it passes unless a tolerance given in ``verify`` is exceeded
    (:class:`Approximation`), and exports are checked against the pruned model. ``quant``
    adds the quantization readiness report of the fused model (:class:`QuantOptions`).

    ``name`` and ``source`` name the model in reports; ``provenance`` (from
    :func:`made_by`), ``input_files`` (files never to be overwritten) and ``notes`` (what
    was assumed) come from the command line. ``progress(what, done, total)`` is told of every
    step.

    Raises :class:`RepfuseError` for bad input before any work; an error while writing
    (an export that fails) carries the conversion so far as ``error.conversion``.
    """
    inputs = as_input_tuple(inputs)
    planned = plan_outputs(outputs, export, [Path(p) for p in input_files])
    tell = progress or (lambda what, done, total: None)
    tell("checking the model", 0, 0)
    notes = [*notes, *check_model(model)]
    check_memory(model, [t.shape for t in inputs],
                 verify.batches if verify is not None else 1, [t.dtype for t in inputs])
    if passes is None and any(p.kind == ".onnx" for p in planned):
        passes = list(ONNX_PIPELINE)
        notes.append("for an .onnx output merge_siblings is left out (onnxruntime runs a conv + "
                     "Split slower than the separate convs) and prune_dead keeps pruned widths "
                     "a multiple of 8 (its convs work on blocks of 8 channels); --passes "
                     "chooses the passes")
    passes = with_prune_below(passes, prune_below, prune_by)
    tell("capturing and fusing", 0, 0)
    fused = _fuse(model, inputs, passes, allow_costlier)
    report = approximate = None
    if verify is not None:
        report, approximate = verify_candidate(
            model, fused.module, inputs, verify, rewrites=fused.passes.rewrites,
            reference_name=name, candidate_name=f"{name} (fused)", progress=progress)
    elif any(not r.exact for r in fused.passes.rewrites):
        # an approximate result always carries its measured error, verified or not
        _, approximate = verify_candidate(
            model, fused.module, inputs, DEFAULT_VERIFY, rewrites=fused.passes.rewrites,
            reference_name=name, candidate_name=f"{name} (fused)", progress=progress)
    if prune_below is not None and approximate is None:
        notes.append(f"prune_below found no channel under {prune_below:g}: nothing approximate "
                     "was done, the result is exact")
    if approximate is not None and any(p.kind != "report" for p in planned):
        notes.append("approximate: each export is checked against the pruned model (it is "
                     "what the file must hold); the error against the original is measured "
                     "above")
    result = Conversion(
        fused.module, fused.passes, fused.cost_before, _cost(fused.module), fused.seconds,
        report, not_mergeable=[op for _, gm in parts_of(fused.module) for op in not_mergeable(gm)],
        capture=fused.capture, name=name, source=source or name,
        input_shapes=[list(t.shape) for t in inputs], notes=notes,
        provenance=dict(provenance) if provenance is not None else made_by(None, {}),
        approximate=approximate,
    )
    if quant is not None:
        tell("measuring quantization readiness", 0, 0)
        result.quant = quant.run(fused.module, model, name)
    try:
        _write(result, model, inputs, planned, verify or DEFAULT_VERIFY, export, force, tell)
    except RepfuseError as exc:
        exc.conversion = result  # the summary so far, for the CLI to print before the error
        raise
    return result


def _write(result: Conversion, model: nn.Module, inputs: tuple[Tensor, ...],
           planned: list[_Planned], verify: VerifyOptions, export: ExportOptions, force: bool,
           tell: ProgressCallback) -> None:
    """Write each planned output (reports last, so they list the others)."""
    verified = result.verified
    failed = ("verification failed" if result.approximate is None else
              "the approximate model's error exceeds the tolerance given")
    for item in (p for p in planned if p.kind != "report"):
        if not (verified or force):
            result.outputs.append(_record(item, False, reason=(
                f"{failed} (use --force to write {item.path} anyway)")))
            continue
        tell(f"writing {item.path}", 0, 0)
        if item.kind == "model":
            save_model(result.fused, item.path, check_inputs=inputs)
            result.outputs.append(_record(item, True, forced=not verified))
            continue
        made = _export(result, model, inputs, item, verify, export, force)
        result.exports.append(made)
        if made.written:
            result.outputs.append(_record(item, True, forced=not (verified and made.passed)))
        else:
            result.outputs.append(_record(item, False, reason=(
                f"the {made.format} check failed (use --force to write {made.path} anyway)")))
    for item in (p for p in planned if p.kind == "report"):
        tell(f"writing report {item.path}", 0, 0)
        write_report(item.path, result)
        result.outputs.append({"path": str(item.path), "kind": "report", "written": True,
                               "sha256": None})


def _export(result: Conversion, model: nn.Module, inputs: tuple[Tensor, ...], item: _Planned,
            verify: VerifyOptions, export: ExportOptions, force: bool) -> ExportResult:
    common = {"reference": model, "verify": verify, "reference_name": result.name,
              "force": force}
    if result.approximate is not None:
        # the file must hold the pruned model; its error against the original is measured
        common.update(reference=result.fused, verify=verify.with_(rtol=None, atol=None),
                      reference_name=f"{result.name} (pruned, approximate)")
    if item.kind == "code":
        return emit_code(result.fused, item.path, inputs, class_name=item.spec.class_name,
                         description=f"{result.name}, fused", **common)
    if item.kind == "deploy":
        return export_deploy_state_dict(result.fused, inputs, item.path, item.spec.arch,
                                        **common)
    extra: dict[str, Any] = {"dynamic_axes": export.dynamic_axes}
    if item.kind == ".onnx":
        extra["opset"] = export.opset or DEFAULT_OPSET
    return EXPORTERS[item.kind](result.fused, inputs, item.path, **extra, **common)


def _record(item: _Planned, written: bool, *, forced: bool = False, reason: str = "") -> dict:
    kind = {"model": "fused GraphModule (.pt)", "code": "code folder",
            "deploy": "deploy-form state dict"}.get(item.kind, item.kind.lstrip("."))
    record: dict[str, Any] = {"path": str(item.path), "kind": kind, "written": written}
    if written:
        record["sha256"] = file_sha256(item.path)
        record["forced"] = forced
    else:
        record["reason"] = reason
    return record


def with_prune_below(passes: Sequence[str | Pass] | str | None, prune_below: float | None,
                     prune_by: str | None) -> Sequence[str | Pass] | str | None:
    """``passes`` (default: the default pipeline) with the APPROXIMATE ``prune_below`` pass
    added when ``prune_below`` is a threshold (it runs before the folds for ``by="gamma"``,
    after them for ``"norm"``: its stage says when)."""
    if prune_below is None:
        if prune_by is not None:
            raise RepfuseError("--prune-by needs --prune-below (prune_by needs prune_below)")
        return passes
    approximate = PruneBelow(threshold=prune_below, by=prune_by or "gamma")
    if passes is None:
        names: list[str | Pass] = list(DEFAULT_PIPELINE)
    elif isinstance(passes, str):
        names = [n.strip() for n in passes.split(",") if n.strip()]
    else:
        names = list(passes)
    return [*names, approximate]


def _cost(module: nn.Module) -> GraphCost:
    """The cost of a captured model: of its one graph, or summed over its traced parts."""
    parts = [graph_cost(gm) for _, gm in parts_of(module)]
    if len(parts) == 1:
        return parts[0]
    total = GraphCost()
    for part in parts:
        total = GraphCost(**{f.name: getattr(total, f.name) + getattr(part, f.name)
                             for f in fields(GraphCost)})
    return total


def example_input(
    shape: tuple[int, ...], like: nn.Module, seed: int = 0, distribution: str = "normal"
) -> Tensor:
    """A seeded tensor of ``shape`` (N(0, 1), or U[0, 1) for ``distribution="uniform"``) in
    the model's floating dtype and device."""
    dtype, device = torch.float32, torch.device("cpu")
    for tensor in (*like.parameters(), *like.buffers()):
        if tensor.is_floating_point():
            dtype, device = tensor.dtype, tensor.device
            break
    generator = torch.Generator().manual_seed(seed)
    return draw(shape, generator, distribution).to(dtype).to(device)


def example_inputs(shapes: Sequence[tuple[int, ...]], like: nn.Module, seed: int = 0,
                   distribution: str = "normal") -> tuple[Tensor, ...]:
    """One :func:`example_input` per shape, input ``i`` seeded ``seed + i`` (the first is
    what :func:`example_input` draws)."""
    return tuple(example_input(tuple(shape), like, seed + i, distribution)
                 for i, shape in enumerate(shapes))

