"""The equivalence report: one object, rendered as JSON (versioned) or a terminal table.

JSON schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "passed": bool,
      "reference": str, "candidate": str,
      "deploy_dtype": "float32",
      "inputs": {"batches": int, "shapes": [[...], ...], "seed": int, "source": str},
      "runs": [
        {"dtype": "float64" | deploy dtype,
         "tolerance": {"rtol": float, "atol": float},
         "passed": bool,
         "min_rtol_to_pass": float,
         "outputs": [{"name": str, "shape": [...], "passed": bool,
                      "metrics": {"max_abs", "max_rel", "mean_abs", "cosine", "sqnr_db",
                                  "ref_max_abs"},
                      "baseline": {...same keys...} | null}]}
      ]
    }

The float64 run compares reference and candidate both converted to float64. The deploy-dtype
run compares the candidate in its own dtype against the float64 reference; its ``baseline`` is
the unfused reference in that dtype against the same float64 reference, so a reader can tell
the dtype's own rounding from error the rewrite added. Non-finite numbers are the strings
``"inf"``, ``"-inf"``, ``"nan"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from repfuse.verify.compare import ErrorMetrics, Tolerance, json_float, min_rtol_to_pass

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    metrics: ErrorMetrics
    passed: bool
    baseline: ErrorMetrics | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "passed": self.passed,
            "metrics": self.metrics.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
        }


@dataclass(frozen=True)
class RunComparison:
    """Reference vs candidate in one dtype."""

    dtype: str
    tolerance: Tolerance
    outputs: tuple[OutputComparison, ...]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def worst(self) -> ErrorMetrics:
        return max((o.metrics for o in self.outputs), key=lambda m: m.max_rel)

    @property
    def min_rtol_to_pass(self) -> float:
        return max(min_rtol_to_pass(o.metrics, self.tolerance.atol) for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype, "tolerance": self.tolerance.to_dict(), "passed": self.passed,
            "min_rtol_to_pass": json_float(self.min_rtol_to_pass),
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass
class EquivalenceReport:
    """The verdict on whether ``candidate`` computes what ``reference`` computes."""

    reference: str
    candidate: str
    deploy_dtype: str
    runs: list[RunComparison]
    inputs: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.runs)

    def run(self, dtype: str) -> RunComparison:
        for run in self.runs:
            if run.dtype == dtype:
                return run
        raise KeyError(f"no {dtype} run in this report (runs: {[r.dtype for r in self.runs]})")

    @property
    def float64(self) -> RunComparison:
        return self.run("float64")

    @property
    def deploy(self) -> RunComparison:
        return self.run(self.deploy_dtype)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "passed": self.passed,
            "reference": self.reference, "candidate": self.candidate,
            "deploy_dtype": self.deploy_dtype, "inputs": self.inputs,
            "runs": [run.to_dict() for run in self.runs],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary_lines(self) -> list[str]:
        """A few plain lines: verdict, worst error per run and the tolerance that would pass."""
        verdict = "EQUIVALENT" if self.passed else "NOT EQUIVALENT"
        lines = [f"{verdict}: {self.candidate} vs {self.reference}"]
        for run in self.runs:
            worst = run.worst
            status = "ok" if run.passed else "FAIL"
            lines.append(
                f"  {run.dtype:>8}: {status}  max rel {worst.max_rel:.3e}  max abs "
                f"{worst.max_abs:.3e}  SQNR {worst.sqnr_db:.1f} dB  (rtol {run.tolerance.rtol:g}, "
                f"atol {run.tolerance.atol:g}; passes with rtol >= {run.min_rtol_to_pass:.3e})"
            )
        return lines
