"""What a new user tripped over (issue 14), finding by finding, through the CLI and the API.

The models are in ``tests/user_nets.py``, written as a user writes them and loaded by the CLI
from the working directory (``--arch user_nets:two_inputs``). Every number is checked against
the unfused model run in float64 (:func:`conftest.reference64`); every artifact is loaded the
way a deployment loads it (onnxruntime directly, ``torch.jit.load``, ``torch.export.load``,
``torch.load``), not through repfuse's own wrappers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import user_nets
from cli_runs import REPFUSE
from click.testing import CliRunner, Result
from conftest import random_input, reference64, rel_err
from rich.console import Console
from torch import Tensor, nn

import repfuse
from repfuse.cli import main
from repfuse.export import (
    emit_code,
    export_deploy_state_dict,
    export_onnx,
    export_pt2,
    export_torchscript,
    load_by_structure,
    onnx_model,
    torchscript_module,
)
from repfuse.memory import check_memory, estimate_memory
from repfuse.verify import VerifyOptions
from repfuse.verify.render import render_html, render_markdown, render_terminal

F32_RTOL = 1e-5
ONE_BATCH = VerifyOptions(batches=1)
NETS = Path(user_nets.__file__)


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def last_error(result: Result) -> str:
    """The one error line, the last of stderr; no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("repfuse: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    return errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding user_nets.py, importable as the CLI makes it."""
    shutil.copy(NETS, tmp_path / "user_nets.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def onnx_run(path: Path, **feeds: Tensor) -> dict[str, Tensor]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    arrays = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return {name: torch.from_numpy(a) for name, a in zip(names, arrays, strict=True)}


def jit_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


# --- 1. a model in training mode: checks run on eval copies; nothing of the user's changes ----


def state_of(*objects) -> str:
    """A hash of modules' tensors and training flags, of tensors, of files."""
    digest = hashlib.sha256()
    for obj in objects:
        if isinstance(obj, nn.Module):
            for name, tensor in obj.state_dict(keep_vars=True).items():
                digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
            digest.update(bytes(m.training for m in obj.modules()))
        elif isinstance(obj, Tensor):
            digest.update(obj.detach().cpu().numpy().tobytes())
        else:
            digest.update(Path(obj).read_bytes())
    return digest.hexdigest()


def _api_calls(tmp: Path):
    """(name, call) for each public API function, on a training-mode model ``m`` whose fused
    form is ``f`` (itself left in training mode by the user), input ``x``."""
    return [
        ("fuse", lambda m, f, x: repfuse.fuse(m, x)),
        ("trace", lambda m, f, x: repfuse.trace(m, x)),
        ("verify", lambda m, f, x: repfuse.verify(m, f, x, batches=1, localize_divergence=True)),
        ("convert", lambda m, f, x: repfuse.convert(
            m, x, [tmp / "c.pt", tmp / "c.onnx", tmp / "c.pt2", tmp / "c.ts",
                   repfuse.EmitCode(tmp / "code"), tmp / "c.html"], verify=ONE_BATCH)),
        ("export_onnx", lambda m, f, x: export_onnx(f, x, tmp / "e.onnx", reference=m,
                                                    verify=ONE_BATCH)),
        ("export_pt2", lambda m, f, x: export_pt2(f, x, tmp / "e.pt2", reference=m,
                                                  dynamic_batch=True, verify=ONE_BATCH)),
        ("export_torchscript", lambda m, f, x: export_torchscript(f, x, tmp / "e.ts",
                                                                  reference=m,
                                                                  verify=ONE_BATCH)),
        ("emit_code", lambda m, f, x: emit_code(f, tmp / "ecode", x, reference=m,
                                                verify=ONE_BATCH)),
        ("export_deploy_state_dict", lambda m, f, x: export_deploy_state_dict(
            f, x, tmp / "d.pt", user_nets.rep_block_deploy, reference=m, verify=ONE_BATCH)),
        ("load_by_structure", lambda m, f, x: load_by_structure(user_nets.rep_block_deploy(), f,
                                                                x)),
        ("onnx_model", lambda m, f, x: onnx_model(m, x)),
        ("torchscript_module", lambda m, f, x: torchscript_module(m, x)),
        ("benchmark", lambda m, f, x: repfuse.bench.benchmark(m, x, repeat=1, warmup=0)),
    ]


@pytest.mark.parametrize("index", range(13), ids=[n for n, _ in _api_calls(Path("."))])
def test_no_public_function_changes_the_users_model_or_inputs(tmp_path, index):
    name, call = _api_calls(tmp_path)[index]
    model = user_nets.training_mode()
    x = random_input((2, 4, 6, 6), seed=1)
    with torch.no_grad():
        fused = repfuse.fuse(model, x).train()  # a user's fused model, left in training mode
    before = state_of(model, fused, x)
    result = call(model, fused, x)
    assert state_of(model, fused, x) == before, name
    if hasattr(result, "passed"):  # every check ran on eval copies, so it passes
        assert result.passed, name


def test_a_training_mode_model_converts_and_exports_from_the_cli(workdir):
    model = user_nets.training_mode()
    torch.save(model, workdir / "whole.pt")
    before = snapshot(workdir)
    result = cli("convert", "whole.pt", "--trust", "--input-shape", "2,4,6,6", "-o", "m.onnx",
                 "--emit-code", "code", "--report", "r.json")
    assert result.exit_code == 0, result.output
    assert "the model is in training mode: repfuse converts and checks its eval mode" in \
        result.stderr
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # the input is untouched
    x = random_input((2, 4, 6, 6), seed=5)
    out = onnx_run(workdir / "m.onnx", x=x)["output"]
    assert rel_err(reference64(model, x), out) <= F32_RTOL  # reference64 runs eval mode
    report = json.loads((workdir / "r.json").read_text())
    assert [e["passed"] for e in report["export"]] == [True, True]


# --- 2. a shape branch: guards pin the dims read, and every format loads and runs --------------


def test_guards_pin_only_the_dimensions_the_code_read():
    model = user_nets.shape_branch()
    x = random_input((1, 3, 16, 16))
    fused = repfuse.fuse(model, x)
    asserts = [n for n in fused.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 1 and "shape[-1] == 16" in asserts[0].args[1]
    for shape in ((5, 3, 16, 16), (1, 3, 9, 16)):  # another batch, another height: same branch
        other = random_input(shape, seed=2)
        with torch.no_grad():
            assert rel_err(reference64(model, other), fused(other)) <= F32_RTOL
    with pytest.raises(AssertionError, match=r"with shape\[-1\] == 16"):
        fused(random_input((1, 3, 16, 8)))  # the width the branch read


def test_a_specialized_model_loads_back_in_every_format(workdir):
    shape, args = "1,3,16,16", ("--arch", "user_nets:shape_branch")
    model = user_nets.shape_branch()
    torch.save(model.state_dict(), workdir / "w.pt")
    x = random_input((3, 3, 16, 16), seed=4)  # a batch the example did not have
    expected = reference64(model, x)
    for out, extra in (("m.pt", ()), ("m.onnx", ("--dynamic-batch",)),
                       ("m.pt2", ("--dynamic-batch",)), ("m.ts", ("--dynamic-batch",))):
        result = cli("convert", "w.pt", *args, "--input-shape", shape, "-o", out, *extra,
                     "--batches", 1, *(("--emit-code", "code") if out == "m.pt" else ()))
        assert result.exit_code == 0, (out, result.output)
    with torch.no_grad():
        outputs = {
            "pt": torch.load(workdir / "m.pt", weights_only=False)(x),
            "onnx": onnx_run(workdir / "m.onnx", x=x)["output"],
            "pt2": torch.export.load(workdir / "m.pt2").module()(x),
            "ts": jit_load(workdir / "m.ts")(x),
        }
    sys.path.insert(0, str(workdir / "code"))
    try:
        import model as emitted  # the emitted code, plain PyTorch

        with torch.no_grad():
            outputs["code"] = emitted.load()(x)
    finally:
        sys.path.remove(str(workdir / "code"))
        sys.modules.pop("model", None)
    for kind, out in outputs.items():
        assert rel_err(expected, out) <= F32_RTOL, kind
    verified = cli("verify", "w.pt", "m.pt", *args, "--input-shape", shape, "--trust")
    assert verified.exit_code == 0, verified.output  # repfuse verifies its own output


def test_a_dynamic_axis_the_code_read_is_refused(workdir):
    torch.save(user_nets.shape_branch().state_dict(), workdir / "w.pt")
    result = cli("convert", "w.pt", "--arch", "user_nets:shape_branch", "--input-shape",
                 "1,3,16,16", "-o", "m.onnx", "--dynamic-axes", "0,3")
    assert result.exit_code == 2
    assert "specialized to input 'x' with shape[-1] == 16" in last_error(result)
    assert "axis 3 cannot be dynamic" in last_error(result)
    assert not (workdir / "m.onnx").exists()


# --- 3. two inputs, a dict output --------------------------------------------------------------


def two_input_example(batch: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    return random_input((batch, 3, 8, 8), seed), random_input((batch, 6), seed + 1)


def test_two_inputs_and_a_dict_output_through_the_cli(workdir):
    model = user_nets.two_inputs()
    torch.save(model.state_dict(), workdir / "w.pt")
    args = ("w.pt", "--arch", "user_nets:two_inputs")
    one = cli("convert", *args, "-o", "m.onnx")
    assert one.exit_code == 2
    assert "forward takes 2 inputs (image, extra)" in last_error(one)
    named = ("--input-shape", "extra=1,6", "--input-shape", "image=1,3,8,8")
    result = cli("convert", *args, *named, "-o", "m.onnx", "--dynamic-batch", "--batches", 1)
    assert result.exit_code == 0, result.output
    result = cli("convert", *args, "--input-shape", "1,3,8,8", "--input-shape", "1,6",
                 "-o", "m.pt2", "--dynamic-batch", "--batches", 1)
    assert result.exit_code == 0, result.output
    image, extra = two_input_example(batch=3, seed=7)
    expected = reference64(model, image, extra)
    got = onnx_run(workdir / "m.onnx", image=image, extra=extra)  # named inputs
    assert set(got) == {"logits", "features"}  # named outputs
    program = torch.export.load(workdir / "m.pt2").module()
    with torch.no_grad():
        out = program(image, extra)
    for key in ("logits", "features"):
        assert rel_err(expected[key], got[key]) <= F32_RTOL
        assert rel_err(expected[key], out[key]) <= F32_RTOL


def test_a_two_input_pt2_program_is_converted_with_both_inputs(workdir):
    model = user_nets.two_inputs()
    torch.save(model.state_dict(), workdir / "w.pt")
    first = cli("convert", "w.pt", "--arch", "user_nets:two_inputs", "--input-shape", "1,3,8,8",
                "--input-shape", "1,6", "-o", "m.pt2", "--batches", 1)
    assert first.exit_code == 0, first.output
    again = cli("convert", "m.pt2", "-o", "again.onnx", "--batches", 1)  # shapes from the file
    assert again.exit_code == 0, again.output
    assert "input [1, 3, 8, 8], [1, 6]" in again.stderr
    image, extra = two_input_example(seed=9)
    got = onnx_run(workdir / "again.onnx", image=image, extra=extra)
    expected = reference64(model, image, extra)
    assert rel_err(expected["logits"], got["output_0"]) <= F32_RTOL  # a program returns a tuple
    assert rel_err(expected["features"], got["output_1"]) <= F32_RTOL


def test_tuple_batches_in_inputs_need_no_shapes(workdir):
    model = user_nets.two_inputs()
    torch.save(model.state_dict(), workdir / "w.pt")
    batches = [two_input_example(batch=2, seed=s) for s in (1, 3)]
    torch.save(batches, workdir / "batches.pt")
    result = cli("convert", "w.pt", "--arch", "user_nets:two_inputs", "--inputs", "batches.pt",
                 "-o", "m.pt", "--report", "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "r.json").read_text())
    assert report["inputs"]["batches"] == 2
    assert report["inputs"]["shapes"] == [[2, 3, 8, 8], [2, 6]]


def test_every_exporter_and_the_verifier_flatten_dict_outputs_alike(tmp_path):
    model = user_nets.two_inputs()
    example = two_input_example()
    fused = repfuse.fuse(model, example)
    onnx = export_onnx(fused, example, tmp_path / "m.onnx", reference=model, verify=ONE_BATCH)
    pt2 = export_pt2(fused, example, tmp_path / "m.pt2", reference=model, verify=ONE_BATCH)
    for result in (onnx, pt2):
        assert result.passed and result.written
        names = [o.name for o in result.check.runs[-1].outputs]
        assert names == ["output['logits']", "output['features']"]
    assert onnx.details["inputs"] == ["image", "extra"]
    assert onnx.details["outputs"] == ["logits", "features"]


def test_dynamic_height_and_width(workdir):
    model = user_nets.rep_block()
    torch.save(model.state_dict(), workdir / "w.pt")
    result = cli("convert", "w.pt", "--arch", "user_nets:rep_block", "--input-shape", "1,4,6,6",
                 "-o", "m.onnx", "--dynamic-axes", "0,2,3", "--batches", 1)
    assert result.exit_code == 0, result.output
    x = random_input((2, 4, 9, 5), seed=3)
    assert rel_err(reference64(model, x), onnx_run(workdir / "m.onnx", x=x)["output"]) <= F32_RTOL


# --- 4. bad input is exit 2 and one line naming the culprit -------------------------------------


@pytest.mark.parametrize("factory, args, message", [
    ("nan_weight", (), "the model's tensor 'k3.weight' has 1 NaN value(s) of 144"),
    ("negative_variance", (), "the model's tensor 'b1.running_var' has 1 negative value(s)"),
    ("rep_block", ("--rtol", "-1e-5"), "rtol must be a finite number >= 0, got -1e-05"),
    ("meta_head", (), "submodule 'meta' (Linear) has the name of an attribute "
                      "torch.fx.GraphModule needs ('meta')"),
    ("rep_block", ("--input-shape", "1,4,40000,40000"), "need about"),
], ids=["nan-weight", "negative-variance", "negative-rtol", "meta-submodule", "huge-input"])
def test_bad_models_and_options_are_exit_2_naming_the_culprit(workdir, factory, args, message):
    shape = () if "--input-shape" in args else ("--input-shape", "1,4,6,6")
    if factory == "meta_head":
        shape = ("--input-shape", "1,3,6,6")
    torch.save(getattr(user_nets, factory)(), workdir / "whole.pt")
    before = snapshot(workdir)
    result = cli("convert", "whole.pt", "--trust", *shape, *args, "-o", "out.pt")
    assert result.exit_code == 2, result.output
    assert message in last_error(result)
    assert snapshot(workdir) == before


def test_verify_refuses_a_reference_with_nan_weights(workdir):
    torch.save(user_nets.nan_weight(), workdir / "ref.pt")
    torch.save(user_nets.rep_block(), workdir / "cand.pt")
    result = cli("verify", "ref.pt", "cand.pt", "--trust", "--input-shape", "1,4,6,6")
    assert result.exit_code == 2
    assert "the reference's tensor 'k3.weight' has 1 NaN" in last_error(result)


def test_a_huge_input_is_refused_from_the_memory_estimate():
    model = user_nets.rep_block()
    small = estimate_memory(model, [(1, 4, 6, 6)])
    assert small.largest_at in ("k3", "k1", "b3", "b1", "bid")
    assert small.largest_activation_bytes == 8 * 4 * 6 * 6
    with pytest.raises(repfuse.RepfuseError, match=r"need about .* GiB .* but 0\.5 GiB"):
        check_memory(model, [(1, 4, 8000, 8000)], available=1 << 29)


# --- 5. every destination is checked before any work --------------------------------------------


def test_an_unwritable_report_folder_leaves_nothing_written(workdir, monkeypatch):
    folder = workdir / "reports"
    folder.mkdir()
    real = tempfile.mkstemp

    def refuse_in_reports(*args, **kwargs):  # a read-only folder (root ignores the mode bits)
        if Path(kwargs.get("dir", "")).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse_in_reports)
    calls = []
    monkeypatch.setattr(repfuse.cli, "load_source",
                        lambda *a, **k: calls.append(a) or pytest.fail("loaded before checking"))
    result = cli("convert", "resnet_tiny", "-o", "out.pt", "--emit-code", "code",
                 "--report", "reports/r.html")
    assert result.exit_code == 2
    assert "cannot write 'reports/r.html': Permission denied" in last_error(result)
    assert sorted(p.name for p in workdir.iterdir()) == ["reports", "user_nets.py"]
    assert calls == []


@pytest.mark.parametrize("args, message", [
    (["--emit-code", "user_nets.py"], "'user_nets.py' is a file; --emit-code needs a folder"),
    (["--report", "no/such/r.json"], "the folder of output 'no/such/r.json' does not exist"),
    (["--deploy-arch", "resnet_tiny", "-o", "x.onnx"], "use a .pt output"),
    (["-o", "a.pt", "--report", "a.pt.json", "--report", "a.pt.json"], "given as two outputs"),
], ids=["code-into-a-file", "report-folder-missing", "deploy-not-pt", "twice"])
def test_bad_destinations_are_refused_before_loading(workdir, monkeypatch, args, message):
    monkeypatch.setattr(repfuse.cli, "load_source",
                        lambda *a, **k: pytest.fail("loaded before checking"))
    result = cli("convert", "resnet_tiny", *args)
    assert result.exit_code == 2
    assert message in last_error(result)


# --- 6, 7. localize on failure only, with progress; a tolerance below the dtype's noise ---------


def test_localization_runs_on_failure_only_and_progress_is_told():
    model = user_nets.rep_block()
    x = random_input((1, 4, 6, 6))
    steps = []
    result = repfuse.convert(model, x, verify=ONE_BATCH,
                             progress=lambda what, done, total: steps.append(what))
    assert result.passed and result.report.localization is None
    assert {"capturing and fusing", "localizing: comparing activations in float64"} & set(
        steps) == {"capturing and fusing"}
    assert any(s.startswith("running model in float64") for s in steps)
    wrong = result.fused
    with torch.no_grad():
        next(m for m in wrong.modules() if isinstance(m, nn.Conv2d)).weight.mul_(1.01)
    steps.clear()
    report = repfuse.verify(model, wrong, x, batches=1,
                            progress=lambda what, done, total: steps.append(what))
    assert not report.passed and report.first_divergence["kind"] == "rewrite"
    assert "localizing: comparing activations in float64" in steps


def test_a_tolerance_below_float32_noise_blames_no_rewrite(workdir):
    result = cli("convert", "resnet_tiny", "--rtol", "1e-9", "--atol", "0", "-o", "out.pt",
                 "--json", "--batches", 1)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert "below float32's own noise for this model" in data["diagnosis"]
    assert data["localization"] is None
    assert data["first_divergence"]["kind"] == "output"  # not a rewrite
    assert "no rewrite is to blame" in result.stderr
    assert "first divergence: rewrite" not in result.stderr


# --- 8. full numbers when stderr is not a terminal ----------------------------------------------


def test_tables_keep_every_digit_in_a_log(workdir):
    torch.save(user_nets.rep_block(), workdir / "whole.pt")
    fused = repfuse.fuse(user_nets.rep_block(), random_input((1, 4, 6, 6)))
    with torch.no_grad():
        fused.fc.bias.add_(0.1)
    torch.save(fused, workdir / "bad.pt")
    result = cli("verify", "whole.pt", "bad.pt", "--trust", "--input-shape", "1,4,6,6",
                 "--json")
    assert result.exit_code == 1
    assert "…" not in result.stderr
    worst = json.loads(result.stdout)["runs"][1]["outputs"][0]["metrics"]
    assert f"{worst['max_abs']:.4g}" in result.stderr and f"{worst['sqnr_db']:.4g}" in \
        result.stderr


# --- 9. the HTML report: nothing collapsed, module paths, provenance ----------------------------


def test_html_report_shows_everything_and_says_what_made_it(workdir):
    model = user_nets.rep_block()
    torch.save(model.state_dict(), workdir / "w.pt")
    result = cli("convert", "w.pt", "--arch", "user_nets:rep_block", "--input-shape", "1,4,6,6",
                 "-o", "m.pt", "--report", "r.html", "--report", "r.json", "--localize")
    assert result.exit_code == 0, result.output
    page = (workdir / "r.html").read_text()
    data = json.loads((workdir / "r.json").read_text())
    assert "<details" not in page and "<summary" not in page
    assert '<h2 id="rewrites-applied">Rewrites applied</h2>' in page
    for rewrite in data["conversion"]["rewrites"]:
        assert ", ".join(rewrite["module_paths"]) in page
    assert ">k3, b3, k1, b1, bid</text>" in page  # the chart's label: module paths
    chunks = page.split("<h2")[1:]
    assert all("<table" in c or "<ul" in c or "<p" in c or "<svg" in c for c in chunks)
    made = data["provenance"]
    assert made["repfuse"] == repfuse.__version__ and made["torch"] == torch.__version__
    assert made["command"].startswith("repfuse convert w.pt --arch user_nets:rep_block")
    assert made["created"].endswith("+00:00")
    assert made["files"] == [{"role": "model", "path": "w.pt", "sha256": sha256(workdir / "w.pt")}]
    written = {o["path"]: o for o in data["outputs"]}
    assert written["m.pt"]["sha256"] == sha256(workdir / "m.pt")
    for text in (repfuse.__version__, made["created"], sha256(workdir / "w.pt"),
                 sha256(workdir / "m.pt")):
        assert text in page


# --- 10. python -m, attributes, inspect --json, --candidate-arch, --trust, help -----------------


def test_python_dash_m_and_the_public_attributes(tmp_path):
    done = subprocess.run([sys.executable, "-m", "repfuse", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "Usage: repfuse" in done.stdout
    code = ("import repfuse; print(repfuse.bench.benchmark.__name__, "
            "repfuse.export.ONNX_PIPELINE[0], repfuse.convert.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["benchmark", repfuse.export.ONNX_PIPELINE[0], "convert"]


def test_inspect_json_on_stdout(workdir):
    result = cli("inspect", "resnet_tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "inspect" and data["conversion"]["counts"]["fold_batchnorm"] == 12
    assert "runs" not in data  # nothing was verified
    assert "fold_batchnorm" in result.stderr


def test_verify_with_a_candidate_arch(workdir):
    model = user_nets.rep_block()
    x = random_input((1, 4, 6, 6))
    deploy = repfuse.fuse(model, x)
    emitted = repfuse.export.python_source(deploy, "Deploy")
    torch.save(model.state_dict(), workdir / "train.pt")
    torch.save(emitted.state_dict, workdir / "deploy.pt")  # the deploy form's own keys
    (workdir / "deploy_net.py").write_text(emitted.source + "\n\ndef build():\n    return "
                                           "Deploy()\n")
    result = cli("verify", "train.pt", "deploy.pt", "--arch", "user_nets:rep_block",
                 "--candidate-arch", "deploy_net:build", "--input-shape", "1,4,6,6")
    assert result.exit_code == 0, result.output
    assert "EQUIVALENT" in result.stderr


def test_trust_finds_the_class_in_the_working_directory(tmp_path):
    shutil.copy(NETS, tmp_path / "user_nets.py")
    subprocess.run([sys.executable, "-c", "import torch, user_nets; "
                    "torch.save(user_nets.rep_block(), 'whole.pt')"], cwd=tmp_path, check=True,
                   timeout=120)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([str(REPFUSE), "convert", "whole.pt", "--trust", "--input-shape",
                           "1,4,6,6", "-o", "out.pt", "--batches", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.pt").exists()


def test_convert_help_points_to_repfuse_models():
    text = cli("convert", "--help").output
    assert "zoo name (see `repfuse models`)" in text and "`repfuse passes`/README" not in text


def test_report_of_every_kind_renders_in_each_format(tmp_path):
    model = user_nets.rep_block()
    x = random_input((1, 4, 6, 6))
    bench = repfuse.bench.benchmark(model, x, repeat=1, warmup=0).to_dict()
    inspected = repfuse.convert(model, x, verify=None).report_dict()
    for data in (bench, inspected):
        assert "<h1>" in render_html(data) and render_markdown(data).startswith("# repfuse")
        buffer = io.StringIO()
        render_terminal(data, Console(file=buffer, width=200))
        assert buffer.getvalue()
