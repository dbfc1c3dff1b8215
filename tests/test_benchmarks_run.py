"""benchmarks/run.py: the numbers its core function reports, recomputed independently.

One tiny model at one batch size, two timed rounds: the error columns must be what the float64
train form says of each form, the node counts what onnx.load finds in the written files, the
ratios in the table the quotients of the medians. A model whose export fails must be reported,
not crash the run. No timing values are asserted.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import reference64, rel_err
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from repfuse.convert import convert, example_input
from repfuse.export import onnx_model
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAME, BATCH = "repvgg_tiny", 2


def _load_run_script():
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load_run_script()


def _settings(**overrides):
    options = dict(batches=(BATCH,), repeat=2, min_repeat=2, warmup=1,
                   threads=torch.get_num_threads())
    options.update(overrides)
    return run.Settings(**options)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return run.bench_model(NAME, _settings(), folder), folder


@pytest.fixture(scope="module")
def forms():
    """The forms rebuilt here, without the harness: train, repfuse, deploy, fx fuse."""
    train = create_model(NAME)
    x = example_input((BATCH, 3, 32, 32), train)
    conversion = convert(train, x, verify=None)
    deploy = load_by_structure(create_model(NAME, deploy=True), conversion.fused, x).eval()
    return {"train": train, "fused": conversion.fused, "deploy": deploy,
            "fx_fuse": fx_fuse(train)}, x, conversion


def _ops(path: str) -> dict[str, int]:
    return dict(Counter(node.op_type for node in onnx.load(path).graph.node))


def test_eager_errors_are_float32_forms_against_float64_train_form(bench, forms):
    record, _ = bench
    models, x, _ = forms
    eager = record["batches"][str(BATCH)]["eager"]
    expected = reference64(models["train"], x)
    assert set(eager["error"]) == set(run.EAGER_FORMS)
    for form, model in models.items():
        with torch.no_grad():
            error = rel_err(expected, model(x))
        assert 0 < error < 1e-5, form  # float32 rounding, nothing more
        assert eager["error"][form] == pytest.approx(error, rel=1e-3), form


def test_onnx_errors_and_node_counts_match_the_written_files(bench, forms):
    record, folder = bench
    models, x, _ = forms
    group = record["batches"][str(BATCH)]["onnx"]
    expected = reference64(models["train"], x)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    for form in run.ONNX_FORMS:
        path = group["files"][form]
        assert Path(path).parent == folder
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        error = rel_err(expected, torch.from_numpy(output))
        assert 0 < error < 1e-5, form
        assert group["error"][form] == pytest.approx(error, rel=1e-3), form
    nodes = group["nodes"]
    assert nodes["train_onnxsim"] == _ops(group["files"]["train"])
    assert nodes["repfuse"] == _ops(group["files"]["fused"])
    assert nodes["deploy"] == _ops(group["files"]["deploy"])
    raw = onnx_model(models["train"], x)
    assert nodes["train"] == dict(Counter(n.op_type for n in raw.graph.node))
    # repfuse's file has one Conv per conv of the hand-written deploy form, and no BN or Add
    convs = sum(isinstance(m, nn.Conv2d) for m in create_model(NAME, deploy=True).modules())
    assert nodes["repfuse"]["Conv"] == convs
    assert "BatchNormalization" not in nodes["repfuse"] and "Add" not in nodes["repfuse"]
    assert nodes["train_onnxsim"]["Add"] > 0


def test_latencies_rounds_and_table_ratios(bench):
    record, _ = bench
    entry = record["batches"][str(BATCH)]
    for key, forms in (("eager", run.EAGER_FORMS), ("onnx", run.ONNX_FORMS)):
        group = entry[key]
        assert group["rounds"] == 2 and not group["failures"]
        assert set(group["ms"]) == set(forms)
        assert all(group["min_ms"][f] <= group["ms"][f] for f in forms)
    ms = entry["eager"]["ms"]
    (row,) = [line for line in run.eager_table([record]) if line.startswith(f"| {NAME} ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7:] == [f"{ms['train'] / ms['fused']:.2f}", f"{ms['fused'] / ms['deploy']:.2f}",
                         f"{ms['fx_fuse'] / ms['fused']:.2f}"]
    assert record["deploy_weights"] == "repfuse, by structure"


def test_conversion_record(bench, forms):
    record, _ = bench
    _, _, conversion = forms
    conv = record["conversion"]
    assert conv["rewrites"] == sum(conversion.passes.counts().values())
    assert conv["seconds"] > 0 and conv["verify_s"] > 0
    assert conv["verify_passed"] and 0 < conv["verify_max_rel"] < 1e-5
    memory = record["memory"]
    assert memory["method"] in ("VmHWM reset", "ru_maxrss (upper bound)")
    assert 0 <= memory["peak_mib"] < 1024 and memory["model_rss_mib"] > 50  # torch is loaded


def test_peak_rss_increase_sees_a_known_allocation():
    # In a fresh process, as run.py measures each conversion: in a long-lived one (the test
    # session) the allocator may hand back pages that are already resident.
    mib = 64
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import peers\n"
        f"block, peak = peers.peak_rss_increase(lambda: torch.ones({mib} * 2**20 // 4))\n"
        "print(block.numel() * 4, peak.increase_mib, peak.method)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    size, increase, method = int(out[0]), float(out[1]), " ".join(out[2:])
    if method != "VmHWM reset":
        pytest.skip("the peak RSS cannot be reset here (not Linux)")
    assert size == mib * 2**20
    assert mib - 2 <= increase <= mib + 16


def test_failing_steps_become_reasons_not_crashes(tmp_path):
    record = run.bench_model("branchynet_tiny", _settings(memory=False, batches=(1,)), tmp_path)
    entry = record["batches"]["1"]
    # captured in parts (a branch on tensor values): repfuse still runs and is timed
    assert set(entry["eager"]["ms"]) == {"train", "fused", "deploy"}
    assert entry["eager"]["failures"]["fx_fuse"].startswith("TraceError")
    assert record["deploy_weights"] == "repfuse, by name"
    onnx_failures = entry["onnx"]["failures"]
    assert set(onnx_failures) == set(run.ONNX_FORMS) and not entry["onnx"]["ms"]
    assert all(reason.startswith("ExportError") for reason in onnx_failures.values())
    (row,) = [line for line in run.onnx_table([record]) if line.startswith("| branchynet_tiny ")]
    assert "failed: ExportError" in row
