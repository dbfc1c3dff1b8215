"""Tests of :mod:`repfuse.verify.compare`: each metric against a hand computation in numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from repfuse.errors import VerificationError
from repfuse.verify.compare import (
    DEFAULT_TOLERANCES,
    ErrorMetrics,
    Tolerance,
    default_tolerance,
    json_float,
    json_number,
    min_rtol_to_pass,
)


def hand_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The documented formulas, written out in numpy (float64)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    diff = np.abs(a - b)
    return {
        "max_abs": diff.max(),
        "max_rel": diff.max() / np.abs(a).max(),
        "mean_abs": diff.mean(),
        "cosine": a.dot(b) / (np.linalg.norm(a) * np.linalg.norm(b)),
        "sqnr_db": 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)),
        "ref_max_abs": np.abs(a).max(),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [1e-7, 1e-3, 0.5])
def test_metrics_match_numpy(seed, noise):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, 7, 3)) * rng.uniform(0.1, 10)
    b = a + noise * rng.normal(size=a.shape)
    metrics = ErrorMetrics.between(torch.from_numpy(a), torch.from_numpy(b))
    expected = hand_metrics(a, b)
    for name, value in expected.items():
        assert getattr(metrics, name) == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_float32_candidate_is_measured_in_float64():
    rng = np.random.default_rng(5)
    a = rng.normal(size=1000)
    b32 = a.astype(np.float32)
    metrics = ErrorMetrics.between(torch.from_numpy(a), torch.from_numpy(b32))
    expected = hand_metrics(a, b32.astype(np.float64))
    assert metrics.max_abs == pytest.approx(expected["max_abs"], rel=1e-12)
    assert metrics.sqnr_db == pytest.approx(expected["sqnr_db"], rel=1e-12)
    # Float32 rounding of N(0, 1) values: below half an ulp at the largest magnitude.
    assert 0 < metrics.max_rel <= 2.0**-24


def test_identical_outputs():
    a = torch.randn(3, 5, dtype=torch.float64)
    metrics = ErrorMetrics.between(a, a.clone())
    assert metrics.max_abs == 0 and metrics.max_rel == 0 and metrics.mean_abs == 0
    assert metrics.sqnr_db == math.inf
    assert metrics.cosine == pytest.approx(1.0, abs=1e-15)
    assert metrics.ref_max_abs == float(a.abs().max())


def test_nan_in_candidate_is_infinitely_wrong():
    a = torch.randn(10, dtype=torch.float64)
    b = a.clone()
    b[3] = float("nan")
    metrics = ErrorMetrics.between(a, b)
    assert metrics.max_abs == math.inf
    assert metrics.max_rel == math.inf
    assert not Tolerance(rtol=1e9, atol=1e9).allows(metrics.max_abs, metrics.ref_max_abs)
    assert metrics.to_dict()["max_abs"] == "inf"
    json.dumps(metrics.to_dict(), allow_nan=False)  # strings, not bare non-finite floats


def test_zero_reference():
    zero = torch.zeros(4, dtype=torch.float64)
    other = torch.tensor([0.0, 1.0, -2.0, 0.0], dtype=torch.float64)
    metrics = ErrorMetrics.between(zero, other)
    assert metrics.max_abs == 2.0
    assert metrics.mean_abs == 0.75
    assert metrics.max_rel == math.inf
    assert metrics.cosine == 0.0
    assert metrics.sqnr_db == -math.inf
    both_zero = ErrorMetrics.between(zero, zero)
    assert both_zero.max_rel == 0.0 and both_zero.cosine == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(VerificationError, match=r"reference \[2, 3\], candidate \[3, 2\]"):
        ErrorMetrics.between(torch.zeros(2, 3), torch.zeros(3, 2))


def test_empty_outputs_pass():
    metrics = ErrorMetrics.between(torch.zeros(0, 3), torch.zeros(0, 3))
    assert metrics.max_abs == 0.0
    assert Tolerance(0.0, 0.0).allows(metrics.max_abs, metrics.ref_max_abs)


def test_tolerance_allows_up_to_the_bound():
    tol = Tolerance(rtol=1e-3, atol=1e-6)
    bound = 1e-6 + 1e-3 * 5.0
    assert tol.allows(bound, 5.0)
    assert tol.allows(0.0, 0.0)
    assert not tol.allows(bound * (1 + 1e-9), 5.0)
    assert not tol.allows(2e-6, 0.0)  # zero reference: only atol is left
    assert tol.to_dict() == {"rtol": 1e-3, "atol": 1e-6}


def test_default_tolerances():
    assert default_tolerance(torch.float64) == Tolerance(rtol=1e-10, atol=1e-12)
    assert default_tolerance(torch.float32) == Tolerance(rtol=1e-5, atol=1e-6)
    assert set(DEFAULT_TOLERANCES) >= {torch.float16, torch.bfloat16}
    with pytest.raises(VerificationError, match="pass rtol and atol"):
        default_tolerance(torch.int8)


def test_min_rtol_to_pass_is_the_boundary():
    rng = np.random.default_rng(7)
    a = rng.normal(size=50) * 3
    b = a + 1e-4 * rng.normal(size=50)
    metrics = ErrorMetrics.between(torch.from_numpy(a), torch.from_numpy(b))
    atol = 1e-5
    expected = (np.abs(a - b).max() - atol) / np.abs(a).max()
    rtol = min_rtol_to_pass(metrics, atol)
    assert rtol == pytest.approx(expected, rel=1e-12)
    assert Tolerance(rtol * (1 + 1e-9), atol).allows(metrics.max_abs, metrics.ref_max_abs)
    assert not Tolerance(rtol * (1 - 1e-6), atol).allows(metrics.max_abs, metrics.ref_max_abs)
    # An atol that already covers the error needs no rtol at all.
    assert min_rtol_to_pass(metrics, atol=1.0) == 0.0


def test_json_numbers_read_back_as_written():
    values = [0.0, -2.5, 1e-300, 3, math.inf, -math.inf]
    written = json.loads(json.dumps([json_float(v) for v in values]))
    assert written[4:] == ["inf", "-inf"]  # JSON has no inf: spelled as strings
    assert [json_number(w) for w in written] == values
    assert math.isnan(json_number(json.loads(json.dumps(json_float(math.nan)))))
    assert math.isnan(json_number(None))  # a missing number
