"""The fused GraphModule's code and modules: direct submodule access, layers built without
an initializer, unused modules dropped."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import random_input, reference64, rel_err
from torch import nn
from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from repfuse.capture import capture
from repfuse.convert import convert
from repfuse.export import torchscript_module
from repfuse.graph import DirectModuleAccess, module_access, new_layer
from repfuse.models import create_model, get_spec
from repfuse.passes import run_pipeline
from repfuse.passes.base import finish_graph


def _fused(name: str = "mobileone_tiny"):
    model = create_model(name)
    x = random_input(get_spec(name).input_shape)
    return model, x, convert(model, x, verify=None).fused


def test_module_access_spells_the_path_through_modules_dicts():
    assert module_access("self", "stage1.0.conv") == \
        "self._modules['stage1']._modules['0']._modules['conv']"


def test_fused_code_reaches_every_called_module_through_modules_and_computes_the_same():
    model, x, fused = _fused()
    called = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert len(called) > 10
    assert isinstance(fused.graph._codegen, DirectModuleAccess)
    for node in called:
        assert f"{node.name} = {module_access('self', node.target)}(" in fused.code
    assert "getattr(" not in fused.code
    assert rel_err(reference64(model, x), fused(x)) < 1e-5


def test_direct_access_sees_a_submodule_replaced_after_fusion():
    # nothing is cached: the code reads the module tree at every call
    _, x, fused = _fused("resnet_tiny")
    before = fused(x)
    fused.fc = nn.Linear(fused.fc.in_features, fused.fc.out_features)
    after = fused(x)
    expected = nn.functional.linear(_pooled(fused, x), fused.fc.weight, fused.fc.bias)
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)


def _pooled(fused: GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The input of ``fc``, recorded with a hook."""
    seen = []
    handle = fused.fc.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    fused(x)
    handle.remove()
    return seen[0]


def test_deep_copy_keeps_direct_access_and_torchscript_gets_fx_code():
    model, x, fused = _fused()
    copied = copy.deepcopy(fused)
    assert isinstance(copied.graph._codegen, DirectModuleAccess)
    assert "_modules[" in copied.code
    scripted, how = torchscript_module(fused, (x,))
    assert how == "torch.jit.script"
    assert isinstance(fused.graph._codegen, DirectModuleAccess)  # the fused model unchanged
    assert rel_err(reference64(model, x), scripted(x)) < 1e-5


def test_a_custom_codegen_is_kept():
    class Marked(CodeGen):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = random_input((1, 3, 8, 8))
    gm = capture(model, (x,)).module
    gm.graph.set_codegen(Marked())
    run_pipeline(gm)
    assert type(gm.graph._codegen) is Marked


@pytest.mark.parametrize("cls, args", [
    (nn.Conv2d, (3, 4, 3)), (nn.Conv1d, (3, 4, 5)), (nn.ConvTranspose2d, (3, 4, 2)),
    (nn.Linear, (3, 4)),
])
def test_new_layer_runs_no_initializer(monkeypatch, cls, args):
    def refuse(*_, **__):
        raise AssertionError("an initializer ran")

    with monkeypatch.context() as patch:
        patch.setattr(nn.init, "kaiming_uniform_", refuse)
        patch.setattr(nn.init, "uniform_", refuse)
        layer = new_layer(cls, *args, dtype=torch.float64)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.float64
    assert "reset_parameters" not in vars(layer)  # the method is the class's again
    reference = cls(*args, dtype=torch.float64)
    layer.weight = nn.Parameter(reference.weight.detach().clone())
    layer.bias = nn.Parameter(reference.bias.detach().clone())
    x = torch.randn(2, 3, *([6] * (layer.weight.dim() - 2)), dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_finish_graph_drops_uncalled_modules_and_keeps_read_ones():
    root = nn.Module()
    root.block = nn.Module()
    root.block.used = nn.Conv2d(3, 3, 1)
    root.block.unused = nn.Conv2d(3, 3, 1)
    root.orphan = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    root.holder = nn.Module()
    root.holder.scale = nn.Parameter(torch.full((1, 3, 1, 1), 2.0))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("block.used", (x,))
    scale = graph.get_attr("holder.scale")
    graph.output(graph.call_function(torch.mul, (y, scale)))
    gm = GraphModule(root, graph)
    gm.add_submodule("block.unused", root.block.unused)  # GraphModule copies only what is used
    gm.add_submodule("orphan", root.orphan)
    finish_graph(gm)
    names = {name for name, _ in gm.named_modules()}
    assert names == {"", "block", "block.used", "holder"}
    inputs = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(inputs), root.block.used(inputs) * 2.0)


def test_capture_runs_with_the_collector_paused_and_restores_it():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())  # runs while tracing and while propagating shapes
            return x * 2

    x = random_input((1, 3))
    assert gc.isenabled()
    gm = capture(Probe(), (x,)).module
    assert seen and not any(seen) and gc.isenabled()
    torch.testing.assert_close(gm(x), x * 2)

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    with pytest.raises(Exception, match="boom"):
        capture(Broken(), (x,))
    assert gc.isenabled()  # restored after a failure too
