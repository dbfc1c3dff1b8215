"""Numerical proof that a fused model computes what the original computes.

:func:`verify` runs reference and candidate on the same inputs twice: both converted to float64
(any difference there is the rewrite's, not rounding's), and the candidate in its deployment
dtype against the float64 reference. When that fails (or when asked) it localizes: activations
compared in float64 name the first rewrite (or module) that diverges
(:mod:`repfuse.verify.localize`). Inputs: :mod:`repfuse.verify.inputs`; the report:
:mod:`repfuse.verify.report`, rendered by :mod:`repfuse.verify.render`.

:class:`VerifyOptions` holds how to verify (inputs, tolerance, localization). ``repfuse
verify``, :func:`repfuse.convert` and every export check run through :meth:`VerifyOptions.run`,
so there is one verification path. Models are never modified: every run is on an eval-mode
copy, so a model left in training mode neither updates its BatchNorm statistics nor computes
with batch statistics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import keystr, tree_flatten_with_path

from repfuse.capture import ExampleInputs, as_input_tuple
from repfuse.errors import RepfuseError, VerificationError
from repfuse.verify.compare import (
    ErrorMetrics,
    Tolerance,
    default_tolerance,
)
from repfuse.verify.inputs import DISTRIBUTIONS, InputSet, load_batches, random_batches
from repfuse.verify.localize import NONE, Localization, localize
from repfuse.verify.report import (
    SCHEMA_VERSION,
    EquivalenceReport,
    OutputComparison,
    RunComparison,
)

# Called as progress(what is running, steps done, steps in all).
ProgressCallback = Callable[[str, int, int], None]

F64 = torch.float64


def deploy_dtype_of(model: nn.Module, inputs: tuple[Tensor, ...]) -> torch.dtype:
    """The floating dtype the model runs in: its first floating parameter's, else the input's."""
    for tensor in (*model.parameters(), *model.buffers(), *inputs):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore every submodule's training flag afterwards (for
    timing the user's own model; checks run on :func:`eval_copy` instead)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def eval_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode (converted to ``dtype`` if given).

    Every check runs on such a copy: running the user's model itself in training mode would
    update its BatchNorm statistics, and even toggling its mode is a change to their object.
    """
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone = clone.to(dtype)
    return clone.eval()


def check_finite_model(model: nn.Module, role: str = "model") -> None:
    """Refuse a model whose own tensors make every comparison meaningless: a parameter or
    buffer that is NaN or infinite, or a BatchNorm running variance below zero (its square
    root is NaN). The error names the tensor."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor.detach()).sum())
            inf = int((~finite).sum()) - nan
            what = " and ".join(f"{count} {kind}" for count, kind in
                                ((nan, "NaN"), (inf, "infinite")) if count)
            raise VerificationError(
                f"the {role}'s tensor '{name}' has {what} value(s) of {tensor.numel()}: its "
                "outputs are not numbers to compare; fix the weights first"
            )
    for path, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.running_var is not None \
                and not module.running_var.is_meta:
            negative = module.running_var.detach() < 0
            if bool(negative.any()):
                raise VerificationError(
                    f"the {role}'s tensor '{_join(path, 'running_var')}' has "
                    f"{int(negative.sum())} negative value(s) (min "
                    f"{float(module.running_var.min()):.3g}): a variance cannot be negative, "
                    "and its square root is NaN; fix the statistics first"
                )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _cast(batch: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def flatten_outputs(result: object) -> list[tuple[str, Tensor]]:
    """The tensor leaves of a model's result with their paths: ``output`` for a single tensor,
    ``output[0]``, ``output['logits']``, ... for tuples and dicts (pytree order, which is the
    order every exporter writes them in)."""
    leaves, _ = tree_flatten_with_path(result)
    return [(f"output{keystr(path)}", leaf) for path, leaf in leaves
            if isinstance(leaf, Tensor)]


def _outputs(model: nn.Module, batch: tuple[Tensor, ...], role: str) -> list[tuple[str, Tensor]]:
    try:
        with torch.no_grad():
            result = model(*batch)
    except Exception as exc:
        raise VerificationError(f"running the {role} failed: {type(exc).__name__}: {exc}") from exc
    named = flatten_outputs(result)
    if not named:
        raise VerificationError(f"the {role} returned no tensor")
    return named


def _stacked_outputs(
    model: nn.Module, batches: Sequence[tuple[Tensor, ...]], role: str,
    tick: Callable[[], None] = lambda: None,
) -> list[tuple[str, Tensor, torch.Size]]:
    """Each output leaf, concatenated over batches (flattened per batch)."""
    per_batch = []
    for batch in batches:
        per_batch.append(_outputs(model, batch, role))
        tick()
    names = [name for name, _ in per_batch[0]]
    stacked = []
    for index, name in enumerate(names):
        parts = [outs[index][1].detach().reshape(-1) for outs in per_batch]
        stacked.append((name, torch.cat([p.to(F64) for p in parts]), per_batch[0][index][1].shape))
    return stacked


def _aligned(truth: list, candidate: list) -> list:
    """``candidate``'s outputs in the order of ``truth``'s.

    Leaves are matched by name when both have the same names (a dict in another key order);
    otherwise by position, as long as there are as many with the same shapes: an exported
    artifact returns a dict's values as a flat tuple (ONNX knows no dicts), which is the same
    flattening."""
    names = [n for n, *_ in truth]
    given = [n for n, *_ in candidate]
    if sorted(names) == sorted(given):
        by_name = {item[0]: item for item in candidate}
        return [by_name[name] for name in names]
    shapes = [tuple(shape) for *_, shape in truth]
    if len(given) != len(names) or shapes != [tuple(shape) for *_, shape in candidate]:
        raise VerificationError(
            f"outputs differ in structure: reference {_describe(truth)}, candidate "
            f"{_describe(candidate)}"
        )
    return [(name, *rest) for name, (_, *rest) in zip(names, candidate, strict=True)]


def _describe(outputs: list) -> str:
    return "[" + ", ".join(f"{name} {list(shape)}" for name, _, shape in outputs) + "]"


def _check_finite_truth(truth: list) -> None:
    for name, values, _ in truth:
        if not bool(torch.isfinite(values).all()):
            raise VerificationError(
                f"the reference's {name} is not finite in float64 on these inputs: there is "
                "nothing to compare against; check the model's weights and the inputs"
            )


def _compare_run(
    dtype: torch.dtype,
    tolerance: Tolerance,
    truth: list,
    candidate: list,
    baseline: list | None,
) -> RunComparison:
    candidate = _aligned(truth, candidate)
    outputs = []
    for index, (name, ref, shape) in enumerate(truth):
        metrics = ErrorMetrics.between(ref, candidate[index][1])
        base = None if baseline is None else ErrorMetrics.between(ref, baseline[index][1])
        outputs.append(OutputComparison(
            name=name, shape=tuple(shape), metrics=metrics, baseline=base,
            passed=tolerance.allows(metrics.max_abs, metrics.ref_max_abs),
        ))
    return RunComparison(str(dtype).removeprefix("torch."), tolerance, tuple(outputs))


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    batches: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    reference_name: str = "reference",
    candidate_name: str = "candidate",
    distribution: str = "normal",
    inputs: InputSet | Sequence[ExampleInputs] | None = None,
    localize_divergence: bool | None = None,
    progress: ProgressCallback | None = None,
) -> EquivalenceReport:
    """Compare ``candidate`` with ``reference`` in float64 and in the deployment dtype.

    Inputs: ``example_inputs`` and ``batches - 1`` more seeded batches of its shapes drawn from
    ``distribution`` (``normal`` or ``uniform``), or the user's own ``inputs`` (an
    :class:`~repfuse.verify.inputs.InputSet` or a list of batches, each a tensor or a tuple of
    tensors), which then replace them. Floating inputs are rounded to the deployment dtype
    first, so both runs see the same values. Tolerances default per deployment dtype
    (:data:`repfuse.verify.compare.DEFAULT_TOLERANCES`; ``rtol``/``atol`` override them) and
    apply to both runs: a float32 model's fused weights carry float32 rounding even in float64.
    Exactness to 1e-10 is therefore checked on float64 models.

    ``localize_divergence``: ``None`` (default) localizes only when the outputs fail, and not
    when the failure is within the deployment dtype's own noise
    (:attr:`EquivalenceReport.diagnosis`); ``True`` always (also to find a rewrite error a later
    ReLU masks); ``False`` never. Localization names the first rewrite (or module) whose output
    diverges, from activations compared in float64 (:func:`localize`).

    Outputs are compared leaf by leaf in pytree order (:func:`flatten_outputs`): a candidate
    returning a dict's values as a tuple (an ONNX or TorchScript export) is compared by
    position. A reference with non-finite weights or outputs is refused
    (:class:`VerificationError`): there is nothing to compare against. Neither model is
    modified: both run as eval-mode copies. ``progress(what, done, total)`` is told of each
    model run.
    """
    _check_tolerance(rtol, atol)
    check_finite_model(reference, "reference")
    input_set = _input_set(example_inputs, inputs, batches, seed, distribution)
    example = input_set.batches[0]
    dtype = deploy_dtype_of(candidate, example)
    inputs = [_cast(b, dtype) for b in input_set.batches]
    inputs64 = [_cast(b, F64) for b in inputs]
    runs_per_batch = 4 if dtype != F64 else 2
    steps = _Steps(progress, runs_per_batch * len(inputs) + 1)

    steps.start(f"running {reference_name} in float64")
    truth = _stacked_outputs(eval_copy(reference, F64), inputs64, "reference (float64)",
                             steps.done)
    _check_finite_truth(truth)
    steps.start(f"running {candidate_name} in float64")
    cand64 = _stacked_outputs(eval_copy(candidate, F64), inputs64, "candidate (float64)",
                              steps.done)
    # A model stored in a lower precision keeps that precision's rounding in its weights even
    # when run in float64, so its float64 run is held to the deployment dtype's tolerance.
    tol = _override(default_tolerance(dtype), rtol, atol)
    runs = [_compare_run(F64, tol, truth, cand64, None)]
    if dtype != F64:
        steps.start(f"running both in {str(dtype).removeprefix('torch.')}")
        cand = _stacked_outputs(eval_copy(candidate), inputs, f"candidate ({dtype})", steps.done)
        base = _stacked_outputs(eval_copy(reference), inputs, f"reference ({dtype})", steps.done)
        runs.append(_compare_run(dtype, tol, truth, cand, base))
    report = EquivalenceReport(
        reference=reference_name,
        candidate=candidate_name,
        deploy_dtype=str(dtype).removeprefix("torch."),
        runs=runs,
        inputs=input_set.describe(),
    )
    wanted = localize_divergence
    if wanted is None:
        wanted = not report.passed and report.diagnosis is None
    if wanted:
        steps.start("localizing: comparing activations in float64")
        try:
            report.localization = localize(reference, candidate, inputs64, tol)
        except RepfuseError as exc:  # the verdict above stands; say why nothing is localized
            report.localization = Localization(NONE, tol, note=f"localization failed: {exc}")
    steps.done()
    return report


class _Steps:
    """Counts model runs for a progress callback."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self.progress, self.total, self.count, self.what = progress, total, 0, ""

    def start(self, what: str) -> None:
        self.what = what
        if self.progress is not None:
            self.progress(what, self.count, self.total)

    def done(self) -> None:
        self.count = min(self.count + 1, self.total)
        if self.progress is not None:
            self.progress(self.what, self.count, self.total)


def _check_tolerance(rtol: float | None, atol: float | None) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise VerificationError(f"{name} must be a finite number >= 0, got {value:g}")


def _input_set(
    example_inputs: ExampleInputs | None,
    inputs: InputSet | Sequence[ExampleInputs] | None,
    batches: int,
    seed: int,
    distribution: str,
) -> InputSet:
    if inputs is not None:
        if isinstance(inputs, InputSet):
            given = inputs
        else:
            given = InputSet([as_input_tuple(b) for b in inputs], "batches given")
        if not given.batches:
            raise VerificationError("no input batches to verify on")
        return given
    if example_inputs is None:
        raise VerificationError("give example_inputs or inputs")
    if batches < 1:
        raise VerificationError("batches must be at least 1")
    example = as_input_tuple(example_inputs)
    drawn = random_batches(example, batches, seed, distribution)
    return InputSet(drawn, f"example + seeded {distribution}", seed=seed,
                    distribution=distribution)


def _override(base: Tolerance, rtol: float | None, atol: float | None) -> Tolerance:
    return Tolerance(rtol=base.rtol if rtol is None else rtol,
                     atol=base.atol if atol is None else atol)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify: the options of :func:`verify`, given once and used by ``repfuse
    verify``, :func:`repfuse.convert` and every export check.

    ``inputs`` (the user's batches: an :class:`InputSet` or a list of batches) replace the
    example and the ``batches - 1`` seeded random ones. ``localize``: ``None`` only when the
    check fails, ``True`` always, ``False`` never (see :func:`verify`).
    """

    batches: int = 3
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    distribution: str = "normal"
    inputs: InputSet | Sequence[ExampleInputs] | None = None
    localize: bool | None = None

    def __post_init__(self) -> None:
        _check_tolerance(self.rtol, self.atol)
        if self.batches < 1:
            raise VerificationError(f"batches must be at least 1, got {self.batches}")
        if self.distribution not in DISTRIBUTIONS:
            raise VerificationError(f"unknown distribution '{self.distribution}' (use "
                                    f"{' or '.join(DISTRIBUTIONS)})")

    def with_(self, **changes: object) -> VerifyOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def run(
        self,
        reference: nn.Module,
        candidate: nn.Module,
        example_inputs: ExampleInputs | None = None,
        *,
        reference_name: str = "reference",
        candidate_name: str = "candidate",
        progress: ProgressCallback | None = None,
    ) -> EquivalenceReport:
        """:func:`verify` with these options."""
        return verify(reference, candidate, example_inputs, batches=self.batches,
                      seed=self.seed, rtol=self.rtol, atol=self.atol,
                      distribution=self.distribution, inputs=self.inputs,
                      localize_divergence=self.localize, reference_name=reference_name,
                      candidate_name=candidate_name, progress=progress)

    def to_dict(self) -> dict:
        """The options as plain values (the user's batches as their description)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "inputs"}
        if isinstance(self.inputs, InputSet):
            out["inputs"] = self.inputs.source
        elif self.inputs is not None:
            out["inputs"] = f"{len(self.inputs)} batches given"
        return out


# The defaults, as a value to give as a default argument (a call there would run once anyway).
DEFAULT_VERIFY = VerifyOptions()

__all__ = [
    "DEFAULT_VERIFY", "SCHEMA_VERSION", "EquivalenceReport", "ErrorMetrics", "InputSet",
    "Localization", "Tolerance", "VerifyOptions", "check_finite_model", "eval_copy", "eval_mode",
    "flatten_outputs", "load_batches", "localize", "random_batches", "verify",
]
