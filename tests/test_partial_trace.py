"""Capturing models that torch.fx cannot trace as a whole (:mod:`repfuse.capture`).

Two mechanisms, each checked against the unfused model run in float64:

- **shape specialization**: Python branches on shapes, dtypes and non-tensor arguments are
  resolved with the example input's values, recorded, and guarded by checks on the inputs;
- **partial capture**: a forward that branches on tensor values (an early exit, an assert on
  values) stays eager; its largest traceable submodules are traced and fused, and every module
  kept eager is reported with the reason.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import F32_RTOL, F64_RTOL, modules_of, random_input, reference64, rel_err
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.cli import main
from repfuse.convert import convert
from repfuse.models import create_model, load_fused_state_dict, randomize_bn_stats
from repfuse.models.branchy import entropy


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels))


def randomized(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    return randomize_bn_stats(model, seed=3).to(dtype).eval()


def assert_fused_like_reference(model: nn.Module, fused: nn.Module, x: Tensor,
                                rtol: float = F64_RTOL) -> None:
    with torch.no_grad():
        actual = fused(x)
    assert actual.dtype == x.dtype
    assert rel_err(reference64(model, x), actual) <= rtol


def no_batchnorm_left(fused: nn.Module) -> bool:
    return modules_of(fused, _BatchNorm) == []


# --- shape specialization -----------------------------------------------------------------------


class ShapeBranches(nn.Module):
    """Python that asks for shapes and dims: plain torch.fx cannot trace any of it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() == 4, "expects NCHW"
        y = self.body(x)
        if y.shape[-1] == 7:
            y = y * 2
        else:
            y = y - 1
        for _ in range(x.size(1)):  # x.size(1) as a Python int
            y = y + self.scale
        return y.mean(dim=(2, 3)) * len(x)


@pytest.mark.parametrize("side, branch", [(7, "y.shape[-1] == 7 is True"),
                                          (6, "y.shape[-1] == 7 is False")],
                         ids=["true-branch", "false-branch"])
def test_shape_branches_are_specialized_recorded_and_guarded(side, branch):
    model = randomized(ShapeBranches())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(copy.deepcopy(model))  # plain fx cannot
    x = random_input((2, 3, side, side), dtype=torch.float64)

    fused = repfuse.fuse(model, x)

    assert isinstance(fused, GraphModule)
    info = repfuse.capture_info(fused)
    assert not info.partial
    decisions = "\n".join(info.specialized)
    assert branch.replace("y.", "body_1.") in decisions
    assert "x.dim() == 4 is True" in decisions
    assert "x.size(1) is 3" in decisions
    assert "len of x is 2" in decisions
    assert no_batchnorm_left(fused)
    assert_fused_like_reference(model, fused, x)
    other = random_input((2, 3, 5, 5), dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"repfuse specialized .* shape \[2, 3, "):
        fused(other)  # never silently the branch of another shape


def test_a_traceable_model_is_neither_specialized_nor_guarded():
    x = random_input((1, 3, 32, 32))
    fused = repfuse.fuse(create_model("resnet_tiny"), x)
    info = repfuse.capture_info(fused)
    assert info.specialized == [] and not info.partial and info.parts == [""]
    assert not any(n.target is torch._assert for n in fused.graph.nodes)
    assert_fused_like_reference(create_model("resnet_tiny"), fused, x, F32_RTOL)


class FlagArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 3)

    def forward(self, x: Tensor, double: bool = False) -> Tensor:
        y = self.body(x)
        if double:
            y = y * 2
        return y


def test_non_tensor_argument_is_specialized_to_its_example_value():
    model = randomized(FlagArgument())
    x = random_input((1, 3, 6, 6), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    assert "branch on double is False" in "\n".join(repfuse.capture_info(fused).specialized)
    assert_fused_like_reference(model, fused, x)
    with pytest.raises(AssertionError, match="argument 'double' = False"):
        fused(x, True)


# --- partial capture: BranchyNet's early exit ----------------------------------------------------


@pytest.fixture(scope="module")
def branchy() -> nn.Module:
    return create_model("branchynet_tiny")


def early_exit_logits(model: nn.Module, x: Tensor) -> Tensor:
    """BranchyNet's side branch, computed by calling its modules (float64)."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref.exit1(ref.stage1(ref.stem(x.double())))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_branchy_net_fuses_partially_and_both_exits_are_correct(branchy, dtype):
    model = copy.deepcopy(branchy).to(dtype)
    x = random_input((2, 3, 32, 32), dtype=dtype)
    assert (entropy(early_exit_logits(model, x)) > model.threshold).all()  # x runs it all

    with pytest.warns(repfuse.RepfuseWarning, match="kept eager: the model \\(BranchyNet\\)"):
        fused = repfuse.fuse(model, x)

    assert type(fused).__name__ == "BranchyNet" and not isinstance(fused, GraphModule)
    info = repfuse.capture_info(fused)
    assert info.partial
    assert info.parts == ["stem", "stage1", "exit1", "stage2", "head"]
    assert [(s.path, s.kind) for s in info.skipped] == [("", "BranchyNet")]
    assert "control flow depends on tensor values" in info.skipped[0].reason
    for path in info.parts:
        assert isinstance(fused.get_submodule(path), GraphModule)
    assert no_batchnorm_left(fused)
    assert repfuse.history(fused).counts()["fold_batchnorm"] == 10
    tolerance = F64_RTOL if dtype == torch.float64 else F32_RTOL
    outputs = {}
    for threshold, exit_name in ((math.inf, "early"), (0.0, "final")):  # entropy >= 0
        model.threshold = fused.threshold = threshold
        assert_fused_like_reference(model, fused, x, tolerance)
        with torch.no_grad():
            outputs[exit_name] = fused(x).double()
    assert rel_err(early_exit_logits(model, x), outputs["early"]) <= tolerance
    assert rel_err(outputs["early"], outputs["final"]) > 0.1  # two different exits


def test_fused_branchy_net_loads_into_its_deploy_form(branchy):
    """Its fused parts keep the train form's paths: the state dict is the deploy form's."""
    x = random_input((1, 3, 32, 32), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(copy.deepcopy(branchy).double(), x)
    deploy = create_model("branchynet_tiny", deploy=True).double()
    load_fused_state_dict(deploy, fused.state_dict())
    for threshold in (math.inf, 0.0):
        branchy_copy = copy.deepcopy(branchy)
        branchy_copy.threshold = deploy.threshold = threshold
        assert_fused_like_reference(branchy_copy, deploy, x)


def test_convert_reports_the_skipped_module(branchy):
    x = random_input((1, 3, 32, 32))
    conversion = convert(branchy, x, name="branchynet_tiny")
    assert conversion.report.passed
    section = conversion.to_dict()
    assert section["partial"] is True
    assert section["parts"] == ["stem", "stage1", "exit1", "stage2", "head"]
    assert section["skipped"] == [{"path": "", "module": "BranchyNet",
                                   "reason": conversion.capture.skipped[0].reason}]
    assert section["cost"]["before"]["ops"]["BatchNorm2d"] == 10
    assert "BatchNorm2d" not in section["cost"]["after"]["ops"]
    json.dumps(conversion.report_dict())  # serializable


def test_cli_convert_prints_the_partial_capture(tmp_path, branchy):
    out, report = tmp_path / "branchy.fused.pt", tmp_path / "branchy.json"
    result = CliRunner().invoke(main, ["convert", "branchynet_tiny", "-o", str(out),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "partial capture: traced and fused 5 part(s)" in result.stderr
    assert "the model (BranchyNet): control flow depends on tensor values" in result.stderr
    assert json.loads(report.read_text())["conversion"]["partial"] is True
    loaded = torch.load(out, weights_only=False)
    assert repfuse.capture_info(loaded).partial
    x = random_input((3, 3, 32, 32), seed=5)
    original = copy.deepcopy(branchy)
    for threshold in (math.inf, 0.0):
        original.threshold = loaded.threshold = threshold
        assert_fused_like_reference(original, loaded, x, F32_RTOL)


# --- partial capture: where the untraceable code sits ---------------------------------------------


class ValueGate(nn.Module):
    """Data-dependent control flow."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.sum() > 0 else -x


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = conv_bn(3, 3)
        self.gate = ValueGate()
        self.second = conv_bn(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.gate(self.first(x)))


class TraceableAroundAGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 3)
        self.block = GatedBlock()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.block(self.stem(x)))


def test_untraceable_submodule_is_called_opaquely_from_the_traced_rest():
    model = randomized(TraceableAroundAGate())
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning, match="'block.gate' \\(ValueGate\\)"):
        fused = repfuse.fuse(model, x)
    assert isinstance(fused, GraphModule)  # the root traced, with block.gate as a call
    info = repfuse.capture_info(fused)
    assert info.parts == [""]
    assert [(s.path, s.kind) for s in info.skipped] == [("block.gate", "ValueGate")]
    assert "(block_first_1.sum() > 0)" in info.skipped[0].reason
    assert "block.gate" in [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert no_batchnorm_left(fused)  # all three conv-BN pairs around the gate
    assert_fused_like_reference(model, fused, x)
    assert_fused_like_reference(model, fused, -x)  # the gate's other branch


class ValueAssert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        assert torch.isfinite(x).all(), "non-finite input"
        return self.body(x)


class EarlyExit(nn.Module):
    """An eager forward with a module called twice, one asserting on values, one rarely run."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = ValueAssert()
        self.shared = conv_bn(3, 3)
        self.rare = conv_bn(3, 3)
        self.blocks = nn.ModuleList([conv_bn(3, 3), conv_bn(3, 3)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.shared(self.shared(self.checked(x)))
        if x.abs().max() > 1e6:
            return self.rare(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_eager_forward_keeps_what_it_must_and_fuses_the_rest():
    model = randomized(EarlyExit())
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)

    info = repfuse.capture_info(fused)
    skipped = {s.path: s.reason for s in info.skipped}
    assert set(skipped) == {"", "checked", "rare"}
    assert "control flow depends on tensor values" in skipped[""]
    assert "control flow depends on tensor values" in skipped["checked"]
    assert "not run on the example input" in skipped["rare"]
    assert info.parts == ["checked.body", "shared", "blocks.0", "blocks.1"]
    assert isinstance(fused.shared, GraphModule)  # called twice, fused once
    assert modules_of(fused, _BatchNorm) == ["rare.1"]  # kept as it was
    assert_fused_like_reference(model, fused, x)
    big = x * 1e8  # takes the rarely run branch: the module kept as it was still computes it
    assert_fused_like_reference(model, fused, big)
    with pytest.raises(AssertionError, match="non-finite input"):
        fused(torch.full_like(x, math.nan))  # the value assert is still there


class Twice(nn.Module):
    """An eager forward calling a shape-specialized child with two input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.child = ShapeBranches()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > -1e9:
            return self.child(x) + self.child(x[:, :, 1:, 1:]).sum()
        return x


def test_specialized_child_called_with_two_shapes_is_kept_eager():
    model = randomized(Twice())
    x = random_input((1, 3, 7, 7), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)
    skipped = {s.path: s.reason for s in repfuse.capture_info(fused).skipped}
    assert "specialized to one input shape but it is called with several" in skipped["child"]
    assert isinstance(fused.child.body, GraphModule)  # its traceable part is still fused
    assert no_batchnorm_left(fused)
    assert_fused_like_reference(model, fused, x)


def test_wrong_input_shape_of_an_untraceable_model_is_a_capture_error():
    with pytest.raises(repfuse.CaptureError, match=r"running the model on inputs of shape "
                                                   r"\[1, 5, 32, 32\] failed"):
        repfuse.fuse(create_model("branchynet_tiny"), random_input((1, 5, 32, 32)))


class Raises(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("this model is broken")


def test_forward_that_raises_is_a_capture_error():
    with pytest.raises(repfuse.CaptureError, match="ValueError: this model is broken"):
        repfuse.fuse(Raises(), random_input((1, 3)))


def test_strict_trace_still_refuses_a_model_that_only_traces_in_parts():
    with pytest.raises(repfuse.CaptureError, match="the forward of BranchyNet"):
        repfuse.trace(create_model("branchynet_tiny"), random_input((1, 3, 32, 32)))
