"""Tests of exporting fused models: ONNX, torch.export, TorchScript, Python source, deploy form.

Every number is checked against the *unfused* zoo model run in float64
(:func:`conftest.reference64`) on inputs of its own, drawn here and not by the exporter: float32
outputs within 1e-5 of the largest reference magnitude. ONNX files are run here with
onnxruntime directly (graph optimizations disabled), not through repfuse's wrapper. ``.pt2``,
TorchScript and emitted code are loaded in a fresh Python process in which importing repfuse
fails.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from cli_runs import cli
from conftest import random_input, reference64, rel_err
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.capture import RepfuseWarning
from repfuse.errors import LoadError
from repfuse.export import (
    DEFAULT_OPSET,
    ExportError,
    emit_code,
    export_onnx,
    export_pt2,
    export_torchscript,
    onnx_model,
    onnx_node_counts,
    python_source,
    simplify_onnx,
)
from repfuse.io import load_model
from repfuse.models import create_model, get_spec, list_models
from repfuse.verify import VerifyOptions

F32_RTOL = 1e-5
# The exporters' own check runs on one batch here; each test checks a fresh input itself.
ONE_BATCH = VerifyOptions(batches=1)

# The tiny variants: every zoo model whose example input has at most 40k elements. The
# full-size ones (224x224 inputs, RepLKNet's 64x56x56 stage) take seconds each.
SMALL = [s.name for s in list_models() if math.prod(s.input_shape) <= 40_000]
# AffineGrid entered ONNX in opset 20.
OPSET = {"stn_tiny": 20}
# BatchNorms after a dynamic conv (a kernel computed from the input) stay, and fold_batchnorm
# says why; every other zoo model loses all of them.
BATCHNORM_KEPT = {"dynamic_conv_tiny"}
# Reparameterized models with a hand-written deploy form, among the small ones.
REPARAMETERIZED = [
    name for name in SMALL if get_spec(name).reparameterized and get_spec(name).supports_deploy
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine spinning worker threads
    cost much more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(stderr: str, after_conversion: bool = False) -> str:
    """The one error line: all of stderr, or its last line after a conversion's summary."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    assert sum(line.startswith("repfuse: error") for line in lines) == 1, stderr
    assert after_conversion or len(lines) == 1, stderr
    assert lines[-1].startswith("repfuse: error: ")
    return lines[-1]


@functools.cache
def fused_zoo_model(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """The zoo model, its fused form and the example input (shared: no test modifies them)."""
    model = create_model(name)
    x = random_input(get_spec(name).input_shape, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepfuseWarning)  # partial capture is expected here
        return model, repfuse.fuse(model, x), x


def fresh_batch(name: str, batch: int = 2, seed: int = 7) -> Tensor:
    """An input none of the exporters' checks saw: another seed, another batch size."""
    shape = get_spec(name).input_shape
    return random_input((batch, *shape[1:]), seed=seed)


def jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        return torch.jit.load(str(path))


def run_onnxruntime(path: Path, x: Tensor) -> Tensor:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --- ONNX, every small zoo model ---------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_onnx_matches_float64_reference_without_batchnorm(tmp_path, name):
    model, fused, x = fused_zoo_model(name)
    path = tmp_path / f"{name}.onnx"
    opset = OPSET.get(name, DEFAULT_OPSET)
    for dynamic_batch in (True, False):
        try:
            result = export_onnx(fused, x, path, reference=model, opset=opset,
                                 dynamic_batch=dynamic_batch, count_train_nodes=False,
                                 verify=ONE_BATCH)
            break
        except ExportError:
            # Acceptable only when torch.onnx cannot export the original model so either (a
            # dynamic conv's kernel shape depends on the batch size; an early exit branches on
            # tensor values).
            with pytest.raises(ExportError):
                onnx_model(model, x, opset=opset, dynamic_batch=dynamic_batch)
            assert not path.exists()
    else:
        pytest.skip(f"torch.onnx cannot export {name}, fused or not")
    assert result.passed and result.written
    assert result.check.runs[-1].worst.max_rel <= F32_RTOL
    counts = op_counts(path)
    assert counts == result.onnx_nodes["repfuse"]
    kept = sum(isinstance(m, _BatchNorm) for m in fused.modules())
    assert kept == (2 if name in BATCHNORM_KEPT else 0)
    assert counts.get("BatchNormalization", 0) == kept
    x = fresh_batch(name, batch=3 if dynamic_batch else 1)
    assert rel_err(reference64(model, x), run_onnxruntime(path, x)) <= F32_RTOL
    if name in REPARAMETERIZED:
        # as many Conv and Add nodes as the hand-written deploy form exported alike
        deploy, _ = simplify_onnx(onnx_model(create_model(name, deploy=True), x))
        expected = onnx_node_counts(deploy)
        for op in ("Conv", "Add", "BatchNormalization"):
            assert counts.get(op, 0) == expected.get(op, 0), op


@pytest.mark.parametrize("name", ["repvgg_tiny", "mobileone_tiny"])
def test_onnx_of_repvgg_style_model_has_one_conv_per_block_which_onnxsim_cannot(tmp_path, name):
    model, fused, x = fused_zoo_model(name)
    result = export_onnx(fused, x, tmp_path / "ours.onnx", reference=model, verify=ONE_BATCH)
    deploy_convs = sum(isinstance(m, nn.Conv2d) for m in create_model(name, deploy=True).modules())
    ours, train = result.onnx_nodes["repfuse"], result.onnx_nodes["train_onnxsim"]
    assert ours["Conv"] == deploy_convs
    assert ours.get("Add", 0) == 0 and ours.get("BatchNormalization", 0) == 0
    # Exporting in eval mode and onnxsim fold Conv-BN, but keep the branches and their adds.
    train_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert train["Conv"] == train_convs > deploy_convs
    assert train["Add"] > 0 and train["BatchNormalization"] > 0
    assert result.onnx_nodes["train"]["Conv"] == train_convs


def test_onnx_check_failure_writes_nothing_unless_forced(tmp_path):
    _, fused, x = fused_zoo_model("repvgg_tiny")
    other = create_model("repvgg_tiny", seed=1)  # same structure, other weights
    path = tmp_path / "out.onnx"
    result = export_onnx(fused, x, path, reference=other, count_train_nodes=False,
                         verify=ONE_BATCH)
    assert not result.passed and not result.written
    assert result.check.runs[-1].worst.max_rel > 1e-2
    assert list(tmp_path.iterdir()) == []
    forced = export_onnx(fused, x, path, reference=other, count_train_nodes=False, force=True,
                         verify=ONE_BATCH)
    assert forced.written and not forced.passed and path.exists()


def test_onnx_export_error_leaves_no_file(tmp_path):
    model, fused, x = fused_zoo_model("stn_tiny")
    with pytest.raises(ExportError, match="affine_grid"):
        export_onnx(fused, x, tmp_path / "stn.onnx", reference=model, opset=17)
    assert list(tmp_path.iterdir()) == []


def test_onnx_refuses_to_trace_through_a_branch_on_tensor_values(tmp_path):
    model, fused, x = fused_zoo_model("branchynet_tiny")  # an early exit: partial capture
    assert not isinstance(fused, torch.fx.GraphModule)
    with pytest.raises(ExportError, match=r"a Python branch on a tensor \(branchy.py:\d+\)"):
        export_onnx(fused, x, tmp_path / "b.onnx", reference=model)
    assert list(tmp_path.iterdir()) == []


# --- .pt2, TorchScript and emitted code in a fresh process without repfuse ---------------------

FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    from pathlib import Path

    class NoRepfuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "repfuse" or name.startswith("repfuse."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoRepfuse())
    import torch

    try:
        import repfuse  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True
    jobs = json.loads(Path("jobs.json").read_text())
    outputs = {}
    for key, (kind, path) in jobs.items():
        x = torch.load(f"{key}.input.pt", weights_only=True)
        if kind == "pt2":
            model = torch.export.load(path).module()
        elif kind == "ts":
            model = torch.jit.load(path)
        else:
            spec = importlib.util.spec_from_file_location(f"emitted_{key}", f"{path}/model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model = module.load()
        with torch.no_grad():
            outputs[key] = model(x)
    torch.save(outputs, "outputs.pt")
    print(json.dumps({"blocked": blocked,
                      "repfuse_loaded": any(m.startswith("repfuse") for m in sys.modules)}))
""")


def run_in_fresh_process(folder: Path, jobs: dict[str, tuple[str, Path, Tensor]]) -> dict:
    """Run each ``key: (kind, artifact, input)`` in one fresh ``python -I`` process in which
    repfuse cannot be imported; the outputs by key."""
    for key, (_, _, x) in jobs.items():
        torch.save(x, folder / f"{key}.input.pt")
    (folder / "jobs.json").write_text(
        json.dumps({key: (kind, str(path)) for key, (kind, path, _) in jobs.items()})
    )
    (folder / "run.py").write_text(FRESH_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "run.py"], cwd=folder, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.splitlines()[-1])
    assert status == {"blocked": True, "repfuse_loaded": False}
    return torch.load(folder / "outputs.pt", weights_only=True)


def test_pt2_torchscript_and_emitted_code_load_and_match_in_a_fresh_process(tmp_path):
    jobs, references = {}, {}
    for name in SMALL:  # emitted code for every small zoo model captured as one graph
        model, fused, x = fused_zoo_model(name)
        if not isinstance(fused, torch.fx.GraphModule):  # eager Python parts stay
            with pytest.raises(ExportError, match="only a model captured as one graph"):
                emit_code(fused, tmp_path / "code" / name, x, reference=model)
            assert not (tmp_path / "code" / name).exists()
            continue
        result = emit_code(fused, tmp_path / "code" / name, x, reference=model,
                           verify=ONE_BATCH)
        assert result.passed and result.written
        x = fresh_batch(name, batch=1)
        jobs[f"code-{name}"] = ("code", tmp_path / "code" / name, x)
        references[f"code-{name}"] = reference64(model, x)
    # .pt2 with a dynamic batch; TorchScript is scripted, so any batch size runs
    for kind, name in (("pt2", "repvgg_tiny"), ("ts", "repvgg_tiny"), ("ts", "vit_convstem_tiny")):
        model, fused, x = fused_zoo_model(name)
        path = tmp_path / f"{name}.{kind}"
        if kind == "pt2":
            result = export_pt2(fused, x, path, reference=model, dynamic_batch=True,
                                verify=ONE_BATCH)
        else:
            result = export_torchscript(fused, x, path, reference=model, verify=ONE_BATCH)
        assert result.passed and result.written
        x = fresh_batch(name, batch=3)
        jobs[f"{kind}-{name}"] = (kind, path, x)
        references[f"{kind}-{name}"] = reference64(model, x)
    outputs = run_in_fresh_process(tmp_path, jobs)
    assert set(outputs) == set(jobs)
    for key, reference in references.items():
        assert outputs[key].dtype == torch.float32, key
        assert rel_err(reference, outputs[key]) <= F32_RTOL, key


def test_emitted_code_is_plain_pytorch_with_the_fused_layers(tmp_path):
    model, fused, x = fused_zoo_model("repvgg_tiny")
    source = python_source(fused, input_shapes=[tuple(x.shape)]).source
    assert "repfuse" not in source.split('"""', 2)[2]  # past the docstring: no import of it
    assert "import torch" in source and "from torch import nn" in source
    deploy = create_model("repvgg_tiny", deploy=True)
    convs = sum(isinstance(m, nn.Conv2d) for m in deploy.modules())
    assert source.count("nn.Conv2d(") == convs
    assert "BatchNorm" not in source
    compile(source, "model.py", "exec")


class CeilAvgPoolNet(nn.Module):
    """AvgPool2d's repr leaves out ceil_mode and count_include_pad; the code must not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.conv(x))) * self.scale.exp()


def test_emitted_code_keeps_every_constructor_argument_and_constant(tmp_path):
    model = repfuse.models.randomize_bn_stats(CeilAvgPoolNet()).eval()
    x = random_input((2, 3, 9, 9))
    fused = repfuse.fuse(model, x)
    result = emit_code(fused, tmp_path, x, reference=model)
    assert result.passed
    source = (tmp_path / "model.py").read_text()
    assert "ceil_mode=True" in source and "count_include_pad=False" in source
    module = repfuse.export.code._import_file(tmp_path / "model.py").load()
    with torch.no_grad():
        assert rel_err(reference64(model, x), module(x)) <= F32_RTOL


class Gate(nn.Module):
    """Not a torch.nn layer: emitted code could not rebuild it without its source."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class LeafGateTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Gate) or super().is_leaf_module(m, qualname)


def test_emit_code_refuses_a_custom_leaf_module_and_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Gate()).eval()
    gm = torch.fx.GraphModule(model, LeafGateTracer().trace(model))
    with pytest.raises(ExportError, match=r"module '1' \(.*Gate\): only torch.nn layers"):
        emit_code(gm, tmp_path / "code", random_input((1, 3, 8, 8)))
    assert not (tmp_path / "code").exists()


@torch.fx.wrap
def add_all(*tensors: Tensor) -> Tensor:
    return sum(tensors[1:], tensors[0])


class VarargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return add_all(y, y.relu(), x.mean(1, keepdim=True))


def test_torchscript_falls_back_to_tracing_when_scripting_fails(tmp_path):
    model = VarargsNet().eval()
    x = random_input((1, 3, 8, 8))
    fused = repfuse.fuse(model, x)
    result = export_torchscript(fused, x, tmp_path / "m.ts", reference=model)
    assert result.details["exporter"] == "torch.jit.trace"
    assert result.passed and result.written
    loaded = jit_load(tmp_path / "m.ts")
    x = random_input((1, 3, 8, 8), seed=5)
    with torch.no_grad():
        assert rel_err(reference64(model, x), loaded(x)) <= F32_RTOL


# --- the command line ---------------------------------------------------------------------------


def test_convert_to_onnx_reports_the_check_and_node_counts(tmp_path):
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    result = cli("convert", "repvgg_tiny", "-o", out, "--dynamic-batch", "--opset", 18,
                 "--report", report)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr
    assert "onnx nodes: train 35, train+onnxsim 35, repfuse 17" in result.stderr
    model = create_model("repvgg_tiny")
    x = fresh_batch("repvgg_tiny", batch=3)
    assert rel_err(reference64(model, x), run_onnxruntime(out, x)) <= F32_RTOL
    assert onnx.load(str(out)).opset_import[0].version == 18
    data = json.loads(report.read_text())
    assert data["passed"] is True
    (entry,) = data["export"]
    assert entry["format"] == "onnx" and entry["passed"] and entry["written"]
    assert entry["opset"] == 18 and entry["dynamic_batch"] is True
    assert entry["onnx_nodes"]["repfuse"] == op_counts(out)
    assert entry["check"]["inputs"]["shapes"] == [[2, 3, 32, 32]]  # checked at another batch
    assert entry["check"]["runs"][-1]["outputs"][0]["metrics"]["max_rel"] <= F32_RTOL


def test_convert_to_onnx_leaves_horizontal_fusion_out_unless_asked(tmp_path):
    model, x = create_model("googlenet_tiny"), fresh_batch("googlenet_tiny", batch=1)
    default, chosen = tmp_path / "default.onnx", tmp_path / "chosen.onnx"
    result = cli("convert", "googlenet_tiny", "-o", default)
    assert result.exit_code == 0, result.output
    assert "for an .onnx output merge_siblings is left out" in result.stderr
    assert "prune_dead keeps pruned widths a multiple of 8" in result.stderr
    assert "Split" not in op_counts(default)
    assert rel_err(reference64(model, x), run_onnxruntime(default, x)) <= F32_RTOL
    result = cli("convert", "googlenet_tiny", "-o", chosen, "--passes",
                 ",".join(repfuse.DEFAULT_PIPELINE))
    assert result.exit_code == 0, result.output
    assert op_counts(chosen)["Split"] == 9  # one per Inception module
    assert op_counts(chosen)["Conv"] < op_counts(default)["Conv"]
    assert rel_err(reference64(model, x), run_onnxruntime(chosen, x)) <= F32_RTOL


@pytest.mark.parametrize("suffix", [".pt2", ".ts"])
def test_convert_to_pt2_and_torchscript(tmp_path, suffix):
    out, code = tmp_path / f"tiny{suffix}", tmp_path / "code"
    emit = ["--emit-code", code] if suffix == ".pt2" else []
    result = cli("convert", "resnet_tiny", "-o", out, "--dynamic-batch", *emit)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr
    model = create_model("resnet_tiny")
    loaded = load_model(str(out)).module if suffix == ".pt2" else jit_load(out)
    modules = [loaded]
    if emit:
        assert f"wrote {code}" in result.stderr
        modules.append(repfuse.export.code._import_file(code / "model.py").load())
    x = fresh_batch("resnet_tiny", batch=2)
    for module in modules:
        with torch.no_grad():
            assert rel_err(reference64(model, x), module(x)) <= F32_RTOL


@pytest.mark.parametrize(
    "name, shape",
    [("repvgg_tiny", None), ("mobileone_tiny", None), ("repvgg_a0", (1, 3, 64, 64)),
     ("mobileone_s0", (1, 3, 64, 64))],
)
def test_convert_deploy_arch_writes_the_deploy_forms_state_dict(tmp_path, name, shape):
    shape = shape or get_spec(name).input_shape
    out, report = tmp_path / "deploy.pt", tmp_path / "r.json"
    result = cli("convert", name, "--deploy-arch", name, "-o", out, "--report", report,
                 "--input-shape", ",".join(map(str, shape)))
    assert result.exit_code == 0, result.output
    deploy = create_model(name, deploy=True, seed=3)  # other weights, all to be replaced
    deploy.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = random_input((2, *shape[1:]), seed=9)
    with torch.no_grad():
        assert rel_err(reference64(create_model(name), x), deploy(x)) <= F32_RTOL
    (entry,) = json.loads(report.read_text())["export"]
    assert entry["format"] == "deploy_state_dict" and entry["passed"]


def test_convert_deploy_arch_accepts_a_factory(tmp_path, monkeypatch):
    (tmp_path / "mydeploy.py").write_text(textwrap.dedent("""
        from repfuse.models import create_model

        def build():
            return create_model("repvgg_tiny", deploy=True, randomize_bn=False)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("convert", "repvgg_tiny", "--deploy-arch", "mydeploy:build", "-o", "d.pt")
    assert result.exit_code == 0, result.output
    deploy = create_model("repvgg_tiny", deploy=True, seed=3)
    deploy.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True), strict=True)
    x = fresh_batch("repvgg_tiny")
    with torch.no_grad():
        assert rel_err(reference64(create_model("repvgg_tiny"), x), deploy(x)) <= F32_RTOL


@pytest.mark.parametrize(
    "args, message",
    [
        (["repvgg_tiny", "-o", "out.bin"], "unsupported output type '.bin'"),
        (["repvgg_tiny", "-o", "out.pt", "--opset", "17"], "--opset applies to an .onnx"),
        (["repvgg_tiny", "-o", "out.pt", "--dynamic-batch"], "--dynamic-batch applies to"),
        (["repvgg_tiny", "-o", "out.onnx", "--deploy-arch", "repvgg_tiny"], "use a .pt output"),
        (["resnet_tiny", "-o", "out.pt", "--deploy-arch", "acnet_resnet18x"],
         "--deploy-arch must be package.module:factory or a zoo model name"),
        (["resnet_tiny", "-o", "out.pt", "--deploy-arch", "se_resnet_tiny"],
         "zoo model 'se_resnet_tiny' has no hand-written deploy form"),
        (["resnet_tiny", "-o", "out.pt", "--deploy-arch", "no_such_module:build"],
         "cannot import 'no_such_module' for --deploy-arch"),
    ],
    ids=["extension", "opset-pt", "dynamic-pt", "deploy-onnx", "deploy-unknown",
         "deploy-no-deploy-form", "deploy-import"],
)
def test_convert_bad_export_input_exits_2_with_one_line_and_no_file(
    tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", *args)
    assert result.exit_code == 2, result.output
    assert message in error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet_tiny", "-o", "out.pt", "--deploy-arch", "repvgg_tiny"],
         "the fused weights do not fit --deploy-arch repvgg_tiny: the deploy model "
         "runs 8 conv/linear layers but the fused model runs 13"),
        (["stn_tiny", "-o", "out.onnx"], "torch.onnx.export (opset 17) failed"),
    ],
    ids=["deploy-mismatch", "onnx-unsupported-op"],
)
def test_convert_export_failure_after_conversion_exits_2_and_writes_nothing(
    tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    result = cli("convert", *args)
    assert result.exit_code == 2, result.output
    assert "EQUIVALENT" in result.stderr  # the conversion itself was fine
    assert message in error_line(result.stderr, after_conversion=True)
    assert list(tmp_path.iterdir()) == []


# --- an ONNX file as the reference of verify ----------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "repvgg_tiny.onnx"
    assert cli("convert", "repvgg_tiny", "-o", out).exit_code == 0
    return out


def test_convert_refuses_an_onnx_model(tmp_path, onnx_file):
    result = cli("convert", onnx_file, "-o", tmp_path / "again.pt")
    assert result.exit_code == 2
    assert "is an ONNX model" in error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_verify_with_an_onnx_reference(onnx_file):
    result = cli("verify", onnx_file, "repvgg_tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["deploy_dtype"] == "float32"
    assert report["inputs"]["shapes"] == [[1, 3, 32, 32]]  # the ONNX model's input shape
    # the ONNX reference computes in float32, so the runs differ by float32 rounding only
    for run in report["runs"]:
        assert 0 < run["outputs"][0]["metrics"]["max_rel"] <= F32_RTOL


def test_verify_with_an_onnx_reference_fails_for_another_model(onnx_file):
    result = cli("verify", onnx_file, "resnet_tiny", "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["passed"] is False


def test_onnx_model_wrapper_matches_onnxruntime_and_torch(onnx_file):
    loaded = load_model(str(onnx_file))
    assert loaded.input_shape == (1, 3, 32, 32)
    x = fresh_batch("repvgg_tiny", batch=1)
    out = loaded.module(x.double())  # cast to the model's float32 input
    assert out.dtype == torch.float32
    assert torch.equal(out, run_onnxruntime(onnx_file, x))
    assert rel_err(reference64(create_model("repvgg_tiny"), x), out) <= F32_RTOL


def test_loading_a_file_that_is_not_onnx_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a protobuf")
    with pytest.raises(LoadError, match="cannot load .* as an ONNX model"):
        load_model(str(bad))
    result = cli("verify", bad, "repvgg_tiny")
    assert result.exit_code == 2
    assert "as an ONNX model" in error_line(result.stderr)
