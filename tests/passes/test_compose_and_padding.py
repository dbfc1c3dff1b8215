"""``compose_linear`` and ``merge_padding``: sequential linear ops become one conv.

- ``compose_linear``: conv → conv, conv → avg-pool and avg-pool → conv with nothing between
  become one conv when exact (the second does not pad, or the first is a bias-free 1x1) and
  when the MACs do not rise (unless ``allow_costlier``).
- ``merge_padding``: a symmetric zero ``F.pad``/``nn.ZeroPad*d`` before a zero-padded conv
  becomes conv padding; a 1x1 conv whose output is padded with its own bias (DBB's BN-and-pad)
  becomes that conv with padding.

Positive cases check the rewrite counts, the ops left and the numbers against the unfused model
in float64 (1e-10 for a float64 fold, 1e-5 for a float32 one); negative cases check the reason
and that the graph is unchanged.
"""

from __future__ import annotations

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
    signature,
)
from torch import nn

import repfuse
from repfuse.cost import graph_cost
from repfuse.models import randomize_bn_stats
from repfuse.passes import (
    ComposeLinear,
    PassResult,
    compose_linear,
    merge_padding,
    run_passes,
    run_pipeline,
)

# fx cannot record `y[index] = v` on a Proxy; a wrapped global `setitem` records it as an
# operator.setitem call_function node (whose generated code is the slice assignment).
torch.fx.wrap("setitem")

F64 = torch.float64
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def only_reason(result: PassResult) -> str:
    assert len(result.declined) == 1, result.declined
    return result.declined[0].reason


# --- compose_linear -------------------------------------------------------------------------

class ConvPool(nn.Module):
    """conv3x3 p1 → AvgPool2d(2, 2): Deep Rebirth's streamline merge, a 4x4/s2/p1 conv."""

    def __init__(self, in_ch: int = 4, out_ch: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(x))


@DTYPES
def test_conv_then_avgpool_becomes_one_strided_conv_with_fewer_macs(dtype) -> None:
    model = ConvPool()
    x = random_input((2, 4, 10, 12))
    macs_before = graph_cost(repfuse.trace(model.to(dtype), x.to(dtype))).macs

    gm, result = fuse_checked(model, x, compose_linear, dtype)

    assert result.counts() == {"compose_linear": 1} and result.declined == []
    assert modules_of(gm, *POOLS) == [] and modules_of(gm, nn.Conv2d) == ["conv"]
    conv = gm.get_submodule("conv")
    assert conv.kernel_size == (4, 4) and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert graph_cost(gm).macs < macs_before


class PointwiseThenConv(nn.Module):
    def __init__(self, bias: bool, padding: int = 0) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(4, 4, 1, bias=bias)
        self.conv = nn.Conv2d(4, 6, 3, padding=padding)

    def forward(self, x):
        return self.conv(self.reduce(x))


@DTYPES
@pytest.mark.parametrize(("bias", "padding"), [(True, 0), (False, 1)],
                         ids=["biased_1x1-unpadded_3x3", "bias_free_1x1-padded_3x3"])
def test_pointwise_then_conv_is_composed(bias: bool, padding: int, dtype) -> None:
    gm, result = fuse_checked(PointwiseThenConv(bias, padding), random_input((2, 4, 8, 9)),
                              compose_linear, dtype)

    assert result.counts() == {"compose_linear": 1}
    assert len(modules_of(gm, nn.Conv2d)) == 1
    conv = gm.get_submodule(modules_of(gm, nn.Conv2d)[0])
    assert conv.kernel_size == (3, 3) and conv.padding == (padding, padding)
    assert set(result.rewrites[0].module_paths) == {"reduce", "conv"}


@DTYPES
def test_strided_conv_then_unpadded_strided_conv_is_composed(dtype) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Conv2d(4, 4, 1, stride=2))
    gm, result = fuse_checked(model, random_input((2, 4, 13, 12)), compose_linear, dtype)

    assert result.counts() == {"compose_linear": 1}
    conv = gm.get_submodule(modules_of(gm, nn.Conv2d)[0])
    assert conv.stride == (4, 4) and conv.kernel_size == (3, 3)


def test_padded_conv_after_conv_is_declined() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    result, _ = check_unchanged(model, (2, 4, 7, 7), compose_linear)
    assert "no padding" in only_reason(result)


def test_biased_1x1_before_padded_conv_is_declined() -> None:
    result, _ = check_unchanged(PointwiseThenConv(bias=True, padding=1), (2, 4, 7, 7),
                             compose_linear)
    assert "bias" in only_reason(result)


class FirstOutputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 4, 3)
        self.second = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.first(x)
        return self.second(y), y


def test_conv_whose_output_is_used_elsewhere_is_declined() -> None:
    model = FirstOutputUsedTwice().double()
    x = random_input((2, 4, 7, 7), dtype=F64)
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = compose_linear(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert "used elsewhere" in only_reason(result)
    with torch.no_grad():
        for expected, actual in zip(reference64(model, x), gm(x), strict=True):
            assert rel_err(expected, actual) <= F64_RTOL


class Bottleneck(nn.Module):
    """8 → 2 channels by a 3x3, back to 8 by another 3x3: one 5x5 8→8 conv costs more."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(8, 2, 3, padding=1)
        self.expand = nn.Conv2d(2, 8, 3)

    def forward(self, x):
        return self.expand(self.squeeze(x))


def test_composition_raising_macs_is_declined() -> None:
    result, _ = check_unchanged(Bottleneck(), (2, 8, 9, 9), compose_linear)
    assert "raise MACs" in only_reason(result)


@DTYPES
def test_composition_raising_macs_runs_when_allowed(dtype: torch.dtype) -> None:
    model = Bottleneck()
    x = random_input((2, 8, 9, 9))
    macs_before = graph_cost(repfuse.trace(model.to(dtype), x.to(dtype))).macs

    def costlier(gm):
        return run_passes(gm, [ComposeLinear(allow_costlier=True)])

    gm, result = fuse_checked(model, x, costlier, dtype)

    assert result.counts() == {"compose_linear": 1}
    conv = gm.get_submodule(modules_of(gm, nn.Conv2d)[0])
    assert conv.kernel_size == (5, 5) and conv.padding == (1, 1)
    assert graph_cost(gm).macs > macs_before


@DTYPES
def test_avgpool_then_conv_composes_when_allowed(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(4, 6, 3))
    x = random_input((2, 4, 12, 10))

    declined, _ = check_unchanged(model, (2, 4, 12, 10), compose_linear)
    assert "raise MACs" in only_reason(declined)

    gm, result = fuse_checked(
        model, x, lambda gm: run_passes(gm, [ComposeLinear(allow_costlier=True)]), dtype)
    assert result.counts() == {"compose_linear": 1}
    assert modules_of(gm, *POOLS) == []
    conv = gm.get_submodule(modules_of(gm, nn.Conv2d)[0])
    assert conv.kernel_size == (6, 6) and conv.stride == (2, 2)


def test_avgpool_then_padded_conv_is_declined_even_when_costlier_is_allowed() -> None:
    """The conv pads the pool's output with zeros; a fused conv would average real pixels."""
    model = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(4, 6, 3, padding=1))
    result, _ = check_unchanged(model, (2, 4, 12, 10),
                             lambda gm: run_passes(gm, [ComposeLinear(allow_costlier=True)]))
    assert "exact only when the second has no padding" in only_reason(result)


@pytest.mark.parametrize(("pool", "reason"), [
    pytest.param(nn.AvgPool2d(3, 1, 1, count_include_pad=False), "count_include_pad=False",
                 id="count_include_pad_false"),
    pytest.param(nn.AvgPool2d(2, 2, ceil_mode=True), "ceil_mode", id="ceil_mode"),
    pytest.param(nn.AvgPool2d(2, 2, divisor_override=3), "overrides the divisor",
                 id="divisor_override"),
])
def test_avgpool_that_is_not_a_conv_is_declined_with_its_reason(pool: nn.Module,
                                                                 reason: str) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), pool)
    result, _ = check_unchanged(model, (2, 4, 9, 9), compose_linear)
    assert "the pool is not a convolution" in only_reason(result)
    assert reason in only_reason(result)


def test_padded_avgpool_after_conv_is_declined() -> None:
    """The pool pads the conv's output with zeros (counted): a fused conv would not."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(3, 2, 1))
    result, _ = check_unchanged(model, (2, 4, 9, 9), compose_linear)
    assert "exact only when the second has no padding" in only_reason(result)


# --- merge_padding --------------------------------------------------------------------------

class PadThenConv(nn.Module):
    def __init__(self, pad, dims: int = 2, conv_padding: int = 0, value: float = 0.0,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        self.pad = pad
        self.value = value
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = cls(4, 6, 3, padding=conv_padding, padding_mode=padding_mode)

    def forward(self, x):
        if isinstance(self.pad, nn.Module):
            return self.conv(self.pad(x))
        if self.value:
            return self.conv(F.pad(x, self.pad, value=self.value))
        return self.conv(F.pad(x, self.pad))


@DTYPES
@pytest.mark.parametrize(("make_model", "shape", "padding"), [
    pytest.param(lambda: PadThenConv([1, 1, 1, 1]), (2, 4, 7, 8), (1, 1), id="F.pad"),
    pytest.param(lambda: PadThenConv(nn.ZeroPad2d(1)), (2, 4, 7, 8), (1, 1), id="ZeroPad2d"),
    pytest.param(lambda: PadThenConv([2, 2, 1, 1], conv_padding=1), (2, 4, 7, 8), (2, 3),
                 id="F.pad_onto_padded_conv"),
    pytest.param(lambda: PadThenConv([2, 2], dims=1), (2, 4, 9), (2,), id="F.pad_1d"),
    pytest.param(lambda: PadThenConv(nn.ZeroPad3d(1), dims=3), (2, 4, 4, 5, 3), (1, 1, 1),
                 id="ZeroPad3d"),
])
def test_zero_pad_becomes_conv_padding(make_model, shape, padding, dtype) -> None:
    gm, result = fuse_checked(make_model(), random_input(shape), merge_padding, dtype)

    assert result.counts() == {"merge_padding": 1}
    assert calls_to(gm, F.pad) == 0
    assert modules_of(gm, nn.ZeroPad2d, nn.ZeroPad3d) == []
    assert modules_of(gm, nn.Conv1d, nn.Conv2d, nn.Conv3d) == ["conv"]
    assert tuple(gm.get_submodule("conv").padding) == padding


@pytest.mark.parametrize("model", [
    pytest.param(PadThenConv([1, 0, 1, 0]), id="asymmetric"),
    pytest.param(PadThenConv([1, 1, 1, 1], value=1.0), id="value_1"),
    pytest.param(PadThenConv(nn.ReflectionPad2d(1)), id="reflection"),
])
def test_pad_that_is_not_zero_conv_padding_stays(model: nn.Module) -> None:
    result, _ = check_unchanged(model, (2, 4, 7, 8), merge_padding)
    assert result.declined == []


def test_zero_pad_before_reflect_padded_conv_is_declined() -> None:
    model = PadThenConv([1, 1, 1, 1], conv_padding=1, padding_mode="reflect")
    result, _ = check_unchanged(model, (2, 4, 7, 8), merge_padding)
    assert "does not pad with zeros" in only_reason(result)


class PadWithValue(nn.Module):
    """conv1x1 → ``F.pad`` 1 → each border strip overwritten with ``fill`` → conv3x3 p0.

    ``fill`` is a buffer (DBB's BN-and-pad value once constants are folded), or computed from
    the 1x1's bias inside the forward when ``computed``.
    """

    def __init__(self, fill_offset: float | None = 0.0, computed: bool = False) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(4, 4, 1)
        self.conv = nn.Conv2d(4, 6, 3)
        self.computed = computed
        if fill_offset is not None:
            value = self.reduce.bias.detach().clone() + fill_offset
            self.register_buffer("fill", value.reshape(1, -1, 1, 1))

    def forward(self, x):
        y = F.pad(self.reduce(x), [1, 1, 1, 1])
        v = self.reduce.bias.view(1, -1, 1, 1) if self.computed else self.fill
        every = slice(None)
        setitem(y, (every, every, slice(0, 1), every), v)
        setitem(y, (every, every, slice(-1, None), every), v)
        setitem(y, (every, every, every, slice(0, 1)), v)
        setitem(y, (every, every, every, slice(-1, None)), v)
        return self.conv(y)


@DTYPES
def test_pad_with_the_bias_of_a_1x1_conv_becomes_its_padding(dtype) -> None:
    gm, result = fuse_checked(PadWithValue(), random_input((2, 4, 7, 6)), merge_padding, dtype)

    assert result.counts() == {"merge_padding": 1}
    assert calls_to(gm, F.pad, setitem) == 0
    assert sorted(modules_of(gm, nn.Conv2d)) == ["conv", "reduce"]
    assert gm.get_submodule("reduce").padding == (1, 1)


@DTYPES
def test_pad_with_bias_then_conv_fuses_to_one_conv(dtype) -> None:
    gm, result = fuse_checked(PadWithValue(), random_input((2, 4, 7, 6)), run_pipeline, dtype)

    assert {k: v for k, v in result.counts().items() if v} == {
        "merge_padding": 1, "compose_linear": 1}
    assert len(modules_of(gm, nn.Conv2d)) == 1
    assert calls_to(gm, F.pad, setitem) == 0


def test_pad_with_a_value_other_than_the_bias_is_declined() -> None:
    result, _ = check_unchanged(PadWithValue(fill_offset=0.5), (2, 4, 7, 6), merge_padding)
    assert "differ" in only_reason(result)


def test_pad_with_a_computed_bias_value_fuses_in_one_pipeline_run() -> None:
    model = PadWithValue(fill_offset=None, computed=True).double()
    gm, result = fuse_checked(model, random_input((2, 4, 7, 6)), run_pipeline, F64)

    assert calls_to(gm, F.pad, setitem) == 0
    assert len(modules_of(gm, nn.Conv2d)) == 1


# --- streamline merging into average pools ------------------------------------------------------

class PadThenPool(nn.Module):
    def __init__(self, pad: list[int], pool: nn.Module) -> None:
        super().__init__()
        self.pad, self.pool = pad, pool

    def forward(self, x):
        return self.pool(F.pad(x, self.pad))


@DTYPES
def test_zero_pad_becomes_the_padding_of_a_counting_avgpool(dtype) -> None:
    model = PadThenPool([1, 1, 1, 1], nn.AvgPool2d(3, 2))
    gm, result = fuse_checked(model, random_input((2, 3, 9, 8)), merge_padding, dtype)
    assert result.counts() == {"merge_padding": 1}
    assert calls_to(gm, F.pad) == 0
    (path,) = modules_of(gm, *POOLS)
    assert gm.get_submodule(path).padding == (1, 1)


@pytest.mark.parametrize(("model", "reason"), [
    pytest.param(PadThenPool([1, 1, 1, 1], nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
                 "count_include_pad=False", id="pool-does-not-count-padding"),
    pytest.param(PadThenPool([1, 1, 1, 1], nn.AvgPool2d(3, 1, 0, count_include_pad=False)),
                 "the zeros of the pad are counted", id="unpadded-pool-not-counting"),
    pytest.param(PadThenPool([2, 2, 2, 2], nn.AvgPool2d(3, 1)), "more than half its kernel",
                 id="padding-over-half-kernel"),
    pytest.param(PadThenPool([1, 1, 1, 1], nn.AvgPool2d(2, 2, ceil_mode=True)), "ceil_mode",
                 id="ceil-mode"),
])
def test_zero_pad_before_a_pool_that_cannot_take_it_is_declined(model, reason) -> None:
    result, _ = check_unchanged(model, (2, 3, 8, 8), merge_padding)
    assert reason in only_reason(result)


class ConvBNPoolStage(nn.Module):
    """A VGG-style stage end: conv3x3 → BN → AvgPool2d(2, 2) with nothing non-linear between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(2, 2)
        randomize_bn_stats(self, seed=2)

    def forward(self, x):
        return torch.relu(self.pool(self.bn(self.conv(x))))


@DTYPES
def test_conv_bn_avgpool_stage_becomes_one_strided_conv_in_the_pipeline(dtype) -> None:
    model = ConvBNPoolStage()
    x = random_input((2, 4, 12, 10))
    macs_before = graph_cost(repfuse.trace(model.to(dtype), x.to(dtype))).macs
    gm, result = fuse_checked(model, x, run_pipeline, dtype)
    assert result.counts()["fold_batchnorm"] == 1 and result.counts()["compose_linear"] == 1
    assert modules_of(gm, nn.BatchNorm2d, *POOLS) == []
    conv = gm.get_submodule("conv")
    assert conv.kernel_size == (4, 4) and conv.stride == (2, 2)
    assert graph_cost(gm).macs < macs_before


# --- linear → linear ----------------------------------------------------------------------------

class TwoLinears(nn.Module):
    def __init__(self, hidden: int = 6, reuse: bool = False) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, hidden), nn.Linear(hidden, 5)
        self.reuse = reuse

    def forward(self, x):
        y = self.first(x)
        out = self.second(y)
        return out + y.sum(-1, keepdim=True) if self.reuse else out


@DTYPES
def test_linear_then_linear_becomes_one_linear(dtype) -> None:
    gm, result = fuse_checked(TwoLinears(), random_input((3, 4, 8)), compose_linear, dtype)
    assert result.counts() == {"compose_linear": 1}
    assert modules_of(gm, nn.Linear) == ["second"]
    assert gm.get_submodule("second").in_features == 8


@pytest.mark.parametrize(("model", "reason"), [
    pytest.param(TwoLinears(hidden=2), "raise MACs", id="bottleneck-costs-more"),
    pytest.param(TwoLinears(reuse=True), "also used elsewhere", id="output-reused"),
])
def test_linear_pair_that_should_stay_is_declined(model, reason) -> None:
    result, _ = check_unchanged(model, (3, 4, 8), compose_linear)
    assert reason in only_reason(result)
