"""The external tier: repfuse on real third-party models (``scripts/test-external``).

Per corpus model (``corpus.py``; random weights, random BatchNorm statistics), five checks, each
its own test so that one failure does not hide the others (the model is built, fused and
measured once, :func:`evaluation`):

- ``converts``: ``repfuse.fuse`` returns and the fused model runs, in float64 and float32;
  a part kept eager is listed with a reason;
- ``float64``: max rel error <= 1e-9 against the unfused model in float64; for a model that is
  chaotic in float64 (its output moves by more than ``harness.CHAOTIC`` when its input moves
  by 1e-15) every non-chaotic block fused alone meets it (the whole model's error is reported,
  not judged: a rounding-sized change can reorder its detections);
- ``float32``: the fused float32 model within 10x the model's own float32 noise floor (the
  original in float32 against the original in float64);
- ``batchnorm``: no BatchNorm call left, except as many as ``KEEPS_BATCHNORM`` says (and why);
- ``convs``: no more conv calls than the library's own deploy form (timm's
  ``reparameterize_model``, ultralytics' ``fuse()``, torch.fx's conv-BN fuse for torchvision).
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

pytestmark = pytest.mark.external

for _package in ("timm", "torchvision", "ultralytics"):
    pytest.importorskip(_package, reason=(
        "the external tier needs timm, torchvision and ultralytics: it runs in its own "
        ".venv-ext with `scripts/test-external` (CI runs it after the unit tests)"))

from corpus import CORPUS, KEEPS_BATCHNORM  # noqa: E402
from harness import CHAOTIC, F32_FACTOR, F64_LIMIT, Evaluation, evaluate  # noqa: E402

MODELS = pytest.mark.parametrize("spec", CORPUS, ids=[s.id for s in CORPUS])
# Where to append every evaluation as a JSON line (for a failure inventory), if set.
RECORD = os.environ.get("REPFUSE_EXTERNAL_RECORD")
# ultralytics writes a settings file at import, under this folder (keep it out of $HOME), and
# logs every model it builds unless told not to.
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repfuse-ultralytics-"))
os.environ.setdefault("YOLO_VERBOSE", "False")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One torch thread by default (REPFUSE_EXTERNAL_THREADS): these are checks, not timings,
    and on a loaded machine two threads lose whole time slices at every op's barrier (a conv
    runs ~30x slower), which one does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("REPFUSE_EXTERNAL_THREADS", "1")))
    yield
    torch.set_num_threads(before)


_EVALUATIONS: dict = {}


def evaluation(spec) -> Evaluation:
    """:func:`harness.evaluate` once per model; an error of the harness itself (building the
    model, running the original) is raised again, not recomputed, by the model's other tests."""
    if spec not in _EVALUATIONS:
        try:
            _EVALUATIONS[spec] = _evaluate(spec)
        except Exception as exc:
            _EVALUATIONS[spec] = exc
    result = _EVALUATIONS[spec]
    if isinstance(result, Exception):
        raise result
    return result


def _evaluate(spec) -> Evaluation:
    result = evaluate(spec)
    if RECORD:
        with open(RECORD, "a", encoding="utf-8") as file:
            file.write(json.dumps(result.to_dict(), default=str) + "\n")
    return result


def _declines_for(result: Evaluation, paths: list[str], limit: int = 4) -> str:
    """The distinct decline reasons that name one of ``paths`` (or all, if none does)."""
    named = [d for d in result.declined
             if any(p in d["module_paths"] or p in d["reason"] for p in paths)]
    reasons = list(dict.fromkeys(f"{d['pass']}: {d['reason']}" for d in named or result.declined))
    more = f" (+{len(reasons) - limit} more)" if len(reasons) > limit else ""
    return "; ".join(reasons[:limit]) + more or "no decline recorded"


def _require_converted(result: Evaluation) -> None:
    if result.failure:
        pytest.fail(f"did not convert: {result.failure} [{result.failure_at}]")


@MODELS
def test_converts(spec) -> None:
    result = evaluation(spec)
    _require_converted(result)
    for skipped in result.skipped:
        assert skipped.split(": ", 1)[1].strip(), f"kept eager without a reason: {skipped}"


@MODELS
def test_float64(spec) -> None:
    result = evaluation(spec)
    _require_converted(result)
    if not result.chaotic:
        assert result.error64 <= F64_LIMIT, (
            f"float64 max rel error {result.error64:.3g} > {F64_LIMIT:g}")
        return
    # Chaotic: the whole model's error says nothing (a rounding can reorder detections).
    failed = [b for b in result.blocks if not b.error <= F64_LIMIT]
    assert result.blocks and not failed, (
        f"chaotic model (sensitivity {result.sensitivity:.2g} > {CHAOTIC:g}), "
        f"{len(failed)} of {len(result.blocks)} blocks over {F64_LIMIT:g}: " + "; ".join(
            f"{b.path} {b.error:.3g} {b.failure}".strip() for b in failed[:5]))


@MODELS
def test_float32(spec) -> None:
    result = evaluation(spec)
    _require_converted(result)
    assert result.error32 <= F32_FACTOR * result.floor32, (
        f"float32 max rel error {result.error32:.3g} > {F32_FACTOR:g} x the model's own "
        f"float32 noise floor {result.floor32:.3g}")


@MODELS
def test_batchnorm(spec) -> None:
    result = evaluation(spec)
    _require_converted(result)
    expected, _why = KEEPS_BATCHNORM.get(spec.id, (0, ""))
    assert result.bn_after == expected, (
        f"{result.bn_after} of {result.bn_before} BatchNorm calls left (expected {expected}; "
        f"the deploy form keeps {result.bn_deploy}; {len(result.bn_foldable)} foldable by a "
        f"local rule, e.g. {result.bn_foldable[:2]}), e.g. {result.bn_left[:3]}; declined: "
        f"{_declines_for(result, result.bn_left)}")


@MODELS
def test_convs(spec) -> None:
    result = evaluation(spec)
    _require_converted(result)
    after, of = result.conv_after, ""
    if result.deploy_outputs:  # the deploy form computes fewer outputs: compare on those
        after = result.conv_after_same_outputs
        of = (f" (asked for the {len(result.deploy_outputs)} outputs the deploy form keeps; "
              f"all outputs: {result.conv_after})")
    assert after <= result.conv_deploy, (
        f"{after} conv calls after fusion{of} (before: {result.conv_before}) > "
        f"{result.conv_deploy} in {result.deploy}")
