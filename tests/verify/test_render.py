"""Tests of :mod:`repfuse.verify.render`: one report as JSON, Markdown, HTML and terminal tables.

The report is a real one: resnet_tiny converted, one fused conv perturbed, verified again. The
renderings must carry its numbers (checked against the report dict and the conversion's own
cost objects), the HTML must load nothing from anywhere, and its chart must order the bars as
the errors are ordered. An optional test renders the page in headless Chromium.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from cli_runs import screenshot
from conftest import random_input
from rich.console import Console

import repfuse
from repfuse.convert import convert
from repfuse.errors import RepfuseError
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model
from repfuse.verify.render import (
    error_chart_svg,
    render,
    render_html,
    render_json,
    render_markdown,
    render_terminal,
    write_report,
)

TINY_SHAPE = (1, 3, 32, 32)
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source",
        "rect", "line", "circle", "path"}  # the SVG shapes are written self-closed


@pytest.fixture(scope="module")
def failing():
    """A Conversion of resnet_tiny whose report verifies a perturbed copy of the fused model."""
    model = create_model("resnet_tiny")
    x = random_input(TINY_SHAPE)
    result = convert(model, x, name="resnet_tiny")
    wrong = copy.deepcopy(result.fused)
    with torch.no_grad():
        wrong.get_submodule("layer2.0.conv1").weight.mul_(1.01)
    result.report = repfuse.verify(model, wrong, x, batches=1, reference_name="resnet_tiny",
                                   candidate_name="resnet_tiny (fused, perturbed)",
                                   localize_divergence=True)
    return result


class TagChecker(HTMLParser):
    """Collects tags and attributes, and the text inside the element with id="verdict"."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.verdict: list[str] = []
        self.in_verdict = False

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v) for k, v in attrs]
        if dict(attrs).get("id") == "verdict":
            self.in_verdict = True
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
            return
        self.stack.pop()
        if tag == "p":
            self.in_verdict = False

    def handle_data(self, data):
        if self.in_verdict:
            self.verdict.append(data)


def test_json_is_the_report_dict(failing):
    data = json.loads(render_json(failing))
    assert data == json.loads(json.dumps(failing.report_dict()))
    assert data["schema_version"] == 3 and data["passed"] is False
    assert data["kind"] == "convert" and data["diagnosis"] is None
    assert data["first_divergence"]["module_paths"] == ["layer2.0.conv1", "layer2.0.bn1"]


def test_markdown_carries_verdict_divergence_errors_and_cost(failing):
    text = render_markdown(failing)
    data = failing.report_dict()
    assert "**NOT EQUIVALENT**" in text
    first = data["first_divergence"]
    assert (f"first divergence: rewrite fold_batchnorm at node '{first['node']}', original "
            "modules layer2.0.conv1, layer2.0.bn1") in text
    row = next(r for r in data["rewrites"] if r["node"] == first["node"])
    assert (f"| {first['node']} | {row['reference_node']} | layer2.0.conv1, layer2.0.bn1 | "
            f"{row['max_abs']:.4g} | {row['max_rel']:.4g} | FAIL |") in text
    before, after = failing.cost_before, failing.cost_after
    bn = before.ops["BatchNorm2d"]
    assert f"| ops: BatchNorm2d | {bn} | 0 | {-bn} |" in text
    assert (f"| params | {before.params:,} | {after.params:,} | "
            f"{after.params - before.params:,} |") in text
    deploy = data["runs"][1]["outputs"][0]["metrics"]
    assert f"{deploy['p99_abs']:.4g}" in text


def test_html_is_self_contained_and_well_formed(failing):
    page = render_html(failing)
    for forbidden in ("http://", "https://", "<script", "<link", "<img", "<iframe", "url(",
                      "@import"):
        assert forbidden not in page, forbidden
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert not [a for a in checker.attrs if a[1] in ("src", "href")]
    assert "".join(checker.verdict) == "NOT EQUIVALENT"
    assert "<style>" in page
    first = failing.report_dict()["first_divergence"]
    assert "original modules layer2.0.conv1, layer2.0.bn1" in page
    assert first["node"] in page
    assert "Op counts and cost" in page and "BatchNorm2d" in page


def bars(svg: str) -> list[tuple[float, float, str, str]]:
    """(y, width, fill, title) of each bar of a chart (bars are horizontal, one per row)."""
    found = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="([\d.]+)" height="[\d.]+" '
                       r'fill="(#[0-9a-f]+)"><title>([^<]*)</title>', svg)
    return [(float(y), float(w), fill, title) for y, w, fill, title in found]


def labels(svg: str) -> list[str]:
    """The row labels of a chart (the text anchored at the end, left of the bars)."""
    return re.findall(r'<text x="[\d.]+" y="[\d.]+" text-anchor="end">([^<]*)</text>', svg)


def test_html_chart_draws_one_bar_per_rewrite_ordered_by_error(failing):
    page = render_html(failing)
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    rows = failing.report_dict()["rewrites"]
    drawn = bars(svg)
    assert len(drawn) == len(rows) == 12
    for (_, _, fill, title), row in zip(drawn, rows, strict=True):
        assert row["node"] in title
        assert fill == ("#2e9a52" if row["passed"] else "#c0392b")
    for (_, w1, _, _), r1 in zip(drawn, rows, strict=True):
        for (_, w2, _, _), r2 in zip(drawn, rows, strict=True):
            if r1["max_rel"] > r2["max_rel"]:
                assert w1 >= w2  # log scale: a larger error is a longer bar
    assert [y for y, *_ in drawn] == sorted(y for y, *_ in drawn)  # in report order
    # labelled by the original modules, not by fx node names, and not rotated
    assert labels(svg)[0] == "conv1, bn1" and "layer2.0: conv1, bn1" in labels(svg)
    assert "rotate" not in svg
    assert "tolerance rtol 1e-05" in svg and 'stroke-dasharray="6 4"' in svg


def test_chart_of_exact_and_infinite_errors():
    rows = [{"node": "a", "max_rel": 0.0, "passed": True},
            {"node": "b", "max_rel": 1e-8, "passed": True},
            {"node": "c", "max_rel": "inf", "passed": False}]
    svg = error_chart_svg(rows, rtol=1e-5)
    assert svg.count("<circle") == 1 and "a: max rel 0 (exact)" in svg
    (_, wb, _, tb), (_, wc, fill, tc) = bars(svg)
    assert "b: max rel 1e-08" in tb
    assert "c: max rel inf" in tc and fill == "#c0392b"
    width = float(re.search(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)" height="[\d.]+" '
                            r'fill="#fafafa"', svg).group(2))
    assert wc == pytest.approx(width, abs=0.1)  # an infinite error reaches the right end
    assert wc > wb


def test_module_path_reports_chart_the_modules():
    model = create_model("resnet_tiny")
    x = random_input(TINY_SHAPE, seed=1)
    deploy = load_by_structure(create_model("resnet_tiny", deploy=True),
                               repfuse.fuse(model, x), x)
    data = repfuse.verify(model, deploy, x, batches=1, localize_divergence=True).to_dict()
    page = render_html(data)
    assert len(bars(page)) == len(data["modules"]) > 10
    assert "layer1.0.relu" in labels(page)
    assert "error per module" in page and "Passes" not in page
    assert "| layer1.0.relu | 0 | yes |" in render_markdown(data)


def test_sections_the_renderers_do_not_know_are_shown_generically(failing):
    data = failing.report_dict()
    data["quantization"] = [{"layer": "conv1", "sqnr_db": 35.5, "max_abs": 3.5e-7,
                             "ok": True}]
    data["conversion"]["pruned"] = {"channels": 3}
    page, text = render_html(data), render_markdown(data)
    assert '<h2 id="quantization">quantization</h2>' in page and "3.5e-07" in page
    assert "## quantization" in text and "| conv1 | 35.5 | 3.5e-07 | yes |" in text
    assert "## conversion: pruned" in text and "| channels | 3 |" in text


def test_terminal_tables(failing):
    buffer = io.StringIO()
    render_terminal(failing.report, Console(file=buffer, width=160, highlight=False))
    out = buffer.getvalue()
    first = failing.report_dict()["first_divergence"]
    assert "NOT EQUIVALENT" in out and "FAIL" in out
    assert first["node"] in out and "layer2.0.conv1, layer2.0.bn1" in out
    assert "passes with rtol ≥" in out
    buffer = io.StringIO()  # the summary of `repfuse convert`: passes, cost, verdict
    render_terminal(failing, Console(file=buffer, width=160, highlight=False))
    out = buffer.getvalue()
    assert "fold_batchnorm" in out and "BatchNorm2d" in out and "NOT EQUIVALENT" in out
    assert "first divergence: rewrite fold_batchnorm" in out


def test_write_report_by_extension(tmp_path, failing):
    for suffix in (".json", ".md", ".html"):
        path = write_report(tmp_path / f"r{suffix}", failing)
        assert path.read_text() == render(failing, suffix)
    with pytest.raises(RepfuseError, match=r"unsupported report type '\.txt'"):
        write_report(tmp_path / "r.txt", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json", "r.md"]


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH")
def test_html_renders_in_headless_chromium_at_print_width(tmp_path, failing):
    """scripts/screenshot-report: the page at A4's printable width (718 px) with its print
    styles, a PNG of the whole page and a PDF; nothing may stick out sideways."""
    page = write_report(tmp_path / "report.html", failing)
    shot, pdf = tmp_path / "shot.png", tmp_path / "report.pdf"
    done = screenshot(page, shot, "--pdf", pdf)
    assert done.returncode == 0, done.stdout + done.stderr  # 1: something overflows
    width, scroll, height = map(int, re.findall(r"\d+", done.stdout))
    assert width == 718 and scroll <= width and height > 1000
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 718  # the PNG's width
    assert int.from_bytes(png[20:24], "big") == height
    assert pdf.read_bytes()[:5] == b"%PDF-"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    assert re.search(r'id="verdict"[^>]*>NOT EQUIVALENT<', dom)
    assert "<svg" in dom


def test_the_screenshot_script_finds_a_page_that_is_too_wide(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH")
    page = tmp_path / "wide.html"
    page.write_text("<html><body><table><tr><td>" + "x" * 400 + "</td></tr></table></body></html>")
    done = screenshot(page, tmp_path / "w.png")
    assert done.returncode == 1, done.stdout + done.stderr
