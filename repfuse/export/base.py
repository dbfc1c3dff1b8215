"""What every exporter shares: the check before writing, its result, inputs, shape guards.

:func:`checked_export` is the one path by which an artifact reaches the disk: it is built in a
scratch folder, loaded back the way a deployment would load it, verified against the float64
reference with the same :class:`~repfuse.verify.VerifyOptions` as ``repfuse verify``, and only
then copied into place with :func:`repfuse.io.atomic_write`. An exporter of one file
(``.onnx``, ``.pt2``, ``.ts``, deploy weights) goes there through :class:`FileExport`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from repfuse.capture import GUARD_MESSAGE, ExampleInputs, as_input_tuple
from repfuse.errors import ExportError
from repfuse.io import atomic_write
from repfuse.verify import EquivalenceReport, VerifyOptions, eval_copy


@dataclass
class ExportResult:
    """An exported artifact, the check of it loaded back, and whether it was written.

    Attributes:
        format: ``"onnx"``, ``"pt2"``, ``"torchscript"``, ``"code"`` or ``"deploy_state_dict"``.
        path: The file written (the folder, for ``"code"``).
        check: The artifact as loaded back, against the float64 reference.
        written: Whether it was written: the check passed, or ``force`` was given.
        details: Format-specific facts (opset, exporter, dynamic axes, files, ...).
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

# --- inputs ------------------------------------------------------------------------------------


def example_inputs_of(model: nn.Module, example_inputs: ExampleInputs | None) -> tuple[Tensor, ...]:
    """``example_inputs``, or seeded N(0, 1) tensors of the shapes recorded at capture."""
    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    metas = []
    if isinstance(model, GraphModule):
        metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
    if not metas or any(m is None or not m.dtype.is_floating_point for m in metas):
        raise ExportError("pass example_inputs: the model has no recorded floating input shapes")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m.dtype)
                 for m in metas)


def dynamic_axes_of(dynamic_batch: bool, dynamic_axes: Sequence[int] | None) -> tuple[int, ...]:
    """The axes that vary: ``dynamic_axes`` (of every input that has them; negative counts
    from the end), plus axis 0 with ``dynamic_batch``."""
    axes = list(dynamic_axes or ())
    if dynamic_batch and 0 not in axes:
        axes.insert(0, 0)
    return tuple(dict.fromkeys(axes))


def input_axes(inputs: Sequence[Tensor], axes: Sequence[int]) -> list[list[int]]:
    """Per input, the non-negative indices of ``axes`` it has."""
    out = []
    for tensor in inputs:
        own = [a + tensor.dim() if a < 0 else a for a in axes]
        out.append(sorted({a for a in own if 0 <= a < tensor.dim()}))
    return out


def resized_inputs(example: Sequence[Tensor], axes: Sequence[int], seed: int = 0
                   ) -> tuple[Tensor, ...]:
    """Each input with every dynamic axis twice as long, filled with seeded N(0, 1) values.

    A dynamic axis is checked, and traced by torch.export, at a size other than the example's:
    torch.export specializes a size of 1 to the constant 1, and a check at the example's own
    size would not show that the axis really varies. Doubling keeps sizes divisible by the
    model's strides.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for tensor, own in zip(example, input_axes(example, axes), strict=True):
        if not own:
            out.append(tensor)
            continue
        if not tensor.is_floating_point():
            raise ExportError("dynamic axes need floating inputs (integer inputs are not drawn)")
        shape = [2 * s if i in own else s for i, s in enumerate(tensor.shape)]
        out.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(tensor))
    return tuple(out)


# --- shape guards of a specialized model --------------------------------------------------------


@dataclass(frozen=True)
class Guard:
    """A ``torch._assert`` that :mod:`repfuse.capture` put at the start of a graph specialized
    to its example's shapes: input ``placeholder`` must have these values at ``dims`` (all of
    its shape when ``dims`` is None, its rank only when ``()``), or an argument must have its
    example value."""

    node: Node
    placeholder: Node
    dims: tuple[int, ...] | None  # None: the whole shape (or a non-tensor argument's value)
    message: str


def specialization_guards(gm: GraphModule) -> list[Guard]:
    """The shape guards in ``gm``'s graph, recognized by their message, so also in a model
    saved and loaded again (whose node metadata is gone)."""
    guards = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch._assert:
            continue
        message = node.args[1] if len(node.args) > 1 else node.kwargs.get("message", "")
        condition = node.args[0] if node.args else None
        if not (isinstance(message, str) and message.startswith(GUARD_MESSAGE)):
            continue
        if not (isinstance(condition, Node) and condition.target is operator.eq):
            continue
        subject = condition.args[0]
        dims: tuple[int, ...] | None = None
        if isinstance(subject, Node) and subject.target is operator.getitem:
            dims, subject = (subject.args[1],), subject.args[0]
        if isinstance(subject, Node) and subject.op == "call_method" and subject.target == "dim":
            dims, subject = (), subject.args[0]  # the rank only
        elif isinstance(subject, Node) and subject.target is getattr:
            subject = subject.args[0]
        if isinstance(subject, Node) and subject.op == "placeholder":
            guards.append(Guard(node, subject, dims, message))
    return guards


def _graph_modules(model: nn.Module) -> list[GraphModule]:
    return [m for m in model.modules() if isinstance(m, GraphModule)]


def without_guards(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its shape guards, for the tracing exporters (torch.onnx,
    ``torch.jit.trace``): they would record each guard's comparison as a Python constant and
    warn that the trace may be wrong. The artifact keeps the example's static shapes on the
    axes that are not dynamic, so it still refuses other sizes there; :func:`check_dynamic`
    has refused a dynamic axis the code read."""
    if not any(specialization_guards(gm) for gm in _graph_modules(model)):
        return model
    clone = copy.deepcopy(model)
    for gm in _graph_modules(clone):
        guards = specialization_guards(gm)
        if not guards:
            continue
        for guard in guards:
            gm.graph.erase_node(guard.node)
        pure = {operator.eq, operator.getitem, getattr, "dim"}
        changed = True
        while changed:  # the comparisons and shape reads that fed only the guards
            changed = False
            for node in reversed(list(gm.graph.nodes)):
                if node.op in ("call_function", "call_method") and node.target in pure \
                        and not node.users:
                    gm.graph.erase_node(node)
                    changed = True
        gm.recompile()
    return clone


def check_dynamic(model: nn.Module, example: Sequence[Tensor], axes: Sequence[int]) -> None:
    """Refuse dynamic ``axes`` that a specialized model's guards pin: its Python branched on
    those sizes, so another size may need another graph."""
    if not axes:
        return
    per_input = input_axes(example, axes)
    root_guards = specialization_guards(model) if isinstance(model, GraphModule) else []
    placeholders = ([n for n in model.graph.nodes if n.op == "placeholder"]
                    if isinstance(model, GraphModule) else [])
    for guard in root_guards:
        if guard.placeholder not in placeholders:
            continue
        index = placeholders.index(guard.placeholder)
        if index >= len(per_input):
            continue
        tensor = example[index]
        pinned = (set(range(tensor.dim())) if guard.dims is None else
                  {d + tensor.dim() if d < 0 else d for d in guard.dims})
        clash = sorted(pinned & set(per_input[index]))
        if clash:
            raise ExportError(
                f"the fused model is specialized to input '{guard.placeholder.name}' "
                f"{_pinned(guard, tensor)} (its forward's Python branched on it), so axis "
                f"{clash[0]} cannot be dynamic: convert it again for each size, or leave that "
                "axis static"
            )
    for gm in _graph_modules(model):
        if gm is not model and specialization_guards(gm):
            raise ExportError("a part of the model is specialized to its example's shapes "
                              "(its Python branched on them): its axes cannot be dynamic")


def _pinned(guard: Guard, tensor: Tensor) -> str:
    if guard.dims == ():
        return f"of rank {tensor.dim()}"
    if guard.dims is None:
        return f"of shape {list(tensor.shape)}"
    return ", ".join(f"with shape[{d}] == {tensor.shape[d]}" for d in guard.dims)


# --- running exporters quietly --------------------------------------------------------------------


@contextlib.contextmanager
def native_output_silenced(fd: int = 1) -> Iterator[None]:
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


def refuse_value_branches(caught: list[warnings.WarningMessage], exporter: str) -> None:
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


# --- the check ------------------------------------------------------------------------------------


def checked_export(
    fmt: str,
    destinations: Mapping[str, Path],
    build: Callable[[Path], nn.Module],
    *,
    reference: nn.Module,
    check_inputs: tuple[Tensor, ...],
    verify: VerifyOptions,
    reference_name: str,
    force: bool,
    path: Path,
    details: dict[str, Any],
    onnx_nodes: dict[str, dict[str, int]] | None = None,
) -> ExportResult:
    """Build the files named by ``destinations`` in a scratch folder (``build`` writes them and
    returns the artifact loaded back), check it, and copy each file into place atomically.

    The check is :meth:`VerifyOptions.run` without localization: an artifact has no rewrite
    record to localize a divergence with. With the user's own batches the artifact runs on
    them; otherwise on ``check_inputs`` (at twice the size on dynamic axes) and seeded ones.
    """
    options = verify.with_(localize=False)
    with tempfile.TemporaryDirectory(prefix="repfuse-export-") as scratch_name:
        scratch = Path(scratch_name)
        candidate = build(scratch)
        with warnings.catch_warnings():
            # converting a loaded TorchScript module to float64 reads each parameter's .grad
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
            check = options.run(reference, candidate, check_inputs,
                                reference_name=reference_name,
                                candidate_name=f"{path.name} ({fmt})")
        written = check.passed or force
        if written:
            for name, destination in destinations.items():
                source = scratch / name
                atomic_write(destination, lambda tmp, src=source: shutil.copyfile(src, tmp))
    return ExportResult(fmt, path, check, written, details, onnx_nodes)


def prepared(fused: nn.Module, reference: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    """Eval-mode copies of the model to export and of the reference (default: the model): an
    exporter runs them, and running the user's model in training mode would change it."""
    model = eval_copy(fused)
    return model, (model if reference is None else eval_copy(reference))


@dataclass
class FileExport:
    """One file to export, as every single-file exporter starts: eval-mode copies of the model
    and of the reference (:func:`prepared`), the example inputs, the dynamic axes, and how the
    check is run. :meth:`write` checks the artifact and writes it (:func:`checked_export`)."""

    path: Path
    model: nn.Module
    reference: nn.Module
    example: tuple[Tensor, ...]
    axes: tuple[int, ...]
    verify: VerifyOptions
    reference_name: str
    force: bool

    @classmethod
    def of(cls, fused: nn.Module, example_inputs: ExampleInputs | None, path: str | Path, *,
           reference: nn.Module | None, verify: VerifyOptions, reference_name: str,
           force: bool, dynamic_batch: bool = False,
           dynamic_axes: Sequence[int] | None = None) -> FileExport:
        """The export of ``fused`` (an exporter's own arguments; see :func:`example_inputs_of`
        and :func:`dynamic_axes_of`); neither model is modified."""
        example = example_inputs_of(fused, example_inputs)
        axes = dynamic_axes_of(dynamic_batch, dynamic_axes)
        model, checked_against = prepared(fused, reference)
        return cls(Path(path), model, checked_against, example, axes, verify, reference_name,
                   force)

    @functools.cached_property
    def check_inputs(self) -> tuple[Tensor, ...]:
        """The example, at twice its size on each dynamic axis (:func:`resized_inputs`)."""
        return resized_inputs(self.example, self.axes, self.verify.seed) if self.axes \
            else self.example

    @property
    def dynamic_details(self) -> dict[str, Any]:
        """The dynamic axes, as :attr:`ExportResult.details` gives them."""
        return {"dynamic_batch": 0 in self.axes, "dynamic_axes": list(self.axes)}

    def write(self, fmt: str, save: Callable[[Path], nn.Module], details: dict[str, Any],
              onnx_nodes: dict[str, dict[str, int]] | None = None) -> ExportResult:
        """Check the artifact ``save(file)`` writes to ``file`` (in a scratch folder, named as
        :attr:`path`) and returns loaded back, on :attr:`check_inputs`; write it to
        :attr:`path` if the check passed or ``force``."""
        return checked_export(fmt, {self.path.name: self.path},
                              lambda scratch: save(scratch / self.path.name),
                              reference=self.reference, check_inputs=self.check_inputs,
                              verify=self.verify, reference_name=self.reference_name,
                              force=self.force, path=self.path, details=details,
                              onnx_nodes=onnx_nodes)
