"""Tests of the ``repfuse`` command line: exit codes, files written (or not), and numbers.

Most commands run in-process through click's :class:`~click.testing.CliRunner`; a few run the
installed console script in a subprocess, for the real exit code and the one-line error on
stderr. Every command runs with ``tmp_path`` as its working directory or explicit ``-o`` paths
there, so nothing is written into the repository.

Every fused model written is loaded back and compared with the unfused zoo model run in float64
(:func:`conftest.reference64`): float32 output within 1e-5 relative.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import cli, console_script
from click.testing import Result
from conftest import random_input, reference64, rel_err
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

from repfuse.errors import RepfuseError
from repfuse.models import create_model, list_models
from repfuse.passes import DEFAULT_PIPELINE, REGISTRY

TINY = "resnet_tiny"
TINY_SHAPE = (1, 3, 32, 32)
F32_RTOL = 1e-5


def error_line(stderr: str) -> str:
    """The single line a failing command prints; asserts there is exactly one."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("repfuse: error: ")
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """What ``repfuse convert resnet_tiny`` converts: the seeded zoo model."""
    return create_model(TINY)


def batchnorm_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def assert_fused_model_file(path: Path, reference: nn.Module, shape=TINY_SHAPE) -> GraphModule:
    """``path`` holds a BatchNorm-free GraphModule computing ``reference`` to 1e-5 (float32)."""
    fused = torch.load(path, weights_only=False)
    assert isinstance(fused, GraphModule)
    assert batchnorm_count(fused) == 0
    assert not any("batch_norm" in str(n.target) for n in fused.graph.nodes)
    for batch in (1, 3):
        x = random_input((batch, *shape[1:]), seed=batch + 10)
        with torch.no_grad():
            out = fused(x)
        assert out.dtype == torch.float32
        assert rel_err(reference64(reference, x), out) <= F32_RTOL
    return fused


# --- convert a zoo model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Result, Path, Path]:
    folder = tmp_path_factory.mktemp("converted")
    out, report = folder / "tiny.fused.pt", folder / "tiny.json"
    result = cli("convert", TINY, "-o", out, "--report", report)
    return result, out, report


def test_convert_zoo_model(converted, tiny):
    result, out, _ = converted
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # human output goes to stderr
    assert f"wrote {out}" in result.stderr
    assert_fused_model_file(out, tiny)


def test_convert_report(converted, tiny):
    result, _, report_path = converted
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["schema_version"] == 3
    assert report["passed"] is True
    assert [run["dtype"] for run in report["runs"]] == ["float64", "float32"]
    for run in report["runs"]:
        assert run["passed"] is True
        assert run["outputs"][0]["metrics"]["max_rel"] <= F32_RTOL
    conversion = report["conversion"]
    bn = batchnorm_count(tiny)
    assert bn == 12
    assert conversion["counts"]["fold_batchnorm"] == bn
    before, after = conversion["cost"]["before"], conversion["cost"]["after"]
    assert before["ops"]["BatchNorm2d"] == bn
    assert after["ops"].get("BatchNorm2d", 0) == 0
    assert before["ops"]["Conv2d"] == after["ops"]["Conv2d"] == 12
    # Each folded BatchNorm2d(C) drops its weight and bias, the conv gains a bias only if it
    # had none: resnet_tiny's convs are bias-free, so the count drops by 2C - C = C per BN.
    channels = sum(m.num_features for m in tiny.modules() if isinstance(m, _BatchNorm))
    assert before["params"] - after["params"] == channels
    assert before["params"] == sum(p.numel() for p in tiny.parameters())


def test_convert_default_output_of_a_zoo_model_is_in_the_working_directory(
    tmp_path, monkeypatch, tiny
):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", TINY)
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path) == ["resnet_tiny.fused.pt"]
    assert_fused_model_file(tmp_path / "resnet_tiny.fused.pt", tiny)


# --- whole pickled modules ----------------------------------------------------------------------


@pytest.fixture
def pickled(tmp_path, tiny) -> Path:
    """resnet_tiny saved whole with ``torch.save(model)`` in ``tmp_path/models``."""
    path = tmp_path / "models" / "whole.pt"
    path.parent.mkdir()
    torch.save(tiny, path)
    return path


def test_pickled_module_without_trust_is_refused(tmp_path, pickled):
    digest = sha256(pickled)
    done = console_script("convert", pickled, "--input-shape", "1,3,32,32", cwd=tmp_path)
    assert done.returncode == 2
    line = error_line(done.stderr)
    assert "--trust" in line and "arbitrary code" in line
    assert done.stdout == ""
    assert files_in(tmp_path) == ["models", "models/whole.pt"]
    assert sha256(pickled) == digest


def test_pickled_module_with_trust_writes_beside_the_input(tmp_path, monkeypatch, pickled, tiny):
    digest = sha256(pickled)
    monkeypatch.chdir(tmp_path)
    result = cli("convert", "models/whole.pt", "--trust", "--input-shape", "1,3,32,32")
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path) == ["models", "models/whole.fused.pt", "models/whole.pt"]
    assert_fused_model_file(tmp_path / "models" / "whole.fused.pt", tiny)
    assert sha256(pickled) == digest


def test_output_equal_to_input_is_refused(tmp_path, pickled):
    digest = sha256(pickled)
    same = tmp_path / "models" / ".." / "models" / "whole.pt"
    result = cli("convert", pickled, "--trust", "--input-shape", "1,3,32,32", "-o", same)
    assert result.exit_code == 2
    assert "refusing to overwrite the input" in error_line(result.stderr)
    assert sha256(pickled) == digest
    assert files_in(tmp_path) == ["models", "models/whole.pt"]


# --- state dicts --------------------------------------------------------------------------------


def test_state_dict_with_zoo_arch_notes_the_assumed_shape(tmp_path, tiny):
    weights, out = tmp_path / "weights.pt", tmp_path / "out.pt"
    torch.save(tiny.state_dict(), weights)
    result = cli("convert", weights, "--arch", TINY, "-o", out)
    assert result.exit_code == 0, result.output
    assert "assumed input shape [1, 3, 224, 224] from the first conv 'conv1'" in result.stderr
    assert_fused_model_file(out, tiny)


MYMOD = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)
        self.bn_fc = nn.BatchNorm1d(2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.bn_fc(self.fc(y))


def build():
    return Net()
'''


def test_state_dict_with_a_factory_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text(MYMOD)
    namespace: dict = {}
    exec(compile(MYMOD, "mymod.py", "exec"), namespace)
    original = namespace["build"]()
    with torch.no_grad():  # statistics far from the fresh BatchNorm's identity
        for bn in (original.bn, original.bn_fc):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        result = cli("convert", "w.pt", "--arch", "mymod:build", "--input-shape", "2,4,10,10",
                     "-o", "w.fused.pt")
    finally:
        sys.modules.pop("mymod", None)
    assert result.exit_code == 0, result.output
    fused = torch.load(tmp_path / "w.fused.pt", weights_only=False)
    assert batchnorm_count(fused) == 0
    x = random_input((3, 4, 10, 10), seed=4)
    with torch.no_grad():
        assert rel_err(reference64(original.eval(), x), fused(x)) <= F32_RTOL


def test_state_dict_without_arch(tmp_path, tiny):
    weights = tmp_path / "weights.pt"
    torch.save(tiny.state_dict(), weights)
    result = cli("convert", weights, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2
    assert "--arch" in error_line(result.stderr)
    assert files_in(tmp_path) == ["weights.pt"]


def test_state_dict_of_another_architecture(tmp_path):
    weights = tmp_path / "vgg.pt"
    torch.save(create_model("vgg_tiny").state_dict(), weights)
    result = cli("convert", weights, "--arch", TINY, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "does not fit --arch resnet_tiny" in line
    assert "missing conv1.weight" in line
    assert "unexpected features.0." in line
    assert files_in(tmp_path) == ["vgg.pt"]


# --- torch.export programs ----------------------------------------------------------------------


def test_export_program(tmp_path, tiny):
    program = tmp_path / "tiny.pt2"
    x = random_input(TINY_SHAPE)
    torch.export.save(torch.export.export(create_model(TINY), (x,)), program)
    out = tmp_path / "tiny.fused.pt"
    result = cli("convert", program, "-o", out)
    assert result.exit_code == 0, result.output
    assert "input [1, 3, 32, 32]" in result.stderr  # the program's own input shape
    assert "assumed" not in result.stderr
    fused = torch.load(out, weights_only=False)
    assert isinstance(fused, GraphModule)
    assert not any("batch_norm" in str(n.target) for n in fused.graph.nodes)
    with torch.no_grad():
        assert rel_err(reference64(tiny, x), fused(x)) <= F32_RTOL


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["absent.pt"], "no file or zoo model named 'absent.pt'"),
        ([TINY, "--input-shape", "1,three,32,32"], "bad --input-shape '1,three,32,32'"),
        ([TINY, "--input-shape", "1,0,32,32"], "expected positive integers"),
        ([TINY, "--passes", "fold_batchnorm,fuse_everything"], "unknown pass 'fuse_everything'"),
        ([TINY, "--report", "report.txt"], "unsupported report type '.txt'"),
        ([TINY, "-o", "out.bin"], "unsupported output type '.bin'"),
    ],
    ids=["missing-file", "shape-not-int", "shape-zero", "unknown-pass", "report-txt", "output-bin"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", *args)
    assert result.exit_code == 2
    assert message in error_line(result.stderr)
    assert result.stdout == ""
    assert files_in(tmp_path) == []


def test_zero_tolerance_fails_and_writes_nothing(tmp_path):
    out, report = tmp_path / "out.pt", tmp_path / "r.json"
    result = cli("convert", TINY, "--rtol", 0, "--atol", 0, "-o", out, "--report", report)
    assert result.exit_code == 1
    assert "not written" in result.stderr and "--force" in result.stderr
    assert not out.exists()
    data = json.loads(report.read_text())  # the report says why
    assert data["passed"] is False
    float32 = data["runs"][1]
    assert float32["tolerance"] == {"rtol": 0.0, "atol": 0.0}
    max_rel = float32["outputs"][0]["metrics"]["max_rel"]
    assert 0 < max_rel <= F32_RTOL  # float32 rounding: not zero, but small
    assert float32["min_rtol_to_pass"] == pytest.approx(max_rel, rel=1e-12)


def test_force_writes_despite_failed_verification(tmp_path, tiny):
    out = tmp_path / "out.pt"
    result = cli("convert", TINY, "--rtol", 0, "--atol", 0, "--force", "-o", out)
    assert result.exit_code == 1
    assert f"wrote {out} despite failed verification (--force)" in result.stderr
    assert_fused_model_file(out, tiny)


def test_debug_lets_the_error_propagate(tmp_path):
    quiet = cli("convert", TINY, "--input-shape", "bad", "-o", tmp_path / "o.pt")
    assert quiet.exit_code == 2 and isinstance(quiet.exception, SystemExit)
    loud = cli("convert", TINY, "--input-shape", "bad", "-o", tmp_path / "o.pt", "--debug")
    assert isinstance(loud.exception, RepfuseError)
    assert "bad --input-shape" in str(loud.exception)


def test_console_script_traceback_only_with_debug(tmp_path):
    quiet = console_script("convert", TINY, "--input-shape", "1,3,y", cwd=tmp_path)
    assert quiet.returncode == 2
    assert "bad --input-shape '1,3,y'" in error_line(quiet.stderr)
    loud = console_script("convert", TINY, "--input-shape", "1,3,y", "--debug", cwd=tmp_path)
    assert loud.returncode != 0
    assert "Traceback (most recent call last)" in loud.stderr
    assert "RepfuseError: bad --input-shape" in loud.stderr
    assert files_in(tmp_path) == []


def test_input_shape_that_does_not_fit_is_one_line(tmp_path):
    result = cli("convert", TINY, "--input-shape", "1,5,32,32", "-o", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert "inputs of shape [1, 5, 32, 32]" in error_line(result.stderr)


# --- verify -------------------------------------------------------------------------------------


def hand_max_abs(
    reference: nn.Module, candidate: nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    """max|candidate(x) - reference64(x)| and max|reference64(x)|."""
    truth = reference64(reference, x)
    with torch.no_grad():
        out = candidate(x).double()
    return (out - truth).abs().max().item(), truth.abs().max().item()


# The CLI's example input: seeded N(0, 1) drawn in float64 (repfuse.convert.example_input),
# which is conftest.random_input with seed 0.
EXAMPLE = random_input(TINY_SHAPE, seed=0)


def test_verify_json_reports_the_measured_error(converted, tiny):
    _, out, _ = converted
    result = cli("verify", TINY, out, "--trust", "--json", "--batches", 1)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 3 and report["passed"] is True
    assert report["inputs"]["shapes"] == [list(TINY_SHAPE)]
    max_abs, ref_max = hand_max_abs(tiny, torch.load(out, weights_only=False), EXAMPLE)
    metrics = report["runs"][1]["outputs"][0]["metrics"]
    assert metrics["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert metrics["ref_max_abs"] == pytest.approx(ref_max, rel=1e-12)
    assert "EQUIVALENT" in result.stderr


def test_verify_without_trust_is_refused(converted):
    _, out, _ = converted
    result = cli("verify", TINY, out)
    assert result.exit_code == 2
    assert "--trust" in error_line(result.stderr)


def test_verify_perturbed_candidate_exits_1(tmp_path, converted, tiny):
    _, out, _ = converted
    bad = torch.load(out, weights_only=False)
    conv = next(m for m in bad.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.add_(1e-2)
    torch.save(bad, tmp_path / "bad.pt")
    report = tmp_path / "bad.json"
    done = console_script("verify", TINY, "bad.pt", "--trust", "--batches", 1, "--report",
                          report, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "NOT EQUIVALENT" in done.stderr
    data = json.loads(report.read_text())
    assert data["passed"] is False
    max_abs, ref_max = hand_max_abs(tiny, bad, EXAMPLE)
    assert max_abs > F32_RTOL * ref_max
    metrics = data["runs"][1]["outputs"][0]["metrics"]
    assert metrics["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert math.isfinite(metrics["sqnr_db"])


# --- listing and inspecting ---------------------------------------------------------------------


def test_passes_lists_every_registered_pass():
    result = cli("passes")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert sorted(names) == sorted(REGISTRY)
    assert names[: len(DEFAULT_PIPELINE)] == list(DEFAULT_PIPELINE)


def test_models_lists_the_zoo():
    result = cli("models")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [spec.name for spec in list_models()]
    assert f"{TINY} " in result.stdout and "1,3,32,32" in result.stdout


def test_inspect_lists_rewrites_and_writes_nothing(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", TINY)
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path) == []
    assert result.stderr.count("fold_batchnorm") == batchnorm_count(tiny)
    for name, module in tiny.named_modules():
        if isinstance(module, nn.Conv2d):
            assert name in result.stderr  # every conv absorbs a BatchNorm
    # The only declines: running a downsampling block's 1x1 and 3x3 convs as one would cost
    # MACs (horizontal fusion).
    declines = [line for line in result.stderr.splitlines() if "declined" in line]
    assert declines and all("merge_siblings" in d and "raise MACs" in d for d in declines)
    assert "\nlayer1.0\n" in result.stderr  # grouped per block


COMMANDS_WITH_EXAMPLES = ["convert", "verify", "inspect", "bench"]
COMMANDS_WITHOUT_EXAMPLES = ["passes", "models"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS_WITH_EXAMPLES)],
                         ids=["repfuse", *COMMANDS_WITH_EXAMPLES])
def test_help_has_an_example(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


@pytest.mark.parametrize("command", COMMANDS_WITHOUT_EXAMPLES)
def test_help_of_listing_commands_has_an_example(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
