"""Numerical proof that a fused model computes what the original computes.

:func:`verify` runs reference and candidate on the same inputs twice: both converted to float64
(any difference there is the rewrite's, not rounding's), and the candidate in its deployment
dtype against the float64 reference. Then it localizes: activations compared in float64 name
the first rewrite (or module) that diverges (:mod:`repfuse.verify.localize`). Inputs:
:mod:`repfuse.verify.inputs`; the report: :mod:`repfuse.verify.report`, rendered by
:mod:`repfuse.verify.render`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from repfuse.capture import ExampleInputs, as_input_tuple
from repfuse.errors import RepfuseError, VerificationError
from repfuse.verify.compare import (
    ErrorMetrics,
    Tolerance,
    default_tolerance,
)
from repfuse.verify.inputs import InputSet, load_batches, random_batches
from repfuse.verify.localize import NONE, Localization, localize
from repfuse.verify.report import (
    SCHEMA_VERSION,
    EquivalenceReport,
    OutputComparison,
    RunComparison,
)

F64 = torch.float64


def deploy_dtype_of(model: nn.Module, inputs: tuple[Tensor, ...]) -> torch.dtype:
    """The floating dtype the model runs in: its first floating parameter's, else the input's."""
    for tensor in (*model.parameters(), *model.buffers(), *inputs):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _to_float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(F64).eval()


def _cast(batch: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def _outputs(model: nn.Module, batch: tuple[Tensor, ...], role: str) -> list[tuple[str, Tensor]]:
    try:
        with torch.no_grad():
            result = model(*batch)
    except Exception as exc:
        raise VerificationError(f"running the {role} failed: {type(exc).__name__}: {exc}") from exc
    leaves, _ = tree_flatten_with_path(result)
    named = [(f"output{keystr(path)}", leaf) for path, leaf in leaves if isinstance(leaf, Tensor)]
    if not named:
        raise VerificationError(f"the {role} returned no tensor")
    return named


def _stacked_outputs(
    model: nn.Module, batches: Sequence[tuple[Tensor, ...]], role: str
) -> list[tuple[str, Tensor]]:
    """Each output leaf, concatenated over batches (flattened per batch)."""
    per_batch = [_outputs(model, batch, role) for batch in batches]
    names = [name for name, _ in per_batch[0]]
    stacked = []
    for index, name in enumerate(names):
        parts = [outs[index][1].detach().reshape(-1) for outs in per_batch]
        stacked.append((name, torch.cat([p.to(F64) for p in parts]), per_batch[0][index][1].shape))
    return stacked


def _compare_run(
    dtype: torch.dtype,
    tolerance: Tolerance,
    truth: list,
    candidate: list,
    baseline: list | None,
) -> RunComparison:
    if [n for n, *_ in truth] != [n for n, *_ in candidate]:
        raise VerificationError(
            f"outputs differ in structure: reference {[n for n, *_ in truth]}, "
            f"candidate {[n for n, *_ in candidate]}"
        )
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
    localize_divergence: bool = True,
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

    With ``localize_divergence`` the report also names the first rewrite (or module) whose
    output diverges, from activations compared in float64 (:func:`localize`). Neither model is
    modified.
    """
    input_set = _input_set(example_inputs, inputs, batches, seed, distribution)
    example = input_set.batches[0]
    dtype = deploy_dtype_of(candidate, example)
    inputs = [_cast(b, dtype) for b in input_set.batches]
    inputs64 = [_cast(b, F64) for b in inputs]

    truth = _stacked_outputs(_to_float64(reference), inputs64, "reference (float64)")
    cand64 = _stacked_outputs(_to_float64(candidate), inputs64, "candidate (float64)")
    # A model stored in a lower precision keeps that precision's rounding in its weights even
    # when run in float64, so its float64 run is held to the deployment dtype's tolerance.
    tol = _override(default_tolerance(dtype), rtol, atol)
    runs = [_compare_run(F64, tol, truth, cand64, None)]
    if dtype != F64:
        with eval_mode(candidate), eval_mode(reference):
            cand = _stacked_outputs(candidate, inputs, f"candidate ({dtype})")
            base = _stacked_outputs(reference, inputs, f"reference ({dtype})")
        runs.append(_compare_run(dtype, tol, truth, cand, base))
    located = None
    if localize_divergence:
        try:
            located = localize(reference, candidate, inputs64, tol)
        except RepfuseError as exc:  # the verdict above stands; say why nothing is localized
            located = Localization(NONE, tol, note=f"localization failed: {exc}")
    return EquivalenceReport(
        reference=reference_name,
        candidate=candidate_name,
        deploy_dtype=str(dtype).removeprefix("torch."),
        runs=runs,
        inputs=input_set.describe(),
        localization=located,
    )


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


__all__ = [
    "SCHEMA_VERSION", "EquivalenceReport", "ErrorMetrics", "InputSet", "Localization",
    "Tolerance", "load_batches", "localize", "random_batches", "verify",
]
