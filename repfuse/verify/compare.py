"""Error metrics between a float64 reference output and a candidate output, and tolerances.

All metrics are computed in float64 over every element of every batch:

- ``max_abs = max|a − b|``; ``max_rel = max|a − b| / max|a|`` (relative to the reference's
  largest magnitude, so near-zero elements do not blow it up);
- ``mean_abs``; ``cosine`` similarity of the flattened outputs; ``sqnr_db =
  10·log10(Σa² / Σ(a − b)²)`` (``inf`` when equal);
- ``p50_abs``, ``p90_abs``, ``p99_abs``: percentiles of ``|a − b|`` (linear interpolation
  between order statistics, as numpy's default); with ``max_abs`` they show whether an error is
  everywhere or in a few elements (a border, one channel).

A candidate passes when ``max_abs ≤ atol + rtol·max|a|``. Default tolerances per deployment
dtype (:data:`DEFAULT_TOLERANCES`; ``rtol`` is relative to the largest reference magnitude):

==========  =======  =======
dtype       rtol     atol
==========  =======  =======
float64     1e-10    1e-12
float32     1e-5     1e-6
float16     1e-2     1e-3
bfloat16    5e-2     1e-2
==========  =======  =======

float64 checks that a rewrite is exact up to rounding; float32 allows a few ulps of the
largest value accumulated over a layer's reduction; float16 (10-bit mantissa, ulp ≈ 1e-3) and
bfloat16 (7-bit mantissa, ulp ≈ 8e-3) allow that precision's own rounding through a network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from repfuse.errors import VerificationError


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``max|a − b| ≤ atol + rtol·max|a|``."""

    rtol: float
    atol: float

    def allows(self, max_abs: float, ref_max_abs: float) -> bool:
        return max_abs <= self.atol + self.rtol * ref_max_abs

    def to_dict(self) -> dict:
        return asdict(self)


# Defaults per deployment dtype, relative to the largest reference magnitude. float64 checks
# that the rewrite is exact up to rounding; the others leave room for that dtype's own rounding.
DEFAULT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=5e-2, atol=1e-2),
}


def default_tolerance(dtype: torch.dtype) -> Tolerance:
    if dtype not in DEFAULT_TOLERANCES:
        raise VerificationError(f"no default tolerance for {dtype}; pass rtol and atol")
    return DEFAULT_TOLERANCES[dtype]


@dataclass(frozen=True)
class ErrorMetrics:
    """How far a candidate output is from the float64 reference."""

    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    sqnr_db: float
    ref_max_abs: float
    p50_abs: float = 0.0
    p90_abs: float = 0.0
    p99_abs: float = 0.0

    @classmethod
    def between(cls, reference: Tensor, candidate: Tensor) -> ErrorMetrics:
        if reference.shape != candidate.shape:
            raise VerificationError(
                f"output shapes differ: reference {list(reference.shape)}, "
                f"candidate {list(candidate.shape)}"
            )
        ref = reference.detach().to(torch.float64).reshape(-1)
        out = candidate.detach().to(torch.float64).reshape(-1)
        if ref.numel() == 0:
            return cls(0.0, 0.0, 0.0, 1.0, math.inf, 0.0)
        diff = (ref - out).abs()
        max_abs = _finite_max(diff)
        p50, p90, p99 = percentiles(diff, (0.5, 0.9, 0.99))
        ref_max = float(ref.abs().max())
        signal = float((ref * ref).sum())
        noise = float((diff * diff).sum())
        return cls(
            max_abs=max_abs,
            max_rel=_ratio(max_abs, ref_max),
            mean_abs=float(diff.mean()),
            cosine=_cosine(ref, out),
            sqnr_db=math.inf if noise == 0 else 10 * math.log10(signal / noise)
            if signal > 0 else -math.inf,
            ref_max_abs=ref_max,
            p50_abs=p50, p90_abs=p90, p99_abs=p99,
        )

    def to_dict(self) -> dict:
        return {k: json_float(v) for k, v in asdict(self).items()}


def _finite_max(diff: Tensor) -> float:
    # NaN anywhere in the candidate is infinitely wrong, not silently ignored by max().
    if bool(torch.isnan(diff).any()):
        return math.inf
    return float(diff.max())


def percentiles(values: Tensor, quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """Quantiles of a 1-D tensor by linear interpolation (numpy's default); NaN counts as inf.

    Sorts once (``torch.quantile`` refuses tensors of more than 2**24 elements).
    """
    ordered = torch.nan_to_num(values, nan=math.inf).sort().values
    last = ordered.numel() - 1
    out = []
    for q in quantiles:
        position = q * last
        low = math.floor(position)
        high = min(low + 1, last)
        lo, hi = float(ordered[low]), float(ordered[high])
        out.append(lo if hi == lo else lo + (hi - lo) * (position - low))
    return tuple(out)


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))


def json_float(value: float) -> float | str:
    """JSON has no inf/nan: spell them as strings."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def json_number(value: float | str | None) -> float:
    """A number as :func:`json_float` wrote it, back as a float (a missing one is nan)."""
    if isinstance(value, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(value, math.nan)
    return math.nan if value is None else float(value)


def min_rtol_to_pass(metrics: ErrorMetrics, atol: float) -> float:
    """The smallest ``rtol`` with which these metrics pass at the given ``atol``."""
    excess = metrics.max_abs - atol
    if excess <= 0:
        return 0.0
    return _ratio(excess, metrics.ref_max_abs)
