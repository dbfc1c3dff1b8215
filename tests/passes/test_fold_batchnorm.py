"""``fold_batchnorm``: eval batch norm folded into the neighbouring conv/linear layer.

Positive cases check the graph (one rewrite, no batch norm left, one layer of the original
kind at the original path) and the numbers (float64 fold to 1e-10 and float32 fold to 1e-5,
both against the unfused model in float64). Negative cases check, for each decline reason,
that the reason is given and that the graph is left exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    F64_RTOL,
    TOLERANCE,
    calls_to,
    check_unchanged,
    fuse_checked,
    modules_of,
    random_input,
    reference64,
    rel_err,
    signature,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import randomize_bn_stats
from repfuse.passes import fold_batchnorm

aten = torch.ops.aten
BATCH_NORM_CALLS = (F.batch_norm, aten.batch_norm.default)
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class LayerThenNorm(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x):
        return self.bn(self.layer(x))


class NormThenLayer(nn.Module):
    """``layer(bn(x))``, optionally after a ReLU so that no conv produces the norm's input."""

    def __init__(self, bn: nn.Module, layer: nn.Module, relu: bool = False) -> None:
        super().__init__()
        self.bn = bn
        self.layer = layer
        self.relu = relu

    def forward(self, x):
        if self.relu:
            x = torch.relu(x)
        return self.layer(self.bn(x))


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    return randomize_bn_stats(model, seed).eval()


# (id, layer factory, norm factory, input shape)
LAYER_THEN_NORM = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: nn.BatchNorm1d(6), (2, 4, 12)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: nn.BatchNorm2d(6),
     (2, 4, 9, 9)),
    ("conv2d_no_bias_groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
     lambda: nn.BatchNorm2d(6), (2, 4, 7, 7)),
    ("conv2d_depthwise_dilated", lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4),
     lambda: nn.BatchNorm2d(8), (2, 4, 7, 7)),
    ("conv3d", lambda: nn.Conv3d(3, 5, 3, padding=1), lambda: nn.BatchNorm3d(5),
     (2, 3, 4, 5, 6)),
    *[
        (f"conv_transpose{dims}d_groups{groups}",
         lambda dims=dims, groups=groups: {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                                           3: nn.ConvTranspose3d}[dims](
             4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups),
         lambda dims=dims: {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](6),
         (2, 4, *[5, 4, 3][:dims]))
        for dims in (1, 2, 3) for groups in (1, 2)
    ],
    ("linear", lambda: nn.Linear(5, 7), lambda: nn.BatchNorm1d(7), (4, 5)),
    ("linear_no_bias", lambda: nn.Linear(5, 7, bias=False), lambda: nn.BatchNorm1d(7), (4, 5)),
]

# (id, norm factory, layer factory, input shape, relu before the norm)
NORM_THEN_LAYER = [
    ("batchnorm1d_linear", lambda: nn.BatchNorm1d(5), lambda: nn.Linear(5, 7), (4, 5), False),
    ("relu_batchnorm2d_conv1x1", lambda: nn.BatchNorm2d(4), lambda: nn.Conv2d(4, 6, 1),
     (2, 4, 7, 7), True),
    ("relu_batchnorm2d_conv3x3_unpadded_strided_grouped", lambda: nn.BatchNorm2d(4),
     lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (2, 4, 9, 9), True),
    ("relu_batchnorm2d_conv3x3_reflect_padded", lambda: nn.BatchNorm2d(4),
     lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 7), True),
    ("batchnorm1d_conv1d", lambda: nn.BatchNorm1d(4), lambda: nn.Conv1d(4, 6, 3),
     (2, 4, 10), False),
]


def assert_single_fold(gm, result, layer_type: type) -> None:
    """One rewrite, no batch norm anywhere, one layer of ``layer_type`` kept at ``layer``."""
    assert result.counts() == {"fold_batchnorm": 1}
    rewrite = result.rewrites[0]
    assert set(rewrite.module_paths) == {"layer", "bn"}
    assert set(rewrite.replaced) == {"layer", "bn"}
    assert rewrite.module == "layer" and rewrite.exact
    assert result.declined == []

    assert modules_of(gm, _BatchNorm) == []
    assert calls_to(gm, *BATCH_NORM_CALLS) == 0
    assert modules_of(gm, *LAYER_TYPES) == ["layer"]
    assert type(gm.get_submodule("layer")) is layer_type
    # The fused layer keeps the train-form layer's path; nothing of the norm is left.
    assert set(gm.state_dict()) == {"layer.weight", "layer.bias"}


@DTYPES
@pytest.mark.parametrize(("make_layer", "make_norm", "shape"),
                         [case[1:] for case in LAYER_THEN_NORM],
                         ids=[case[0] for case in LAYER_THEN_NORM])
def test_folds_into_preceding_layer(make_layer, make_norm, shape, dtype) -> None:
    model = randomized(LayerThenNorm(make_layer(), make_norm()))
    gm, result = fuse_checked(model, random_input(shape), fold_batchnorm, dtype)
    assert_single_fold(gm, result, type(model.layer))


@DTYPES
@pytest.mark.parametrize(("make_norm", "make_layer", "shape", "relu"),
                         [case[1:] for case in NORM_THEN_LAYER],
                         ids=[case[0] for case in NORM_THEN_LAYER])
def test_folds_into_following_layer(make_norm, make_layer, shape, relu: bool, dtype) -> None:
    model = randomized(NormThenLayer(make_norm(), make_layer(), relu=relu))
    gm, result = fuse_checked(model, random_input(shape), fold_batchnorm, dtype)
    assert_single_fold(gm, result, type(model.layer))
    assert calls_to(gm, torch.relu) == int(relu)


class FunctionalConvNorm(nn.Module):
    """``F.batch_norm(F.conv2d(x, self.weight), ...)`` with the statistics as buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.3)
        self.register_buffer("mean", torch.randn(6) * 0.5)
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.conv2d(x, self.weight)
        return F.batch_norm(y, self.mean, self.var, self.w, self.b, False, 0.1, 1e-5)


@DTYPES
def test_folds_functional_conv_and_batch_norm(dtype: torch.dtype) -> None:
    model = FunctionalConvNorm().eval()
    gm, result = fuse_checked(model, random_input((2, 4, 8, 8)), fold_batchnorm, dtype)

    assert result.counts() == {"fold_batchnorm": 1}
    assert set(result.rewrites[0].module_paths) == {"weight", "mean", "var", "w", "b"}
    assert calls_to(gm, F.batch_norm, F.conv2d) == 0
    assert len(modules_of(gm, nn.Conv2d)) == 1
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    fused_path = result.rewrites[0].module
    assert set(gm.state_dict()) == {f"{fused_path}.weight", f"{fused_path}.bias"}


class ConvNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.conv(x))


@DTYPES
def test_folds_torch_export_program(dtype: torch.dtype) -> None:
    model = randomized(ConvNorm())
    x = random_input((2, 3, 8, 8))
    expected = reference64(model, x)
    exported = torch.export.export(copy.deepcopy(model).to(dtype), (x.to(dtype),)).module()
    assert calls_to(exported, aten.batch_norm.default) == 1

    gm = repfuse.trace(exported, x.to(dtype))
    result = fold_batchnorm(gm)

    assert result.counts() == {"fold_batchnorm": 1}
    assert set(result.rewrites[0].module_paths) == {"conv", "bn"}
    assert calls_to(gm, aten.batch_norm.default, aten.conv2d.default) == 0
    assert len(modules_of(gm, nn.Conv2d)) == 1
    for name in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert name not in gm.state_dict()
    # The fused conv takes the place of the exported container that held the conv's weights.
    assert isinstance(gm.get_submodule("conv"), nn.Conv2d)
    assert sorted(gm.state_dict()) == ["conv.bias", "conv.weight"]
    with torch.no_grad():
        actual = gm(x.to(dtype))
    assert actual.dtype == dtype
    assert rel_err(expected, actual) <= TOLERANCE[dtype]


def test_folded_export_program_keeps_no_batch_norm_tensors() -> None:
    model = randomized(ConvNorm())
    x = random_input((2, 3, 8, 8))
    gm = repfuse.trace(torch.export.export(model, (x,)).module(), x)

    fold_batchnorm(gm)

    assert [k for k in gm.state_dict() if k.startswith("bn.")] == []


# --- declines: one per reason, graph unchanged ----------------------------------------------

class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class OutputReused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class NonLinearBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class LinearOnSequence(nn.Module):
    """BatchNorm1d on (N, L, C) normalizes axis L, but the linear layer works on axis C."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


# (id, model factory, input shape, key phrase of the reason)
DECLINES = [
    ("conv_called_twice", CalledTwice, (2, 4, 6, 6), "called at 2 sites"),
    ("conv_output_reused", OutputReused, (2, 4, 6, 6), "also used elsewhere"),
    ("relu_between_and_no_layer_after", NonLinearBetween, (2, 4, 6, 6),
     "'relu' (relu) is not a conv/linear layer"),
    ("zero_padded_conv_after", lambda: NormThenLayer(
        nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), relu=True), (2, 4, 6, 6),
     "pads with zeros"),
    ("tied_weight", TiedWeights, (2, 4, 6, 6), "tied to another module"),
    ("conv_transpose_after", lambda: NormThenLayer(
        nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3), relu=True), (2, 4, 6, 6),
     "transposed conv"),
    ("no_running_statistics", lambda: LayerThenNorm(
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (2, 4, 6, 6),
     "no running statistics"),
    ("linear_on_other_axis", LinearOnSequence, (2, 3, 6), "normalizes axis 1"),
]


@pytest.mark.parametrize(("make_model", "shape", "phrase"), [c[1:] for c in DECLINES],
                         ids=[c[0] for c in DECLINES])
def test_declines_and_leaves_graph_unchanged(make_model, shape, phrase: str) -> None:
    result, _ = check_unchanged(randomized(make_model()), shape, fold_batchnorm)
    assert [d.node for d in result.declined] == ["bn"]
    assert phrase in result.declined[0].reason


def test_declines_batch_norm_in_training_mode() -> None:
    model = randomized(ConvNorm()).double()
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    gm.get_submodule("bn").train()
    before = signature(gm)

    result = fold_batchnorm(gm)

    assert result.rewrites == []
    assert signature(gm) == before
    assert [d.node for d in result.declined] == ["bn"]
    assert "training mode" in result.declined[0].reason
    # Still the batch-statistics computation of the original in training mode.
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        assert rel_err(reference(x), gm(x)) <= F64_RTOL


def test_declines_functional_batch_norm_with_training_true() -> None:
    class TrainingNorm(FunctionalConvNorm):
        def forward(self, x):
            y = F.conv2d(x, self.weight)
            return F.batch_norm(y, self.mean, self.var, self.w, self.b, True, 0.0, 1e-5)

    gm = repfuse.trace(TrainingNorm(), random_input((2, 4, 6, 6)))
    before = signature(gm)

    result = fold_batchnorm(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert "training mode" in result.declined[0].reason


# --- soundness: the user's model, dtype and device ------------------------------------------

def test_fuse_does_not_touch_the_users_model() -> None:
    model = randomized(ConvNorm()).train()
    model.conv.eval()  # a mixed state, which must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}

    fused = repfuse.fuse(model, random_input((2, 3, 6, 6)))

    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.weight is not fused.conv.weight
    assert modules_of(fused, _BatchNorm) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_fuse_keeps_dtype_and_device(dtype: torch.dtype) -> None:
    model = randomized(ConvNorm())
    x = random_input((2, 3, 6, 6))
    expected = reference64(model, x)

    fused = repfuse.fuse(model.to(dtype), x.to(dtype))

    assert modules_of(fused, _BatchNorm) == []
    for tensor in fused.state_dict().values():
        assert tensor.dtype == dtype and tensor.device.type == "cpu"
    with torch.no_grad():
        actual = fused(x.to(dtype))
    assert actual.dtype == dtype
    # bfloat16 keeps 8 bits of mantissa: compare at its precision.
    assert rel_err(expected, actual) <= (F64_RTOL if dtype == torch.float64 else 2e-2)
