"""``fold_constants``: pure ops on parameters/buffers/constants evaluated once into a buffer.

Positive cases: a weight-standardized kernel and DBB's BN-and-pad value become buffers (and so
expose a constant conv weight / pad value to the other passes); the numbers match the unfused
model in float64. Negative cases: ops that draw random numbers, mutate, or read an input stay,
and the graph is unchanged where nothing is foldable.
"""

from __future__ import annotations

import operator
from operator import setitem

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from conftest import (
    DTYPES,
    F64_RTOL,
    calls_to,
    check_unchanged,
    fuse_checked,
    modules_of,
    random_input,
    reference64,
    rel_err,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import randomize_bn_stats
from repfuse.passes import fold_batchnorm, fold_constants, run_pipeline

# fx cannot record `y[index] = v` on a Proxy; a wrapped global `setitem` records it as an
# operator.setitem call_function node (whose generated code is the slice assignment).
torch.fx.wrap("setitem")

F64 = torch.float64


def get_attrs(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]


def non_placeholder_ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")]


class StandardizedConv(nn.Module):
    """Weight standardization (Qiao et al. 2019): ``w / ‖w‖`` per output channel, then BN."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        centred = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = centred / centred.norm(p=2, dim=(1, 2, 3), keepdim=True)
        return self.bn(F.conv2d(x, w, None, 1, 1))


@DTYPES
def test_weight_standardization_folds_to_a_buffer(dtype: torch.dtype) -> None:
    model = randomize_bn_stats(StandardizedConv(), seed=2).eval()
    gm, result = fuse_checked(model, random_input((2, 4, 7, 8)), fold_constants, dtype)

    # mean, sub, norm, truediv: each evaluated once (the last one replaces the whole chain).
    assert result.counts() == {"fold_constants": 4}
    assert non_placeholder_ops(gm) == [str(F.conv2d), "bn"]
    (constant,) = get_attrs(gm)
    value = getattr(gm, constant)
    assert value.dtype == dtype
    w64 = model.weight.detach().double()
    w64 = w64 - w64.mean(dim=(1, 2, 3), keepdim=True)
    expected = w64 / w64.norm(p=2, dim=(1, 2, 3), keepdim=True)
    assert rel_err(expected, value) <= (F64_RTOL if dtype == F64 else 1e-6)


@DTYPES
def test_standardized_weight_then_batch_norm_folds_into_one_conv(dtype) -> None:
    model = randomize_bn_stats(StandardizedConv(), seed=3).eval()

    def constants_then_batchnorm(gm):
        fold_constants(gm)
        return fold_batchnorm(gm)

    gm, result = fuse_checked(model, random_input((2, 4, 7, 8)), constants_then_batchnorm,
                              dtype)

    assert result.counts() == {"fold_batchnorm": 1}
    assert modules_of(gm, _BatchNorm) == [] and calls_to(gm, F.conv2d) == 0
    assert len(modules_of(gm, nn.Conv2d)) == 1
    assert get_attrs(gm) == []


@DTYPES
def test_pipeline_folds_standardized_weight_and_norm(dtype: torch.dtype) -> None:
    model = randomize_bn_stats(StandardizedConv(), seed=4).eval()
    gm, result = fuse_checked(model, random_input((2, 4, 6, 6)), run_pipeline, dtype)

    counts = {k: v for k, v in result.counts().items() if v}
    assert counts == {"fold_constants": 4, "fold_batchnorm": 1}
    assert len(modules_of(gm, nn.Conv2d)) == 1 and modules_of(gm, _BatchNorm) == []
    assert len(non_placeholder_ops(gm)) == 1


def test_provenance_of_a_folded_weight_names_the_original_parameter() -> None:
    model = randomize_bn_stats(StandardizedConv(), seed=4).eval().double()
    gm = repfuse.trace(model, random_input((2, 4, 6, 6), dtype=F64))

    result = run_pipeline(gm)

    fold = next(r for r in result.rewrites if r.pass_name == "fold_batchnorm")
    assert set(fold.module_paths) == {"weight", "bn"}


class BNAndPadValue(nn.Module):
    """BN → ``F.pad`` → border strips overwritten with ``β − μ·γ/√(σ² + ε)`` (DBB)."""

    def __init__(self, channels: int = 5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.pad(self.bn(x), [1, 1, 1, 1])
        bn = self.bn
        v = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        v = v.view(1, -1, 1, 1)
        every = slice(None)
        setitem(y, (every, every, slice(0, 1), every), v)
        setitem(y, (every, every, slice(-1, None), every), v)
        setitem(y, (every, every, every, slice(0, 1)), v)
        setitem(y, (every, every, every, slice(-1, None)), v)
        return y


def test_bn_and_pad_value_folds_to_one_buffer() -> None:
    model = randomize_bn_stats(BNAndPadValue(), seed=5).eval().double()
    gm, result = fuse_checked(model, random_input((2, 5, 6, 7), dtype=F64), fold_constants, F64)

    assert result.counts()["fold_constants"] >= 4  # add, sqrt, mul, div, sub, view
    assert calls_to(gm, torch.sqrt, "view") == 0
    assert non_placeholder_ops(gm) == ["bn", str(F.pad)] + [str(setitem)] * 4
    (constant,) = get_attrs(gm)
    # The value the BN gives a zero input, by F.batch_norm in float64.
    bn = model.bn
    expected = F.batch_norm(torch.zeros(1, 5, 1, 1, dtype=F64), bn.running_mean,
                            bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert rel_err(expected, getattr(gm, constant)) <= F64_RTOL


# --- not folded -----------------------------------------------------------------------------

class RandomNoise(nn.Module):
    """A conv whose weight gets fresh noise on every call."""

    def __init__(self, noise) -> None:
        super().__init__()
        self.noise = noise
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.p = nn.Parameter(torch.full((4, 4, 3, 3), 0.5))

    def forward(self, x):
        return F.conv2d(x, self.w + self.noise(self), padding=1)


NOISE = {
    "rand_like": pytest.param(lambda m: torch.rand_like(m.w)),
    "randn_like": pytest.param(lambda m: torch.randn_like(m.w)),
    "bernoulli": pytest.param(lambda m: torch.bernoulli(m.p)),
    "dropout": pytest.param(lambda m: F.dropout(m.p, 0.5, True)),
}


@pytest.mark.parametrize("noise", list(NOISE.values()), ids=list(NOISE))
def test_random_op_on_constants_is_not_folded(noise) -> None:
    model = RandomNoise(noise).double().eval()
    x = random_input((2, 4, 6, 6), dtype=F64)
    gm = repfuse.trace(model, x)

    fold_constants(gm)

    # Still random: with one seed the fused model draws what the original draws.
    with torch.no_grad():
        torch.manual_seed(11)
        expected = model(x)
        torch.manual_seed(11)
        actual = gm(x)
        torch.manual_seed(12)
        other = gm(x)
    assert rel_err(expected, actual) <= F64_RTOL
    assert rel_err(expected, other) > 1e-3


class CloneThenInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w.clone().add_(1.0), padding=1)


def test_value_mutated_in_place_is_not_frozen() -> None:
    model = CloneThenInPlace().double()
    x = random_input((2, 4, 6, 6), dtype=F64)
    expected = reference64(model, x)
    gm = repfuse.trace(model, x)

    fold_constants(gm)

    with torch.no_grad():
        for _ in range(3):
            assert rel_err(expected, gm(x)) <= F64_RTOL


class OpsOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(x) * self.scale + x.mean(dim=1, keepdim=True)


def test_ops_reading_an_input_are_not_folded() -> None:
    result, _ = check_unchanged(OpsOnInput(), (2, 4, 5, 5), fold_constants)
    assert result.declined == []


class MixedConstantAndInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(1, 4, 1, 1) * 0.3)

    def forward(self, x):
        return x * self.log_scale.exp()


def test_only_the_constant_part_of_an_expression_folds() -> None:
    model = MixedConstantAndInput().double()
    x = random_input((2, 4, 5, 5), dtype=F64)
    gm, result = fuse_checked(model, x, fold_constants, F64)

    assert result.counts() == {"fold_constants": 1}
    assert calls_to(gm, operator.mul) == 1 and calls_to(gm, "exp") == 0
