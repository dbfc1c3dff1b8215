"""Tests of :func:`repfuse.verify`: verdicts, the metrics behind them, and the report.

With ``batches=1`` the only input is the example itself, so every metric in a report can be
recomputed here by hand: the unfused model deep-copied to float64 is the reference
(:func:`conftest.reference64`), the candidate is run as it is.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import random_input, reference64
from torch import Tensor, nn

import repfuse
from repfuse.errors import VerificationError
from repfuse.models import create_model, randomize_bn_stats
from repfuse.verify import SCHEMA_VERSION, Tolerance, random_batches
from repfuse.verify.compare import DEFAULT_TOLERANCES

SHAPE = (2, 3, 12, 12)


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU twice and a Linear-BN1d head: everything folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.fc, self.bn3 = nn.Linear(8, 5), nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


class TwoHeads(nn.Module):
    """A shared trunk and two heads, returned as a dict (or a tuple)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.logits = nn.Linear(6, 4)
        self.embed = nn.Linear(6, 3)

    def forward(self, x: Tensor):
        feat = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        if self.as_dict:
            return {"logits": self.logits(feat), "embed": self.embed(feat)}
        return self.logits(feat), self.embed(feat)


class FirstOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)[0]


def make(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn_stats(model, seed).eval()


def hand_metrics(reference: Tensor, candidate: Tensor) -> dict[str, float]:
    """The metrics of :mod:`repfuse.verify.compare`, computed directly in float64."""
    ref = reference.double().reshape(-1)
    out = candidate.double().reshape(-1)
    diff = (ref - out).abs()
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / ref.abs().max()).item(),
        "mean_abs": diff.mean().item(),
        "cosine": (ref @ out / (ref.norm() * out.norm())).item(),
        "sqnr_db": 10 * math.log10((ref @ ref).item() / (diff @ diff).item()),
        "ref_max_abs": ref.abs().max().item(),
    }


def assert_metrics(metrics, expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert getattr(metrics, name) == pytest.approx(value, rel=1e-9, abs=1e-300), name


def run(model: nn.Module, *inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return model(*inputs)


def perturbed(model: nn.Module, path: str, relative: float) -> nn.Module:
    """A copy of ``model`` whose ``path``.weight is scaled by ``1 + relative``."""
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.get_submodule(path).weight.mul_(1 + relative)
    return wrong


# --- correct fusions pass -----------------------------------------------------------------------


def test_correct_float32_fusion_passes_in_both_runs():
    model = make(ConvBNNet())
    x = random_input(SHAPE)
    fused = repfuse.fuse(model, x)
    report = repfuse.verify(model, fused, x, batches=1)

    assert report.passed
    assert report.deploy_dtype == "float32"
    assert [r.dtype for r in report.runs] == ["float64", "float32"]
    truth = reference64(model, x)
    (out64,) = report.float64.outputs
    assert_metrics(out64.metrics, hand_metrics(truth, run(copy.deepcopy(fused).double(),
                                                          x.double())))
    (out32,) = report.deploy.outputs
    assert out32.name == "output" and out32.shape == (2, 5)
    assert_metrics(out32.metrics, hand_metrics(truth, run(fused, x)))
    assert_metrics(out32.baseline, hand_metrics(truth, run(model, x)))
    assert out32.metrics.max_rel <= 1e-5
    for r in report.runs:
        assert r.tolerance == DEFAULT_TOLERANCES[torch.float32]


def test_correct_float64_fusion_is_exact():
    model = make(ConvBNNet()).double()
    x = random_input(SHAPE, dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    report = repfuse.verify(model, fused, x)
    assert report.passed
    assert [r.dtype for r in report.runs] == ["float64"]
    assert report.float64.tolerance == Tolerance(rtol=1e-10, atol=1e-12)
    assert report.float64.outputs[0].metrics.max_rel <= 1e-10
    assert report.inputs["batches"] == 3 and report.inputs["shapes"] == [list(SHAPE)]


# --- wrong candidates fail, with the right numbers ----------------------------------------------


def test_perturbed_weight_fails_with_measured_error():
    model = make(ConvBNNet())
    x = random_input(SHAPE)
    wrong = perturbed(model, "conv2", 1e-3)
    report = repfuse.verify(model, wrong, x, batches=1)

    assert not report.passed
    assert not report.float64.passed and not report.deploy.passed
    truth = reference64(model, x)
    expected64 = hand_metrics(truth, reference64(wrong, x))
    assert_metrics(report.float64.outputs[0].metrics, expected64)
    assert_metrics(report.deploy.outputs[0].metrics, hand_metrics(truth, run(wrong, x)))
    # A 1e-3 relative change of one layer is far above float32 rounding and far below 1.
    assert 1e-5 < expected64["max_rel"] < 1e-2
    assert report.float64.min_rtol_to_pass == pytest.approx(
        (expected64["max_abs"] - 1e-6) / expected64["ref_max_abs"], rel=1e-9)
    assert report.summary_lines()[0].startswith("NOT EQUIVALENT")


def test_tolerance_overrides_are_used():
    model = make(ConvBNNet())
    x = random_input(SHAPE)
    wrong = perturbed(model, "conv2", 1e-3)
    loose = repfuse.verify(model, wrong, x, rtol=0.05, atol=0.0)
    assert loose.passed
    assert all(r.tolerance == Tolerance(rtol=0.05, atol=0.0) for r in loose.runs)

    fused = repfuse.fuse(model, x)
    strict = repfuse.verify(model, fused, x, rtol=0.0, atol=0.0)
    assert not strict.deploy.passed  # float32 rounding is not zero
    assert strict.deploy.tolerance == Tolerance(rtol=0.0, atol=0.0)

    only_rtol = repfuse.verify(model, fused, x, rtol=1e-3)
    assert only_rtol.deploy.tolerance == Tolerance(rtol=1e-3, atol=1e-6)


# --- lower precision ----------------------------------------------------------------------------


def low_precision_dtype() -> torch.dtype:
    """float16 if this torch runs a half conv on CPU, else bfloat16."""
    conv = nn.Conv2d(3, 4, 3)
    for dtype in (torch.float16, torch.bfloat16):
        try:
            conv.to(dtype)(torch.zeros(1, 3, 5, 5, dtype=dtype))
            return dtype
        except RuntimeError:
            continue
    pytest.skip("no half-precision conv on this CPU build")


def test_half_precision_fusion_reports_float64_deploy_and_baseline():
    dtype = low_precision_dtype()
    model = make(ConvBNNet()).to(dtype)
    x = random_input(SHAPE, dtype=dtype)
    fused = repfuse.fuse(model, x)
    report = repfuse.verify(model, fused, x, batches=1)

    name = str(dtype).removeprefix("torch.")
    assert report.passed, report.summary_lines()
    assert report.deploy_dtype == name
    assert [r.dtype for r in report.runs] == ["float64", name]
    assert all(r.tolerance == DEFAULT_TOLERANCES[dtype] for r in report.runs)
    truth = reference64(model, x)
    cand64 = run(copy.deepcopy(fused).double(), x.double())
    assert_metrics(report.float64.outputs[0].metrics, hand_metrics(truth, cand64))
    deploy = report.deploy.outputs[0]
    assert_metrics(deploy.metrics, hand_metrics(truth, run(fused, x)))
    assert_metrics(deploy.baseline, hand_metrics(truth, run(model, x)))
    # The fused weights are rounded to the low precision, so the float64 run is not exact,
    # but it is within that precision's tolerance, and well above float32 rounding.
    assert 0 < report.float64.outputs[0].metrics.max_rel <= DEFAULT_TOLERANCES[dtype].rtol


# --- the report ---------------------------------------------------------------------------------


def test_report_is_json_with_schema_version():
    model = make(ConvBNNet())
    x = random_input(SHAPE)
    report = repfuse.verify(model, repfuse.fuse(model, x), x)
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["schema_version"] == SCHEMA_VERSION == 3
    assert data["passed"] is True and data["diagnosis"] is None
    assert data["localization"] is None  # localized only on failure
    assert [r["dtype"] for r in data["runs"]] == ["float64", "float32"]
    deploy = data["runs"][1]["outputs"][0]
    assert deploy["metrics"]["max_abs"] == report.deploy.outputs[0].metrics.max_abs
    assert deploy["metrics"]["sqnr_db"] > 100
    assert deploy["baseline"]["max_abs"] == report.deploy.outputs[0].baseline.max_abs
    assert data["runs"][0]["outputs"][0]["baseline"] is None


def test_report_of_a_nan_candidate_is_strict_json():
    model = make(ConvBNNet())
    x = random_input(SHAPE)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.bias[0] = float("nan")
    report = repfuse.verify(model, broken, x)
    assert not report.passed
    assert report.deploy.outputs[0].metrics.max_abs == math.inf
    json.loads(report.to_json(), parse_constant=lambda name: pytest.fail(f"bare {name}"))


def test_training_flags_and_state_are_restored():
    model = make(ConvBNNet()).train()
    model.bn2.eval()
    x = random_input(SHAPE)
    fused = repfuse.fuse(model, x)
    fused.train()
    flags = {m: m.training for m in (*model.modules(), *fused.modules())}
    state = copy.deepcopy(model.state_dict())

    report = repfuse.verify(model, fused, x)

    assert report.passed  # the reference ran in eval mode: train-mode BN would differ
    assert {m: m.training for m in (*model.modules(), *fused.modules())} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running stats not updated


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
def test_structured_outputs_are_compared_per_leaf(as_dict):
    model = make(TwoHeads(as_dict))
    x = random_input(SHAPE)
    names = (["output['logits']", "output['embed']"] if as_dict
             else ["output[0]", "output[1]"])

    good = repfuse.verify(model, repfuse.fuse(model, x), x)
    assert good.passed
    assert [o.name for o in good.deploy.outputs] == names
    assert [o.shape for o in good.deploy.outputs] == [(2, 4), (2, 3)]

    wrong = perturbed(model, "embed", 1e-2)
    report = repfuse.verify(model, wrong, x, batches=1)
    logits, embed = report.deploy.outputs
    assert logits.passed and not embed.passed
    truth, out = reference64(model, x), run(wrong, x)
    key_embed = "embed" if as_dict else 1
    key_logits = "logits" if as_dict else 0
    assert_metrics(embed.metrics, hand_metrics(truth[key_embed], out[key_embed]))
    assert_metrics(logits.metrics, hand_metrics(truth[key_logits], out[key_logits]))


# --- comparisons that cannot be made ------------------------------------------------------------


def test_different_output_structure_is_an_error():
    model = make(TwoHeads(as_dict=False))
    x = random_input(SHAPE)
    single = FirstOutput(copy.deepcopy(model))
    with pytest.raises(VerificationError, match="structure"):
        repfuse.verify(model, single, x)


def test_candidate_that_does_not_run_is_an_error():
    model = make(ConvBNNet())
    with pytest.raises(VerificationError, match="running the candidate"):
        repfuse.verify(model, nn.Linear(3, 3), random_input(SHAPE))


def test_zero_batches_is_an_error():
    model = make(ConvBNNet())
    with pytest.raises(VerificationError, match="batches"):
        repfuse.verify(model, model, random_input(SHAPE), batches=0)


def test_random_batches_keep_shape_dtype_and_integer_inputs():
    x, idx = random_input((2, 3), dtype=torch.float16), torch.arange(4)
    batches = random_batches((x, idx), 3, seed=4)
    assert batches[0][0] is x
    assert all(b[0].dtype == torch.float16 and b[0].shape == (2, 3) for b in batches)
    assert all(b[1] is idx for b in batches)
    assert not torch.equal(batches[1][0], batches[2][0])
    assert torch.equal(random_batches((x, idx), 3, seed=4)[2][0], batches[2][0])


def test_cli_example_and_verification_batches_are_distinct():
    from repfuse.convert import example_input

    model = create_model("resnet_tiny")
    example = example_input((1, 3, 32, 32), model)
    batches = random_batches((example,), 3, seed=0)
    assert not torch.equal(batches[0][0], batches[1][0])
