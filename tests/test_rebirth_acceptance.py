"""Acceptance of Deep Rebirth merging (issue 4) on the zoo's GoogLeNet and VGG-avgpool nets.

- GoogLeNet: no BN left, each Inception module's three 1x1 convs on its input are one conv
  (then split), outputs match the unfused model (float64 to 1e-10, float32 to 1e-5).
- conv → avgpool stage ends become single strided convs with fewer MACs and the same outputs.
- max pooling and activations stay, and the JSON report lists them as not mergeable exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import random_input, reference64, rel_err
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.cli import main
from repfuse.cost import graph_cost
from repfuse.models import create_model
from repfuse.models.googlenet import Inception

SIDE = 64  # GoogLeNet at 64x64: the rules do not depend on the spatial size


def _conv_paths(module: nn.Module) -> list[str]:
    return [p for p, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_googlenet_fuses_bn_and_merges_each_inception_head(dtype, rtol) -> None:
    model = create_model("googlenet")
    x = random_input((1, 3, SIDE, SIDE))
    expected = reference64(model, x)

    fused = repfuse.fuse(model.to(dtype), x.to(dtype))

    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    with torch.no_grad():
        assert rel_err(expected, fused(x.to(dtype))) <= rtol
    inceptions = [p for p, m in model.named_modules() if isinstance(m, Inception)]
    assert len(inceptions) == 9
    merges = [r for r in repfuse.history(fused).rewrites if r.pass_name == "merge_siblings"]
    for path in inceptions:
        heads = {f"{path}.branch1.conv", f"{path}.branch2.0.conv", f"{path}.branch3.0.conv"}
        merged = [r for r in merges if heads <= set(r.module_paths)]
        assert len(merged) == 1, path
        wide = fused.get_submodule(merged[0].module)
        assert wide.kernel_size == (1, 1) and wide.out_channels == sum(
            model.get_submodule(h).out_channels for h in heads)
    assert len(_conv_paths(fused)) == len(_conv_paths(model)) - 2 * len(inceptions)


def test_vgg_avgpool_stages_become_single_strided_convs_with_fewer_macs() -> None:
    model = create_model("vgg_avgpool_tiny").double()
    x = random_input((1, 3, 32, 32), dtype=torch.float64)
    expected = reference64(model, x)
    captured = repfuse.trace(model, x)
    pools = sum(isinstance(m, nn.AvgPool2d) for m in model.modules())
    assert pools >= 2

    fused = repfuse.fuse(model, x)

    assert not any(isinstance(m, (nn.AvgPool2d, _BatchNorm)) for m in fused.modules())
    composed = [r for r in repfuse.history(fused).rewrites if r.pass_name == "compose_linear"]
    assert len(composed) == pools
    for rewrite in composed:
        conv = fused.get_submodule(rewrite.module)
        assert conv.stride == (2, 2) and conv.kernel_size == (4, 4)
    assert graph_cost(fused).macs < graph_cost(captured).macs
    with torch.no_grad():
        assert rel_err(expected, fused(x)) <= 1e-10


def test_report_lists_max_pooling_and_activations_as_not_mergeable(tmp_path) -> None:
    report = tmp_path / "googlenet.json"
    result = CliRunner().invoke(main, ["convert", "googlenet_tiny", "-o",
                                       str(tmp_path / "g.pt"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "not mergeable exactly" in result.output
    conversion = json.loads(report.read_text())["conversion"]
    entries = {e["op"]: e for e in conversion["not_mergeable"]}
    assert entries["MaxPool2d"]["kind"] == "max pooling"
    assert entries["ReLU"]["kind"] == "activation" and entries["ReLU"]["count"] > 0
    assert "retraining" in entries["MaxPool2d"]["reason"]
    passes = [row["pass"] for row in conversion["cost"]["by_pass"]]
    assert "merge_siblings" in passes and conversion["counts"]["merge_siblings"] == 9
