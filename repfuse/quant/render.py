"""Renderings of a :class:`repfuse.quant.report.QuantReport`: terminal rows, Markdown, and an
HTML section with an SVG chart. Each works from the report's ``to_dict()`` (a report read back
from JSON renders the same); none computes anything new.
"""

from __future__ import annotations

import html
import math
from typing import Any

from repfuse.verify.compare import json_number

FORM_LABELS = {"train": "train form", "fused": "fused", "equalized": "fused + equalize"}


def _data(report: Any) -> dict:
    return report if isinstance(report, dict) else report.to_dict()


def db(value: Any) -> str:
    """A decibel figure as text: one decimal, ``inf`` for an exact quantization."""
    number = json_number(value)
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.1f}"


def ratio(value: Any) -> str:
    number = json_number(value)
    return "inf" if math.isinf(number) else f"{number:.3g}"


LAYER_HEADER = ["layer", "weight", "max/median", "per-tensor dB", "per-channel dB",
                "median ch. dB", "equalized per-tensor dB", "flags"]


def layer_rows(report: Any) -> tuple[list[str], list[list[str]]]:
    """One row per conv/linear layer: the weight figures of the fused and equalized forms (the
    equalized column only when the report has the equalized form)."""
    data = _data(report)
    with_equalized = bool(data.get("equalized"))
    equalized = {layer["module"]: layer for layer in data.get("equalized", [])}
    rows = []
    for layer in data["layers"]:
        eq = equalized.get(layer["module"])
        row = [
            layer["module"], "x".join(map(str, layer["weight_shape"])),
            ratio(layer["range_ratio"]), db(layer["sqnr_per_tensor_db"]),
            db(layer["sqnr_per_channel_db"]), db(layer["median_channel_sqnr_db"]),
            db(eq["sqnr_per_tensor_db"]) if eq else "", "; ".join(layer["flags"]),
        ]
        rows.append(row if with_equalized else row[:6] + row[7:])
    header = LAYER_HEADER if with_equalized else LAYER_HEADER[:6] + LAYER_HEADER[7:]
    return header, rows


def form_rows(report: Any) -> tuple[list[str], list[list[str]]]:
    """End-to-end SQNR of the simulated INT8 model, one row per form."""
    data = _data(report)
    header = ["form", "INT8 per-tensor dB", "INT8 per-channel dB", "quantized tensors", "note"]
    rows = [[FORM_LABELS.get(f["form"], f["form"]), db(f["per_tensor_db"]),
             db(f["per_channel_db"]), str(f["quant_points"]), f.get("note", "")]
            for f in data.get("forms", [])]
    return header, rows


def activation_rows(report: Any) -> tuple[list[str], list[list[str]]]:
    data = _data(report)
    header = ["layer", "input range", "output range", "output ch. max/median", "float16"]
    rows = [[a["module"], f"[{json_number(a['input_min']):.3g}, {json_number(a['input_max']):.3g}]",
             f"[{json_number(a['output_min']):.3g}, {json_number(a['output_max']):.3g}]",
             ratio(a["channel_ratio"]), "overflow" if a["float16_overflow"] else "ok"]
            for a in data.get("activations", [])]
    return header, rows


def summary_lines(report: Any) -> list[str]:
    """The verdict in a few sentences: flagged layers, the worst layer, equalization."""
    data = _data(report)
    threshold = data["thresholds"]["sqnr_db"]
    layers, equalized = data["layers"], data.get("equalized", [])
    lines = [f"{len(data['flagged'])} of {len(layers)} layers flagged "
             f"(INT8 weight SQNR < {threshold:g} dB, outlier channels, float16 range)"]
    if layers:
        worst = min(layers, key=lambda layer: json_number(layer["sqnr_per_tensor_db"]))
        line = (f"worst per-tensor INT8 weight SQNR: {db(worst['sqnr_per_tensor_db'])} dB "
                f"({worst['module']})")
        if equalized:
            eq = min(equalized, key=lambda layer: json_number(layer["sqnr_per_tensor_db"]))
            line += f"; after equalize: {db(eq['sqnr_per_tensor_db'])} dB ({eq['module']})"
        lines.append(line)
    if data.get("equalization"):
        rewrites = data["equalization"].get("rewrites", [])
        declined = data["equalization"].get("declined", [])
        lines.append(f"equalize: {len(rewrites)} group(s) of layers rewritten, {len(declined)} "
                     "layer(s) left alone"
                     + (f" (e.g. {declined[0]['reason']})" if declined else ""))
    else:
        lines.append("equalize: not run (the equalized form is left out)")
    lines.extend(data.get("notes", []))
    return lines


# --- Markdown ----------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


def render_markdown(report: Any) -> str:
    data = _data(report)
    out = [f"# Quantization readiness: {data['model']}", ""]
    out += [f"- {line}" for line in summary_lines(data)] + [""]
    if data.get("forms"):
        out += ["## Simulated INT8, end to end (SQNR against float64)", ""]
        out += _md_table(*form_rows(data)) + [""]
    out += ["## Weights per layer", ""] + _md_table(*layer_rows(data)) + [""]
    if data.get("activations"):
        out += ["## Activations (calibration inputs)", ""]
        out += _md_table(*activation_rows(data)) + [""]
    return "\n".join(out)


# --- HTML --------------------------------------------------------------------------------------


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header),
           "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


SERIES = (("sqnr_per_tensor_db", "fused, per-tensor", "#c0392b", False),
          ("sqnr_per_channel_db", "fused, per-channel", "#e67e22", False),
          ("sqnr_per_tensor_db", "fused + equalize, per-tensor", "#2e86c1", True))


def sqnr_chart_svg(report: Any, width: int = 1000, height: int = 380) -> str:
    """Grouped bars of INT8 weight SQNR per layer (fused per-tensor, per-channel, equalized
    per-tensor) with the flagging threshold dashed. Infinite SQNR is drawn to the top. Without
    the equalized form its series is left out."""
    data = _data(report)
    layers = data["layers"]
    equalized = {layer["module"]: layer for layer in data.get("equalized", [])}
    series_drawn = [s for s in SERIES if equalized or not s[3]]
    threshold = float(data["thresholds"]["sqnr_db"])
    values = [json_number(layer[key]) for layer in layers for key, *_ in series_drawn]
    finite = [v for v in values if math.isfinite(v)]
    high = max(60.0, math.ceil(max(finite, default=60.0) / 10) * 10)
    left, right, top, bottom = 50, 10, 28, 170
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(value: float) -> float:
        value = high if not math.isfinite(value) else min(max(value, 0.0), high)
        return top + plot_h * (1 - value / high)

    step = plot_w / max(len(layers), 1)
    bar = max(step * 0.8 / len(series_drawn), 1.0)
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} '
           f'{height}" role="img" aria-label="INT8 weight SQNR per layer">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
           'stroke="#ccc"/>']
    for tick in range(0, int(high) + 1, 10):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" '
                   f'y2="{y(tick):.1f}" stroke="#e4e4e4"/><text x="{left - 6}" '
                   f'y="{y(tick) + 4:.1f}" text-anchor="end">{tick} dB</text>')
    for index, layer in enumerate(layers):
        x0 = left + index * step + step * 0.1
        for series, (key, label, color, from_equalized) in enumerate(series_drawn):
            source = equalized.get(layer["module"]) if from_equalized else layer
            if source is None:
                continue
            value = json_number(source[key])
            tip = html.escape(f"{layer['module']}: {label} {db(value)} dB")
            out.append(f'<rect x="{x0 + series * bar:.1f}" y="{y(value):.1f}" '
                       f'width="{bar:.1f}" height="{y(0) - y(value):.1f}" fill="{color}">'
                       f"<title>{tip}</title></rect>")
        if len(layers) <= 60:
            name = layer["module"]
            short = name if len(name) <= 24 else "…" + name[-23:]
            tx, ty = left + index * step + step / 2, top + plot_h + 8
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" transform="rotate(60 {tx:.1f} '
                       f'{ty:.1f})">{html.escape(short)}</text>')
    ty = y(threshold)
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" '
               'stroke="#333" stroke-dasharray="6 4"/>')
    # a white halo keeps the label readable where it crosses a bar
    out.append(f'<text x="{left + plot_w - 4}" y="{ty - 4:.1f}" text-anchor="end" '
               'paint-order="stroke" stroke="#fff" stroke-width="3">'
               f"flagged below {threshold:g} dB</text>")
    legend_step = min(230, plot_w // len(series_drawn))
    for series, (_, label, color, _) in enumerate(series_drawn):
        lx = left + series * legend_step
        out.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{color}"/>'
                   f'<text x="{lx + 16}" y="18">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def html_section(report: Any) -> str:
    """A ``<section>`` for an HTML report: summary, the SQNR chart, and the tables."""
    data = _data(report)
    parts = ['<section id="quantization">', "<h2>Quantization readiness</h2>", "<ul>",
             *(f"<li>{html.escape(line)}</li>" for line in summary_lines(data)), "</ul>"]
    if data.get("forms"):
        parts += ["<h3>Simulated INT8, end to end (SQNR against float64)</h3>",
                  _html_table(*form_rows(data))]
    parts += ["<h3>INT8 weight SQNR per layer</h3>", sqnr_chart_svg(data),
              _html_table(*layer_rows(data))]
    if data.get("activations"):
        parts += ["<h3>Activations (calibration inputs)</h3>",
                  _html_table(*activation_rows(data))]
    parts.append("</section>")
    return "\n".join(parts)
