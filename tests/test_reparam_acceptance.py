"""Acceptance of structural reparameterization on the whole zoo (issue 3).

For every reparameterizable zoo model, with randomized BN statistics: the fused graph has exactly
as many convs as the hand-written deploy form and no BN; it matches the unfused model to 1e-10
(float64) and 1e-5 (float32); and its weights load into the deploy form by structure, which then
gives the same outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import random_input, reference64, rel_err
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.cli import main
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, get_spec, list_models

REPARAM_MODELS = [spec.name for spec in list_models() if spec.reparameterized]
# Models with 224x224 inputs run at 64x64 here: the rules do not depend on the spatial size.
SMALL_SIDE = 64


def example_shape(name: str) -> tuple[int, ...]:
    shape = get_spec(name).input_shape
    if shape[-1] > SMALL_SIDE and shape[1] == 3:
        return (*shape[:2], SMALL_SIDE, SMALL_SIDE)
    return shape


def convs(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


def batchnorms_and_calls(gm: torch.fx.GraphModule) -> int:
    modules = sum(isinstance(m, _BatchNorm) for m in gm.modules())
    calls = sum(n.op == "call_function" and n.target in (F.batch_norm,) for n in gm.graph.nodes)
    return modules + calls


@pytest.mark.parametrize("name", REPARAM_MODELS)
def test_zoo_model_fuses_to_its_deploy_form(name: str) -> None:
    model = create_model(name).double()
    x = random_input(example_shape(name), dtype=torch.float64)
    expected = reference64(model, x)

    fused = repfuse.fuse(model, x)

    deploy = create_model(name, deploy=True).double()
    assert convs(fused) == convs(deploy)
    assert batchnorms_and_calls(fused) == 0
    with torch.no_grad():
        assert rel_err(expected, fused(x)) <= 1e-10
    load_by_structure(deploy, fused, x)
    with torch.no_grad():
        assert rel_err(expected, deploy(x)) <= 1e-10


@pytest.mark.parametrize("name", REPARAM_MODELS)
def test_zoo_model_fuses_in_float32(name: str) -> None:
    model = create_model(name)
    x = random_input(example_shape(name))
    expected = reference64(model, x)

    fused = repfuse.fuse(model, x)

    assert all(p.dtype == torch.float32 for p in fused.parameters())
    with torch.no_grad():
        assert rel_err(expected, fused(x)) <= 1e-5


def test_convert_cli_accepts_a_reparameterizable_zoo_model(tmp_path) -> None:
    out = tmp_path / "repvgg.fused.pt"
    result = CliRunner().invoke(main, ["convert", "repvgg_tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    fused = torch.load(out, weights_only=False)
    model = create_model("repvgg_tiny")
    x = random_input(get_spec("repvgg_tiny").input_shape)
    assert convs(fused) == convs(create_model("repvgg_tiny", deploy=True))
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= 1e-5


def test_inspect_reports_merges_per_block() -> None:
    result = CliRunner().invoke(main, ["inspect", "repvgg_tiny"])
    assert result.exit_code == 0, result.output
    assert "merge_branches: sum of 3 branches" in result.stderr
    # The block of a RepVGG unit lists its BN folds and the merge together.
    block = result.stderr.split("\nstage2.1.conv\n")[1].split("\nstage")[0]
    assert block.count("fold_batchnorm") == 2 and block.count("merge_branches") == 1


class DilatedMisaligned(nn.Module):
    """3x3 dilation 2 padding 2 and 2x2 padding 0, both stride 2: equal shapes on even sizes,
    but the 2x2 window is off-centre by half a pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.dilated = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.small = nn.Conv2d(4, 4, 2, stride=2)

    def forward(self, x):
        return self.dilated(x) + self.small(x)


def test_branches_with_misaligned_dilations_are_declined() -> None:
    model = DilatedMisaligned().double().eval()
    x = random_input((2, 4, 8, 8), dtype=torch.float64)

    fused = repfuse.fuse(model, x)

    assert convs(fused) == 2
    declined = repfuse.history(fused).declined
    assert any("odd size difference" in d.reason for d in declined)
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= 1e-10
