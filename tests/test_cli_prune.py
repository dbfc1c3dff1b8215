"""``--prune-below`` on the command line: approximate, opt-in, labelled APPROXIMATE everywhere.

The model has nearly dead channels (BN |γ| of a few 1e-3, as sparsity training leaves them)
that read into a 1x1 conv and, through a global pool, into the Linear head, so exact pruning
can remove them once they are made constant. The independent reference is the same model with
exactly those γ set to 0 by hand: the pruned file must equal it (float32 tolerance), and the
error every report states must be the one measured here between the original and the pruned
file, both run in float64 on the user's batches.

Also: ``.onnx`` outputs keep pruned widths a multiple of 8 (``ONNX_PIPELINE``), exactly.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from cli_runs import cli, console_script, screenshot
from click.testing import Result
from conftest import random_input, reference64
from torch import nn

from repfuse.models import create_model, randomize_bn_stats

THRESHOLD = 1e-2
NEARLY_DEAD = {"1": [2, 5, 11], "4": [7]}  # BN index in the Sequential -> channels
# "EQUIVALENT" as a verdict, alone or in "NOT EQUIVALENT": an approximation is neither
EQUIVALENT = re.compile(r"\bEQUIVALENT\b")


def nearly_dead_model() -> nn.Sequential:
    """The same model at every call (its own seed, whatever the global one)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
    randomize_bn_stats(model, seed=4)
    with torch.no_grad():
        for index, channels in NEARLY_DEAD.items():
            bn = model.get_submodule(index)
            bn.weight[channels] = torch.tensor([3e-3, -5e-3, 8e-3][:len(channels)])
            bn.bias[channels] = torch.tensor([0.4, 0.7, 0.2][:len(channels)])  # relu(β) > 0
    return model.eval()


def pruned_by_hand(model: nn.Module) -> nn.Module:
    """The approximation itself, independently: γ below the threshold set to 0."""
    approx = copy.deepcopy(model)
    with torch.no_grad():
        for module in approx.modules():
            if isinstance(module, nn.BatchNorm2d):
                small = module.weight.abs() < THRESHOLD
                module.weight[small] = 0
    return approx


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def stacked_error(reference: nn.Module, candidate: nn.Module, batches) -> tuple[float, float]:
    """max rel (to max |reference|) and max abs error over all batches, both in float64."""
    ref = torch.cat([reference64(reference, b) for b in batches])
    cand = torch.cat([reference64(candidate, b) for b in batches])
    diff = (cand - ref).abs().max().item()
    return diff / ref.abs().max().item(), diff


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prune")
    torch.save(nearly_dead_model(), folder / "model.pt")
    torch.save([random_input((2, 3, 16, 16), seed=20 + i) for i in range(3)],
               folder / "batches.pt")
    return folder


@pytest.fixture(scope="module")
def pruned(files) -> tuple[Result, dict, Path]:
    out = files / "out"
    out.mkdir()
    result = cli("convert", files / "model.pt", "--trust", "--inputs", files / "batches.pt",
                 "--prune-below", THRESHOLD, "-o", out / "pruned.pt", "--json",
                 "--report", out / "r.json", "--report", out / "r.md", "--report",
                 out / "r.html")
    return result, json.loads(result.stdout), out


def test_the_pruned_file_is_the_approximation_and_nothing_else(pruned, files):
    result, data, out = pruned
    assert result.exit_code == 0, result.output
    model = nearly_dead_model()
    fused = torch.load(out / "pruned.pt", weights_only=False)
    assert widths(model) == [16, 16, 10]
    assert widths(fused) == [13, 15, 10]  # the nearly dead channels are gone
    batches = torch.load(files / "batches.pt")
    exact_part, _ = stacked_error(pruned_by_hand(model), fused, batches)
    assert exact_part < 1e-5  # every other rewrite exact, up to float32 weights
    rewrites = data["conversion"]["rewrites"]
    assert {r["pass"] for r in rewrites if not r["exact"]} == {"prune_below"}
    assert sorted(r["module_paths"][0] for r in rewrites if not r["exact"]) == ["1", "4"]


def test_json_states_the_measured_error(pruned, files):
    _, data, out = pruned
    model = nearly_dead_model()
    fused = torch.load(out / "pruned.pt", weights_only=False)
    max_rel, max_abs = stacked_error(model, fused, torch.load(files / "batches.pt"))
    assert max_rel > 1e-4  # a real approximation, far above float32 rounding
    approx = data["approximate"]
    assert approx["exact"] is False and approx["passes"] == ["prune_below"]
    assert approx["max_rel_error"] == pytest.approx(max_rel, rel=1e-6)
    assert approx["max_abs_error"] == pytest.approx(max_abs, rel=1e-6)
    assert approx["measured_on"]["batches"] == 3
    assert approx["tolerance"] is None and approx["passed"] is True
    assert data["passed"] is True and data["kind"] == "convert"
    assert json.loads((out / "r.json").read_text())["approximate"] == approx
    assert "localization" in data and data["localization"] is None  # by design, not a bug
    written = {o["path"]: o["written"] for o in data["outputs"]}
    assert written[str(out / "pruned.pt")] is True


def test_every_rendering_says_approximate_and_never_equivalent(pruned):
    result, data, out = pruned
    error = f"{data['approximate']['max_rel_error']:.3e}"
    terminal = result.stderr
    assert "APPROXIMATE, not exact" in terminal and f"max rel error {error}" in terminal
    assert "APPROXIMATE: " in terminal and "not exact" in terminal
    markdown = (out / "r.md").read_text()
    assert "(APPROXIMATE)" in markdown.splitlines()[0]
    assert "**APPROXIMATE**" in markdown and f"max rel error {error}" in markdown
    page = (out / "r.html").read_text()
    assert '<p id="verdict" class="verdict approx">APPROXIMATE</p>' in page
    assert '<p id="approximate" class="approx">APPROXIMATE, not exact' in page
    assert f"max rel error {error}" in page
    for text in (terminal, markdown, page, json.dumps(data)):
        assert not EQUIVALENT.search(text)


def test_a_tolerance_given_decides_the_exit_code(files, tmp_path):
    common = [files / "model.pt", "--trust", "--inputs", files / "batches.pt",
              "--prune-below", THRESHOLD, "--json"]
    result = cli("convert", *common, "--rtol", 1e-6, "-o", tmp_path / "tight.pt")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["approximate"]["within_tolerance"] is False
    assert data["approximate"]["tolerance"]["rtol"] == 1e-6
    assert not (tmp_path / "tight.pt").exists()
    assert "error exceeds the tolerance given" in data["outputs"][0]["reason"]
    result = cli("convert", *common, "--rtol", 0.5, "-o", tmp_path / "loose.pt")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["approximate"]["within_tolerance"] is True
    assert (tmp_path / "loose.pt").exists()


def test_verify_of_a_pruned_file_is_approximate(pruned, files):
    _, data, out = pruned
    common = [files / "model.pt", out / "pruned.pt", "--trust", "--inputs",
              files / "batches.pt", "--json"]
    result = cli("verify", *common)
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)
    assert checked["approximate"]["max_rel_error"] == pytest.approx(
        data["approximate"]["max_rel_error"], rel=1e-9)
    assert "APPROXIMATE" in result.stderr and not EQUIVALENT.search(result.stderr)
    result = cli("verify", *common, "--rtol", 1e-6)
    assert result.exit_code == 1
    assert "OUTSIDE the tolerance given" in result.stderr
    assert not EQUIVALENT.search(result.stderr)


def test_never_in_the_default_pipeline(files):
    result = cli("convert", files / "model.pt", "--trust", "--inputs", files / "batches.pt",
                 "-o", files / "exact.pt", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "approximate" not in data and "prune_below" not in data["conversion"]["passes"]
    assert "EQUIVALENT" in result.stderr and "APPROXIMATE" not in result.stderr
    fused = torch.load(files / "exact.pt", weights_only=False)
    assert widths(fused) == [16, 16, 10]


def test_inspect_and_bench_label_it_too(files):
    common = [files / "model.pt", "--trust", "--input-shape", "1,3,16,16", "--prune-below",
              THRESHOLD, "--json"]
    inspected = cli("inspect", *common)
    assert inspected.exit_code == 0, inspected.output
    approx = json.loads(inspected.stdout)["approximate"]
    assert approx["max_rel_error"] > 1e-4 and approx["passes"] == ["prune_below"]
    assert "APPROXIMATE, not exact" in inspected.stderr
    benched = cli("bench", *common, "--repeat", 1, "--warmup", 0)
    assert benched.exit_code == 0, benched.output
    data = json.loads(benched.stdout)
    assert data["approximate"]["passes"] == ["prune_below"]
    # bench's own error column measures the same approximation
    assert data["batches"][0]["max_rel_error"]["fused"] > 1e-4
    assert "APPROXIMATE, not exact" in benched.stderr


def test_prune_by_norm(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(8)
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[5] *= 1e-4
    torch.save(model, tmp_path / "m.pt")
    result = cli("convert", tmp_path / "m.pt", "--trust", "--input-shape", "1,3,8,8",
                 "--prune-below", 1e-2, "--prune-by", "norm", "-o", tmp_path / "p.pt",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["approximate"]["rewrites"][0]["module_paths"] == ["0"]
    fused = torch.load(tmp_path / "p.pt", weights_only=False)
    assert widths(fused) == [7, 4]
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand[0].weight[5] = 0  # its bias stays: relu(b5) folds into the reader's bias
    x = [random_input((2, 3, 8, 8), seed=s) for s in range(2)]
    assert stacked_error(by_hand, fused, x)[0] < 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["--prune-below", "-1"], "the threshold must be >= 0"),
    (["--prune-by", "norm"], "--prune-by needs --prune-below"),
])
def test_bad_prune_options_are_one_line_and_exit_2(tmp_path, args, message):
    done = console_script("convert", "resnet_tiny", "-o", "out.pt", *args, cwd=tmp_path,
                          timeout=180)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("repfuse: error: ") and message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_onnx_output_keeps_pruned_widths_a_multiple_of_eight(tmp_path):
    result = cli("convert", "slim_vgg_tiny", "-o", tmp_path / "s.onnx", "--json")
    assert result.exit_code == 0, result.output
    graph = onnx.load(tmp_path / "s.onnx").graph
    weights = {w.name: list(w.dims) for w in graph.initializer}
    convs = [weights[n.input[1]][0] for n in graph.node if n.op_type == "Conv"]
    original = [m.out_channels for m in create_model("slim_vgg_tiny").modules()
                if isinstance(m, nn.Conv2d)]
    assert all(c % 8 == 0 for c in convs) and sum(convs) < sum(original)
    result = cli("convert", "slim_vgg_tiny", "-o", tmp_path / "s.pt")  # eager: remove all
    eager = [m.out_channels for m in torch.load(tmp_path / "s.pt", weights_only=False).modules()
             if isinstance(m, nn.Conv2d)]
    assert any(c % 8 for c in eager) and all(e <= c for e, c in zip(eager, convs, strict=True))
    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"))
    x = random_input((1, 3, 32, 32), seed=5)
    expected = reference64(create_model("slim_vgg_tiny"), x)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    rel = np.abs(got - expected.numpy()).max() / expected.abs().max().item()
    assert rel < 1e-5  # keeping dead channels is exact


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary on PATH")
def test_approximate_page_fits_the_printed_width(pruned, tmp_path):
    _, _, out = pruned
    done = screenshot(out / "r.html", tmp_path / "r.png")
    assert done.returncode == 0, done.stdout + done.stderr
