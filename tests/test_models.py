"""Tests of the example models: registry, determinism, BatchNorm statistics, deploy forms.

The deploy forms are checked against an independent reference: each BatchNorm is folded into the
conv or linear layer before it *by hand, in this file*, in float64,

    W' = W * g / sqrt(v + eps)        b' = beta - mu * g / sqrt(v + eps) + b * g / sqrt(v + eps)

and the deploy form loaded with those weights must reproduce the train form to 1e-10 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repfuse.capture import symbolic_trace
from repfuse.models import (
    create_model,
    get_spec,
    list_models,
    load_fused_state_dict,
    randomize_bn_stats,
    register_model,
    registry,
)
from repfuse.models.resnet import DropPath

# Too large to run in tests; they are built on the meta device and their parameters counted.
LARGE_MODELS = {"resnet50", "vgg11_bn", "googlenet", "inception_v3", "vgg_avgpool"}
FAST_MODELS = [spec.name for spec in list_models() if spec.name not in LARGE_MODELS]
# Models whose deploy form is the train form without BN (reparameterized ones merge branches
# too: tests/test_reparam_models.py covers those).
DEPLOY_MODELS = [
    spec.name for spec in list_models() if spec.supports_deploy and not spec.reparameterized
]
FAST_DEPLOY_MODELS = [name for name in DEPLOY_MODELS if name not in LARGE_MODELS]

# torchvision's parameter counts for the same architectures with 1000 classes.
TORCHVISION_PARAMETER_COUNTS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vgg11_bn": 132_868_840,
}


def random_input(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """An N(0, 1) input from a local generator, leaving the global RNG alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


def build_on_meta(name: str, deploy: bool = False) -> nn.Module:
    """The model's structure without allocating or initializing its parameters."""
    factory = get_spec(name).factory
    with torch.device("meta"):
        return factory(deploy=True) if deploy else factory()


def batchnorm_after_layer(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer_path, batchnorm_path)`` for each BatchNorm and the conv or linear layer
    registered just before it, which in these models is the layer whose output it normalizes."""
    pairs = []
    previous_layer = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            previous_layer = (path, module)
        elif isinstance(module, _BatchNorm):
            assert previous_layer is not None, f"BatchNorm {path!r} has no layer before it"
            layer_path, layer = previous_layer
            out_features = (
                layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            )
            assert out_features == module.num_features, f"{layer_path!r} does not feed {path!r}"
            pairs.append((layer_path, path))
            previous_layer = None
    return pairs


def module_path(key: str) -> str:
    return key.rpartition(".")[0]


def fold_batchnorms_by_hand(model: nn.Module) -> dict[str, Tensor]:
    """The train form's state dict with every BatchNorm folded into its layer, in float64."""
    state = {key: value.to(torch.float64) for key, value in model.state_dict().items()}
    modules = dict(model.named_modules())
    pairs = batchnorm_after_layer(model)
    batchnorm_paths = {bn_path for _, bn_path in pairs}
    fused = {key: value for key, value in state.items() if module_path(key) not in batchnorm_paths}
    for layer_path, bn_path in pairs:
        eps = modules[bn_path].eps
        scale = state[f"{bn_path}.weight"] / torch.sqrt(state[f"{bn_path}.running_var"] + eps)
        weight = state[f"{layer_path}.weight"]
        bias = state.get(f"{layer_path}.bias", torch.zeros_like(scale))
        broadcast_shape = (-1,) + (1,) * (weight.dim() - 1)
        fused[f"{layer_path}.weight"] = weight * scale.reshape(broadcast_shape)
        fused[f"{layer_path}.bias"] = (
            state[f"{bn_path}.bias"] - state[f"{bn_path}.running_mean"] * scale + bias * scale
        )
    return fused


# --- registry --------------------------------------------------------------------------------


def test_list_models_is_sorted_and_holds_the_example_models():
    names = [spec.name for spec in list_models()]
    assert names == sorted(names)
    expected = {"resnet18", "resnet50", "resnet_tiny", "resnet_tiny_droppath", "vgg11_bn"}
    assert expected | {"vgg_tiny"} <= set(names)


def test_get_spec_of_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="resnet18.*vgg_tiny"):
        get_spec("resnet19")


def test_register_model_rejects_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18", input_shape=(1,), description="duplicate")(nn.Identity)


def test_create_model_without_deploy_form_refuses_deploy(monkeypatch):
    spec = registry.ModelSpec("no_deploy", nn.Identity, (1, 4), "test only", False)
    monkeypatch.setitem(registry._REGISTRY, "no_deploy", spec)
    assert isinstance(create_model("no_deploy"), nn.Identity)
    with pytest.raises(ValueError, match="no hand-written deploy form"):
        create_model("no_deploy", deploy=True)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_model_runs_on_its_default_input(name):
    spec = get_spec(name)
    model = create_model(name)
    assert not model.training
    with torch.no_grad():
        output = model(random_input(spec.input_shape))
    assert output.shape[0] == spec.input_shape[0]
    assert torch.isfinite(output).all()


# BranchyNet's early exit is a Python branch on values: tests/test_partial_trace.py covers it.
@pytest.mark.parametrize("name", [n for n in FAST_MODELS if n != "branchynet_tiny"])
def test_model_traces_with_torch_fx_in_eval(name):
    model = create_model(name)
    traced = symbolic_trace(model)  # torch.fx's symbolic tracing, plus item assignment
    example = random_input(get_spec(name).input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(example), model(example), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETER_COUNTS))
def test_parameter_count_matches_torchvision(name):
    model = build_on_meta(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETER_COUNTS[name]


def test_resnet50_outputs_stay_numerically_sane_with_random_batchnorm_stats():
    model = create_model("resnet50")
    with torch.no_grad():
        output = model(random_input((1, 3, 224, 224)))
    assert torch.isfinite(output).all()
    assert output.abs().max() < 1e4


# --- determinism and BatchNorm statistics ----------------------------------------------------


@pytest.mark.parametrize("name", ["resnet_tiny", "vgg_tiny"])
def test_create_model_is_deterministic_per_seed(name):
    first = create_model(name, seed=3).state_dict()
    again = create_model(name, seed=3).state_dict()
    other = create_model(name, seed=4).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_create_model_leaves_the_global_rng_untouched():
    before = torch.get_rng_state()
    create_model("resnet_tiny", seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_randomize_bn_stats_moves_statistics_away_from_identity():
    model = create_model("vgg_tiny", randomize_bn=False).double()
    batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(batchnorms) == 5  # four BatchNorm2d and the BatchNorm1d of the head
    assert all(torch.equal(bn.running_var, torch.ones_like(bn.running_var)) for bn in batchnorms)

    before = torch.get_rng_state()
    assert randomize_bn_stats(model, seed=1) is model
    assert torch.equal(torch.get_rng_state(), before)

    for bn in batchnorms:
        assert bn.running_mean.dtype == torch.float64
        assert bn.running_mean.abs().min() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert ((bn.running_var >= 0.5) & (bn.running_var <= 1.5)).all()
        assert ((bn.weight >= 0.5) & (bn.weight <= 1.5)).all()
        assert bn.bias.abs().min() > 0


def test_randomize_bn_stats_is_deterministic_per_seed():
    first = randomize_bn_stats(create_model("resnet_tiny", randomize_bn=False), seed=5)
    again = randomize_bn_stats(create_model("resnet_tiny", randomize_bn=False), seed=5)
    assert torch.equal(first.bn1.running_mean, again.bn1.running_mean)
    assert torch.equal(first.layer4[0].bn2.running_var, again.layer4[0].bn2.running_var)


# --- deploy forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOY_MODELS)
def test_deploy_form_keys_are_train_keys_without_batchnorm_plus_layer_biases(name):
    train = build_on_meta(name)
    pairs = batchnorm_after_layer(train)
    batchnorm_paths = {bn_path for _, bn_path in pairs}
    expected = {key for key in train.state_dict() if module_path(key) not in batchnorm_paths}
    expected |= {f"{layer_path}.bias" for layer_path, _ in pairs}
    assert set(build_on_meta(name, deploy=True).state_dict()) == expected


@pytest.mark.parametrize("name", FAST_DEPLOY_MODELS)
def test_hand_folded_train_form_matches_deploy_form_in_float64(name):
    train = create_model(name, seed=11).double()
    deploy = load_fused_state_dict(
        create_model(name, deploy=True).double(), fold_batchnorms_by_hand(train)
    )
    example = random_input(get_spec(name).input_shape, seed=2, dtype=torch.float64)
    with torch.no_grad():
        reference = train(example)
        candidate = deploy(example)
    relative_error = (candidate - reference).abs().max() / reference.abs().max()
    assert relative_error <= 1e-10


def test_load_fused_state_dict_names_missing_and_unexpected_keys():
    train_state = create_model("resnet_tiny").state_dict()
    deploy = create_model("resnet_tiny", deploy=True)
    with pytest.raises(ValueError, match=r"missing keys \['conv1.bias'.*unexpected keys \['bn1"):
        load_fused_state_dict(deploy, train_state)


def test_load_fused_state_dict_rejects_wrong_shapes():
    deploy = create_model("resnet_tiny", deploy=True)
    state = dict(deploy.state_dict())
    state["fc.bias"] = torch.zeros(11)
    with pytest.raises(ValueError, match="fc.bias"):
        load_fused_state_dict(deploy, state)


# --- drop path -------------------------------------------------------------------------------


def test_drop_path_is_identity_in_eval():
    with_drop_path = create_model("resnet_tiny_droppath", seed=5)
    without = create_model("resnet_tiny", seed=5)
    example = random_input((2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(with_drop_path(example), without(example))


def test_drop_path_is_random_in_train_mode():
    model = create_model("resnet_tiny_droppath").train()
    example = random_input((16, 3, 32, 32))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        first = model(example)
        second = model(example)
    # BatchNorm uses the same batch statistics in both passes: only the dropped paths differ.
    assert not torch.equal(first, second)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    drop_path = DropPath(0.5).train()
    ones = torch.ones(4000, 3, 2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        output = drop_path(ones)
    per_sample = output.flatten(1)
    assert ((per_sample == 0) | (per_sample == 2)).all()
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(output.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path.eval()(ones), ones)
    assert torch.equal(DropPath(0.0).train()(ones), ones)


def test_drop_path_rejects_probability_one():
    with pytest.raises(ValueError, match="drop-path probability"):
        DropPath(1.0)
