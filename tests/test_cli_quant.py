"""``repfuse quant-report`` and ``repfuse convert --quant-report`` on the command line.

Every figure asserted is recomputed here: the per-layer INT8 weight SQNR by a direct symmetric
fake quantization in numpy (round half to even, [-127, 127], as onnxruntime) of the fused
model's weights, and the activation ranges at the network's ends from the calibration batches
themselves and from the unfused model run in float64.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import cli, console_script, screenshot
from click.testing import Result
from conftest import random_input, reference64
from int8_reference import int8_weight, sqnr_db
from torch import nn

import repfuse
from repfuse.models import create_model

MODEL = "repvgg_tiny"
SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Three calibration batches of two images, stacked (one rank more than the input)."""
    stacked = torch.stack([random_input((2, 3, 32, 32), seed=10 + i) for i in range(3)])
    path = tmp_path_factory.mktemp("calib") / "calib.pt"
    torch.save(stacked, path)
    return path, stacked


@pytest.fixture(scope="module")
def quant_run(calibration, tmp_path_factory) -> tuple[Result, dict, Path]:
    """``repfuse quant-report repvgg_tiny --inputs calib.pt`` with every report."""
    folder = tmp_path_factory.mktemp("quant")
    path, _ = calibration
    result = cli("quant-report", MODEL, "--inputs", path, "--json",
                 "--report", folder / "q.json", "--report", folder / "q.md",
                 "--report", folder / "q.html")
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout), folder


def fused_layers() -> dict[str, nn.Module]:
    fused = repfuse.fuse(create_model(MODEL), random_input(SHAPE))
    return {n.target: fused.get_submodule(n.target) for n in fused.graph.nodes
            if n.op == "call_module"
            and isinstance(fused.get_submodule(n.target), (nn.Conv2d, nn.Linear))}


def test_weight_sqnr_in_the_json_is_a_direct_fake_quantization(quant_run):
    _, data, _ = quant_run
    assert data["kind"] == "quant" and data["quant"]["kind"] == "quant_report"
    layers = fused_layers()
    quant = data["quant"]
    assert [layer["module"] for layer in quant["layers"]] == list(layers)
    for layer in quant["layers"]:
        w = layers[layer["module"]].weight.detach().double().numpy()
        assert layer["weight_shape"] == list(w.shape)
        assert layer["sqnr_per_tensor_db"] == pytest.approx(sqnr_db(w, int8_weight(w, False)),
                                                            rel=1e-9)
        assert layer["sqnr_per_channel_db"] == pytest.approx(sqnr_db(w, int8_weight(w, True)),
                                                             rel=1e-9)
        ranges = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        assert layer["channel_ranges"] == pytest.approx(ranges.tolist(), rel=1e-12)
        lower_median = np.sort(ranges)[(len(ranges) - 1) // 2]  # torch.median's convention
        assert layer["range_ratio"] == pytest.approx(ranges.max() / lower_median, rel=1e-9)
    flagged = [layer["node"] for layer in quant["layers"]
               if min(layer["sqnr_per_tensor_db"], layer["sqnr_per_channel_db"]) < 30]
    assert flagged and set(flagged) <= set(quant["flagged"])


def test_calibration_ranges_and_simulated_forms(quant_run, calibration):
    _, data, _ = quant_run
    path, stacked = calibration
    quant = data["quant"]
    assert quant["batches"] == 3 and path.name in quant["calibration"]
    first, last = quant["activations"][0], quant["activations"][-1]
    # the first layer reads the calibration images, the last one writes the model's output
    assert (first["input_min"], first["input_max"]) == (pytest.approx(stacked.min().item()),
                                                        pytest.approx(stacked.max().item()))
    # the fused float32 weights run in float64: equal to the unfused float64 run up to the
    # float32 rounding of the folded weights
    model = create_model(MODEL)
    outputs = torch.cat([reference64(model, batch) for batch in stacked])
    scale = outputs.abs().max().item()
    assert abs(last["output_min"] - outputs.min().item()) <= 1e-5 * scale
    assert abs(last["output_max"] - outputs.max().item()) <= 1e-5 * scale
    assert [f["form"] for f in quant["forms"]] == ["train", "fused", "equalized"]
    assert all(math.isfinite(f["per_tensor_db"]) and f["quant_points"] > 0
               for f in quant["forms"])


def test_terminal_markdown_and_html_draw_the_same_numbers(quant_run):
    result, data, folder = quant_run
    worst = min(data["quant"]["layers"], key=lambda layer: layer["sqnr_per_tensor_db"])
    figure = f"{worst['sqnr_per_tensor_db']:.1f}"
    row = re.compile(rf"{re.escape(worst['module'])}\W+{worst['weight_shape'][0]}x")
    assert row.search(result.stderr)  # the terminal table of the renderer
    assert f"worst per-tensor INT8 weight SQNR: {figure} dB" in result.stderr
    written = json.loads((folder / "q.json").read_text())
    assert written["quant"] == data["quant"]
    markdown = (folder / "q.md").read_text()
    assert markdown.startswith(f"# repfuse quant-report: {MODEL}")
    layers = len(data["quant"]["layers"])
    assert f"{layers} conv/linear layers after fusion · quant report schema 1" in markdown
    assert f"| {worst['module']} |" in markdown and f"| {figure} |" in markdown
    page = (folder / "q.html").read_text()
    assert '<h2 id="quant">Quantization readiness</h2>' in page
    assert 'aria-label="INT8 weight SQNR per layer"' in page
    assert page.count("<svg") == 1 and "fused + equalize, per-tensor" in page
    assert page.index('id="quant"') < page.index('id="passes"')  # what the report is about


def test_no_equalize_leaves_out_the_equalized_form(calibration):
    path, _ = calibration
    result = cli("quant-report", MODEL, "--inputs", path, "--no-equalize", "--json")
    assert result.exit_code == 0, result.output
    quant = json.loads(result.stdout)["quant"]
    assert quant["equalized"] == [] and quant["equalization"] == {}
    assert [f["form"] for f in quant["forms"]] == ["train", "fused"]
    assert "equalized per-tensor dB" not in result.stderr
    assert "equalize: not run" in result.stderr


def test_without_inputs_only_the_weights(tmp_path):
    result = cli("quant-report", MODEL, "--json", "--no-equalize", "--report",
                 tmp_path / "q.md")
    assert result.exit_code == 0, result.output
    quant = json.loads(result.stdout)["quant"]
    assert quant["batches"] == 0 and quant["activations"] == [] and quant["forms"] == []
    assert len(quant["layers"]) == len(fused_layers())
    assert "weight figures only" in (tmp_path / "q.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.md"]


def test_convert_with_quant_report_carries_the_section(tmp_path, calibration, quant_run):
    path, _ = calibration
    out = tmp_path / "m.fused.pt"
    result = cli("convert", MODEL, "-o", out, "--quant-report", "--inputs", path,
                 "--max-batches", 1, "--report", tmp_path / "r.json",
                 "--report", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kind"] == "convert" and data["passed"] is True
    assert data["quant"]["layers"] == quant_run[1]["quant"]["layers"]
    assert data["quant"]["batches"] == 1 and data["inputs"]["batches"] == 1
    page = (tmp_path / "r.html").read_text()
    assert '<h2 id="quantization">Quantization readiness</h2>' in page
    assert page.index('id="export"' if 'id="export"' in page else 'id="outputs"') \
        < page.index('id="quantization"')
    assert 'aria-label="INT8 weight SQNR per layer"' in page
    fused = torch.load(out, weights_only=False)
    x = random_input(SHAPE, seed=3)
    expected = reference64(create_model(MODEL), x)
    assert ((fused(x).double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["quant-report", MODEL, "--report", "q.csv"], "unsupported report type '.csv'"),
    (["quant-report", "no_such_model"], "no file or zoo model named 'no_such_model'"),
    (["quant-report", MODEL, "--inputs", "absent.pt"], "absent.pt"),
    (["quant-report", "branchynet_tiny"], "fused in parts"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    done = console_script(*args, cwd=tmp_path, timeout=180)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("repfuse: ")]
    assert len(lines) == 1 and lines[0].startswith("repfuse: error: ")
    assert message in lines[0] and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary on PATH")
def test_quant_report_page_fits_the_printed_width(quant_run, tmp_path):
    _, _, folder = quant_run
    done = screenshot(folder / "q.html", tmp_path / "q.png")
    assert done.returncode == 0, done.stdout + done.stderr  # 1: something sticks out
