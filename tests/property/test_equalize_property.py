"""Property: ``equalize`` on any random block of conv/linear layers joined by ReLU/LeakyReLU
computes the same function, and balances every pair it rescales.

Hypothesis draws a *block*: a chain of 2 to 4 conv layers (kernel 1/3, stride 1/2, groups
dense/grouped/depthwise, bias or not, padding zeros or reflect, output channels spread over
several decades as BN folding with tiny variances leaves them), each followed by ReLU or
LeakyReLU (random slope) and sometimes a max or average pool; optionally the last conv's
channels fan out to two readers whose outputs are concatenated, and optionally a global pool,
flatten and linear head. Every op commutes with a positive per-channel scale, so:

1. the pass rewrites the block as one group, and the result equals the unequalized block run
   in float64 (1e-10 relative);
2. for every producer/reader pair, the producer's output-channel ranges equal the readers'
   input-channel ranges (the converged equalization; 1e-6 relative);
3. running the pass again changes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, random_input, reference64, rel_err, signature
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

import repfuse
from repfuse.equalization import LayerWeights, input_channel_ranges, output_channel_ranges
from repfuse.graph import layer_view
from repfuse.passes import run_passes
from repfuse.passes.equalize import Equalize

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Link:
    out_channels: int
    kernel: int
    stride: int
    groups: int  # as a divisor choice: 1, 2 or "depthwise" when it divides
    bias: bool
    reflect: bool
    activation: str  # "relu" | "leaky_relu"
    slope: float
    pool: str  # "" | "max" | "avg"


@dataclass(frozen=True)
class Block:
    in_channels: int
    links: tuple[Link, ...]
    fan_out: bool
    head: bool
    spread: float
    seed: int


@st.composite
def links(draw) -> Link:
    return Link(
        out_channels=draw(st.sampled_from([2, 4, 6, 8])),
        kernel=draw(st.sampled_from([1, 3])),
        stride=draw(st.sampled_from([1, 1, 2])),
        groups=draw(st.sampled_from([1, 1, 2, 0])),  # 0: depthwise when the channels allow
        bias=draw(st.booleans()),
        reflect=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "leaky_relu"])),
        slope=draw(st.floats(0.01, 0.5)),
        pool=draw(st.sampled_from(["", "", "max", "avg"])),
    )


blocks = st.builds(
    Block,
    in_channels=st.sampled_from([2, 3, 4]),
    links=st.lists(links(), min_size=2, max_size=4).map(tuple),
    fan_out=st.booleans(),
    head=st.booleans(),
    spread=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**16),
)


def _groups(link: Link, in_channels: int) -> int:
    if link.groups == 0 and link.out_channels == in_channels:
        return in_channels
    if link.groups == 2 and in_channels % 2 == 0 and link.out_channels % 2 == 0:
        return 2
    return 1


SIZE = 16  # input height and width


class RandomBlock(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same block gets the same weights on every replay
            torch.manual_seed(block.seed)
            self._build(block)

    def _build(self, block: Block) -> None:
        self.block = block
        channels, size = block.in_channels, SIZE
        self.convs = nn.ModuleList()
        self.pools = []
        for link in block.links:
            stride = link.stride if size >= 4 else 1  # keep at least 2x2 pixels
            self.convs.append(nn.Conv2d(
                channels, link.out_channels, link.kernel, stride,
                padding=link.kernel // 2, groups=_groups(link, channels), bias=link.bias,
                padding_mode="reflect" if link.reflect else "zeros"))
            channels, size = link.out_channels, (size - 1) // stride + 1
            self.pools.append(link.pool if size >= 3 else "")
            size -= 1 if self.pools[-1] == "max" else 0
        self.left = self.right = self.fc = None
        if block.fan_out:
            self.left = nn.Conv2d(channels, 3, 1)
            self.right = nn.Conv2d(channels, 2, 3, padding=1)
            channels = 5
        if block.head:
            self.fc = nn.Linear(channels, 3)
        g = torch.Generator().manual_seed(block.seed)
        with torch.no_grad():
            for layer in self.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    rows = layer.weight.shape[0]
                    exponent = torch.empty(rows).uniform_(-block.spread, block.spread,
                                                          generator=g)
                    layer.weight.mul_(torch.exp(exponent).reshape(
                        -1, *([1] * (layer.weight.dim() - 1))))

    def forward(self, x):
        for conv, link, pool in zip(self.convs, self.block.links, self.pools, strict=True):
            x = conv(x)
            x = F.relu(x) if link.activation == "relu" else F.leaky_relu(x, link.slope)
            if pool == "max":
                x = F.max_pool2d(x, 2, 1)
            elif pool == "avg":
                x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        if self.left is not None:
            x = torch.cat([self.left(x), F.relu(self.right(x))], dim=1)
        if self.fc is not None:
            x = self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))
        return x


def _pairs(gm) -> list[tuple[LayerWeights, list[LayerWeights]]]:
    """(producer, readers) for each layer whose output another layer reads through
    non-layer ops only (this block's shape: a chain, a fan-out, a concat of readers)."""
    views = {n: layer_view(gm, n) for n in gm.graph.nodes}
    views = {n: v for n, v in views.items() if v is not None}

    def weights(v):
        return LayerWeights(v.weight, v.bias, v.groups)

    pairs = []
    for node, view in views.items():
        readers, pending, seen = [], list(node.users), set()
        while pending:
            user = pending.pop()
            if user in seen:
                continue
            seen.add(user)
            if user in views:
                readers.append(weights(views[user]))
            else:
                pending.extend(user.users)
        if readers:
            pairs.append((weights(view), readers))
    return pairs


@given(block=blocks)
def test_equalize_random_blocks(block: Block) -> None:
    note(repr(block))
    model = RandomBlock(block).double().eval()
    x = random_input((2, block.in_channels, SIZE, SIZE), dtype=torch.float64)
    gm = repfuse.trace(copy.deepcopy(model), x)

    result = run_passes(gm, [Equalize()])

    assert result.counts() == {"equalize": 1}
    assert result.declined == []
    with torch.no_grad():
        expected, actual = reference64(model, x), gm(x)
    if bool(expected.abs().max() > 0):
        assert rel_err(expected, actual) <= F64_RTOL
    else:  # every unit of the last ReLU is off: exactly zero either way
        assert bool((actual == 0).all())
    for producer, readers in _pairs(gm):
        if readers[0].in_channels != producer.out_channels:
            continue  # a concat of the fan-out readers: checked through its own producers
        r1 = output_channel_ranges(producer)
        r2 = torch.stack([input_channel_ranges(r) for r in readers]).amax(dim=0)
        live = (r1 > 0) & (r2 > 0)
        assert torch.allclose(r1[live], r2[live], rtol=1e-6, atol=0)
    before = signature(gm)
    assert run_passes(gm, [Equalize()]).rewrites == []
    assert signature(gm) == before
