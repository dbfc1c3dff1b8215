"""The cross-layer equalization math (repfuse.equalization) against torch.nn.functional.

Each rescaling is checked on random tensors in float64: the network ``W2 f(W1 x + b1) + b2``
with ``f`` positively homogeneous computes the same before and after (relative 1e-10 to the
float64 output), and the scales balance the ranges they are meant to balance.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, random_input, rel_err

from repfuse.equalization import (
    ChannelSet,
    LayerWeights,
    apply_scales,
    equalization_scales,
    input_channel_ranges,
    output_channel_ranges,
    range_ratio,
    reader_ranges,
    scale_input_channels,
    scale_output_channels,
    solve_equalization,
)

F64 = torch.float64


def imbalanced_conv(out_c: int, in_per_group: int, k: int, seed: int) -> LayerWeights:
    """A conv weight whose output channels span three decades of magnitude (as BN folding
    with a tiny running variance leaves them), and a bias."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_c, in_per_group, k, k, generator=g, dtype=F64)
    spread = torch.exp(torch.empty(out_c, dtype=F64).uniform_(-3.5, 3.5, generator=g))
    bias = torch.randn(out_c, generator=g, dtype=F64)
    return LayerWeights(weight * spread.reshape(-1, 1, 1, 1), bias)


def run_conv(layer: LayerWeights, x: torch.Tensor, padding: int = 1) -> torch.Tensor:
    if layer.transposed:
        return F.conv_transpose2d(x, layer.weight, layer.bias, groups=layer.groups)
    return F.conv2d(x, layer.weight, layer.bias, padding=padding, groups=layer.groups)


ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.17),
    "prelu": lambda t: F.prelu(t, torch.linspace(-0.5, 0.9, t.shape[1], dtype=F64)),
    "identity": lambda t: t,
    "max_pool": lambda t: F.max_pool2d(t, 2),
    "avg_pool": lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False),
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("groups", [1, 2])
def test_rescaled_pair_computes_the_same(activation: str, groups: int) -> None:
    f = ACTIVATIONS[activation]
    first = replace(imbalanced_conv(8, 6 // groups, 3, 1), groups=groups)
    second = LayerWeights(imbalanced_conv(4, 8 // groups, 3, 2).weight,
                          torch.randn(4, dtype=F64), groups)
    x = random_input((2, 6, 9, 9), dtype=F64)
    expected = run_conv(second, f(run_conv(first, x)))

    scales = torch.exp(torch.randn(8, dtype=F64))
    new_first = scale_output_channels(first, 1 / scales)
    new_second = scale_input_channels(second, scales)

    assert rel_err(expected, run_conv(new_second, f(run_conv(new_first, x)))) <= F64_RTOL
    assert not torch.equal(new_first.weight, first.weight)


def test_transposed_layers_rescale_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    # transposed conv weight (C_in, C_out / g, k, k): 4 -> 6 channels, 2 groups
    first = LayerWeights(torch.randn(4, 3, 2, 2, generator=g, dtype=F64),
                         torch.randn(6, generator=g, dtype=F64), groups=2, transposed=True)
    second = LayerWeights(torch.randn(6, 3, 2, 2, generator=g, dtype=F64),
                          torch.randn(3, generator=g, dtype=F64), groups=1, transposed=True)
    x = random_input((2, 4, 5, 5), dtype=F64)
    expected = run_conv(second, F.relu(run_conv(first, x)))

    scales = torch.exp(torch.randn(6, generator=g, dtype=F64))
    new_first = scale_output_channels(first, 1 / scales)
    new_second = scale_input_channels(second, scales)

    assert rel_err(expected, run_conv(new_second, F.relu(run_conv(new_first, x)))) <= F64_RTOL
    assert output_channel_ranges(first).shape == (6,)
    assert input_channel_ranges(second).shape == (6,)


def test_ranges_are_the_largest_magnitude_per_channel() -> None:
    layer = imbalanced_conv(6, 2, 3, 4)
    grouped = LayerWeights(layer.weight, layer.bias, groups=2)  # 6 out, 4 in, 2 groups
    expected_out = layer.weight.abs().amax(dim=(1, 2, 3))
    assert torch.equal(output_channel_ranges(grouped), expected_out)
    # input channel c of group c // 2 is read by output channels 3(c // 2) .. 3(c // 2) + 2
    expected_in = torch.stack([
        layer.weight[3 * (c // 2):3 * (c // 2) + 3, c % 2].abs().max() for c in range(4)])
    assert torch.equal(input_channel_ranges(grouped), expected_in)


def test_scales_balance_a_pair_and_skip_dead_channels() -> None:
    first, second = imbalanced_conv(5, 3, 3, 5), imbalanced_conv(4, 5, 1, 6)
    first.weight[2] = 0  # a dead channel: nothing to balance
    r1, r2 = output_channel_ranges(first), input_channel_ranges(second)
    s = equalization_scales(r1, r2)
    assert s[2] == 1
    balanced_first = output_channel_ranges(scale_output_channels(first, 1 / s))
    balanced_second = input_channel_ranges(scale_input_channels(second, s))
    live = torch.tensor([0, 1, 3, 4])
    assert torch.allclose(balanced_first[live], balanced_second[live], rtol=1e-12, atol=0)
    assert torch.allclose(balanced_first[live], torch.sqrt(r1 * r2)[live], rtol=1e-12, atol=0)


def test_reader_ranges_follow_the_index_map() -> None:
    reader_a, reader_b = imbalanced_conv(3, 4, 1, 7), imbalanced_conv(2, 6, 1, 8)
    index_a = torch.tensor([0, 1, 2, 3])
    index_b = torch.tensor([-1, -1, 3, 2, 1, 0])  # a concatenation: two foreign channels first
    ranges = reader_ranges(4, [(reader_a, index_a), (reader_b, index_b)])
    in_a, in_b = input_channel_ranges(reader_a), input_channel_ranges(reader_b)
    expected = torch.stack([torch.maximum(in_a[c], in_b[5 - c]) for c in range(4)])
    assert torch.equal(ranges, expected)


@pytest.mark.parametrize("length", [2, 3, 5])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "prelu"])
def test_solved_chain_computes_the_same_and_balances_every_set(length: int,
                                                               activation: str) -> None:
    f = ACTIVATIONS[activation]
    widths = [3, 8, 6, 7, 5, 4][:length + 1]
    layers = [imbalanced_conv(widths[i + 1], widths[i], 3, 10 + i) for i in range(length)]
    sets = [ChannelSet(i, ((i + 1, torch.arange(widths[i + 1])),)) for i in range(length - 1)]
    x = random_input((2, 3, 8, 8), dtype=F64)

    def network(ls: list[LayerWeights]) -> torch.Tensor:
        h = x
        for i, layer in enumerate(ls):
            h = run_conv(layer, h)
            if i < len(ls) - 1:
                h = f(h)
        return h

    solved = solve_equalization(layers, sets)

    assert solved.converged
    assert rel_err(network(layers), network(solved.layers)) <= F64_RTOL
    assert rel_err(network(layers), network(apply_scales(layers, sets, solved.scales))) \
        <= F64_RTOL
    for channel_set in sets:
        r1 = output_channel_ranges(solved.layers[channel_set.producer])
        reader, _ = channel_set.readers[0]
        r2 = input_channel_ranges(solved.layers[reader])
        assert torch.allclose(r1, r2, rtol=1e-7, atol=0)
    before = max(range_ratio(output_channel_ranges(layer)) for layer in layers[:-1])
    after = max(range_ratio(output_channel_ranges(layer)) for layer in solved.layers[:-1])
    assert after < before


def test_range_ratio() -> None:
    assert range_ratio(torch.tensor([1.0, 2.0, 8.0])) == 4.0
    assert range_ratio(torch.tensor([0.0, 0.0, 3.0])) == float("inf")
    assert range_ratio(torch.tensor([0.0, 0.0])) == 1.0
