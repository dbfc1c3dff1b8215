"""Tests of the structurally reparameterized example models and of ``load_by_structure``.

Every reparameterizable model pairs each conv or linear layer of its deploy form with the train
*unit* at the same path (:mod:`repfuse.models.layers`). Two independent references check that
the deploy forms are right and that the train forms compute what the papers say:

- a hand-written merge, in float64, in this file: fold each BatchNorm into its branch
  (``W' = W * g / sqrt(v + eps)``, ``b' = beta - mu * g / sqrt(v + eps)``), pad each kernel
  centred to the main size, add identity kernels for BatchNorm identities, compose 1x1 -> k x k
  branches, sum (RepVGG, ACNet, MobileOne, DBB);
- probing, for every model: a unit is an affine, shift-equivariant map, so impulses give its
  kernel and a zero input its bias, with no knowledge of its branches. A zero input must give
  the same bias everywhere, borders included (e.g. DBB's BN-and-pad makes it so).

Loaded into the deploy form, either must reproduce the train form to 1e-10 relative (float64).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import random_input, rel_err
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

from repfuse.capture import symbolic_trace
from repfuse.export.deploy import load_by_structure
from repfuse.models import (
    create_model,
    get_spec,
    list_models,
    randomize_bn_stats,
)
from repfuse.models.acnet import ACBlock
from repfuse.models.dbb import BNAndPad, ConcatConv1x1, DiverseBranchBlock
from repfuse.models.layers import ConvBN
from repfuse.models.mobileone import MobileOneConv
from repfuse.models.repvgg import PAPER_GROUPWISE_LAYERS, RepVGGConv

# name -> (input shape, conv layers of the deploy form, linear layers of the deploy form)
EXPECTED = {
    "repvgg_a0": ((1, 3, 224, 224), 1 + 2 + 4 + 14 + 1, 1),
    "repvgg_a1": ((1, 3, 224, 224), 1 + 2 + 4 + 14 + 1, 1),
    "repvgg_b0": ((1, 3, 224, 224), 1 + 4 + 6 + 16 + 1, 1),
    "repvgg_b1g4": ((1, 3, 224, 224), 1 + 4 + 6 + 16 + 1, 1),
    "repvgg_tiny": ((1, 3, 32, 32), 1 + 1 + 2 + 2 + 1, 1),
    # ResNet-18: stem, two convs per block, three projection shortcuts.
    "acnet_resnet18": ((1, 3, 224, 224), 1 + 2 * 8 + 3, 1),
    "acnet_resnet_tiny": ((1, 3, 32, 32), 1 + 2 * 4 + 3, 1),
    "dbb_resnet18": ((1, 3, 224, 224), 1 + 2 * 8 + 3, 1),
    "dbb_resnet_tiny": ((1, 3, 32, 32), 1 + 2 * 4 + 3, 1),
    # MobileOne: stem, a depthwise and a pointwise conv per block.
    "mobileone_s0": ((1, 3, 224, 224), 1 + 2 * (2 + 8 + 10 + 1), 1),
    "mobileone_tiny": ((1, 3, 32, 32), 1 + 2 * (1 + 2 + 2 + 1), 1),
    # RepLKNet: 3 convs per RepLK block (pw1, 31x31, pw2), 2 per ConvFFN.
    "replknet_stage": ((1, 64, 56, 56), 2 * (3 + 2), 0),
    "replknet_tiny": ((1, 16, 32, 32), 3 + 2, 0),
    "unireplknet_block": ((1, 32, 32, 32), 1, 0),
    # RepViT: stem 2, stride-1 block 1 + 2, stride-2 block 2 + 2.
    "repvit_tiny": ((1, 3, 32, 32), 2 + 3 + 3 + 4 + 3, 1),
    # 11 RepConvs and the 1x1 reduce conv.
    "yolo_repconv_neck": ((1, 3, 64, 64), 11 + 1, 0),
}
NAMES = sorted(EXPECTED)
LARGE = {"repvgg_a0", "repvgg_a1", "repvgg_b0", "repvgg_b1g4", "acnet_resnet18"}
LARGE |= {"dbb_resnet18", "mobileone_s0", "replknet_stage"}
FAST = [name for name in NAMES if name not in LARGE]
HAND_MERGED = ["acnet_resnet_tiny", "dbb_resnet_tiny", "mobileone_tiny", "repvgg_tiny"]

# Deploy-form parameter counts with 1000 classes, and the papers' in millions as printed
# (RepVGG: Ding et al. 2021; MobileOne: Vasu et al. 2023).
PARAMETERS = {
    "repvgg_a0": (8_309_384, "8.30"),
    "repvgg_a1": (12_789_864, "12.79"),
    "repvgg_b0": (14_339_048, "14.33"),
    "repvgg_b1g4": (36_125_416, "36.12"),
    "mobileone_s0": (2_078_504, "2.1"),
}


def build_on_meta(name: str, deploy: bool = False) -> nn.Module:
    factory = get_spec(name).factory
    with torch.device("meta"):
        return factory(deploy=True) if deploy else factory()


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


# --- hand-written merge (float64) ------------------------------------------------------------


def batchnorm_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(x) = scale * x + shift`` per channel, in eval mode."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def fold(weight: Tensor, bias: Tensor | None, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """A conv (or linear layer) followed by ``bn`` as one conv."""
    scale, shift = batchnorm_affine(bn)
    weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if bias is not None:
        shift = shift + bias.double() * scale
    return weight, shift


def fold_conv_bn(unit: ConvBN) -> tuple[Tensor, Tensor]:
    return fold(unit.conv.weight, unit.conv.bias, unit.bn)


def pad_kernel(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad a kernel centred to ``size``."""
    pad_h = (size[0] - weight.shape[2]) // 2
    pad_w = (size[1] - weight.shape[3]) // 2
    return F.pad(weight, [pad_w, pad_w, pad_h, pad_h])


def batchnorm_identity(bn: _BatchNorm, groups: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``bn(x)`` as a ``size`` conv with ``groups``: a 1 at the centre of ``W[i, i % (C/g)]``."""
    channels = bn.num_features
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *size, dtype=torch.float64)
    index = torch.arange(channels)
    kernel[index, index % per_group, size[0] // 2, size[1] // 2] = 1.0
    return fold(kernel, None, bn)


def merge_repvgg(unit: RepVGGConv) -> tuple[Tensor, Tensor]:
    weight, bias = fold_conv_bn(unit.dense)
    pointwise_weight, pointwise_bias = fold_conv_bn(unit.pointwise)
    weight = weight + pad_kernel(pointwise_weight, (3, 3))
    bias = bias + pointwise_bias
    if unit.identity is not None:
        identity_weight, identity_bias = batchnorm_identity(
            unit.identity, unit.dense.conv.groups, (3, 3)
        )
        weight, bias = weight + identity_weight, bias + identity_bias
    return weight, bias


def merge_acb(unit: ACBlock) -> tuple[Tensor, Tensor]:
    weight, bias = fold_conv_bn(unit.square)
    size = tuple(weight.shape[2:])
    for branch in (unit.horizontal, unit.vertical):
        branch_weight, branch_bias = fold_conv_bn(branch)
        weight, bias = weight + pad_kernel(branch_weight, size), bias + branch_bias
    return weight, bias


def merge_mobileone(unit: MobileOneConv) -> tuple[Tensor, Tensor]:
    merged = [fold_conv_bn(branch) for branch in unit.branches]
    size = tuple(merged[0][0].shape[2:])
    if unit.scale is not None:
        scale_weight, scale_bias = fold_conv_bn(unit.scale)
        merged.append((pad_kernel(scale_weight, size), scale_bias))
    if unit.skip is not None:
        merged.append(batchnorm_identity(unit.skip, unit.branches[0].conv.groups, size))
    return sum(w for w, _ in merged), sum(b for _, b in merged)


def compose_1x1_then_kxk(
    first: Tensor, first_bias: Tensor, second: Tensor
) -> tuple[Tensor, Tensor]:
    """A 1x1 conv ``(first, first_bias)`` then a bias-free k x k conv ``second`` that sees
    ``first_bias`` where it pads: ``W[o, i] = sum_m second[o, m] * first[m, i]``,
    ``b[o] = sum_{m,u,v} second[o, m, u, v] * first_bias[m]``."""
    weight = torch.einsum("omuv,mi->oiuv", second, first[:, :, 0, 0])
    return weight, torch.einsum("omuv,m->o", second, first_bias)


def merge_dbb(unit: DiverseBranchBlock) -> tuple[Tensor, Tensor]:
    weight, bias = fold_conv_bn(unit.kxk)
    k = weight.shape[2]
    assert unit.kxk.conv.groups == 1, "this reference merges groups=1 blocks only"
    if unit.one_by_one is not None:
        branch_weight, branch_bias = fold_conv_bn(unit.one_by_one)
        weight, bias = weight + pad_kernel(branch_weight, (k, k)), bias + branch_bias

    # (c) 1x1 conv -> BN-and-pad -> AvgPool(k) -> BN; the pool is a depthwise k x k of 1/k^2.
    first, first_bias = fold(unit.avg.conv.weight, None, unit.avg.bn_pad.bn)
    channels = first.shape[0]
    pool = torch.zeros(channels, channels, k, k, dtype=torch.float64)
    pool[torch.arange(channels), torch.arange(channels)] = 1.0 / (k * k)
    branch_weight, branch_bias = compose_1x1_then_kxk(first, first_bias, pool)
    branch_weight, branch_bias = fold(branch_weight, branch_bias, unit.avg.bn)
    weight, bias = weight + branch_weight, bias + branch_bias

    # (d) 1x1 conv (or two, concatenated) -> BN-and-pad -> k x k conv -> BN.
    conv1 = unit.one_by_one_kxk.conv1
    if isinstance(conv1, ConcatConv1x1):
        first_weight = torch.cat([conv1.first.weight, conv1.second.weight])
    else:
        first_weight = conv1.weight
    first, first_bias = fold(first_weight, None, unit.one_by_one_kxk.bn_pad.bn)
    second = unit.one_by_one_kxk.conv2.weight.double()
    branch_weight, branch_bias = compose_1x1_then_kxk(first, first_bias, second)
    branch_weight, branch_bias = fold(branch_weight, branch_bias, unit.one_by_one_kxk.bn)
    return weight + branch_weight, bias + branch_bias


def merge_by_hand(unit: nn.Module, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``unit`` merged by hand (``layer``, its deploy layer, unused)."""
    if isinstance(unit, nn.Linear | nn.Conv2d):
        return unit.weight.double(), unit.bias.double()
    merges = {
        ConvBN: fold_conv_bn,
        RepVGGConv: merge_repvgg,
        ACBlock: merge_acb,
        MobileOneConv: merge_mobileone,
        DiverseBranchBlock: merge_dbb,
    }
    return merges[type(unit)](unit)


# --- probing (float64) -----------------------------------------------------------------------


def probe(unit: nn.Module, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The weight and bias of the map ``unit`` computes, in the shape of ``layer`` (a conv or
    linear layer of the deploy form), measured with impulses in float64.

    For a conv of kernel k, stride s, padding p: the input is ``2k + 2s`` pixels wide; an
    impulse at ``k + a`` in input channel ``j`` of every group (a in [0, s), one probe per
    ``(a, j)`` and axis) reaches output ``y`` through tap ``u = k + a + p - s y``; together the
    probes reach every tap once.
    """
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            inputs = torch.cat([torch.eye(layer.in_features), torch.zeros(1, layer.in_features)])
            outputs = unit(inputs.double())
            return (outputs[:-1] - outputs[-1]).T, outputs[-1]

        assert isinstance(layer, nn.Conv2d) and layer.dilation == (1, 1)
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        per_group = layer.in_channels // layer.groups
        shape = (layer.in_channels, 2 * kh + 2 * sh, 2 * kw + 2 * sw)
        offsets = [(a, b, j) for a in range(sh) for b in range(sw) for j in range(per_group)]
        inputs = torch.zeros(len(offsets) + 1, *shape, dtype=torch.float64)
        for index, (a, b, j) in enumerate(offsets):
            inputs[index, j::per_group, kh + a, kw + b] = 1.0
        outputs = unit(inputs)

    at_zero = outputs[-1]
    bias = at_zero[:, 0, 0]
    # An exact conv with zero padding maps a zero input to its bias everywhere, borders too.
    assert rel_err(bias[:, None, None].expand_as(at_zero), at_zero) <= 1e-12
    responses = outputs[:-1] - at_zero
    weight = torch.zeros(layer.out_channels, per_group, kh, kw, dtype=torch.float64)
    for index, (a, b, j) in enumerate(offsets):
        for u in range(kh):
            if (kh + a + ph - u) % sh:
                continue
            for v in range(kw):
                if (kw + b + pw - v) % sw:
                    continue
                y, x = (kh + a + ph - u) // sh, (kw + b + pw - v) // sw
                weight[:, j, u, v] = responses[index, :, y, x]
    return weight, bias


# --- loading references into deploy forms ----------------------------------------------------


Merge = Callable[[nn.Module, nn.Module], tuple[Tensor, Tensor]]


def deploy_with(
    name: str, train: nn.Module, merge: Merge, seed: int = 1
) -> tuple[nn.Module, set[type]]:
    """A float64 deploy form of ``name`` whose every layer holds ``merge(unit, layer)`` of the
    train unit at its path; also the set of unit types met."""
    deploy = create_model(name, deploy=True, seed=seed).double()
    state = {}
    unit_types = set()
    for path, layer in layers_of(deploy).items():
        unit = train.get_submodule(path)
        unit_types.add(type(unit))
        weight, bias = merge(unit, layer)
        state[f"{path}.weight"], state[f"{path}.bias"] = weight, bias
    deploy.load_state_dict(state, strict=True)
    return deploy, unit_types


# --- registry, shapes and structure ----------------------------------------------------------


def test_every_reparameterized_model_is_registered_with_its_input_shape():
    specs = {spec.name: spec for spec in list_models() if spec.reparameterized}
    assert sorted(specs) == NAMES
    for name, (shape, _, _) in EXPECTED.items():
        assert specs[name].input_shape == shape
        assert specs[name].supports_deploy


@pytest.mark.parametrize("name", NAMES)
def test_deploy_form_has_the_papers_layers_and_no_batchnorm(name):
    _, expected_convs, expected_linears = EXPECTED[name]
    deploy = build_on_meta(name, deploy=True)
    modules = list(deploy.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert len(convs) == expected_convs
    assert sum(isinstance(m, nn.Linear) for m in modules) == expected_linears
    assert not any(isinstance(m, _BatchNorm) for m in modules)
    assert all(conv.bias is not None for conv in convs)
    # Every deploy layer stands for a train unit at the same path.
    train = build_on_meta(name)
    for path in layers_of(deploy):
        train.get_submodule(path)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_deploy_parameter_count_matches_the_paper(name):
    count, paper = PARAMETERS[name]
    deploy = build_on_meta(name, deploy=True)
    assert sum(p.numel() for p in deploy.parameters()) == count
    # Within one unit of the paper's last printed digit (it rounds some and truncates others).
    last_digit = 10.0 ** -len(paper.partition(".")[2])
    assert abs(count / 1e6 - float(paper)) <= last_digit


def test_repvgg_b1g4_groups_the_papers_layers():
    model = build_on_meta("repvgg_b1g4")
    blocks = [
        block
        for stage in (model.stage1, model.stage2, model.stage3, model.stage4)
        for block in stage
    ]
    grouped = {
        index for index, block in enumerate(blocks, start=1) if block.conv.dense.conv.groups == 4
    }
    assert grouped == PAPER_GROUPWISE_LAYERS == set(range(2, 27, 2))
    assert all(block.conv.pointwise.conv.groups == block.conv.dense.conv.groups for block in blocks)


def test_repvgg_tiny_has_a_grouped_stage_with_an_identity_branch():
    stage = build_on_meta("repvgg_tiny").stage2
    assert [block.conv.dense.conv.groups for block in stage] == [4, 4]
    assert stage[0].conv.identity is None and stage[1].conv.identity is not None


@pytest.mark.parametrize("name", ["acnet_resnet_tiny", "dbb_resnet_tiny", "acnet_resnet18"])
def test_acnet_and_dbb_deploy_forms_are_resnet_deploy_forms(name):
    resnet = "resnet_tiny" if name.endswith("tiny") else "resnet18"
    ours = build_on_meta(name, deploy=True).state_dict()
    theirs = build_on_meta(resnet, deploy=True).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["dbb_resnet_tiny", "dbb_resnet18"])
def test_dbb_concatenates_depth_once_per_stage(name):
    model = build_on_meta(name)
    paths = [path for path, m in model.named_modules() if isinstance(m, ConcatConv1x1)]
    expected = [f"layer{i}.0.conv1.one_by_one_kxk.conv1" for i in range(1, 5)]
    assert paths == expected
    assert isinstance(model.conv1, DiverseBranchBlock)
    assert model.conv1.kxk.conv.kernel_size == (7, 7)


# --- running, tracing, determinism -----------------------------------------------------------


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("name", NAMES)
def test_model_traces_with_torch_fx_and_the_trace_computes_the_same(name, deploy):
    model = create_model(name, deploy=deploy)
    traced = symbolic_trace(model)  # torch.fx's symbolic tracing, plus item assignment
    shape = EXPECTED[name][0]
    if name in LARGE and len(shape) == 4 and shape[1] == 3:
        shape = (1, 3, 64, 64)  # a classifier takes any size; keep the large models quick
    example = random_input(shape)
    output = run(model, example)
    assert torch.isfinite(output).all()
    assert torch.equal(run(traced, example), output)


@pytest.mark.parametrize("name", FAST)
def test_create_model_is_deterministic_per_seed(name):
    first = create_model(name, seed=3).state_dict()
    again = create_model(name, seed=3).state_dict()
    other = create_model(name, seed=4).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


# --- the deploy forms compute the train forms ------------------------------------------------


@pytest.mark.parametrize("name", HAND_MERGED)
def test_hand_merged_train_form_loaded_into_deploy_form_matches_in_float64(name):
    train = create_model(name, seed=11).double()
    deploy, unit_types = deploy_with(name, train, merge_by_hand)
    assert unit_types - {ConvBN, nn.Linear}, "no reparameterized unit was merged"
    example = random_input((2, *EXPECTED[name][0][1:]), seed=2, dtype=torch.float64)
    assert rel_err(run(train, example), run(deploy, example)) <= 1e-10


@pytest.mark.parametrize("name", FAST)
def test_probed_train_form_loaded_into_deploy_form_matches_in_float64(name):
    train = create_model(name, seed=12).double()
    deploy, _ = deploy_with(name, train, probe)
    example = random_input((2, *EXPECTED[name][0][1:]), seed=3, dtype=torch.float64)
    assert rel_err(run(train, example), run(deploy, example)) <= 1e-10


def test_probing_agrees_with_the_hand_merge_on_a_strided_dbb():
    unit = DiverseBranchBlock(6, 10, 3, stride=2, concat_1x1=True)
    randomize_bn_stats(unit, seed=4)
    unit = unit.double().eval()
    layer = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    probed_weight, probed_bias = probe(unit, layer)
    weight, bias = merge_dbb(unit)
    assert rel_err(weight, probed_weight) <= 1e-12
    assert rel_err(bias, probed_bias) <= 1e-12


# --- DBB's BN-and-pad layer ------------------------------------------------------------------


def bn_and_pad(channels: int, pad: int) -> BNAndPad:
    layer = BNAndPad(channels, pad)
    randomize_bn_stats(layer, seed=5)
    return layer.double().eval()


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_bn_and_pad_is_batchnorm_of_the_zero_padded_input(pad):
    layer = bn_and_pad(6, pad)
    x = random_input((2, 6, 5, 7), dtype=torch.float64)
    expected = layer.bn(F.pad(x, [pad] * 4))
    actual = run(layer, x)
    assert actual.shape == (2, 6, 5 + 2 * pad, 7 + 2 * pad)
    assert rel_err(expected, actual) <= 1e-15


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 1), (7, 2)])
def test_conv1x1_bn_and_pad_then_unpadded_conv_is_conv1x1_bn_on_a_zero_padded_input(kernel, stride):
    pad = kernel // 2
    conv1x1 = nn.Conv2d(4, 6, 1, bias=False).double()
    layer = bn_and_pad(6, pad)
    conv_kxk = nn.Conv2d(6, 5, kernel, stride, padding=0).double()
    x = random_input((2, 4, 9, 8), dtype=torch.float64)

    actual = run(lambda t: conv_kxk(layer(conv1x1(t))), x)
    expected = run(lambda t: conv_kxk(layer.bn(conv1x1(F.pad(t, [pad] * 4)))), x)
    assert rel_err(expected, actual) <= 1e-12
    # Padding the BatchNorm's output with zeros instead is a different map.
    zero_padded = run(
        lambda t: F.conv2d(layer.bn(conv1x1(t)), conv_kxk.weight, conv_kxk.bias, stride, pad), x
    )
    assert zero_padded.shape == actual.shape
    assert rel_err(expected, zero_padded) > 1e-3


def test_bn_and_pad_traces_to_pad_and_four_slice_assignments():
    traced = symbolic_trace(bn_and_pad(6, 2))  # `output[:, :, 0:p, :] = v`, as DBB writes it
    functions = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert functions.count(F.pad) == 1
    assert functions.count(operator.setitem) == 4
    x = random_input((1, 6, 4, 4), dtype=torch.float64)
    assert torch.equal(run(traced, x), run(bn_and_pad(6, 2), x))


# --- load_by_structure -----------------------------------------------------------------------


def renamed(model: nn.Module) -> GraphModule:
    """``model`` traced, with every conv and linear layer moved to ``fused_layer_<i>``, the way
    a fusion may leave a graph."""
    graph_module = torch.fx.symbolic_trace(model.eval())
    nodes = [
        node
        for node in graph_module.graph.nodes
        if node.op == "call_module"
        and isinstance(graph_module.get_submodule(node.target), nn.Conv2d | nn.Linear)
    ]
    for index, node in enumerate(nodes):
        layer = graph_module.get_submodule(node.target)
        graph_module.add_submodule(f"fused_layer_{index}", layer)
        node.target = f"fused_layer_{index}"
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


@pytest.fixture(scope="module")
def repvgg_tiny_fused() -> tuple[nn.Module, GraphModule]:
    """repvgg_tiny in train form (float64) and its hand-merged deploy form as a renamed
    GraphModule."""
    train = create_model("repvgg_tiny", seed=21).double()
    deploy, _ = deploy_with("repvgg_tiny", train, merge_by_hand)
    return train, renamed(deploy)


def test_load_by_structure_pairs_layers_by_execution_order(repvgg_tiny_fused):
    train, fused = repvgg_tiny_fused
    fused_paths = set(layers_of(fused))
    target = create_model("repvgg_tiny", deploy=True, seed=9).double()
    assert not fused_paths & set(layers_of(target))
    example = random_input((1, 3, 32, 32), dtype=torch.float64)

    assert load_by_structure(target, fused, example) is target
    assert not target.training
    batch = random_input((2, 3, 32, 32), seed=6, dtype=torch.float64)
    assert rel_err(run(train, batch), run(target, batch)) <= 1e-10


def test_load_by_structure_casts_to_the_deploy_dtype(repvgg_tiny_fused):
    train, fused = repvgg_tiny_fused
    target = create_model("repvgg_tiny", deploy=True, seed=9)
    load_by_structure(target, fused, random_input((1, 3, 32, 32)))
    assert target.fc.weight.dtype == torch.float32
    batch = random_input((2, 3, 32, 32), seed=6)
    assert rel_err(run(train, batch.double()), run(target, batch)) <= 1e-5


def test_load_by_structure_reads_a_plain_module_too():
    source = create_model("acnet_resnet_tiny", deploy=True, seed=1)
    target = create_model("acnet_resnet_tiny", deploy=True, seed=2)
    load_by_structure(target, source, random_input((1, 3, 32, 32)))
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )


def test_load_by_structure_rejects_another_layer_count(repvgg_tiny_fused):
    _, fused = repvgg_tiny_fused
    target = create_model("acnet_resnet_tiny", deploy=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="runs 13 conv/linear layers .* runs 8"):
        load_by_structure(target, fused, random_input((1, 3, 32, 32), dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def two_convs(second: nn.Conv2d, middle: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), middle or nn.ReLU(), second).eval()


def test_load_by_structure_names_the_first_mismatched_pair():
    deploy = two_convs(nn.Conv2d(8, 4, 3, padding=1))
    fused = renamed(two_convs(nn.Conv2d(8, 4, 1)))
    before = deploy[0].weight.clone()
    pattern = (
        r"layer 1 in execution order differs: deploy '2' Conv2d\(weight \(4, 8, 3, 3\).*"
        r"but fused 'fused_layer_1' Conv2d\(weight \(4, 8, 1, 1\)"
    )
    with pytest.raises(ValueError, match=pattern):
        load_by_structure(deploy, fused, random_input((1, 3, 8, 8)))
    assert torch.equal(deploy[0].weight, before)


def test_load_by_structure_compares_conv_hyperparameters():
    deploy = two_convs(nn.Conv2d(8, 4, 3, padding=1))
    fused = two_convs(nn.Conv2d(8, 4, 3, padding=1, stride=2))
    with pytest.raises(ValueError, match=r"layer 1 .*stride \(1, 1\).*stride \(2, 2\)"):
        load_by_structure(deploy, fused, random_input((1, 3, 8, 8)))


def test_load_by_structure_compares_output_shapes_on_the_example():
    deploy = two_convs(nn.Conv2d(8, 4, 1), middle=nn.MaxPool2d(2))
    fused = two_convs(nn.Conv2d(8, 4, 1), middle=nn.Identity())
    with pytest.raises(
        ValueError, match=r"layer 1 .* outputs shape \(1, 4, 4, 4\).* \(1, 4, 8, 8\)"
    ):
        load_by_structure(deploy, fused, random_input((1, 3, 8, 8)))


def test_load_by_structure_treats_a_missing_bias_as_zero():
    deploy = two_convs(nn.Conv2d(8, 4, 1, bias=False))
    fused = two_convs(nn.Conv2d(8, 4, 1))
    example = random_input((1, 3, 8, 8))
    with pytest.raises(ValueError, match="deploy '2' has no bias but fused '2' has a nonzero one"):
        load_by_structure(deploy, fused, example)
    with torch.no_grad():
        fused[2].bias.zero_()
    load_by_structure(deploy, fused, example)
    assert torch.equal(deploy[2].weight, fused[2].weight)

    with_bias = two_convs(nn.Conv2d(8, 4, 1))
    load_by_structure(with_bias, two_convs(nn.Conv2d(8, 4, 1, bias=False)), example)
    assert not with_bias[2].bias.any()


def test_load_by_structure_copies_other_tensors_only_by_name():
    deploy = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4, init=0.1))
    same_name = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4, init=0.3))
    other_name = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.PReLU(4, init=0.5))
    example = random_input((1, 3, 4, 4))
    load_by_structure(deploy, other_name, example)
    assert torch.equal(deploy[1].weight, torch.full((4,), 0.1))
    load_by_structure(deploy, same_name, example)
    assert torch.equal(deploy[1].weight, torch.full((4,), 0.3))
