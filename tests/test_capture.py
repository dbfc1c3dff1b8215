"""Tests of :mod:`repfuse.capture`: tracing a copy, locating untraceable code, shape metadata."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_input, reference64, rel_err
from torch import Tensor, nn
from torch.fx import GraphModule

import repfuse
from repfuse.capture import as_input_tuple
from repfuse.models import randomize_bn_stats


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBlock()
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x).mean(dim=(2, 3)))


def make_net() -> Net:
    return randomize_bn_stats(Net(), seed=3)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return x
        return -x


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Gate()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.conv(x))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = GatedBlock()

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.stem(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(self.a(x)) + self.b(y)


def test_untraceable_submodule_is_named_with_its_class():
    with pytest.raises(repfuse.CaptureError) as info:
        repfuse.trace(Untraceable(), random_input((1, 3, 8, 8)))
    message = str(info.value)
    assert "submodule 'block.gate' (Gate)" in message
    assert "\n" not in message  # one line, as the CLI prints it
    assert info.value.exit_code == 2


def test_trace_leaves_the_model_alone():
    model = make_net().train()
    model.block.bn.eval()  # mixed flags must survive exactly
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    gm = repfuse.trace(model, random_input((2, 3, 10, 10)))

    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key  # incl. BN running stats: no train-mode run
    assert not gm.training
    assert all(not m.training for m in gm.modules())
    for p_model, p_gm in zip(model.parameters(), gm.parameters(), strict=True):
        assert p_model.data_ptr() != p_gm.data_ptr()


def test_traced_graph_computes_the_eval_model():
    model = make_net()
    x = random_input((2, 3, 10, 10), dtype=torch.float64)
    gm = repfuse.trace(copy.deepcopy(model).double(), x)
    with torch.no_grad():
        out = gm(x)
    assert rel_err(reference64(model, x), out) <= 1e-12


def test_graph_module_is_copied_not_retraced():
    original = torch.fx.symbolic_trace(make_net().eval())
    count = len(original.graph.nodes)
    code = original.code
    for node in original.graph.nodes:
        node.meta["marker"] = f"made by hand: {node.name}"  # retracing would drop it
    x = random_input((1, 3, 10, 10))
    with torch.no_grad():
        before = original(x)
    gm = repfuse.trace(original, x)

    assert gm is not original
    assert len(gm.graph.nodes) == count
    assert gm.code == code
    assert [n.meta.get("marker") for n in gm.graph.nodes] == [
        f"made by hand: {n.name}" for n in original.graph.nodes
    ]
    with torch.no_grad():
        gm.get_submodule("block.conv").weight.add_(1.0)
    gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "output"))
    assert len(original.graph.nodes) == count
    with torch.no_grad():
        assert torch.equal(original(x), before)


def test_nodes_carry_their_shapes():
    x = random_input((2, 3, 10, 10))
    gm = repfuse.trace(make_net(), x)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if n.op not in ("output",)}
    # Conv 3x3 without padding: 10 -> 8; mean over H, W; linear to 4.
    assert shapes["x"] == (2, 3, 10, 10)
    assert shapes["block_conv"] == (2, 8, 8, 8)
    assert shapes["block_bn"] == (2, 8, 8, 8)
    assert shapes["mean"] == (2, 8)
    assert shapes["head"] == (2, 4)
    assert all(n.meta["tensor_meta"].dtype == torch.float32 for n in gm.graph.nodes
               if n.op != "output")


def test_two_inputs_as_a_tuple():
    model = randomize_bn_stats(TwoInputs(), seed=1).eval()
    x, y = random_input((1, 3, 6, 6), seed=1), random_input((1, 2, 6, 6), seed=2)
    gm = repfuse.trace(model, (x, y))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [tuple(n.meta["tensor_meta"].shape) for n in placeholders] == [(1, 3, 6, 6),
                                                                           (1, 2, 6, 6)]
    fused = repfuse.fuse(model, [x, y])
    with torch.no_grad():
        out = fused(x, y)
    assert rel_err(reference64(model, x, y), out) <= 1e-5


@pytest.mark.parametrize(
    "bad", ["x", 3, {"x": torch.zeros(1)}, (torch.zeros(1), 2.0), None],
    ids=["str", "int", "dict", "tuple-with-float", "none"],
)
def test_bad_example_inputs(bad):
    with pytest.raises(repfuse.RepfuseError, match="example_inputs must be a tensor"):
        repfuse.trace(make_net(), bad)


def test_not_a_module():
    with pytest.raises(repfuse.RepfuseError, match="expected a torch.nn.Module"):
        repfuse.trace(lambda x: x, random_input((1, 3)))


def test_as_input_tuple_normalizes():
    x, y = torch.zeros(1), torch.ones(2)
    assert as_input_tuple(x)[0] is x
    assert as_input_tuple([x, y]) == (x, y)


def test_wrong_input_shape_is_a_capture_error():
    with pytest.raises(repfuse.CaptureError, match=r"inputs of shape \[1, 5, 10, 10\]"):
        repfuse.trace(make_net(), random_input((1, 5, 10, 10)))


def test_wrong_input_shape_error_is_one_line_naming_the_layer():
    with pytest.raises(repfuse.CaptureError) as info:
        repfuse.trace(make_net(), random_input((1, 5, 10, 10)))
    message = str(info.value)
    assert "\n" not in message  # not fx's "While executing ..." appended to it
    assert message.startswith("running the traced model failed at 'block.conv': RuntimeError: ")
    assert message.endswith(" (inputs of shape [1, 5, 10, 10])")


def test_wrong_input_shape_prints_nothing(capsys):
    with pytest.raises(repfuse.CaptureError):
        repfuse.trace(make_net(), random_input((1, 5, 10, 10)))
    assert capsys.readouterr().err == ""


def test_traced_module_is_a_graph_module():
    assert isinstance(repfuse.trace(make_net(), random_input((1, 3, 10, 10))), GraphModule)
