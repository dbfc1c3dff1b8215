"""Acceptance: the bundled ResNet-18/50 and the tiny VGG fold completely and exactly.

The reference is the unfused model (random BatchNorm statistics from ``create_model``) run in
float64. A float64 model fused must match it to 1e-10 relative; a float32 model fused, run in
float32, to 1e-5. Each (model, dtype) is fused once per module.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_input, reference64, rel_err
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import create_model, get_spec

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def batchnorm_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def batch_norm_calls(gm: GraphModule) -> list[str]:
    """Nodes that compute a batch norm in any spelling: module, F.batch_norm, aten op."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BatchNorm):
            found.append(node.name)
        elif node.op in ("call_function", "call_method") and "batch_norm" in str(node.target):
            found.append(node.name)
    return found


class Case:
    """One model: its unfused form, an input and the float64 reference output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model = create_model(name)
        shape = (1, *get_spec(name).input_shape[1:])
        self.x = random_input(shape, seed=11, dtype=torch.float64)
        self.expected = reference64(self.model, self.x)
        self.batchnorms = batchnorm_modules(self.model)


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "vgg_tiny"])
def case(request) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["f64", "f32"])
def fused(case, request):
    dtype = request.param
    model = copy.deepcopy(case.model).to(dtype)
    x = case.x.to(dtype)
    gm = repfuse.fuse(model, x)
    with torch.no_grad():
        out = gm(x)
    return dtype, gm, out


def test_no_batchnorm_left(case, fused):
    _, gm, _ = fused
    assert len(case.batchnorms) > 0
    assert batchnorm_modules(gm) == []
    assert batch_norm_calls(gm) == []
    assert repfuse.history(gm).counts()["fold_batchnorm"] == len(case.batchnorms)


def test_matches_the_unfused_float64_model(case, fused):
    dtype, _, out = fused
    assert out.dtype == dtype
    assert rel_err(case.expected, out) <= RTOL[dtype]


def test_vgg_tiny_head_folds_batchnorm1d_into_its_linear_layers():
    model = create_model("vgg_tiny")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    x = random_input((2, 3, 32, 32), seed=12, dtype=torch.float64)
    gm = repfuse.fuse(copy.deepcopy(model).double(), x)
    fused_linears = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(fused_linears) == len(linears)
    assert all(m.bias is not None for m in fused_linears)
    assert batchnorm_modules(gm) == []
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= 1e-10
