"""The equivalence report: one object, rendered as JSON (versioned), a terminal table,
Markdown or HTML (:mod:`repfuse.verify.render`).

JSON schema (``schema_version`` 3)::

    {
      "schema_version": 3,
      "passed": bool,
      "reference": str, "candidate": str,
      "deploy_dtype": "float32",
      "inputs": {"batches": int, "shapes": [[...], ...], "seed": int | null, "source": str,
                 "distribution": "normal" | "uniform" | null},
      "runs": [
        {"dtype": "float64" | deploy dtype,
         "tolerance": {"rtol": float, "atol": float},
         "passed": bool,
         "min_rtol_to_pass": float,
         "outputs": [{"name": str, "shape": [...], "passed": bool,
                      "metrics": {"max_abs", "max_rel", "mean_abs", "cosine", "sqnr_db",
                                  "ref_max_abs", "p50_abs", "p90_abs", "p99_abs"},
                      "baseline": {...same keys...} | null}]}
      ],
      "diagnosis": null | str,
      "first_divergence": null | {"kind": "rewrite" | "node" | "module" | "output",
                                  "pass": str | null, "node": str, "reference_node": str,
                                  "module_paths": [str], "max_abs": float, "max_rel": float},
      "localization": null | {"method": "provenance" | "module_paths" | "none",
                              "dtype": "float64", "tolerance": {"rtol", "atol"},
                              "compared": int, "note": str},
      "rewrites": [{"pass": str, "node": str, "reference_node": str, "module_paths": [str],
                    "max_abs": float, "max_rel": float, "passed": bool,
                    "includes": ["pass:node", ...]}],
      "modules": [{"module": str, "call": int, "max_abs": float, "max_rel": float,
                   "passed": bool, "same_structure": bool}]
    }

The float64 run compares reference and candidate both converted to float64. The deploy-dtype
run compares the candidate in its own dtype against the float64 reference; its ``baseline`` is
the unfused reference in that dtype against the same float64 reference, so a reader can tell
the dtype's own rounding from error the rewrite added. Non-finite numbers are the strings
``"inf"``, ``"-inf"``, ``"nan"``.

``diagnosis`` explains a failure that no rewrite caused: the tolerance is below the deployment
dtype's own noise (the unfused model in that dtype is as far from its float64 run as the
candidate is), or below the dtype's resolution. Localization is then not run.

Localization (:mod:`repfuse.verify.localize`) runs in float64 with the report's tolerance, by
default only when the outputs fail (``localization`` is null otherwise).
``rewrites`` lists, in the fused graph's topological order, each rewrite whose output is a node
of the fused graph, its error against the reference node it stands for (``includes``: earlier
rewrites folded into it); ``modules`` lists module outputs compared by path, for models
repfuse did not make (``same_structure``: same class and parameter shapes in both, the only
modules expected to match; a conv before its BatchNorm and the conv with it folded in differ
by design). ``first_divergence`` is null when everything compared is within tolerance;
otherwise it names the first diverging rewrite (``kind`` "rewrite", with its ``pass`` and the
original ``module_paths`` it replaced), an unrewritten node both graphs share ("node"), a
same-structure module ("module", with the reference modules upstream of it since the last
matching one as ``module_paths``), or, when nothing inside diverges, the first failing output
("output"). With module paths, a divergence is reported only when the outputs differ.

Version history: 1 had no ``first_divergence``, ``localization``, ``rewrites``, ``modules``,
``inputs.distribution`` or percentiles; 2 had no ``diagnosis`` and localized every time.
Reports written by the CLI or :func:`repfuse.convert` also carry a ``provenance`` section
(versions, command line, time, file hashes; see :mod:`repfuse.verify.render`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from repfuse.verify.compare import ErrorMetrics, Tolerance, json_float, min_rtol_to_pass
from repfuse.verify.localize import MODULE_PATHS, Localization

SCHEMA_VERSION = 3

# The resolution of each deployment dtype (machine epsilon), for the diagnosis.
_EPS = {"float64": 2.220446049250313e-16, "float32": 1.1920928955078125e-07,
        "float16": 9.765625e-04, "bfloat16": 7.8125e-03}
# A failing output whose error is within this factor of the dtype's own noise is noise.
_NOISE_FACTOR = 4.0


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
    localization: Localization | None = None

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.runs)

    @property
    def first_divergence(self) -> dict | None:
        """Where the candidate first departs from the reference (None when nothing does).

        Holds ``pass``, ``node`` and ``module_paths`` (see the module docstring).
        """
        located = self.localization.first if self.localization is not None else None
        if located is not None and not (self.localization.method == MODULE_PATHS
                                        and self.passed):
            return located.divergence()
        for run in self.runs:
            for output in run.outputs:
                if not output.passed:
                    return {"kind": "output", "pass": None, "node": output.name,
                            "reference_node": output.name, "module_paths": [],
                            "max_abs": json_float(output.metrics.max_abs),
                            "max_rel": json_float(output.metrics.max_rel), "run": run.dtype}
        return None

    @property
    def diagnosis(self) -> str | None:
        """Why the outputs fail when no rewrite is to blame, or None.

        The tolerance is below the deployment dtype's own noise when the unfused reference run
        in that dtype is as far from its float64 run as the candidate is (within a factor
        of 4), or when it is below the dtype's machine epsilon. A rewrite that is wrong shows
        errors far above that noise.
        """
        if self.passed:
            return None
        failing = [o for run in self.runs for o in run.outputs if not o.passed]
        worst = max(o.metrics.max_rel for o in failing)
        need = max(run.min_rtol_to_pass for run in self.runs)
        dtype = self.deploy_dtype
        noise = max((o.baseline.max_rel for run in self.runs for o in run.outputs
                     if o.baseline is not None), default=0.0)
        rtol = self.runs[0].tolerance.rtol
        suggestion = f"pass an rtol of at least {need:.1e}" if math.isfinite(need) else ""
        if noise > 0 and worst <= _NOISE_FACTOR * noise:
            return (f"the tolerance (rtol {rtol:g}) is below {dtype}'s own noise for this "
                    f"model: the unfused model in {dtype} is off by max rel {noise:.3e} from "
                    f"its float64 run, about as much as the candidate ({worst:.3e}); no rewrite "
                    f"is to blame; {suggestion}")
        eps = _EPS.get(dtype)
        if eps is not None and rtol < eps and worst <= 64 * eps:
            return (f"the tolerance (rtol {rtol:g}) is below {dtype}'s resolution (machine "
                    f"epsilon {eps:.3g}); the candidate's max rel {worst:.3e} is rounding; no "
                    f"rewrite is to blame; {suggestion}")
        return None

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
        loc = self.localization
        return {
            "schema_version": SCHEMA_VERSION, "passed": self.passed,
            "reference": self.reference, "candidate": self.candidate,
            "deploy_dtype": self.deploy_dtype, "inputs": self.inputs,
            "runs": [run.to_dict() for run in self.runs],
            "diagnosis": self.diagnosis,
            "first_divergence": self.first_divergence,
            "localization": None if loc is None else loc.to_dict(),
            "rewrites": [] if loc is None else [c.to_dict() for c in loc.rewrites],
            "modules": [] if loc is None else [c.to_dict() for c in loc.modules],
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
        if self.diagnosis is not None:
            lines.append(f"  note: {self.diagnosis}")
        lines.extend(divergence_lines(self.to_dict()))
        return lines


def divergence_lines(data: dict) -> list[str]:
    """The localization verdict of a report dict in a line or two (none for an approximate
    result not localized: it departs from the original by design, and its error is reported
    as such)."""
    located = data.get("localization")
    first = data.get("first_divergence")
    lines = []
    if data.get("approximate") and located is None:
        return lines
    if first is not None:
        where = {"rewrite": f"rewrite {first['pass']} at node '{first['node']}'",
                 "node": f"node '{first['node']}' (not rewritten)",
                 "module": f"module '{first['node']}'",
                 "output": f"{first['node']} " + (
                     "(nothing compared inside diverges)" if located is not None else
                     "(not localized)")}[first["kind"]]
        paths = ", ".join(first["module_paths"])
        label = "suspects" if first["kind"] == "module" else "original modules"
        lines.append(f"  first divergence: {where}"
                     + (f", {label} {paths}" if paths else "")
                     + f": max rel {fmt_e(first['max_rel'])}")
        if data.get("passed") and not data.get("approximate"):
            lines.append("  (the outputs still match on these inputs: the difference is masked "
                         "downstream, e.g. by a ReLU, and may show on other inputs)")
    elif located is not None and located["method"] == "provenance":
        lines.append(f"  localized by provenance: {located['compared']} activations compared "
                     "in float64, all within tolerance")
    elif located is not None and located["method"] == "module_paths":
        differ = sum(1 for m in data.get("modules", []) if not m["passed"])
        lines.append(f"  localized by module paths: {located['compared']} module outputs "
                     f"compared in float64; {differ} differ where the models' structure "
                     "differs, none where it is the same")
    if located is not None and located.get("note"):
        lines.append(f"  note: {located['note']}")
    return lines


def fmt_e(value: float | str) -> str:
    """A number as :func:`json_float` wrote it, in scientific notation (``1.234e-05``)."""
    return value if isinstance(value, str) else f"{value:.3e}"
