"""Tests of the reference models of issue 4: GoogLeNet, Inception v3 and the conv -> avg-pool VGG
(Deep Rebirth's streamline and branch merging), and the attention and dynamic nets.

Every model is fused with the default pipeline, with random BatchNorm statistics, and checked
against the *unfused* model run in float64 (``conftest.reference64``): 1e-10 relative for a
float64 fusion, 1e-5 for a float32 one. The fused graph must hold no BatchNorm, and its dynamic
parts (sigmoid and softmax gates, attention products, grid sampling, the per-sample dynamic
conv) must be there as often as in the traced model and as the architecture says.

The models themselves are checked against independent references: parameter counts published
by torchvision, ``F.scaled_dot_product_attention``, per-sample convs, the non-local block's
formula, and the deploy forms against the train forms.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import fuse_checked, random_input, reference64, rel_err
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.export.deploy import load_by_structure
from repfuse.models import create_model, get_spec, load_fused_state_dict
from repfuse.models.attention import (
    DynamicConv2d,
    NonLocalBlock,
    SelfAttention,
    SpatialTransformer,
)
from repfuse.models.googlenet import googlenet_tiny
from repfuse.models.pooled import vgg_avgpool_tiny

# Model -> ops that no exact rewrite may remove, with their count in the architecture.
DYNAMIC_OPS: dict[str, dict[str, int]] = {
    # One SE gate per block, three blocks.
    "se_resnet_tiny": {"Sigmoid": 3, "mul": 3},
    # Per block a channel gate (mean, amax of the map) and a spatial gate (amax, mean over C).
    "cbam_resnet_tiny": {"sigmoid": 6, "mul": 6, "amax": 6, "mean": 6},
    # One selective kernel unit per block: stacked branches weighted by a softmax.
    "sknet_tiny": {"softmax": 3, "stack": 3, "mul": 3},
    "nonlocal_resnet_tiny": {"softmax": 1, "matmul": 2},
    # Two max pools down, two bilinear upsamplings up, the sigmoid mask times the trunk.
    "residual_attention_tiny": {"MaxPool2d": 2, "Upsample": 2, "Sigmoid": 1, "mul": 1},
    "stn_tiny": {"affine_grid": 1, "grid_sample": 1},
    # Two dynamic convs: softmax over kernels, kernel and bias aggregation, per-sample conv.
    "dynamic_conv_tiny": {"softmax": 2, "matmul": 4, "conv2d": 2},
    # Two blocks: q k^T and attention v per block; five LayerNorms (two per block, one final).
    "vit_convstem_tiny": {"softmax": 2, "matmul": 4, "LayerNorm": 5, "GELU": 2},
    "resnet_tiny_droppath": {},
    # 4 max pools in the trunk, one in each of the nine Inception modules' pool branch.
    "googlenet_tiny": {"MaxPool2d": 13},
    # 2 in the stem, one in the B and one in the D module.
    "inception_v3_tiny": {"MaxPool2d": 4},
    "vgg_avgpool_tiny": {},
}
FUSED_MODELS = sorted(DYNAMIC_OPS)

DYNAMIC_CONV_BN = (
    "a BatchNorm after a dynamic convolution (weights aggregated per sample, conv2d over the "
    "batch) is not folded: repfuse folds only into a conv whose weight is a parameter"
)

# torchvision's parameter counts without the auxiliary classifiers, 1000 classes:
# googlenet(aux_logits=False), and inception_v3's 27,161,264 minus its InceptionAux(768, 1000):
# 128*768 + 2*128 + 768*128*25 + 2*768 + 768*1000 + 1000 = 3,326,696.
TORCHVISION_PARAMETERS = {"googlenet": 6_624_904, "inception_v3": 23_834_568}
FULL_SIZE = ["googlenet", "inception_v3", "vgg_avgpool"]
# Full-size models whose one forward at their input size takes well under 2 s (about 0.1 s on
# an idle two-core CPU, ~1.7 s of CPU time with the first-call setup); Inception v3 at 299x299
# takes over 2 s of CPU time, so only its parameters are counted.
FORWARD_FULL_SIZE = ["googlenet", "vgg_avgpool"]
DEPLOY_TINY = ["googlenet_tiny", "inception_v3_tiny", "vgg_avgpool_tiny"]
BATCHNORM_FOLD = ["remove_noops", "fold_batchnorm"]


def example(name: str, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    """A batch of two inputs of the model's size (two, so per-sample paths are exercised)."""
    return random_input((2, *get_spec(name).input_shape[1:]), seed=seed, dtype=dtype)


def build_on_meta(name: str, **kwargs: bool) -> nn.Module:
    with torch.device("meta"):
        return get_spec(name).factory(**kwargs)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: nn.Module, *inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return model(*inputs)


def op_counts(gm: GraphModule) -> Counter:
    """How often each op runs: module class names, function and method names."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[type(gm.get_submodule(node.target)).__name__] += 1
        elif node.op in ("call_function", "call_method"):
            counts[getattr(node.target, "__name__", str(node.target))] += 1
    return counts


def batchnorms(gm: GraphModule) -> list[str]:
    """BatchNorm modules and calls left in ``gm``."""
    modules = [path for path, m in gm.named_modules() if isinstance(m, _BatchNorm)]
    calls = [
        node.name
        for node in gm.graph.nodes
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)
    ]
    return modules + calls


def conv_and_linear_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` call, from the shapes seen
    by forward hooks (independent of repfuse's cost model)."""
    total = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * kernel
        else:
            total += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        run(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


@functools.cache
def fused_float64(name: str) -> tuple[GraphModule, GraphModule]:
    """The traced (unfused) and the fused float64 graph of ``name`` on :func:`example`; shared
    by the tests below, which only read them."""
    model = create_model(name).double()
    x = example(name)
    return repfuse.trace(model, x), repfuse.fuse(model, x)


# --- fusion: equivalence, no BatchNorm, dynamic parts intact ---------------------------------


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_fused_float64_model_matches_the_unfused_model_to_1e_10(name):
    _, fused = fused_float64(name)
    x = example(name)
    assert rel_err(reference64(create_model(name), x), run(fused, x)) <= 1e-10
    assert repfuse.history(fused).counts()["fold_batchnorm"] > 0


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_fused_float32_model_matches_the_unfused_float64_model_to_1e_5(name):
    gm, _ = fuse_checked(create_model(name), example(name), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in gm.parameters())


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=DYNAMIC_CONV_BN))
        if name == "dynamic_conv_tiny"
        else name
        for name in FUSED_MODELS
    ],
)
def test_fused_graph_has_no_batchnorm(name):
    traced, fused = fused_float64(name)
    assert batchnorms(traced), "the model has no BatchNorm to fold"
    assert batchnorms(fused) == []


def test_dynamic_conv_net_folds_every_batchnorm_but_those_after_dynamic_convs():
    traced, fused = fused_float64("dynamic_conv_tiny")
    assert batchnorms(traced) == ["stem.conv.bn", "layers.0.bn", "layers.1.bn"]
    assert set(batchnorms(fused)) <= {"layers.0.bn", "layers.1.bn"}  # see DYNAMIC_CONV_BN


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_dynamic_parts_are_left_intact(name):
    traced, fused = fused_float64(name)
    before, after = op_counts(traced), op_counts(fused)
    for op, count in DYNAMIC_OPS[name].items():
        assert (op, before[op]) == (op, count), "the architecture is not as documented"
        assert (op, after[op]) == (op, count), "fusion removed or duplicated a dynamic op"


def test_drop_path_disappears_in_eval_capture():
    traced, _ = fused_float64("resnet_tiny_droppath")
    assert not any(type(m).__name__ == "DropPath" for m in traced.modules())


# --- deploy forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOY_TINY)
def test_batchnorm_folded_weights_load_into_the_deploy_form(name):
    model = create_model(name, seed=3).double()
    x = example(name, seed=4)
    fused = repfuse.fuse(model, x, passes=BATCHNORM_FOLD)
    deploy = load_fused_state_dict(create_model(name, deploy=True).double(), fused.state_dict())
    assert not any(isinstance(m, _BatchNorm) for m in deploy.modules())
    assert rel_err(reference64(model, x), run(deploy, x)) <= 1e-10

    deploy32 = load_fused_state_dict(create_model(name, deploy=True), fused.state_dict())
    assert rel_err(reference64(model, x), run(deploy32, x.float())) <= 1e-5


@pytest.mark.parametrize("name", FULL_SIZE + DEPLOY_TINY)
def test_deploy_form_has_a_bias_per_folded_batchnorm(name):
    train, deploy = build_on_meta(name), build_on_meta(name, deploy=True)
    channels = sum(m.num_features for m in train.modules() if isinstance(m, _BatchNorm))
    # Each BatchNorm's weight and bias (2 per channel) become one conv bias per channel.
    assert parameter_count(deploy) == parameter_count(train) - channels
    assert all(conv.bias is not None for conv in deploy.modules() if isinstance(conv, nn.Conv2d))


def test_vgg_avgpool_stages_fuse_into_strided_4x4_convs_with_fewer_macs():
    model = create_model("vgg_avgpool_tiny", seed=5).double()
    x = example("vgg_avgpool_tiny", seed=6)
    fused = repfuse.fuse(model, x)
    counts = op_counts(fused)
    assert counts["AvgPool2d"] == counts["avg_pool2d"] == 0
    assert counts["AdaptiveAvgPool2d"] == 1  # the global pool of the head stays a pool
    kernels = sorted(
        (m.kernel_size, m.stride, m.padding) for m in fused.modules() if isinstance(m, nn.Conv2d)
    )
    assert kernels == [((3, 3), (1, 1), (1, 1))] * 3 + [((4, 4), (2, 2), (1, 1))] * 3
    assert conv_and_linear_macs(fused, x) < conv_and_linear_macs(model, x)

    streamlined = vgg_avgpool_tiny(deploy=True, streamlined=True).double().eval()
    assert not any(isinstance(m, nn.AvgPool2d) for m in streamlined.modules())
    load_by_structure(streamlined, fused, x)
    assert rel_err(reference64(model, x), run(streamlined, x)) <= 1e-10


def test_streamlined_form_is_a_deploy_form():
    with pytest.raises(ValueError, match="streamlined=True describes a deploy form"):
        vgg_avgpool_tiny(streamlined=True)


# --- architecture: parameter counts, paths, the merge candidates -----------------------------


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETERS))
def test_parameter_count_matches_torchvision_without_aux_heads(name):
    assert parameter_count(build_on_meta(name)) == TORCHVISION_PARAMETERS[name]


def test_vgg_avgpool_has_vgg11_bn_convs_and_batchnorms_and_a_512_to_1000_head():
    vgg11 = build_on_meta("vgg11_bn")
    conv_biases = sum(m.bias.numel() for m in vgg11.features.modules() if isinstance(m, nn.Conv2d))
    expected = parameter_count(vgg11.features) - conv_biases + 512 * 1000 + 1000
    assert parameter_count(build_on_meta("vgg_avgpool")) == expected == 9_736_232


def test_state_dict_keys_and_shapes_follow_torchvision():
    googlenet = build_on_meta("googlenet").state_dict()
    # torchvision builds the "5x5" branch with a 3x3 kernel (pytorch/vision#906).
    assert googlenet["inception5b.branch3.1.conv.weight"].shape == (128, 48, 3, 3)
    assert googlenet["inception4e.branch4.1.bn.running_var"].shape == (128,)
    assert googlenet["fc.weight"].shape == (1000, 1024)
    inception = build_on_meta("inception_v3").state_dict()
    assert inception["Mixed_6e.branch7x7_2.conv.weight"].shape == (192, 192, 1, 7)
    assert inception["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert inception["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert inception["fc.weight"].shape == (1000, 2048)
    assert not any("Aux" in key for key in inception)


def readers(gm: GraphModule, targets: list[str]) -> set:
    """The input nodes of the ``call_module`` nodes of ``targets`` (each must be called)."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    return {nodes[target].args[0] for target in targets}


def test_googlenet_three_1x1_convs_and_the_pool_read_each_inception_input():
    gm = torch.fx.symbolic_trace(build_on_meta("googlenet"))
    modules = [name for name in dict(gm.named_children()) if name.startswith("inception")]
    assert len(modules) == 9
    for name in modules:
        one_by_one = [f"{name}.branch1.conv", f"{name}.branch2.0.conv", f"{name}.branch3.0.conv"]
        assert all(gm.get_submodule(t).kernel_size == (1, 1) for t in one_by_one)
        assert len(readers(gm, [*one_by_one, f"{name}.branch4.0"])) == 1


def test_inception_v3_factorized_pairs_and_1x1_convs_read_one_tensor():
    gm = torch.fx.symbolic_trace(build_on_meta("inception_v3"))
    for name in ("Mixed_7b", "Mixed_7c"):
        for pair_name in ("branch3x3_2", "branch3x3dbl_3"):
            pair = [f"{name}.{pair_name}{side}.conv" for side in "ab"]
            assert [gm.get_submodule(t).kernel_size for t in pair] == [(1, 3), (3, 1)]
            assert len(readers(gm, pair)) == 1
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        one_by_one = ["branch1x1.conv", "branch5x5_1.conv", "branch3x3dbl_1.conv", "avgpool"]
        assert len(readers(gm, [f"{name}.{branch}" for branch in one_by_one])) == 1


def test_self_attention_q_k_v_projections_read_one_tensor():
    gm = torch.fx.symbolic_trace(build_on_meta("vit_convstem_tiny"))
    for block in ("blocks.0", "blocks.1"):
        projections = [f"{block}.attn.{p}" for p in "qkv"]
        (source,) = readers(gm, projections)
        assert source.target == f"{block}.norm1"


def test_transform_input_rescales_each_channel_and_still_fuses_exactly():
    plain = create_model("googlenet_tiny", seed=7).double()
    transforming = googlenet_tiny(transform_input=True).double().eval()
    transforming.load_state_dict(plain.state_dict())
    x = example("googlenet_tiny", seed=8)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]
    expected = run(plain, x * std / 0.5 + (mean - 0.5) / 0.5)
    assert rel_err(expected, run(transforming, x)) <= 1e-12
    assert rel_err(expected, run(repfuse.fuse(transforming, x), x)) <= 1e-10


@pytest.mark.parametrize("name", FORWARD_FULL_SIZE)
def test_full_size_model_runs_at_its_input_size(name):
    shape = get_spec(name).input_shape
    output = run(create_model(name), random_input(shape))
    assert output.shape == (1, 1000)
    assert torch.isfinite(output).all()
    assert output.abs().max() < 1e4


# --- the dynamic layers against independent references ---------------------------------------


def test_dynamic_conv_is_a_per_sample_conv_with_the_attention_weighted_kernel():
    layer = DynamicConv2d(6, 8, 3, stride=2, padding=1, groups=2, num_kernels=3).double().eval()
    x = random_input((3, 6, 9, 7), dtype=torch.float64)
    attention = torch.softmax(run(layer.attention, x), dim=1)
    expected = torch.cat([
        F.conv2d(
            x[n : n + 1],
            torch.einsum("k,koihw->oihw", attention[n], layer.weight),
            attention[n] @ layer.bias,
            stride=2,
            padding=1,
            groups=2,
        )
        for n in range(3)
    ])
    assert rel_err(expected, run(layer, x)) <= 1e-12
    # Samples get different kernels: the aggregate depends on the input.
    assert not torch.allclose(attention[0], attention[1])


def test_dynamic_conv_traces_once_for_every_batch_size():
    layer = DynamicConv2d(4, 6, 3, padding=1).double().eval()
    traced = torch.fx.symbolic_trace(layer)
    for batch in (1, 3):
        x = random_input((batch, 4, 5, 5), seed=batch, dtype=torch.float64)
        assert torch.equal(run(traced, x), run(layer, x))


def test_non_local_block_is_the_embedded_gaussian_formula():
    block = NonLocalBlock(6, inner=4).double().eval()
    x = random_input((2, 6, 3, 5), dtype=torch.float64)
    theta, phi, g = (run(conv, x).flatten(2) for conv in (block.theta, block.phi, block.g))
    affinity = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi), dim=-1)
    y = torch.einsum("nij,ncj->nci", affinity, g).reshape(2, 4, 3, 5)
    assert rel_err(x + run(block.out, y), run(block, x)) <= 1e-12


def test_self_attention_matches_scaled_dot_product_attention():
    attention = SelfAttention(12, num_heads=3).double().eval()
    x = random_input((2, 5, 12), dtype=torch.float64)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(2, 5, 3, 4).transpose(1, 2)

    q, k, v = (heads(run(p, x)) for p in (attention.q, attention.k, attention.v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 12)
    assert rel_err(run(attention.proj, out), run(attention, x)) <= 1e-12


def test_spatial_transformer_with_the_identity_transform_returns_its_input():
    transformer = SpatialTransformer(3).double().eval()
    with torch.no_grad():
        transformer.regressor[2].weight.zero_()
    x = random_input((2, 3, 8, 6), dtype=torch.float64)
    assert rel_err(x, run(transformer, x)) <= 1e-12
    # With its own weights the warp depends on the input.
    transformer = SpatialTransformer(3).double().eval()
    assert rel_err(x, run(transformer, x)) > 1e-3
