"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), as pure tensor math.

For two layers with a per-channel function between them,

    y = W2 · f(W1 x + b1) + b2,

scaling channel ``i`` of the middle tensor by ``1/s_i`` and compensating in the reader,

    W1 ← S⁻¹ W1,  b1 ← S⁻¹ b1,  W2 ← W2 S,      S = diag(s), s_i > 0,

computes the same ``y`` exactly (up to floating-point rounding) **iff** ``f`` is positively
homogeneous per channel: ``f(z / s) = f(z) / s`` for every ``s > 0``. That holds for ReLU,
LeakyReLU (any slope), PReLU (its slope is per channel, and a positive scale does not move the
kink at 0), the identity, max and average pooling of any kind (per channel, linear or
order-preserving), zero padding, and reshapes that keep each channel's values together
(flatten, channel concatenation and split: the index map of :class:`ChannelSet`). It fails for
ReLU6, clamp/hardtanh, SiLU, GELU, hardswish, sigmoid, tanh, ELU (a threshold or curvature at a
fixed place), and for anything that adds a constant (batch norm's shift, a bias add, a
non-zero pad value): those are never crossed.

Ranges: ``r1_i = max |W1[i, ...]|`` over the weights writing channel ``i``, ``r2_i = max |W2[:,
i, ...]|`` over the weights reading it (over *every* reader when the channels fan out to
several layers: they all share one ``s``). The scale ``s_i = sqrt(r1_i / r2_i)`` makes both
ranges ``sqrt(r1_i · r2_i)``, which is what per-tensor INT8 weight quantization wants: no channel
far above the others. A channel with a zero range (dead, or read by nobody) keeps ``s_i = 1``.

Over a chain, equalizing one pair changes the ranges of its neighbours, so
:func:`solve_equalization` sweeps over all channel sets until every scale of a sweep is within
``tolerance`` of 1 and returns the product of the scales per set. Applying those products
pair by pair is exact at every step, because each pair's rescaling is exact by itself and
rescalings of different channel sets multiply different weight axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from repfuse.algebra import FOLD_DTYPE, input_channel_of_weight, output_channel_of_weight

# A sweep whose scales are all within this of 1 ends the solve.
DEFAULT_TOLERANCE = 1e-9
DEFAULT_MAX_SWEEPS = 500


@dataclass(frozen=True)
class LayerWeights:
    """The weight (and bias) of a conv, transposed conv or linear layer, float64."""

    weight: Tensor  # conv/linear (C_out, C_in / g, *k); transposed conv (C_in, C_out / g, *k)
    bias: Tensor | None
    groups: int = 1
    transposed: bool = False

    @property
    def out_channels(self) -> int:
        if self.transposed:
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.transposed:
            return self.weight.shape[0]
        return self.weight.shape[1] * self.groups


@dataclass(frozen=True)
class ChannelSet:
    """The output channels of one layer (``producer``) and the layers that read them.

    ``readers`` holds ``(layer, index)`` pairs: ``index[j]`` is the producer channel that input
    channel ``j`` of the reader carries, or ``-1`` for an input channel that comes from
    elsewhere (another operand of a concatenation). A flatten of ``C×H×W`` repeats each
    channel ``H·W`` times. Layers are indices into the list given to :func:`solve_equalization`.
    """

    producer: int
    readers: tuple[tuple[int, Tensor], ...]


def output_channel_ranges(layer: LayerWeights) -> Tensor:
    """``r[c] = max |W|`` over the weights that write output channel ``c`` (float64)."""
    magnitude = layer.weight.detach().abs().to(FOLD_DTYPE)
    per_slice = magnitude.reshape(magnitude.shape[0], magnitude.shape[1], -1).amax(dim=2)
    channel = output_channel_of_weight(layer.weight, layer.groups, layer.transposed)
    ranges = torch.zeros(layer.out_channels, dtype=FOLD_DTYPE, device=magnitude.device)
    return ranges.scatter_reduce(0, channel.reshape(-1), per_slice.reshape(-1), "amax")


def input_channel_ranges(layer: LayerWeights) -> Tensor:
    """``r[c] = max |W|`` over the weights that read input channel ``c`` (float64)."""
    magnitude = layer.weight.detach().abs().to(FOLD_DTYPE)
    per_slice = magnitude.reshape(magnitude.shape[0], magnitude.shape[1], -1).amax(dim=2)
    if layer.transposed:  # W[i] reads input channel i
        return per_slice.amax(dim=1)
    channel = input_channel_of_weight(layer.weight, layer.groups)
    ranges = torch.zeros(layer.in_channels, dtype=FOLD_DTYPE, device=magnitude.device)
    return ranges.scatter_reduce(0, channel.reshape(-1), per_slice.reshape(-1), "amax")


def reader_ranges(channels: int, readers: Sequence[tuple[LayerWeights, Tensor]]) -> Tensor:
    """``r2[c]``: the largest input range of any reader over the inputs that carry channel
    ``c`` (through each reader's index map, see :class:`ChannelSet`)."""
    ranges = torch.zeros(channels, dtype=FOLD_DTYPE)
    for layer, index in readers:
        carried = index >= 0
        per_input = input_channel_ranges(layer).to(ranges.device)
        ranges = ranges.scatter_reduce(0, index[carried], per_input[carried], "amax")
    return ranges


def equalization_scales(r1: Tensor, r2: Tensor) -> Tensor:
    """``s = sqrt(r1 / r2)``, and 1 where either range is zero (nothing to balance)."""
    r1, r2 = r1.to(FOLD_DTYPE), r2.to(FOLD_DTYPE)
    usable = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    scales = torch.ones_like(r1)
    scales[usable] = torch.sqrt(r1[usable] / r2[usable])
    return scales


def scale_output_channels(layer: LayerWeights, factor: Tensor) -> LayerWeights:
    """The layer with output channel ``c`` multiplied by ``factor[c]``: ``W[c] ← factor[c]·W[c]``,
    ``b[c] ← factor[c]·b[c]`` (through the output channel of each slice of a transposed or
    grouped weight). Always exact: it scales each output value."""
    channel = output_channel_of_weight(layer.weight, layer.groups, layer.transposed)
    per_slice = factor.to(FOLD_DTYPE)[channel]
    weight = layer.weight.to(FOLD_DTYPE) * per_slice.reshape(
        *per_slice.shape, *([1] * (layer.weight.dim() - 2)))
    bias = None if layer.bias is None else layer.bias.to(FOLD_DTYPE) * factor.to(FOLD_DTYPE)
    return LayerWeights(weight, bias, layer.groups, layer.transposed)


def scale_input_channels(layer: LayerWeights, factor: Tensor) -> LayerWeights:
    """The layer reading input channel ``c`` multiplied by ``factor[c]``: ``W[:, c] ←
    W[:, c]·factor[c]``; the bias is unchanged. ``layer(x / factor)`` then equals the old
    ``layer(x)`` exactly, zero padding included (a padded zero stays zero)."""
    if layer.transposed:
        per_slice = factor.to(FOLD_DTYPE).unsqueeze(1).expand(layer.weight.shape[:2])
    else:
        per_slice = factor.to(FOLD_DTYPE)[input_channel_of_weight(layer.weight, layer.groups)]
    weight = layer.weight.to(FOLD_DTYPE) * per_slice.reshape(
        *per_slice.shape, *([1] * (layer.weight.dim() - 2)))
    bias = None if layer.bias is None else layer.bias.to(FOLD_DTYPE)
    return LayerWeights(weight, bias, layer.groups, layer.transposed)


def reader_factor(index: Tensor, scales: Tensor) -> Tensor:
    """Per input channel of a reader: the scale of the producer channel it carries (1 for
    input channels that come from elsewhere)."""
    factor = torch.ones(index.numel(), dtype=FOLD_DTYPE)
    carried = index >= 0
    factor[carried] = scales.to(FOLD_DTYPE)[index[carried]]
    return factor


def apply_scales(
    layers: Sequence[LayerWeights], sets: Sequence[ChannelSet], scales: Sequence[Tensor]
) -> list[LayerWeights]:
    """Every set's rescaling: its producer's output channels divided by ``s``, its readers'
    input channels multiplied by ``s`` (exact under the module docstring's condition)."""
    out = list(layers)
    for channel_set, s in zip(sets, scales, strict=True):
        out[channel_set.producer] = scale_output_channels(out[channel_set.producer], 1.0 / s)
        for reader, index in channel_set.readers:
            out[reader] = scale_input_channels(out[reader], reader_factor(index, s))
    return out


@dataclass(frozen=True)
class EqualizationResult:
    """The scale per channel set (product over sweeps), the rescaled layers, the sweeps run."""

    scales: list[Tensor]
    layers: list[LayerWeights]
    sweeps: int
    converged: bool


def solve_equalization(
    layers: Sequence[LayerWeights],
    sets: Sequence[ChannelSet],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_sweeps: int = DEFAULT_MAX_SWEEPS,
) -> EqualizationResult:
    """Equalize every channel set, sweeping in order until the scales of a sweep are all
    within ``tolerance`` of 1 (or ``max_sweeps``). Returns the cumulative scale of each set
    and the layers with all of them applied."""
    current = [LayerWeights(layer.weight.detach().to(FOLD_DTYPE),
                            None if layer.bias is None else layer.bias.detach().to(FOLD_DTYPE),
                            layer.groups, layer.transposed) for layer in layers]
    totals = [torch.ones(current[s.producer].out_channels, dtype=FOLD_DTYPE) for s in sets]
    for sweep in range(1, max_sweeps + 1):
        largest_step = 0.0
        for position, channel_set in enumerate(sets):
            producer = current[channel_set.producer]
            r1 = output_channel_ranges(producer)
            r2 = reader_ranges(producer.out_channels,
                               [(current[r], index) for r, index in channel_set.readers])
            step = equalization_scales(r1, r2)
            largest_step = max(largest_step, float((step - 1).abs().max()))
            current = apply_scales(current, [channel_set], [step])
            totals[position] = totals[position] * step
        if largest_step <= tolerance:
            return EqualizationResult(totals, current, sweep, True)
    return EqualizationResult(totals, current, max_sweeps, False)


def range_ratio(ranges: Tensor) -> float:
    """``max / median`` of per-channel ranges (1 for a single channel; inf if the median
    is 0 and the max is not): how far the widest channel stands out."""
    ranges = ranges.to(FOLD_DTYPE).reshape(-1)
    if ranges.numel() == 0:
        return 1.0
    top, median = float(ranges.max()), float(ranges.median())
    if median == 0:
        return 1.0 if top == 0 else math.inf
    return top / median
