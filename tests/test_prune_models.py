"""Exact pruning of the sparse zoo models, and approximate pruning (``prune_below``).

For each model the channels that must go are counted independently, from its parameters (a
BN with ``γ = 0`` before a zero-padded conv goes only where ``relu(β) = 0``; before a 1x1
conv, a global pool or a Linear, always), and the pruned model's layer widths and MACs are
checked against that count; its outputs against the unpruned model in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import F32_RTOL, F64_RTOL, random_input, reference64, rel_err
from torch import nn

import repfuse
from repfuse.cost import graph_cost
from repfuse.models import create_model, get_spec
from repfuse.passes import DEFAULT_PIPELINE, REGISTRY, run_pipeline
from repfuse.pruning import prune_below

F64 = torch.float64


def fused64(name: str):
    model = create_model(name)
    x = random_input(get_spec(name).input_shape, seed=3)
    gm = repfuse.trace(copy.deepcopy(model).double(), x.double())
    result = run_pipeline(gm)
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x.double())) <= F64_RTOL
        fused32 = repfuse.fuse(model, x)
        assert rel_err(reference64(model, x), fused32(x)) <= F32_RTOL
    return model, gm, result


def dead(bn: nn.Module) -> torch.Tensor:
    return bn.weight.detach().eq(0)


def dead_and_zero(bn: nn.Module) -> int:
    """Dead channels whose constant ``relu(β)`` is 0: they can leave before a padded conv."""
    return int((dead(bn) & bn.bias.detach().le(0)).sum())


def conv_macs(c_in: int, c_out: int, k: int, side: int) -> int:
    return c_out * side * side * c_in * k * k


def test_slim_vgg_loses_its_dead_channels_where_exact() -> None:
    model, gm, result = fused64("slim_vgg_tiny")
    f, c = model.features, model.classifier
    widths = [32 - dead_and_zero(f[0].bn), 64 - dead_and_zero(f[2].bn),
              128 - dead_and_zero(f[4].bn), 128 - int(dead(f[5].bn).sum())]
    hidden = 128 - int(dead(c.bn1).sum())
    paths = ["features.0.conv", "features.2.conv", "features.4.conv", "features.5.conv"]
    assert [gm.get_submodule(p).out_channels for p in paths] == widths
    assert (gm.get_submodule("classifier.fc1").in_features,
            gm.get_submodule("classifier.fc1").out_features) == (widths[3], hidden)
    macs = (conv_macs(3, widths[0], 3, 32) + conv_macs(widths[0], widths[1], 3, 16)
            + conv_macs(widths[1], widths[2], 3, 8) + conv_macs(widths[2], widths[3], 3, 8)
            + widths[3] * hidden + hidden * 10)
    assert graph_cost(gm).macs == macs
    # the positive constants before padded convs stay, each with the padding reason
    kept = sum(int(dead(f[i].bn).sum()) - dead_and_zero(f[i].bn) for i in (0, 2, 4))
    declined = [d for d in result.declined if d.pass_name == "prune_dead"]
    assert kept > 0 and len(declined) == 3
    assert all("zero-padded 3x3 conv" in d.reason for d in declined)


def test_slim_resnet_loses_dead_bottleneck_channels_and_dead_stream_channels() -> None:
    model, gm, result = fused64("slim_resnet_tiny")
    for index, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        block, path = stage[0], f"layer{index + 1}.0"
        planes = block.bn1.num_features
        stream = 4 * planes - int((dead(block.bn3) & dead(block.downsample[1])).sum())
        inner = planes - dead_and_zero(block.bn1)
        assert gm.get_submodule(f"{path}.conv2").out_channels == planes - int(
            dead(block.bn2).sum())
        assert gm.get_submodule(f"{path}.conv3").out_channels == stream
        if index == 0:  # conv1 and the shortcut read one tensor alike: merge_siblings stacks them
            assert gm.get_submodule(f"{path}.downsample.0").out_channels == stream + inner
            continue
        assert gm.get_submodule(f"{path}.conv1").out_channels == inner
        assert gm.get_submodule(f"{path}.downsample.0").out_channels == stream
    assert gm.get_submodule("fc").in_features == 512 - int(dead(model.layer4[0].bn3).sum())
    before = graph_cost(repfuse.trace(model, random_input((1, 3, 32, 32)))).macs
    assert graph_cost(gm).macs < 0.75 * before


def test_channels_dead_in_one_residual_addend_all_stay() -> None:
    model, gm, result = fused64("resnet_tiny_dead_addend")
    for index in range(1, 5):
        width = getattr(model, f"layer{index}")[0].bn2.num_features
        assert gm.get_submodule(f"layer{index}.0.conv2").out_channels == width
    assert [r for r in result.rewrites if r.pass_name == "prune_dead"] == []
    reasons = [d.reason for d in result.declined if d.pass_name == "prune_dead"]
    assert len(reasons) == 4 and all("read by the residual add" in r for r in reasons)
    assert "live in 'layer2.0.downsample.0' (Conv2d)" in reasons[1]


@pytest.mark.parametrize("name, prefix", [("vit_pruned_heads_tiny", "attn.q"),
                                          ("mha_pruned_heads_tiny", "attn.q_proj")])
def test_pruned_heads_and_dead_mlp_channels_leave_the_transformer(name: str, prefix: str) -> None:
    model, gm, result = fused64(name)
    # block 0 lost one head of 8 channels, block 1 two; q, k, v run as one layer, then a split
    for block, heads in ((0, 3), (1, 2)):
        assert gm.get_submodule(f"blocks.{block}.{prefix}").out_features == 3 * 8 * heads
        hidden = 64 - int(model.blocks[block].mlp[0].weight.detach().eq(0).all(1).sum())
        assert hidden == 48 and gm.get_submodule(f"blocks.{block}.mlp.0").out_features == 48
    pruned = [r for r in result.rewrites if r.pass_name == "prune_dead"]
    assert len(pruned) == 4 and all(r.exact for r in pruned)


def test_prune_below_is_approximate_opt_in_and_measured() -> None:
    """vgg_tiny with a few BN γ of 5e-3: exact pruning keeps them, prune_below removes them
    and reports the error against the float64 original."""
    model = create_model("vgg_tiny")
    with torch.no_grad():
        model.features[5].bn.weight[[1, 4, 9]] = 5e-3
        model.features[5].bn.bias[[1, 4, 9]] = torch.tensor([0.3, -0.2, 0.1])
    x = random_input((1, 3, 32, 32), seed=5)
    assert "prune_below" in REGISTRY and "prune_below" not in DEFAULT_PIPELINE
    exact = repfuse.fuse(model, x)
    assert exact.get_submodule("features.5.conv").out_channels == 64

    result = prune_below(model, x, threshold=1e-2)

    fused = result.fused
    assert fused.get_submodule("features.5.conv").out_channels == 61
    assert result.channels_before - result.channels_after == 3
    assert result.macs_after < result.macs_before == graph_cost(
        repfuse.trace(model, x)).macs
    approximate = [r for r in result.passes.rewrites if not r.exact]
    assert len(approximate) == 1 and approximate[0].pass_name == "prune_below"
    assert approximate[0].detail.startswith("APPROXIMATE")
    # the reported error is the error of the pruned model, measured independently here
    with torch.no_grad():
        errors = [rel_err(reference64(model, b), fused.double()(b.double()))
                  for b in (x, random_input(x.shape, seed=1), random_input(x.shape, seed=2))]
    assert result.max_rel_error > F32_RTOL
    assert abs(result.max_rel_error - max(errors)) <= 1e-9
    assert result.to_dict()["approximate"] is True


def test_prune_below_by_filter_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight[[2, 5]] *= 1e-5
    x = random_input((2, 3, 8, 8))

    result = prune_below(model, x, threshold=1e-3, by="norm")

    assert result.fused.get_submodule("0").out_channels == 6
    assert 0 < result.max_rel_error < 1e-3
