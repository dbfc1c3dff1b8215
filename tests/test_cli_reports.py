"""Tests of the reports and inputs of ``repfuse convert`` / ``repfuse verify`` on the command line.

Acceptance: the weight of one fused conv perturbed (scaled by 1.01) in a fused model saved to a
file makes ``repfuse verify`` exit 1 and name that rewrite and its original module paths;
unperturbed it exits 0. (Not a single weight element: with randomized BatchNorm statistics the
input channel it reads may be all zeros after a ReLU, and then nothing changes.)

Reports are written by extension; verification runs on the user's batches (files or a
``module:fn`` factory) within ``--max-batches``, which the reported errors must reflect exactly
(recomputed here against the unfused model in float64).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import REPFUSE, cli
from conftest import random_input, reference64
from torch import nn

import repfuse
from repfuse.convert import example_input
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model
from repfuse.passes import history

TINY = "resnet_tiny"
TINY_SHAPE = (1, 3, 32, 32)


def max_abs_over(reference: nn.Module, candidate: nn.Module, batches) -> float:
    """max over batches of |candidate64(x) - reference64(x)|, both unfused-style float64 runs."""
    return max((reference64(candidate, x) - reference64(reference, x)).abs().max().item()
               for x in batches)


@pytest.fixture(scope="module")
def fused_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fused")
    out = folder / "tiny.fused.pt"
    result = cli("convert", TINY, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return create_model(TINY)


def perturb_one_weight(path: Path, conv: str, out: Path) -> None:
    """Load the fused model at ``path``, scale the weight of ``conv`` by 1.01, save to ``out``."""
    fused = torch.load(path, weights_only=False)
    with torch.no_grad():
        fused.get_submodule(conv).weight.mul_(1.01)
    torch.save(fused, out)


# --- acceptance ---------------------------------------------------------------------------------


def test_unperturbed_fused_file_verifies(fused_file):
    result = cli("verify", TINY, fused_file, "--trust", "--json", "--batches", 2)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["first_divergence"] is None
    assert data["localization"] is None  # localized only on failure, unless asked
    result = cli("verify", TINY, fused_file, "--trust", "--json", "--batches", 2, "--localize")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["localization"]["method"] == "provenance"
    assert len(data["rewrites"]) == 12 and all(r["passed"] for r in data["rewrites"])


@pytest.mark.parametrize("conv, bn, console", [("layer1.0.conv2", "layer1.0.bn2", True),
                                               ("layer3.0.conv1", "layer3.0.bn1", False)])
def test_one_perturbed_weight_names_its_rewrite_and_original_modules(
    tmp_path, fused_file, tiny, conv, bn, console
):
    bad = tmp_path / "bad.pt"
    perturb_one_weight(fused_file, conv, bad)
    report = tmp_path / "bad.json"
    args = ["verify", TINY, str(bad), "--trust", "--batches", "1", "--report", str(report)]
    if console:  # the installed script: the real exit status
        done = subprocess.run([str(REPFUSE), *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        status, stderr = done.returncode, done.stderr
    else:
        result = cli(*args)
        status, stderr = result.exit_code, result.stderr
    assert status == 1, stderr
    loaded = torch.load(bad, weights_only=False)
    max_abs = max_abs_over(tiny, loaded, [example_input(TINY_SHAPE, tiny)])
    assert max_abs > 1e-5  # the change reaches the output
    data = json.loads(report.read_text())
    first = data["first_divergence"]
    rewrite = next(r for r in history(loaded).rewrites if r.module == conv)
    assert first["kind"] == "rewrite" and first["pass"] == "fold_batchnorm"
    assert first["node"] == rewrite.node
    assert first["module_paths"] == [conv, bn]
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(max_abs,
                                                                                rel=1e-9)
    assert f"first divergence: rewrite fold_batchnorm at node '{rewrite.node}'" in stderr
    assert f"original modules {conv}, {bn}" in stderr


def test_a_hand_written_deploy_model_is_localized_by_module_path(tmp_path, tiny):
    x = random_input(TINY_SHAPE)
    deploy = load_by_structure(create_model(TINY, deploy=True), repfuse.fuse(tiny, x), x)
    good, bad = tmp_path / "deploy.pt", tmp_path / "deploy_bad.pt"
    torch.save(deploy, good)
    with torch.no_grad():
        deploy.layer3[0].conv1.weight.mul_(1.01)
    torch.save(deploy, bad)

    ok = cli("verify", TINY, good, "--trust", "--json", "--localize")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["localization"]["method"] == "module_paths"

    result = cli("verify", TINY, bad, "--trust", "--json", "--batches", 1)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    first = data["first_divergence"]
    assert first["kind"] == "module" and first["node"] == "layer3.0.relu"
    assert first["module_paths"] == ["layer3.0.conv1", "layer3.0.bn1"]
    max_abs = max_abs_over(tiny, deploy, [example_input(TINY_SHAPE, tiny)])
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(max_abs,
                                                                                rel=1e-9)


# --- reports by extension -----------------------------------------------------------------------


def test_convert_writes_an_html_report_and_prints_json(tmp_path):
    report = tmp_path / "report.html"
    result = cli("convert", TINY, "-o", tmp_path / "out.pt", "--report", report, "--json",
                 "--localize")  # localized although it passes: the chart is drawn
    assert result.exit_code == 0, result.output
    assert f"wrote report {report}" in result.stderr
    data = json.loads(result.stdout)
    assert data["schema_version"] == 3 and data["passed"] is True
    assert data["conversion"]["counts"]["fold_batchnorm"] == 12
    page = report.read_text()
    assert 'id="verdict" class="verdict pass">EQUIVALENT<' in page
    assert "http://" not in page and "https://" not in page
    assert "<svg" in page and "BatchNorm2d" in page


def test_convert_writes_a_markdown_report(tmp_path):
    report = tmp_path / "report.md"
    result = cli("convert", TINY, "-o", tmp_path / "out.pt", "--report", report)
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "**EQUIVALENT**" in text and "| ops: BatchNorm2d | 12 | 0 | -12 |" in text
    assert "deployment dtype float32 · report schema 3" in text


def test_verify_writes_markdown(tmp_path, fused_file):
    report = tmp_path / "v.md"
    result = cli("verify", TINY, fused_file, "--trust", "--report", report, "--localize")
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "## Localization" in text and "**error per rewrite**" in text


@pytest.mark.parametrize("args, message", [
    (["--report", "r.txt"], "unsupported report type '.txt'"),
    (["--inputs", "absent.pt"], "no input file 'absent.pt'"),
    (["--inputs", "nosuchmodule_abc:fn"], "cannot import 'nosuchmodule_abc' for --inputs"),
])
def test_bad_report_or_inputs_exit_2(tmp_path, monkeypatch, fused_file, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli("verify", TINY, fused_file, "--trust", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_max_batches_below_one_is_a_usage_error(fused_file):
    result = cli("verify", TINY, fused_file, "--trust", "--max-batches", 0)
    assert result.exit_code == 2


# --- inputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perturbed_file(tmp_path_factory, fused_file) -> Path:
    path = tmp_path_factory.mktemp("perturbed") / "bad.pt"
    perturb_one_weight(fused_file, "layer2.0.conv1", path)
    return path


def test_verify_on_a_file_of_batches_within_max_batches(tmp_path, tiny, perturbed_file):
    batches = torch.stack([random_input((2, 3, 32, 32), seed=40 + i) for i in range(4)])
    batches[1] *= 3  # the largest error is in batch 1
    batches[3] *= 9  # ... unless batch 3 is read, which --max-batches 2 prevents
    torch.save(batches, tmp_path / "batches.pt")
    result = cli("verify", TINY, perturbed_file, "--trust", "--json",
                 "--inputs", tmp_path / "batches.pt", "--max-batches", 2)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["inputs"]["batches"] == 2 and data["inputs"]["source"] == "batches from batches.pt"
    assert data["inputs"]["shapes"] == [[2, 3, 32, 32]]
    bad = torch.load(perturbed_file, weights_only=False)
    expected = max_abs_over(tiny, bad, batches[:2])
    assert expected < max_abs_over(tiny, bad, batches)
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(expected,
                                                                                rel=1e-9)
    assert data["first_divergence"]["module_paths"] == ["layer2.0.conv1", "layer2.0.bn1"]


def test_verify_on_npz_batches(tmp_path, tiny, perturbed_file):
    batches = torch.stack([random_input((1, 3, 32, 32), seed=50 + i) for i in range(3)])
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "x.npz", batches.numpy())
    result = cli("verify", TINY, perturbed_file, "--trust", "--json", "--inputs",
                 tmp_path / "x.npz")
    data = json.loads(result.stdout)
    bad = torch.load(perturbed_file, weights_only=False)
    assert data["inputs"]["batches"] == 3
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(
        max_abs_over(tiny, bad, batches), rel=1e-9)


LOADER = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def loader():
    g = torch.Generator().manual_seed(60)
    images = torch.randn(10, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(images, torch.zeros(10)), batch_size=4)
'''


def test_convert_on_batches_from_a_factory_in_the_working_directory(tmp_path, monkeypatch, tiny):
    (tmp_path / "mydata.py").write_text(LOADER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        result = cli("convert", TINY, "-o", "out.pt", "--report", "r.json",
                     "--inputs", "mydata:loader", "--max-batches", 2)
    finally:
        sys.modules.pop("mydata", None)
    assert result.exit_code == 0, result.output
    assert "assumed input shape" not in result.stderr  # the shape came from the batches
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"]["batches"] == 2 and data["inputs"]["shapes"] == [[4, 3, 32, 32]]
    g = torch.Generator().manual_seed(60)
    images = torch.randn(10, 3, 32, 32, generator=g)
    fused = torch.load(tmp_path / "out.pt", weights_only=False)
    expected = max_abs_over(tiny, fused, [images[:4], images[4:8]])
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(expected,
                                                                                rel=1e-9)


def test_uniform_random_inputs(fused_file, tiny):
    result = cli("verify", TINY, fused_file, "--trust", "--json", "--batches", 1,
                 "--distribution", "uniform")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"]["distribution"] == "uniform"
    x = example_input(TINY_SHAPE, tiny, distribution="uniform")
    assert 0 <= x.min() and x.max() < 1
    fused = torch.load(fused_file, weights_only=False)
    assert data["runs"][0]["outputs"][0]["metrics"]["max_abs"] == pytest.approx(
        max_abs_over(tiny, fused, [x]), rel=1e-9)
