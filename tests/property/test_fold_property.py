"""Property: any conv → batch norm (→ per-channel scale) block fuses exactly into one conv.

Hypothesis draws the conv's shape and options (1-D or 2-D, channels, groups dividing them,
kernel, stride, padding, dilation, padding mode, bias) and the block's random statistics; the
fused model, in float64, must match the unfused one to 1e-10 relative, with no norm left.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
from conftest import F64_RTOL, calls_to, modules_of, random_input, reference64
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import randomize_bn_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(reference: Tensor, actual: Tensor) -> None:
    """``max|a - b| <= 1e-10 max|a| + 1e-12``: the absolute term for an all-zero reference (a
    strided conv that reads only its zero padding)."""
    error = (reference - actual.double()).abs().max().item()
    assert error <= F64_RTOL * reference.abs().max().item() + 1e-12


@dataclass(frozen=True)
class Block:
    dims: int
    groups: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    padding_mode: str
    bias: bool
    scale: bool
    size: int
    seed: int


@st.composite
def blocks(draw) -> Block:
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    # The input must be at least one (dilated) kernel wide after padding, and reflect padding
    # needs it wider than the padding.
    smallest = max(dilation * (kernel - 1) + 1 - 2 * padding, padding + 1, 1)
    return Block(
        dims=dims, groups=groups,
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel=kernel, stride=draw(st.integers(1, 3)), padding=padding, dilation=dilation,
        padding_mode=padding_mode, bias=draw(st.booleans()), scale=draw(st.booleans()),
        size=draw(st.integers(smallest, smallest + 5)), seed=draw(st.integers(0, 2**16)),
    )


class ConvNormScale(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        conv = nn.Conv1d if block.dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if block.dims == 1 else nn.BatchNorm2d
        self.conv = conv(block.in_channels, block.out_channels, block.kernel,
                         stride=block.stride, padding=block.padding, dilation=block.dilation,
                         groups=block.groups, bias=block.bias, padding_mode=block.padding_mode)
        self.bn = norm(block.out_channels)
        shape = (block.out_channels,) + (1,) * block.dims
        self.g = nn.Parameter(torch.randn(shape)) if block.scale else None

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * self.g if self.g is not None else y


@given(blocks())
def test_conv_norm_scale_fuses_exactly(block: Block) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(block.seed)
        model = randomize_bn_stats(ConvNormScale(block), seed=block.seed).double().eval()
    x = random_input((2, block.in_channels) + (block.size,) * block.dims, seed=block.seed,
                     dtype=torch.float64)

    fused = repfuse.fuse(model, x)

    counts = repfuse.history(fused).counts()
    assert {name: n for name, n in counts.items() if n} == {
        "fold_batchnorm": 1, **({"fold_scale_bias": 1} if block.scale else {})}
    assert modules_of(fused, _BatchNorm) == []
    assert calls_to(fused, operator.mul) == 0
    assert modules_of(fused, nn.Conv1d, nn.Conv2d) == ["conv"]
    with torch.no_grad():
        assert_close(reference64(model, x), fused(x))


class NormConv(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        conv = nn.Conv1d if block.dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if block.dims == 1 else nn.BatchNorm2d
        self.bn = norm(block.in_channels)
        self.conv = conv(block.in_channels, block.out_channels, block.kernel,
                         stride=block.stride, padding=block.padding, dilation=block.dilation,
                         groups=block.groups, bias=block.bias, padding_mode=block.padding_mode)

    def forward(self, x):
        return self.conv(self.bn(x))


@given(blocks())
def test_norm_before_conv_folds_exactly_unless_zero_padded(block: Block) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(block.seed)
        model = randomize_bn_stats(NormConv(block), seed=block.seed).double().eval()
    x = random_input((2, block.in_channels) + (block.size,) * block.dims, seed=block.seed,
                     dtype=torch.float64)
    # The norm's shift is nonzero, so only a conv that reads no zero padding can absorb it.
    foldable = block.padding == 0 or block.padding_mode != "zeros"

    fused = repfuse.fuse(model, x)

    history = repfuse.history(fused)
    assert history.counts()["fold_batchnorm"] == int(foldable)
    assert modules_of(fused, _BatchNorm) == ([] if foldable else ["bn"])
    if not foldable:
        assert "pads with zeros" in history.declined[0].reason
    with torch.no_grad():
        assert_close(reference64(model, x), fused(x))
