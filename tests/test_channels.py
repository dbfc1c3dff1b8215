"""The channel-pruning math of :mod:`repfuse.channels`, checked against ``torch.nn.functional``.

Removing channels must give the same outputs as the unpruned layer run on an input whose removed
channels hold their constants: ``F.conv2d(x_with_constants, W, b) == F.conv2d(x_kept, W', b')``
(unpadded conv, linear), on random tensors in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, rel_err
from torch import Tensor

from repfuse.channels import (
    all_normal,
    conv_of_constant,
    flush_subnormals,
    grouped_output_constants,
    slice_layer,
    subnormal_count,
    zero_input_channels,
    zero_output_channels,
)

F64 = torch.float64


def with_constants(x: Tensor, channels: list[int], values: Tensor) -> Tensor:
    """``x`` with ``channels`` (axis 1) set to ``values`` everywhere."""
    x = x.clone()
    for c in channels:
        x[:, c] = values[c]
    return x


def mask(size: int, channels: list[int]) -> Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    m[channels] = True
    return m


# --- finding dead channels ----------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_zero_output_and_input_channels_of_a_conv(groups: int) -> None:
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=F64)
    weight[1] = 0  # output 1 reads nothing
    assert zero_output_channels(weight, groups).tolist() == [c == 1 for c in range(6)]
    if groups == 1:
        weight[:, 2] = 0
    else:  # input 3 is column 1 of the second group's outputs 3, 4, 5
        weight[3:, 1] = 0
    expected = [2] if groups == 1 else [3]
    assert zero_input_channels(weight, groups).nonzero().flatten().tolist() == expected
    # the same answer from the layer itself: the outputs do not depend on that input
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    y = x.clone()
    y[:, expected[0]] = torch.randn(2, 5, 5, dtype=F64)
    assert torch.equal(F.conv2d(x, weight, groups=groups), F.conv2d(y, weight, groups=groups))


def test_zero_output_channels_of_a_transposed_conv() -> None:
    weight = torch.randn(4, 3, 3, 3, dtype=F64)  # 4 in, 6 out in 2 groups of 3
    weight[2:, 1] = 0  # group 1's rows write outputs 3, 4, 5: output 4 reads nothing
    dead = zero_output_channels(weight, groups=2, transposed=True)
    assert dead.nonzero().flatten().tolist() == [4]
    out = F.conv_transpose2d(torch.randn(1, 4, 5, 5, dtype=F64), weight, groups=2)
    assert bool(out[:, 4].eq(0).all()) and not bool(out[:, 3].eq(0).all())


def test_subnormals_are_counted_and_flushed() -> None:
    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([1.0, tiny / 4, -tiny / 8, 0.0, tiny], dtype=torch.float32)
    assert subnormal_count(t) == 2
    assert flush_subnormals(t).tolist() == [1.0, 0.0, 0.0, 0.0, tiny]
    assert subnormal_count(flush_subnormals(t)) == 0
    assert not all_normal(t) and not all_normal(torch.tensor([0.0, 1.0]))
    assert all_normal(torch.tensor([tiny, -2.0])) and all_normal(None)
    # float16's subnormals (below 6.1e-5) are ordinary small weights: not counted
    assert subnormal_count(torch.tensor([1e-5, 1.0], dtype=torch.float16)) == 0


# --- constants folded into readers ----------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_of_constant_matches_an_unpadded_conv_of_a_constant_input(groups: int) -> None:
    weight = torch.randn(6, 6 // groups, 3, 3, dtype=F64)
    bias = torch.randn(6, dtype=F64)
    values = torch.randn(6, dtype=F64)
    constant = values.reshape(1, 6, 1, 1).expand(2, 6, 5, 5)
    expected = F.conv2d(constant, weight, bias, groups=groups)  # 3x3 of a 5x5: no padding
    got = conv_of_constant(weight, bias, values, groups=groups)
    assert rel_err(expected, got.reshape(1, 6, 1, 1).expand_as(expected)) <= F64_RTOL


@pytest.mark.parametrize("kind", ["conv", "conv_strided_dilated", "linear"])
def test_slice_layer_folds_removed_constant_inputs_into_the_bias(kind: str) -> None:
    removed_in, removed_out = [1, 4], [0, 3]
    values = torch.randn(6, dtype=F64)
    if kind == "linear":
        weight, bias = torch.randn(5, 6, dtype=F64), torch.randn(5, dtype=F64)
        x = torch.randn(3, 7, 6, dtype=F64)
        full = with_constants(x.transpose(1, 2), removed_in, values).transpose(1, 2)
        keep_in = ~mask(6, removed_in)
        expected = F.linear(full, weight, bias)
        new_w, new_b, _ = slice_layer(weight, bias, ~mask(5, removed_out), keep_in,
                                      constants=values)
        got = F.linear(full[..., keep_in], new_w, new_b)
    else:
        stride, dilation = (2, 2) if kind == "conv_strided_dilated" else (1, 1)
        weight, bias = torch.randn(5, 6, 3, 3, dtype=F64), None  # no bias: one is created
        full = with_constants(torch.randn(2, 6, 9, 9, dtype=F64), removed_in, values)
        keep_in = ~mask(6, removed_in)
        expected = F.conv2d(full, weight, bias, stride=stride, dilation=dilation)
        new_w, new_b, _ = slice_layer(weight, bias, ~mask(5, removed_out), keep_in,
                                      constants=values)
        got = F.conv2d(full[:, keep_in], new_w, new_b, stride=stride, dilation=dilation)
    keep_out = ~mask(5, removed_out)
    assert rel_err(expected[:, keep_out] if kind != "linear" else expected[..., keep_out],
                   got) <= F64_RTOL


def test_a_zero_padded_conv_sees_the_border_differently() -> None:
    """Why prune_dead declines a constant into a padded conv: folding is exact only inside."""
    weight = torch.randn(4, 3, 3, 3, dtype=F64)
    values = torch.tensor([0.0, 2.5, 0.0], dtype=F64)
    x = with_constants(torch.randn(1, 3, 6, 6, dtype=F64), [1], values)
    expected = F.conv2d(x, weight, padding=1)
    new_w, new_b, _ = slice_layer(weight, None, torch.ones(4, dtype=torch.bool),
                                  ~mask(3, [1]), constants=values)
    got = F.conv2d(x[:, [0, 2]], new_w, new_b, padding=1)
    assert rel_err(expected[..., 1:-1, 1:-1], got[..., 1:-1, 1:-1]) <= F64_RTOL
    assert rel_err(expected, got) > 1e-3


def test_slice_layer_of_a_grouped_conv_removes_whole_groups() -> None:
    weight, bias = torch.randn(6, 2, 3, 3, dtype=F64), torch.randn(6, dtype=F64)  # 3 groups
    x = torch.randn(2, 6, 7, 7, dtype=F64)
    keep = ~mask(6, [2, 3])  # group 1: inputs 2, 3 and outputs 2, 3
    new_w, new_b, groups = slice_layer(weight, bias, keep, keep, groups=3)
    assert groups == 2
    expected = F.conv2d(x, weight, bias, padding=1, groups=3)[:, keep]
    assert rel_err(expected, F.conv2d(x[:, keep], new_w, new_b, padding=1, groups=2)) <= F64_RTOL
    with pytest.raises(ValueError, match="whole groups"):
        slice_layer(weight, bias, ~mask(6, [2]), ~mask(6, [2]), groups=3)


def test_slice_layer_of_a_transposed_conv() -> None:
    weight, bias = torch.randn(5, 4, 3, 3, dtype=F64), torch.randn(4, dtype=F64)
    x = torch.randn(2, 5, 4, 4, dtype=F64)
    keep_in, keep_out = ~mask(5, [0]), ~mask(4, [2])
    x[:, 0] = 0  # only a zero constant can leave a transposed conv exactly
    new_w, new_b, _ = slice_layer(weight, bias, keep_out, keep_in, transposed=True,
                                  constants=torch.zeros(5, dtype=F64))
    expected = F.conv_transpose2d(x, weight, bias, stride=2)[:, keep_out]
    assert rel_err(expected, F.conv_transpose2d(x[:, keep_in], new_w, new_b,
                                                stride=2)) <= F64_RTOL
    with pytest.raises(ValueError, match="unevenly"):
        slice_layer(weight, bias, keep_out, keep_in, transposed=True,
                    constants=torch.ones(5, dtype=F64))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_grouped_output_constants_match_the_conv(padded: bool) -> None:
    weight, bias = torch.randn(4, 1, 3, 3, dtype=F64), torch.randn(4, dtype=F64)  # depthwise
    weight[3] = 0  # a dead filter: its output is the bias whatever the input
    const_in = torch.tensor([True, True, False, False])
    values = torch.tensor([1.5, 0.0, 0.0, 0.0], dtype=F64)
    const, got = grouped_output_constants(weight, bias, const_in, values, groups=4,
                                          pads_with_zeros=padded)
    # input 0 is 1.5 everywhere, input 1 is 0 everywhere, inputs 2, 3 vary
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    x[:, 0], x[:, 1] = 1.5, 0.0
    out = F.conv2d(x, weight, bias, padding=1 if padded else 0, groups=4)
    uniform = [bool((out[:, o] == out[0, o, 0, 0]).all()) for o in range(4)]
    # padded: the constant 1.5 meets the zero border; 0 and a dead filter stay uniform
    expected = [not padded, True, False, True]
    assert const.tolist() == expected
    assert uniform[1] and uniform[3] and uniform[0] == (not padded) and not uniform[2]
    for o in range(4):
        if expected[o]:
            assert abs(float(out[0, o, 0, 0]) - float(got[o])) <= 1e-12 * max(
                1.0, abs(float(got[o])))
