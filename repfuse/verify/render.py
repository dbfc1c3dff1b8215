"""One report, four renderings: terminal tables (rich), JSON, Markdown, a self-contained HTML page.

Every renderer takes the report as its dict: :meth:`EquivalenceReport.to_dict` (``verify``) or
:meth:`Conversion.report_dict` (``convert``, which adds a ``conversion`` section), or either
object itself. Known sections get their own tables: the verdict, the first divergence, the runs
with their metrics, the per-rewrite (or per-module) errors, the conversion's passes and its cost
before/after. Any other section, or any key of the cost added later (activation bytes, cost per
pass, an export section), is rendered generically (key/value tables, lists of records as tables),
so the renderers never hide what the JSON holds.

The HTML page has no scripts and loads nothing: inline CSS and an inline SVG chart of the
maximum relative error at each rewrite (or module), on a log scale, with the tolerance as a
dashed line. :func:`write_report` picks the rendering from the file's extension.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from repfuse.errors import RepfuseError

REPORT_SUFFIXES = (".json", ".md", ".html")

# Sections rendered by their own code; everything else goes through the generic renderer.
_KNOWN = {"schema_version", "passed", "reference", "candidate", "deploy_dtype", "inputs", "runs",
          "first_divergence", "localization", "rewrites", "modules", "conversion"}
_KNOWN_CONVERSION = {"passes", "counts", "rewrites", "declined", "cost"}


def as_report_dict(report: Any) -> dict:
    """The report's dict, from a dict, a :class:`Conversion` or an :class:`EquivalenceReport`."""
    if isinstance(report, dict):
        return report
    if hasattr(report, "report_dict"):
        return report.report_dict()
    return report.to_dict()


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
    from repfuse.io import write_text

    path = check_report_path(path)
    write_text(path, render(report, path.suffix))
    return path


def render_json(report: Any) -> str:
    return json.dumps(as_report_dict(report), indent=2)


# --- shared pieces ------------------------------------------------------------------------------


def verdict(data: dict) -> str:
    return "EQUIVALENT" if data.get("passed") else "NOT EQUIVALENT"


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


def _as_float(value: Any) -> float:
    if isinstance(value, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(value, math.nan)
    return math.nan if value is None else float(value)


def _run_rows(data: dict) -> tuple[list[str], list[list[Any]]]:
    header = ["run", "output", "shape", "result", "max abs", "max rel", "mean abs", "p50 abs",
              "p90 abs", "p99 abs", "cosine", "SQNR dB", "baseline max rel"]
    rows = []
    for run in data.get("runs", []):
        for out in run.get("outputs", []):
            m = out.get("metrics", {})
            base = out.get("baseline") or {}
            rows.append([run["dtype"], out["name"], "×".join(str(s) for s in out["shape"]),
                         "ok" if out["passed"] else "FAIL", m.get("max_abs"), m.get("max_rel"),
                         m.get("mean_abs"), m.get("p50_abs"), m.get("p90_abs"),
                         m.get("p99_abs"), m.get("cosine"), m.get("sqnr_db"),
                         base.get("max_rel")])
    return header, rows


def _tolerance_lines(data: dict) -> list[str]:
    lines = []
    for run in data.get("runs", []):
        tol = run.get("tolerance", {})
        lines.append(f"{run['dtype']}: {'ok' if run.get('passed') else 'FAIL'} with rtol "
                     f"{fmt(tol.get('rtol'))}, atol {fmt(tol.get('atol'))}; passes with rtol ≥ "
                     f"{fmt(run.get('min_rtol_to_pass'))}")
    return lines


def _divergence_text(data: dict) -> str:
    from repfuse.verify.report import divergence_lines

    return " ".join(line.strip() for line in divergence_lines(data))


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
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  for v in (before, after))
    return [name, before, after, after - before if numeric else None]


def _records_table(records: list) -> tuple[list[str], list[list[Any]]] | None:
    """A list of dicts as (header, rows), or None when it is not one."""
    if not records or not all(isinstance(r, dict) for r in records):
        return None
    header = list(dict.fromkeys(k for r in records for k in r))
    return header, [[r.get(k) for k in header] for r in records]


def _extra_sections(data: dict) -> list[tuple[str, Any]]:
    sections = [(key, value) for key, value in data.items() if key not in _KNOWN]
    conversion = data.get("conversion") or {}
    sections += [(f"conversion: {key}", value) for key, value in conversion.items()
                 if key not in _KNOWN_CONVERSION]
    cost = conversion.get("cost") or {}
    sections += [(f"cost: {key}", value) for key, value in cost.items()
                 if key not in ("before", "after")]
    return sections


# --- Markdown -----------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _md_value(value: Any) -> list[str]:
    if isinstance(value, dict):
        return _md_table(["key", "value"], [[k, v] for k, v in value.items()])
    table = _records_table(value) if isinstance(value, list) else None
    if table is not None:
        return _md_table(*table)
    return [fmt(value), ""]


def render_markdown(report: Any) -> str:
    data = as_report_dict(report)
    lines = [f"# repfuse report: {data.get('candidate')} vs {data.get('reference')}", "",
             f"**{verdict(data)}** (deployment dtype {data.get('deploy_dtype')}, report schema "
             f"{data.get('schema_version')})", ""]
    text = _divergence_text(data)
    if text:
        lines += [text, ""]
    lines += ["## Outputs", ""] + _md_table(*_run_rows(data))
    lines += [f"- {line}" for line in _tolerance_lines(data)] + [""]
    located = data.get("localization")
    if located:
        lines += ["## Localization", "",
                  f"Method: {located['method']}, {located['compared']} activations compared in "
                  f"{located['dtype']} with rtol {fmt(located['tolerance']['rtol'])}, atol "
                  f"{fmt(located['tolerance']['atol'])}."
                  + (f" Note: {located['note']}." if located.get("note") else ""), ""]
        if data.get("rewrites"):
            lines += ["### Error per rewrite", ""] + _md_table(*_rewrite_rows(data))
        if data.get("modules"):
            lines += ["### Error per module", ""] + _md_table(*_module_rows(data))
    conversion = data.get("conversion")
    if conversion:
        lines += ["## Conversion", ""]
        counts = conversion.get("counts", {})
        declined: dict[str, int] = {}
        for d in conversion.get("declined", []):
            declined[d["pass"]] = declined.get(d["pass"], 0) + 1
        lines += _md_table(["pass", "rewrites", "declined"],
                           [[p, counts.get(p, 0), declined.get(p, 0)] for p in counts])
        if conversion.get("cost"):
            lines += ["### Cost", ""] + _md_table(["", "before", "after", "change"],
                                                   _cost_rows(conversion["cost"]))
        if conversion.get("declined"):
            lines += ["### Declined", ""] + _md_table(
                ["pass", "node", "reason"],
                [[d["pass"], d["node"], d["reason"]] for d in conversion["declined"]])
    lines += ["## Inputs", ""] + _md_value(data.get("inputs", {}))
    for title, value in _extra_sections(data):
        lines += [f"## {title}", ""] + _md_value(value)
    return "\n".join(lines).rstrip() + "\n"


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.verdict { font-size: 1.6em; font-weight: 700; padding: .4em .8em; border-radius: 6px;
           display: inline-block; }
.pass { background: #e3f6e8; color: #11612b; } .fail { background: #fde7e7; color: #9b1c1c; }
.divergence { border-left: 4px solid #c0392b; padding: .3em .8em; background: #fff5f4; }
.muted { color: #666; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fff0f0; }
.chart text { font: 11px system-ui, sans-serif; fill: #333; }
details { margin: .6em 0; }
"""


def _h(value: Any) -> str:
    return html.escape(fmt(value))


def _html_table(header: list[str], rows: Iterable[list[Any]], bad: Callable | None = None
                ) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header),
           "</tr></thead><tbody>"]
    for row in rows:
        flag = ' class="bad"' if bad is not None and bad(row) else ""
        cells = "".join(
            f'<td class="num">{_h(c)}</td>' if isinstance(c, (int, float))
            and not isinstance(c, bool) else f"<td>{_h(c)}</td>" for c in row
        )
        out.append(f"<tr{flag}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _html_value(value: Any) -> str:
    if isinstance(value, dict):
        return _html_table(["key", "value"], [[k, v] for k, v in value.items()])
    table = _records_table(value) if isinstance(value, list) else None
    if table is not None:
        return _html_table(*table)
    return f"<p>{_h(value)}</p>"


def _failed(row: list[Any]) -> bool:
    return "FAIL" in row


def render_html(report: Any) -> str:
    data = as_report_dict(report)
    passed = bool(data.get("passed"))
    title = f"repfuse report: {data.get('candidate')} vs {data.get('reference')}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p id="verdict" class="verdict {"pass" if passed else "fail"}">'
        f"{html.escape(verdict(data))}</p>",
        f'<p class="muted">deployment dtype {_h(data.get("deploy_dtype"))} · report schema '
        f'{_h(data.get("schema_version"))}</p>',
    ]
    text = _divergence_text(data)
    if text:
        kind = "divergence" if data.get("first_divergence") else "muted"
        parts.append(f'<p id="first-divergence" class="{kind}">{html.escape(text)}</p>')
    parts += ["<h2>Outputs</h2>", _html_table(*_run_rows(data), bad=_failed),
              "<ul>", *(f"<li>{html.escape(line)}</li>" for line in _tolerance_lines(data)),
              "</ul>"]
    located = data.get("localization")
    if located:
        parts += ["<h2>Localization</h2>",
                  f"<p>method {_h(located['method'])}: {_h(located['compared'])} activations "
                  f"compared in {_h(located['dtype'])} with rtol "
                  f"{_h(located['tolerance']['rtol'])}, atol {_h(located['tolerance']['atol'])}"
                  + (f". Note: {_h(located['note'])}" if located.get("note") else "") + "</p>"]
        rows = data.get("rewrites") or data.get("modules") or []
        if rows:
            what = "rewrite" if data.get("rewrites") else "module"
            parts += [f"<h3>Maximum relative error per {what}</h3>",
                      error_chart_svg(rows, located["tolerance"]["rtol"])]
        if data.get("rewrites"):
            parts += ["<h3>Error per rewrite</h3>",
                      _html_table(*_rewrite_rows(data), bad=_failed)]
        if data.get("modules"):
            parts += ["<h3>Error per module</h3>", _html_table(*_module_rows(data), bad=_failed)]
    conversion = data.get("conversion")
    if conversion:
        counts = conversion.get("counts", {})
        declined: dict[str, int] = {}
        for d in conversion.get("declined", []):
            declined[d["pass"]] = declined.get(d["pass"], 0) + 1
        parts += ["<h2>Conversion</h2>",
                  _html_table(["pass", "rewrites", "declined"],
                              [[p, counts.get(p, 0), declined.get(p, 0)] for p in counts])]
        if conversion.get("cost"):
            parts += ["<h3>Op counts and cost</h3>",
                      _html_table(["", "before", "after", "change"],
                                  _cost_rows(conversion["cost"]))]
        if conversion.get("declined"):
            parts += [f"<details><summary>{len(conversion['declined'])} declined candidates"
                      "</summary>",
                      _html_table(["pass", "node", "reason"],
                                  [[d["pass"], d["node"], d["reason"]]
                                   for d in conversion["declined"]]), "</details>"]
        if conversion.get("rewrites"):
            table = _records_table(conversion["rewrites"])
            parts += [f"<details><summary>{len(conversion['rewrites'])} rewrites applied"
                      "</summary>", _html_table(*table), "</details>"]
    parts += ["<h2>Inputs</h2>", _html_value(data.get("inputs", {}))]
    for name, value in _extra_sections(data):
        parts += [f"<h2>{html.escape(name)}</h2>", _html_value(value)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def error_chart_svg(rows: list[dict], rtol: float, width: int = 1000, height: int = 300) -> str:
    """An inline SVG bar chart of ``max_rel`` per row (log scale) with the tolerance dashed.

    Rows are the report's ``rewrites`` (labelled by node) or ``modules`` (by module path).
    An exact zero is drawn as a dot on the floor, a non-finite error as a bar to the top.
    """
    values = [_as_float(r.get("max_rel")) for r in rows]
    positive = [v for v in values if math.isfinite(v) and v > 0]
    marks = [math.log10(v) for v in positive]
    if rtol > 0:
        marks.append(math.log10(rtol))
    low = max(-20, math.floor(min(marks, default=-16)) - 1)
    high = max(math.ceil(max(marks, default=0)), low + 2)
    if any(not math.isfinite(v) for v in values):
        high += 1
    left, right, top, bottom = 60, 10, 16, 110
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(decade: float) -> float:
        return top + plot_h * (high - decade) / (high - low)

    step = plot_w / max(len(rows), 1)
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} '
           f'{height}" role="img" aria-label="maximum relative error per layer, log scale">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
           'stroke="#ccc"/>']
    every = max(1, math.ceil((high - low) / 8))
    for decade in range(low, high + 1, every):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(decade):.1f}" '
                   f'y2="{y(decade):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 6}" y="{y(decade) + 4:.1f}" text-anchor="end">'
                   f"1e{decade}</text>")
    for index, (row, value) in enumerate(zip(rows, values, strict=True)):
        x = left + index * step
        label = str(row.get("node") or row.get("module") or index)
        color = "#2e9a52" if row.get("passed") else "#c0392b"
        tip = html.escape(f"{row.get('pass') or ''} {label}: max rel {fmt(row.get('max_rel'))}"
                          .strip())
        if value == 0:
            out.append(f'<circle cx="{x + step / 2:.1f}" cy="{y(low) - 3:.1f}" r="2.5" '
                       f'fill="{color}"><title>{tip} (exact)</title></circle>')
        else:
            level = high if not math.isfinite(value) else max(math.log10(value), low)
            bar_w = max(step * 0.7, 1.0)
            out.append(f'<rect x="{x + (step - bar_w) / 2:.1f}" y="{y(level):.1f}" '
                       f'width="{bar_w:.1f}" height="{y(low) - y(level):.1f}" fill="{color}">'
                       f"<title>{tip}</title></rect>")
        if len(rows) <= 60:
            short = label if len(label) <= 22 else label[:21] + "…"
            tx, ty = x + step / 2 + 4, top + plot_h + 8
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" transform="rotate(60 {tx:.1f} '
                       f'{ty:.1f})">{html.escape(short)}</text>')
    if rtol > 0 and low <= math.log10(rtol) <= high:
        ty = y(math.log10(rtol))
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   'stroke="#c0392b" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{left + plot_w - 4}" y="{ty - 4:.1f}" text-anchor="end" '
                   f'fill="#c0392b">tolerance rtol {fmt(rtol)}</text>')
    out.append("</svg>")
    return "".join(out)


# --- terminal -----------------------------------------------------------------------------------


def render_terminal(report: Any, console, limit: int = 25) -> None:
    """Print the verdict, the outputs and the per-rewrite (or per-module) errors as tables.

    At most ``limit`` localization rows are printed: the failing ones first, then the worst.
    """
    from rich.table import Table

    data = as_report_dict(report)
    style = "green" if data.get("passed") else "red"
    console.print(f"[bold {style}]{verdict(data)}[/]: {data.get('candidate')} vs "
                  f"{data.get('reference')}  (deployment dtype {data.get('deploy_dtype')})")
    header, rows = _run_rows(data)
    keep = [0, 1, 3, 4, 5, 9, 11, 12]  # the columns that fit a terminal
    console.print(_rich_table(Table, "outputs", [header[i] for i in keep],
                              [[row[i] for i in keep] for row in rows]))
    for line in _tolerance_lines(data):
        console.print(f"  {line}")
    # Narrow tables: the node and its error; the module paths are in the divergence line.
    for maker, key, keep in ((_rewrite_rows, "rewrites", [0, 1, 2, 6, 7]),
                             (_module_rows, "modules", [0, 1, 2, 3, 5, 6])):
        if data.get(key):
            header, rows = maker(data)
            shown = _most_telling(rows, limit)
            title = f"error per {key[:-1]} (float64)"
            if len(shown) < len(rows):
                title += f", {len(shown)} of {len(rows)}: failing and worst first"
            console.print(_rich_table(Table, title, [header[i] for i in keep],
                                      [[row[i] for i in keep] for row in shown]))
    from repfuse.verify.report import divergence_lines

    for line in divergence_lines(data):
        console.print(f"[{style}]{line.strip()}[/]")


def _most_telling(rows: list[list[Any]], limit: int) -> list[list[Any]]:
    if len(rows) <= limit:
        return rows
    # rows end with max rel and the result
    ranked = sorted(rows, key=lambda r: (r[-1] != "FAIL", -_sortable(r[-2])))
    return sorted(ranked[:limit], key=lambda r: r[0])


def _sortable(value: Any) -> float:
    number = _as_float(value)
    return math.inf if math.isnan(number) else number


def _rich_table(table_cls, title: str, header: list[str], rows: list[list[Any]]):
    table = table_cls(title=title, title_justify="left")
    for name in header:
        table.add_column(name)
    for row in rows:
        cells = [fmt(c) for c in row]
        style = "red" if "FAIL" in cells else None
        table.add_row(*cells, style=style)
    return table
