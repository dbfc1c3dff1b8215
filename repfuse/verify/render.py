"""One report, four renderings: terminal (rich), JSON, Markdown, a self-contained HTML page.

The report is one dict, the JSON: :meth:`EquivalenceReport.to_dict` (``repfuse verify``),
:meth:`repfuse.convert.Conversion.report_dict` (``convert`` and ``inspect``, with a
``conversion`` section), :meth:`repfuse.bench.BenchResult.to_dict` (``bench``), or any of those
objects itself. Its ``kind`` (``verify``, ``convert``, ``inspect``, ``bench``, ``quant``) says
which sections apply. A report with an ``approximate`` section (a rewrite that is not exact,
e.g. ``prune_below``) has the verdict APPROXIMATE in every rendering, never EQUIVALENT; a
``quant`` section (the quantization readiness report, :mod:`repfuse.quant.render` makes its
rows and chart) is drawn wherever it is present.

A *section* turns the dict into renderer-neutral blocks (text, lines, tables, a chart); each
renderer draws blocks in its own way. A block is shown everywhere, or only in the terminal (a
compact form: the first declines, the worst rows) or only in files (every row). The sections
are one ordered list, :data:`SECTIONS`: a new part of a report is one :class:`Section` there
(``register_section``), drawn by all four renderers. Keys no section knows are rendered
generically (key/value tables, lists of records as tables), so a rendering never hides what the
JSON holds.

The HTML page has no scripts and loads nothing: inline CSS, and an inline SVG chart of the
maximum relative error at each rewrite (or module), labelled by module path, on a log scale with
the tolerance as a dashed line. Nothing is collapsed, so a printout shows everything; it is laid
out for a printed page (checked in headless Chromium by ``scripts/screenshot-report``).
:func:`write_report` picks the rendering from the file's extension.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text as RichText

from repfuse.errors import RepfuseError
from repfuse.io import write_text
from repfuse.quant import render as quant_render
from repfuse.verify.compare import json_number
from repfuse.verify.report import divergence_lines, fmt_e

REPORT_SUFFIXES = (".json", ".md", ".html")
KINDS = ("convert", "inspect", "verify", "bench", "quant")
ALL, TERMINAL, FILE = "all", "terminal", "file"


def as_report_dict(report: Any) -> dict:
    """The report's dict, from a dict, a Conversion, a BenchResult or an EquivalenceReport."""
    if isinstance(report, dict):
        return report
    if hasattr(report, "report_dict"):
        return report.report_dict()
    return report.to_dict()


def kind_of(data: dict) -> str:
    """Which report ``data`` is: its ``kind``, or what its sections say."""
    if data.get("kind") in KINDS:
        return data["kind"]
    if "models" in data and "batches" in data:
        return "bench"
    if "conversion" in data and "quant" in data and "runs" not in data:
        return "quant"
    if "conversion" in data:
        return "convert" if "runs" in data else "inspect"
    return "verify"


def check_report_path(path: str | Path) -> Path:
    """``path`` as a Path if its extension names a rendering, else a one-line error."""
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise RepfuseError(f"unsupported report type '{path.suffix}' for '{path}' "
                           f"(use {', '.join(REPORT_SUFFIXES)})")
    return path


def render(report: Any, suffix: str) -> str:
    """The report rendered for a file with ``suffix`` (``.json``, ``.md`` or ``.html``)."""
    renderers: dict[str, Callable[[Any], str]] = {
        ".json": render_json, ".md": render_markdown, ".html": render_html,
    }
    if suffix.lower() not in renderers:
        raise RepfuseError(f"unsupported report type '{suffix}' (use "
                           f"{', '.join(REPORT_SUFFIXES)})")
    return renderers[suffix.lower()](report)


def write_report(path: str | Path, report: Any) -> Path:
    """Write the report to ``path`` (atomically), rendered by its extension."""
    path = check_report_path(path)
    write_text(path, render(report, path.suffix))
    return path


def render_json(report: Any) -> str:
    return json.dumps(as_report_dict(report), indent=2)


# --- blocks -------------------------------------------------------------------------------------


@dataclass
class Text:
    """A paragraph. ``style``: ``""``, ``ok``, ``fail``, ``note``, ``muted``, ``verdict`` or
    ``approx`` (the APPROXIMATE banner)."""

    text: str
    style: str = ""
    where: str = ALL
    id: str | None = None  # an HTML id


@dataclass
class Lines:
    """A few lines (a list in files)."""

    lines: list[str]
    style: str = ""
    where: str = ALL


@dataclass
class Table:
    """A table. ``bad`` marks rows drawn as failures; ``terminal_columns`` picks the columns
    that fit a terminal (all by default)."""

    header: list[str]
    rows: list[list[Any]]
    title: str = ""
    caption: str = ""
    bad: list[bool] | None = None
    where: str = ALL
    terminal_columns: list[int] | None = None


@dataclass
class Chart:
    """The error chart (HTML only): ``max_rel`` per row against the tolerance ``rtol``."""

    rows: list[dict]
    rtol: float
    title: str
    where: str = field(default=FILE, init=False)


@dataclass
class Figure:
    """An SVG figure drawn from the report dict elsewhere (HTML only), under ``title``."""

    svg: str
    title: str
    where: str = field(default=FILE, init=False)


Block = Text | Lines | Table | Chart | Figure


@dataclass(frozen=True)
class Section:
    """A part of a report: its title in files, the report kinds it belongs to, and the
    function that makes its blocks from the report dict (none: the section is left out, with
    its heading)."""

    key: str
    title: str
    blocks: Callable[[dict], list[Block]]
    kinds: frozenset[str] = field(default_factory=lambda: frozenset(KINDS))


# --- shared pieces ------------------------------------------------------------------------------


def verdict(data: dict) -> str:
    """EQUIVALENT or NOT EQUIVALENT; APPROXIMATE for a result with approximate rewrites,
    whatever its error (an approximation is never called equivalent)."""
    if data.get("approximate"):
        return "APPROXIMATE"
    return "EQUIVALENT" if data.get("passed") else "NOT EQUIVALENT"


def _verdict_style(data: dict) -> str:
    """How the verdict is drawn: ``ok`` or ``fail``, ``note`` for an approximate result."""
    if data.get("approximate"):
        return "note"
    return "ok" if data.get("passed") else "fail"


def _status(passed: bool, data: dict) -> str:
    """An output's or run's result word: ``ok``/``FAIL``, or ``not exact`` in an approximate
    report without a tolerance (its error is a measurement, not a failure)."""
    if passed:
        return "ok"
    approximate = data.get("approximate") or {}
    return "not exact" if approximate and approximate.get("tolerance") is None else "FAIL"


def fmt(value: Any) -> str:
    """A value as a reader wants it: ints with separators, floats to 4 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            return json.dumps(value)
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _is_number(value: Any) -> bool:
    """An int or float (a bool is a yes/no, not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape(shape: Iterable[int]) -> str:
    return "×".join(str(s) for s in shape)


def _modules_or_node(record: dict) -> str:
    """Where a rewrite or a decline is: its original module paths, or its node without any."""
    return ", ".join(record.get("module_paths", [])) or record["node"]


def _declined_per_pass(conversion: dict) -> dict[str, int]:
    declined: dict[str, int] = {}
    for d in conversion.get("declined", []):
        declined[d["pass"]] = declined.get(d["pass"], 0) + 1
    return declined


def module_label(paths: list[str], limit: int = 48) -> str:
    """A short label for the original modules a rewrite replaced: ``layer2.0.conv1`` for one,
    ``layer2.0: conv1, bn1`` for several in one block, ``stage1.0: conv, bn +3 more`` when the
    names would not fit in ``limit`` characters (whole names only, never cut)."""
    if not paths:
        return ""
    if len(paths) == 1:
        return paths[0]
    common = _common_parent(paths)
    head = ".".join(common) + ": " if common else ""
    rest = [".".join(p.split(".")[len(common):]) for p in paths]
    for shown in range(len(rest), 0, -1):
        more = f" +{len(rest) - shown} more" if shown < len(rest) else ""
        label = head + ", ".join(rest[:shown]) + more
        if len(label) <= limit:
            return label
    return head + f"{len(rest)} modules"


def _common_parent(paths: list[str]) -> list[str]:
    """The leading parts of the dotted ``paths`` that all share, short of the last part of the
    shortest (each path keeps a name of its own): ``["layer2", "0"]`` for ``layer2.0.conv1``
    and ``layer2.0.bn1``, and for ``layer2.0.conv1`` alone."""
    split = [p.split(".") for p in paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return common[:min(len(s) for s in split) - 1]


# --- the sections -------------------------------------------------------------------------------


def _title(data: dict) -> str:
    title = _kind_title(data)
    return f"{title} (APPROXIMATE)" if data.get("approximate") else title


def _kind_title(data: dict) -> str:
    kind = kind_of(data)
    if kind == "bench":
        return f"repfuse bench: {data.get('model')}"
    if kind == "inspect":
        return f"repfuse inspect: {data.get('model')}"
    if kind == "quant":
        return f"repfuse quant-report: {data.get('model')}"
    return f"repfuse report: {data.get('candidate')} vs {data.get('reference')}"


def _header(data: dict) -> list[Block]:
    kind = kind_of(data)
    blocks: list[Block] = []
    conversion = data.get("conversion") or {}
    if kind in ("convert", "inspect", "quant"):
        shapes = conversion.get("input_shapes") or data.get("inputs", {}).get("shapes") or []
        shown = ", ".join(str(list(s)) for s in shapes)
        blocks.append(Text(f"[bold]{data.get('source') or data.get('model')}[/]  input {shown}  "
                           f"({conversion.get('seconds', 0):.2f} s to fuse)", where=TERMINAL))
        if kind == "quant":
            quant = data.get("quant") or {}
            blocks.append(Text(f"{data.get('source') or data.get('model')} · input {shown} · "
                               f"{len(quant.get('layers', []))} conv/linear layers after fusion "
                               f"· quant report schema {quant.get('schema_version')}", "muted",
                               where=FILE))
    if kind == "bench":
        info = f"torch {data.get('torch')}, {data.get('threads')} threads"
        shapes = ", ".join(str(s) for s in data.get("input_shapes", []))
        blocks.append(Text(f"[bold]{data.get('source') or data.get('model')}[/]  input {shapes}"
                           f"  ({data.get('convert_seconds', 0):.2f} s to fuse; {info})",
                           where=TERMINAL))
    if kind in ("convert", "verify") and "runs" in data:
        blocks.append(Text(verdict(data), "verdict", where=FILE, id="verdict"))
        details = [f"deployment dtype {data.get('deploy_dtype')}",
                   f"report schema {data.get('schema_version')}"]
        blocks.append(Text(" · ".join(details), "muted", where=FILE))
        if kind == "verify":
            blocks.append(Text(f"[bold]{verdict(data)}[/]: {data.get('candidate')} vs "
                               f"{data.get('reference')}  (deployment dtype "
                               f"{data.get('deploy_dtype')})", _verdict_style(data),
                               where=TERMINAL))
    return blocks


def _approximate(data: dict) -> list[Block]:
    """The APPROXIMATE banner: which rewrites are not exact, the error they cost against the
    original in float64, and whether that passes (see :class:`repfuse.convert.Approximation`)."""
    approx = data.get("approximate")
    if not approx:
        return []
    rewrites = approx.get("rewrites", [])
    banner = (f"APPROXIMATE, not exact: {len(rewrites)} rewrite(s) by "
              f"{', '.join(approx.get('passes', []))} change what the model computes; "
              f"measured against the original run in float64: max rel error "
              f"{fmt_e(approx['max_rel_error'])}, max abs error {fmt_e(approx['max_abs_error'])}")
    measured = approx.get("measured_on") or {}
    errors = "; ".join(f"{e['dtype']}: max rel {fmt_e(e['max_rel'])}, max abs "
                       f"{fmt_e(e['max_abs'])}, SQNR {quant_render.db(e['sqnr_db'])} dB"
                       for e in approx.get("errors", []))
    lines = [f"measured on {measured.get('batches')} batch(es) ({measured.get('source')}): "
             f"{errors}"]
    tolerance = approx.get("tolerance")
    if tolerance is None:
        lines.append("no tolerance given: the approximation is accepted with this error (exit "
                     "0); --rtol/--atol set the error to accept")
    else:
        within = "within" if approx.get("within_tolerance") else "OUTSIDE"
        lines.append(f"{within} the tolerance given (rtol {fmt(tolerance['rtol'])}, atol "
                     f"{fmt(tolerance['atol'])})")
    rows = [[r["pass"], _modules_or_node(r), r["detail"]] for r in rewrites]
    return [Text(banner, "approx", id="approximate"), Lines(lines, "note"),
            Table(["pass", "original modules", "what"], rows, title="approximate rewrites",
                  where=FILE)]


def _quant(data: dict) -> list[Block]:
    """The quantization readiness report: summary, simulated INT8 forms, the per-layer weight
    SQNR (table and chart) and activation ranges. The tables are in the terminal too for
    ``repfuse quant-report``; a conversion's terminal shows the summary."""
    quant = data.get("quant")
    if not quant:
        return []
    where = ALL if kind_of(data) == "quant" else FILE
    lines = list(quant_render.summary_lines(quant))
    if quant.get("calibration"):
        lines.append(f"calibration: {quant['calibration']} ({quant['batches']} batch(es))")
    else:
        lines.append("no calibration inputs: weight figures only (--inputs adds activation "
                     "ranges and the simulated INT8 model)")
    blocks: list[Block] = [Lines(lines, "note")]
    if quant.get("forms"):
        header, rows = quant_render.form_rows(quant)
        blocks.append(Table(header, rows, title="simulated INT8, end to end (SQNR against "
                                                 "float64)", where=where))
    blocks.append(Figure(quant_render.sqnr_chart_svg(quant, width=700, height=340),
                         "INT8 weight SQNR per layer"))
    header, rows = quant_render.layer_rows(quant)
    blocks.append(Table(header, rows, title="INT8 weight SQNR per layer (symmetric, computed "
                                             "by quantizing)",
                        bad=[bool(layer["flags"]) for layer in quant["layers"]], where=where))
    if quant.get("activations"):
        header, rows = quant_render.activation_rows(quant)
        blocks.append(Table(header, rows, title="activations (calibration inputs)",
                            where=where))
    declined = (quant.get("equalization") or {}).get("declined", [])
    if declined:
        blocks.append(Table(["equalize left alone", "why"],
                            [[_modules_or_node(d), d["reason"]] for d in declined],
                            where=FILE))
    return blocks


def _notes(data: dict) -> list[Block]:
    notes = list(data.get("notes") or [])
    return [Lines([f"note: {n}" for n in notes], "note")] if notes else []


def _capture(data: dict) -> list[Block]:
    conversion = data.get("conversion") or data.get("capture") or {}
    lines = []
    if conversion.get("partial"):
        parts = ", ".join(f"'{p}'" for p in conversion.get("parts", [])) or "none"
        lines.append(f"partial capture: traced and fused {len(conversion.get('parts', []))} "
                     f"part(s) ({parts}); kept {len(conversion.get('skipped', []))} eager:")
        for s in conversion.get("skipped", []):
            where = f"'{s['path']}' ({s['module']})" if s["path"] else f"the model ({s['module']})"
            lines.append(f"  {where}: {s['reason']}")
    if conversion.get("specialized"):
        lines.append("specialized to the example input's shapes (the fused model checks them):")
        lines += [f"  {d}" for d in conversion["specialized"]]
    if conversion.get("dropped_hooks"):
        lines.append("dropped forward hooks of: " + ", ".join(conversion["dropped_hooks"]))
    return [Lines(lines, "note")] if lines else []


def _passes(data: dict) -> list[Block]:
    conversion = data.get("conversion") or {}
    counts = conversion.get("counts", {})
    if not counts:
        return []
    declined = _declined_per_pass(conversion)
    by_pass = {row["pass"]: row for row in (conversion.get("cost") or {}).get("by_pass", [])}
    rows = [[p, counts.get(p, 0), declined.get(p, 0), by_pass.get(p, {}).get("macs"),
             by_pass.get(p, {}).get("bytes")] for p in counts]
    # inspect's terminal view lists the rewrites by block instead
    return [Table(["pass", "rewrites", "declined", "MACs", "bytes moved"], rows,
                  title="passes (MACs and bytes after each pass's rewrites)",
                  where=ALL if kind_of(data) == "convert" else FILE)]


def _rewrites_applied(data: dict) -> list[Block]:
    rewrites = (data.get("conversion") or {}).get("rewrites", [])
    if not rewrites:
        return []
    rows = [[i + 1, r["pass"], ", ".join(r["module_paths"]), r.get("module") or "–",
             r.get("detail", "")] for i, r in enumerate(rewrites)]
    return [Table(["#", "pass", "original modules", "new module", "what"], rows,
                  where=FILE)]


def _declined(data: dict, limit: int = 5) -> list[Block]:
    declined = (data.get("conversion") or {}).get("declined", [])
    if not declined:
        return []
    blocks: list[Block] = []
    if kind_of(data) == "convert":
        lines = [f"  declined by {d['pass']}: {d['reason']}" for d in declined[:limit]]
        if len(declined) > limit:
            lines.append(f"  ... and {len(declined) - limit} more (see `repfuse inspect`)")
        blocks.append(Lines(lines, where=TERMINAL))
    rows = [[d["pass"], _modules_or_node(d), d["reason"]] for d in declined]
    blocks.append(Table(["pass", "where", "reason"], rows, where=FILE))
    return blocks


def _blocks(data: dict) -> list[Block]:
    """``inspect``'s view: rewrites and declines grouped by block (the common parent of their
    module paths). A rewrite belongs to the block of the last rewrite that consumed its result,
    so BN folds inside a branch show under the block whose branches were merged."""
    conversion = data.get("conversion") or {}
    rewrites, declined = conversion.get("rewrites", []), conversion.get("declined", [])
    block_by_node: dict[str, str] = {}
    owners = []
    for rewrite in reversed(rewrites):
        block = block_by_node.get(rewrite["node"], _block_of(rewrite["module_paths"]))
        for name in rewrite["replaced"]:
            block_by_node.setdefault(name, block)
        owners.append(block)
    grouped: dict[str, list[str]] = {}
    for rewrite, block in zip(rewrites, reversed(owners), strict=True):
        target = f" -> {rewrite['module']}" if rewrite.get("module") else ""
        grouped.setdefault(block, []).append(
            f"  [green]{rewrite['pass']}[/]: {rewrite['detail']}{target}")
    for decline in declined:
        grouped.setdefault(_block_of(decline.get("module_paths", [])), []).append(
            f"  [yellow]declined by {decline['pass']}[/]: {decline['reason']}")
    if not grouped:
        return [Text("nothing to rewrite", where=TERMINAL)]
    lines = []
    for block, entries in grouped.items():
        lines.append(f"[bold]{block or '(top level)'}[/]")
        lines += entries
    return [Lines(lines, where=TERMINAL)]


def _block_of(module_paths: list[str]) -> str:
    return ".".join(_common_parent(module_paths)) if module_paths else ""


def _not_mergeable(data: dict) -> list[Block]:
    groups = (data.get("conversion") or {}).get("not_mergeable", [])
    if not groups:
        return []
    counted = ", ".join(f"{g['count']} {g['op']}" for g in groups)
    lines = [f"not mergeable exactly (they stay): {counted}"]
    for kind in dict.fromkeys(g["kind"] for g in groups):
        lines.append("  " + next(g["reason"] for g in groups if g["kind"] == kind))
    rows = [[g["op"], g["count"], g["reason"]] for g in groups]
    return [Lines(lines, where=TERMINAL),
            Table(["op", "count", "why it stays"], rows, where=FILE)]


def _cost(data: dict) -> list[Block]:
    cost = (data.get("conversion") or {}).get("cost") or {}
    if not cost.get("before"):
        return []
    before, after = cost["before"], cost.get("after") or {}
    terminal = []
    ops_b, ops_a = before.get("ops", {}), after.get("ops", {})
    for op in sorted(set(ops_b) | set(ops_a)):
        if ops_b.get(op, 0) != ops_a.get(op, 0):
            terminal.append([op, ops_b.get(op, 0), ops_a.get(op, 0)])
    terminal += [["ops (all)", sum(ops_b.values()), sum(ops_a.values())],
                 ["params", before.get("params"), after.get("params")],
                 ["MACs", before.get("macs"), after.get("macs")],
                 ["bytes moved", before.get("bytes"), after.get("bytes")]]
    return [Table(["", "before", "after"], terminal, title="cost", where=TERMINAL),
            Table(["", "before", "after", "change"], _cost_rows(cost), where=FILE)]


def _cost_rows(cost: dict) -> list[list[Any]]:
    """Rows ``[quantity, before, after, change]`` from a ``{"before": {...}, "after": {...}}``
    cost, whatever quantities it holds (nested mappings such as op counts are flattened)."""
    before, after = cost.get("before") or {}, cost.get("after") or {}
    rows = []
    for key in dict.fromkeys([*before, *after]):
        b, a = before.get(key), after.get(key)
        if isinstance(b, dict) or isinstance(a, dict):
            b, a = b or {}, a or {}
            for sub in sorted(dict.fromkeys([*b, *a])):
                rows.append(_change_row(f"{key}: {sub}", b.get(sub, 0), a.get(sub, 0)))
        else:
            rows.append(_change_row(key, b, a))
    return rows


def _change_row(name: str, before: Any, after: Any) -> list[Any]:
    numeric = _is_number(before) and _is_number(after)
    return [name, before, after, after - before if numeric else None]


# The columns of the outputs table that fit a printed page, and the rest (a second table).
_MAIN_COLUMNS = [0, 1, 3, 4, 5, 6, 11, 12]
_DETAIL_COLUMNS = [0, 1, 2, 7, 8, 9, 10]


def _run_rows(data: dict) -> tuple[list[str], list[list[Any]]]:
    header = ["run", "output", "shape", "result", "max abs", "max rel", "mean abs", "p50 abs",
              "p90 abs", "p99 abs", "cosine", "SQNR dB", "baseline max rel"]
    rows = []
    for run in data.get("runs", []):
        for out in run.get("outputs", []):
            m = out.get("metrics", {})
            base = out.get("baseline") or {}
            rows.append([run["dtype"], out["name"], _shape(out["shape"]),
                         _status(out["passed"], data), m.get("max_abs"), m.get("max_rel"),
                         m.get("mean_abs"), m.get("p50_abs"), m.get("p90_abs"),
                         m.get("p99_abs"), m.get("cosine"), m.get("sqnr_db"),
                         base.get("max_rel")])
    return header, rows


def _tolerance_lines(data: dict) -> list[str]:
    lines = []
    for run in data.get("runs", []):
        tol = run.get("tolerance", {})
        if _status(run.get("passed"), data) == "not exact":  # no tolerance was applied
            lines.append(f"{run['dtype']}: not exact; within rtol ≥ "
                         f"{fmt(run.get('min_rtol_to_pass'))}")
            continue
        lines.append(f"{run['dtype']}: {_status(run.get('passed'), data)} with rtol "
                     f"{fmt(tol.get('rtol'))}, atol {fmt(tol.get('atol'))}; passes with rtol ≥ "
                     f"{fmt(run.get('min_rtol_to_pass'))}")
    return lines


def _summary_lines(data: dict) -> list[str]:
    """The verdict and the worst error per run, in a few plain lines (``convert``)."""
    lines = [f"{verdict(data)}: {data.get('candidate')} vs {data.get('reference')}"]
    for run in data.get("runs", []):
        worst = max(run["outputs"], key=lambda o: _sortable(o["metrics"]["max_rel"]))["metrics"]
        tol = run["tolerance"]
        status = _status(run["passed"], data)
        applied = "" if status == "not exact" else f"rtol {tol['rtol']:g}, atol {tol['atol']:g}; "
        lines.append(
            f"  {run['dtype']:>8}: {status}  max rel {fmt_e(worst['max_rel'])}  max abs "
            f"{fmt_e(worst['max_abs'])}  SQNR {quant_render.db(worst['sqnr_db'])} dB  "
            f"({applied}passes with rtol >= {fmt_e(run['min_rtol_to_pass'])})")
    if data.get("diagnosis"):
        lines.append(f"  note: {data['diagnosis']}")
    lines += divergence_lines(data)
    return lines


def _outputs(data: dict) -> list[Block]:
    if "runs" not in data:
        return []
    header, rows = _run_rows(data)
    bad = [r[3] == "FAIL" for r in rows]
    tolerances = _tolerance_lines(data)
    blocks: list[Block] = []
    if kind_of(data) == "convert":
        blocks.append(Lines(_summary_lines(data), _verdict_style(data), where=TERMINAL))
    else:
        blocks += [Table(header, rows, title="outputs", bad=bad, where=TERMINAL,
                         terminal_columns=[0, 1, 3, 4, 5, 9, 11, 12]),
                   Lines([f"  {line}" for line in tolerances], where=TERMINAL)]
    for columns, caption in ((_MAIN_COLUMNS, "baseline max rel: the unfused model in the same "
                                             "dtype against its float64 run"),
                             (_DETAIL_COLUMNS, "percentiles of |candidate − reference|")):
        blocks.append(Table([header[i] for i in columns], [[r[i] for i in columns] for r in rows],
                            caption=caption, bad=bad, where=FILE))
    blocks.append(Lines(tolerances, where=FILE))
    if data.get("diagnosis"):
        blocks.append(Text(f"note: {data['diagnosis']}", "note", where=FILE))
    return blocks


def _rewrite_rows(data: dict) -> tuple[list[str], list[list[Any]]]:
    header = ["#", "pass", "node", "stands for", "original modules", "max abs", "max rel",
              "result"]
    rows = [[i + 1, r["pass"], r["node"], r["reference_node"], ", ".join(r["module_paths"]),
             r["max_abs"], r["max_rel"], "ok" if r["passed"] else "FAIL"]
            for i, r in enumerate(data.get("rewrites", []))]
    return header, rows


def _module_rows(data: dict) -> tuple[list[str], list[list[Any]]]:
    header = ["#", "module", "call", "same structure", "max abs", "max rel", "result"]
    rows = [[i + 1, m["module"], m["call"], m["same_structure"], m["max_abs"], m["max_rel"],
             "ok" if m["passed"] else ("differs" if not m["same_structure"] else "FAIL")]
            for i, m in enumerate(data.get("modules", []))]
    return header, rows


def _localization(data: dict, limit: int = 25) -> list[Block]:
    located = data.get("localization")
    text = " ".join(line.strip() for line in divergence_lines(data))
    blocks: list[Block] = []
    if text:
        style = "fail" if data.get("first_divergence") else "muted"
        blocks.append(Text(text, style, where=FILE, id="first-divergence"))
    if not located:
        return blocks
    tol = located["tolerance"]
    blocks.append(Text(
        f"Method {located['method']}: {located['compared']} activations compared in "
        f"{located['dtype']} with rtol {fmt(tol['rtol'])}, atol {fmt(tol['atol'])}"
        + (f". Note: {located['note']}" if located.get("note") else "") + ".",
        where=FILE))
    chart_rows = data.get("rewrites") or data.get("modules") or []
    if chart_rows:
        what = "rewrite" if data.get("rewrites") else "module"
        blocks.append(Chart(chart_rows, tol["rtol"],
                            f"maximum relative error per {what} (float64), log scale"))
    for maker, key, keep in ((_rewrite_rows, "rewrites", [0, 1, 2, 6, 7]),
                             (_module_rows, "modules", [0, 1, 2, 3, 5, 6])):
        if not data.get(key):
            continue
        header, rows = maker(data)
        bad = [r[-1] == "FAIL" for r in rows]
        blocks.append(Table(header, rows, title=f"error per {key[:-1]}", bad=bad, where=FILE))
        shown = _most_telling(rows, limit)
        title = f"error per {key[:-1]} (float64)"
        if len(shown) < len(rows):
            title += f", {len(shown)} of {len(rows)}: failing and worst first"
        if kind_of(data) == "verify":
            blocks.append(Table(header, shown, title=title, bad=[r[-1] == "FAIL" for r in shown],
                                where=TERMINAL, terminal_columns=keep))
    return blocks


def _divergence_terminal(data: dict) -> list[Block]:
    if kind_of(data) != "verify":
        return []
    lines = [line.strip() for line in divergence_lines(data)]
    if data.get("diagnosis"):
        lines.append(f"note: {data['diagnosis']}")
    return [Lines(lines, _verdict_style(data), where=TERMINAL)] if lines else []


def _most_telling(rows: list[list[Any]], limit: int) -> list[list[Any]]:
    if len(rows) <= limit:
        return rows
    # rows end with max rel and the result
    ranked = sorted(rows, key=lambda r: (r[-1] != "FAIL", -_sortable(r[-2])))
    return sorted(ranked[:limit], key=lambda r: r[0])


def _sortable(value: Any) -> float:
    number = json_number(value)
    return math.inf if math.isnan(number) else number


def _exports(data: dict) -> list[Block]:
    exports = data.get("export") or []
    if not exports:
        return []
    lines, rows = [], []
    for e in exports:
        check = e.get("check") or {}
        run = (check.get("runs") or [{}])[-1]
        worst = max(run.get("outputs", [{"metrics": {}}]),
                    key=lambda o: _sortable(o["metrics"].get("max_rel")))["metrics"]
        tol = run.get("tolerance", {})
        status = "ok" if e["passed"] else "FAIL"
        how = e.get("run_by", e["format"])
        lines.append(f"{e['format']} {e['path']}: {status}  max rel {fmt_e(worst.get('max_rel'))}"
                     f"  max abs {fmt_e(worst.get('max_abs'))} in {run.get('dtype')} vs the "
                     f"float64 reference ({how}; rtol {tol.get('rtol'):g}, atol "
                     f"{tol.get('atol'):g})")
        if e.get("onnx_nodes"):
            lines.append("onnx nodes: " + describe_node_counts(e["onnx_nodes"]))
        rows.append([e["format"], e["path"], status, e["written"], worst.get("max_rel"),
                     run.get("dtype"), how, ", ".join(map(str, e.get("dynamic_axes", [])))])
    blocks: list[Block] = [
        Table(["format", "path", "check", "written", "max rel", "dtype", "loaded back with",
               "dynamic axes"], rows, bad=[r[2] == "FAIL" for r in rows], where=FILE)]
    for e in exports:
        if e.get("onnx_nodes"):
            counts = e["onnx_nodes"]
            ops = sorted({op for c in counts.values() for op in c})
            blocks.append(Table(["ONNX op", *counts], [[op, *(c.get(op, 0) for c in
                                                              counts.values())] for op in ops],
                                title=f"ONNX nodes of {e['path']}", where=FILE))
    style = "ok" if all(e["passed"] for e in exports) else "fail"
    return [Lines(lines, style, where=TERMINAL), *blocks]


def describe_node_counts(counts: dict) -> str:
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


def _outputs_written(data: dict) -> list[Block]:
    outputs = data.get("outputs") or []
    if not outputs:
        return []
    lines, rows = [], []
    for o in outputs:
        if o["written"] and o["kind"] == "report":
            lines.append(f"wrote report {o['path']}")
        elif o["written"]:
            suffix = " despite failed verification (--force)" if o.get("forced") else ""
            lines.append(f"[green]wrote {o['path']}[/]{suffix}" if not suffix else
                         f"[yellow]wrote {o['path']}{suffix}[/]")
        else:
            lines.append(f"[bold red]not written[/]: {o['reason']}")
        rows.append([o["path"], o["kind"], o["written"], o.get("sha256") or o.get("reason")])
    return [Lines(lines, where=TERMINAL),
            Table(["path", "what", "written", "SHA-256 (or why not written)"], rows,
                  where=FILE)]


def _inputs(data: dict) -> list[Block]:
    inputs = data.get("inputs")
    if not inputs:
        return []
    rows = [[k, [_shape(s) for s in v] if k == "shapes" else v] for k, v in inputs.items()]
    return [Table(["", ""], rows, where=FILE)]


def _provenance(data: dict) -> list[Block]:
    made = data.get("provenance")
    if not made:
        return []
    rows = [[k, v] for k, v in made.items() if k != "files"]
    blocks: list[Block] = [Table(["", ""], rows, where=FILE)]
    files = made.get("files") or []
    if files:
        blocks.append(Table(["file", "role", "SHA-256"],
                            [[f["path"], f["role"], f.get("sha256") or "–"] for f in files],
                            where=FILE))
    return blocks


def _bench(data: dict) -> list[Block]:
    rows = bench_rows(data)
    if not rows:
        return []
    return [Table(["", "original", "fused", "original/fused"], rows,
                  title=f"{data.get('model')}: original vs fused",
                  caption="original/fused above 1: the fused model is faster or smaller. "
                          "max rel error: each model against the original run in float64.")]


def bench_rows(data: dict) -> list[list[str]]:
    """The table of ``repfuse bench``: (metric, original, fused, original / fused), from its
    JSON (:meth:`repfuse.bench.BenchResult.to_dict`)."""
    rows: list[list[str]] = []
    for b in data.get("batches", []):
        latency = b["latency_ms"]
        rows.append(_ratio_row(f"latency, batch {b['batch']}: median ms",
                               latency["original"]["median_ms"], latency["fused"]["median_ms"],
                               "{:.3f}"))
        rows.append(_ratio_row(f"latency, batch {b['batch']}: min ms",
                               latency["original"]["min_ms"], latency["fused"]["min_ms"],
                               "{:.3f}"))
        errors = b["max_rel_error"]
        rows.append([f"max rel error, batch {b['batch']}", _e2(errors["original"]),
                     _e2(errors["fused"]), ""])
    models = data.get("models") or {}
    if not models:
        return rows
    shapes = data.get("input_shapes") or [[1]]
    batch = shapes[0][0] if shapes[0] else 1
    before, after = models["original"], models["fused"]
    for label, metric in (("params", "params"), (f"MACs, batch {batch}", "macs"),
                          (f"bytes moved, batch {batch}", "bytes"), ("ops (all)", "ops")):
        rows.append(_ratio_row(label, before[metric], after[metric], "{:,}"))
    for kind in before.get("ops_by_kind", {}):
        old, new = before["ops_by_kind"][kind], after["ops_by_kind"].get(kind, 0)
        if old or new:  # kinds neither model has would only be noise
            rows.append(_ratio_row(f"ops: {kind}", old, new, "{}"))
    return rows


def _ratio_row(label: str, original: float, fused: float, form: str) -> list[str]:
    ratio = "-" if not fused else f"{original / fused:.2f}x"
    return [label, form.format(original), form.format(fused), ratio]


def _e2(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.2e}"


_KNOWN = {"schema_version", "passed", "reference", "candidate", "deploy_dtype", "inputs", "runs",
          "first_divergence", "localization", "rewrites", "modules", "conversion", "kind",
          "diagnosis", "notes", "source", "model", "outputs", "export", "provenance",
          # bench
          "torch", "threads", "device", "dtype", "repeat", "warmup", "convert_seconds",
          "input_shapes", "capture", "models", "batches",
          "approximate", "quant"}
_KNOWN_CONVERSION = {"passes", "counts", "rewrites", "declined", "cost", "not_mergeable",
                     "partial", "parts", "skipped", "specialized", "dropped_hooks", "seconds",
                     "input_shapes"}


def _extra_sections(data: dict) -> list[tuple[str, Any]]:
    sections = [(key, value) for key, value in data.items() if key not in _KNOWN]
    conversion = data.get("conversion") or {}
    sections += [(f"conversion: {key}", value) for key, value in conversion.items()
                 if key not in _KNOWN_CONVERSION]
    cost = conversion.get("cost") or {}
    sections += [(f"cost: {key}", value) for key, value in cost.items()
                 if key not in ("before", "after", "by_pass")]
    return sections


def _generic(value: Any) -> list[Block]:
    if isinstance(value, dict):
        return [Table(["key", "value"], [[k, v] for k, v in value.items()], where=FILE)]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        header = list(dict.fromkeys(k for r in value for k in r))
        return [Table(header, [[r.get(k) for k in header] for r in value], where=FILE)]
    return [Text(fmt(value), where=FILE)]


def _kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


# The report, section by section, in order. A new section is one entry here.
SECTIONS: list[Section] = [
    Section("header", "", _header),
    Section("approximate", "Approximate: not exact", _approximate),
    Section("notes", "Notes", _notes),
    Section("capture", "Capture", _capture, _kinds("convert", "inspect", "bench", "quant")),
    # what a quant-report is about comes first; in a conversion's report, after the exports
    Section("quant", "Quantization readiness", _quant, _kinds("quant")),
    Section("blocks", "", _blocks, _kinds("inspect")),
    Section("passes", "Passes", _passes, _kinds("convert", "inspect", "quant")),
    Section("rewrites-applied", "Rewrites applied", _rewrites_applied,
            _kinds("convert", "inspect", "quant")),
    Section("declined", "Declined candidates", _declined, _kinds("convert", "inspect", "quant")),
    Section("not-mergeable", "Not mergeable exactly", _not_mergeable,
            _kinds("convert", "inspect")),
    Section("cost", "Op counts and cost", _cost, _kinds("convert", "inspect")),
    Section("outputs", "Outputs", _outputs, _kinds("convert", "verify")),
    Section("localization", "Localization", _localization, _kinds("convert", "verify")),
    Section("divergence", "", _divergence_terminal, _kinds("verify")),
    Section("export", "Exports", _exports, _kinds("convert")),
    Section("quantization", "Quantization readiness", _quant, _kinds("convert", "inspect")),
    Section("bench", "Original vs fused", _bench, _kinds("bench")),
    Section("written", "Files written", _outputs_written, _kinds("convert", "quant")),
    Section("inputs", "Inputs", _inputs, _kinds("convert", "verify")),
    Section("provenance", "Provenance", _provenance),
]


def register_section(section: Section, before: str | None = None) -> None:
    """Add ``section`` to every rendering, before the section keyed ``before`` (default: before
    the inputs and provenance, which end a report)."""
    keys = [s.key for s in SECTIONS]
    index = keys.index(before) if before is not None else keys.index("inputs")
    SECTIONS.insert(index, section)


def _sections(data: dict, where: str) -> list[tuple[Section, list[Block]]]:
    kind = kind_of(data)
    out = []
    for section in SECTIONS:
        if kind not in section.kinds:
            continue
        blocks = [b for b in section.blocks(data) if b.where in (ALL, where)]
        if blocks:
            out.append((section, blocks))
    if where == FILE:
        for name, value in _extra_sections(data):
            out.append((Section(name, name, lambda d: []), _generic(value)))
    return out


# --- Markdown -----------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", table.caption]
    return lines + [""]


def _plain(text: str) -> str:
    """Text without rich markup (``[bold]...[/]``)."""
    return RichText.from_markup(text).plain


def render_markdown(report: Any) -> str:
    data = as_report_dict(report)
    lines = [f"# {_title(data)}", ""]
    for section, blocks in _sections(data, FILE):
        if section.title:
            lines += [f"## {section.title}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Lines):
                lines += [f"- {_plain(line).strip()}" for line in block.lines] + [""]
            elif isinstance(block, Text):
                text = _plain(block.text)
                lines += [f"**{text}**" if block.style in ("approx", "verdict") else text, ""]
    return "\n".join(lines).rstrip() + "\n"


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.verdict { font-size: 1.6em; font-weight: 700; padding: .3em .8em; border-radius: 6px;
           display: inline-block; margin: .2em 0; }
.verdict.pass { background: #e3f6e8; color: #11612b; }
.verdict.fail { background: #fde7e7; color: #9b1c1c; }
.verdict.approx { background: #fff1d6; color: #7a4a00; }
p.approx { border: 2px solid #d98c00; background: #fff7e6; color: #5c3800; font-weight: 700;
           padding: .4em .8em; border-radius: 4px; }
.fail { color: #9b1c1c; } .ok { color: #11612b; } .note { color: #7a5200; }
p.fail { border-left: 4px solid #c0392b; padding: .3em .8em; background: #fff5f4; }
.muted { color: #666; }
table { border-collapse: collapse; margin: .6em 0; font-size: 12px; max-width: 100%; }
caption { caption-side: bottom; text-align: left; color: #666; padding-top: .3em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums;
                                     white-space: nowrap; }
tr.bad td { background: #fff0f0; }
ul { padding-left: 1.2em; } li { overflow-wrap: anywhere; }
.chart { display: block; max-width: 100%; height: auto; }
.chart text { font: 11px system-ui, sans-serif; fill: #333; }
@media print {
  body { margin: 0; max-width: none; padding: 0; font-size: 11px; }
  table { font-size: 10px; } th, td { padding: 1px 4px; }
  h2 { break-after: avoid; } tr, svg { break-inside: avoid; }
}
"""


def _h(value: Any) -> str:
    return html.escape(fmt(value))


def _html_table(table: Table) -> str:
    out = ["<table>"]
    if table.title:
        out.append(f"<caption style='caption-side: top'>{html.escape(table.title)}</caption>")
    header = table.header if any(table.header) else None
    if header:
        out += ["<thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header),
                "</tr></thead>"]
    out.append("<tbody>")
    for index, row in enumerate(table.rows):
        flag = ' class="bad"' if table.bad is not None and table.bad[index] else ""
        cells = "".join(
            f'<td class="num">{_h(c)}</td>' if _is_number(c) else f"<td>{_h(c)}</td>"
            for c in row
        )
        out.append(f"<tr{flag}>{cells}</tr>")
    out.append("</tbody></table>")
    if table.caption:
        out.append(f'<p class="muted">{html.escape(table.caption)}</p>')
    return "".join(out)


def _html_block(block: Block) -> str:
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Chart):
        return (f"<h3>{html.escape(block.title[0].upper() + block.title[1:])}</h3>"
                + error_chart_svg(block.rows, block.rtol))
    if isinstance(block, Figure):
        return f"<h3>{html.escape(block.title)}</h3>{block.svg}"
    if isinstance(block, Lines):
        style = f' class="{block.style}"' if block.style else ""
        items = "".join(f"<li>{html.escape(_plain(line).strip())}</li>" for line in block.lines)
        return f"<ul{style}>{items}</ul>"
    ident = f' id="{block.id}"' if block.id else ""
    if block.style == "verdict":
        return f'<p{ident} class="verdict {_verdict_class(block.text)}">' \
               f"{html.escape(block.text)}</p>"
    style = f' class="{block.style}"' if block.style else ""
    return f"<p{ident}{style}>{html.escape(_plain(block.text))}</p>"


def _verdict_class(text: str) -> str:
    return {"EQUIVALENT": "pass", "APPROXIMATE": "approx"}.get(text, "fail")


def render_html(report: Any) -> str:
    data = as_report_dict(report)
    title = _title(data)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section, blocks in _sections(data, FILE):
        if section.title:
            parts.append(f'<h2 id="{html.escape(section.key)}">{html.escape(section.title)}</h2>')
        parts += [_html_block(b) for b in blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def error_chart_svg(rows: list[dict], rtol: float, width: int = 700) -> str:
    """An inline SVG bar chart of ``max_rel`` per row (log scale) with the tolerance dashed.

    Rows are the report's ``rewrites`` or ``modules``. One horizontal bar per row, top to
    bottom in report order, labelled with the original module paths (:func:`module_label`; the
    node and the error are in each bar's tooltip and in the table below). An exact zero is a
    dot at the left, a non-finite error a bar to the right end. ``width`` fits a printed page.
    """
    values = [json_number(r.get("max_rel")) for r in rows]
    labels = [module_label(list(r.get("module_paths") or []))
              or str(r.get("module") or r.get("node") or i) for i, r in enumerate(rows)]
    positive = [v for v in values if math.isfinite(v) and v > 0]
    marks = [math.log10(v) for v in positive]
    if rtol > 0:
        marks.append(math.log10(rtol))
    low = max(-20, math.floor(min(marks, default=-16)) - 1)
    high = max(math.ceil(max(marks, default=0)), low + 2)
    if any(not math.isfinite(v) for v in values):
        high += 1
    row_h, top, right = 16, 20, 10
    left = min(300, 12 + 6 * max((len(label) for label in labels), default=4))
    plot_w, plot_h = width - left - right, row_h * max(len(rows), 1) + 4
    height = top + plot_h + 20  # the axis above, the tolerance's label below

    def x(decade: float) -> float:
        return left + plot_w * (decade - low) / (high - low)

    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} '
           f'{height}" role="img" aria-label="maximum relative error per layer, log scale">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
           'stroke="#ccc"/>']
    every = max(1, math.ceil((high - low) / 8))
    for decade in range(low, high + 1, every):
        out.append(f'<line x1="{x(decade):.1f}" x2="{x(decade):.1f}" y1="{top}" '
                   f'y2="{top + plot_h}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x(decade):.1f}" y="{top - 6}" text-anchor="middle">'
                   f"1e{decade}</text>")
    for index, (row, value, label) in enumerate(zip(rows, values, labels, strict=True)):
        y = top + 2 + index * row_h
        color = "#2e9a52" if row.get("passed") else "#c0392b"
        node = row.get("node") or row.get("module") or ""
        tip = html.escape(f"{row.get('pass') or ''} {node}: max rel {fmt(row.get('max_rel'))}"
                          .strip())
        out.append(f'<text x="{left - 6}" y="{y + row_h * 0.72:.1f}" text-anchor="end">'
                   f"{html.escape(label)}</text>")
        if value == 0:
            out.append(f'<circle cx="{left + 3}" cy="{y + row_h / 2:.1f}" r="2.5" '
                       f'fill="{color}"><title>{tip} (exact)</title></circle>')
            continue
        level = high if not math.isfinite(value) else max(math.log10(value), low)
        out.append(f'<rect x="{left}" y="{y + 3:.1f}" width="{x(level) - left:.1f}" '
                   f'height="{row_h - 6}" fill="{color}"><title>{tip}</title></rect>')
    if rtol > 0 and low <= math.log10(rtol) <= high:
        tx = x(math.log10(rtol))
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{top + plot_h}" '
                   'stroke="#c0392b" stroke-dasharray="6 4"/>')
        anchor, shift = ("end", -4) if tx > left + plot_w / 2 else ("start", 4)
        out.append(f'<text x="{tx + shift:.1f}" y="{top + plot_h + 14}" '
                   f'text-anchor="{anchor}" fill="#c0392b">tolerance rtol {fmt(rtol)}</text>')
    out.append("</svg>")
    return "".join(out)


# --- terminal -----------------------------------------------------------------------------------

_NUMERIC_HEADERS = {"before", "after", "original", "fused", "original/fused"}
_STYLES = {"ok": "green", "fail": "red", "note": "yellow", "muted": "dim", "verdict": "bold",
           "approx": "bold yellow"}


def terminal_console(stderr: bool = True) -> Console:
    """The console human output goes to: stderr, markup on; when it is not a terminal (a log,
    a pipe), wide enough that no table cuts a number."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=400)
    return console


def render_terminal(report: Any, console: Console, limit: int = 25) -> None:
    """Print the report's terminal blocks: for ``verify`` the verdict, the outputs and the
    per-rewrite (or per-module) errors (at most ``limit`` rows, failing and worst first); for
    ``convert`` the passes, cost and verdict; for ``bench`` its table."""
    data = as_report_dict(report)
    for _, blocks in _sections(data, TERMINAL):
        for block in blocks:
            if isinstance(block, Table):
                console.print(_rich_table(block))
            elif isinstance(block, Lines):
                color = _STYLES.get(block.style)
                for line in block.lines:
                    console.print(f"[{color}]{line}[/]" if color else line)
            elif isinstance(block, Text):
                color = _STYLES.get(block.style)
                console.print(f"[{color}]{block.text}[/]" if color else block.text)


def _numbers_as_text(cells: Iterable[Any]) -> bool:
    """Every cell is a number already formatted as text (``"21.5"``, ``"inf"``), or empty."""
    seen = False
    for cell in cells:
        if not isinstance(cell, str):
            return False
        if not cell:
            continue
        try:
            float(cell.replace(",", ""))
        except ValueError:
            return False
        seen = True
    return seen


def _rich_table(table: Table) -> RichTable:
    keep = table.terminal_columns or list(range(len(table.header)))
    out = RichTable(title=table.title or None, title_justify="left",
                    caption=table.caption or None, caption_justify="left")
    for index in keep:
        name = table.header[index]
        column = [row[index] for row in table.rows]
        numeric = (name in _NUMERIC_HEADERS or any(_is_number(c) for c in column)
                   or _numbers_as_text(column))
        # "fold" wraps a long cell instead of cutting it: a number is never shortened
        out.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for index, row in enumerate(table.rows):
        cells = [fmt(row[i]) for i in keep]
        bad = table.bad[index] if table.bad is not None else False
        out.add_row(*cells, style="red" if bad else None)
    return out
