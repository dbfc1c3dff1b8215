"""Property: any RepVGG/ACNet-like block of parallel linear branches fuses exactly into one conv.

Hypothesis draws blocks of one or two stages (ReLU between): 1-D or 2-D, channels with groups
dividing them, a random set of centred branch kernels among 1x1, 3x3, 1x3, 3x1, 5x5 (each a
conv-BN or a conv with bias, grouped or not), an optional BN identity branch (stride 1 and equal
channels only), stride 1 or 2. After :func:`repfuse.fuse` exactly one conv remains per stage, no
norm and no add, and the float64 fused model matches the unfused one to 1e-10 relative.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce

import pytest
import torch
from conftest import F64_RTOL, calls_to, modules_of, random_input, reference64, rel_err
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import randomize_bn_stats

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES_2D = [(1, 1), (3, 3), (1, 3), (3, 1), (5, 5)]


@dataclass(frozen=True)
class BranchSpec:
    kernel: tuple[int, ...]
    grouped: bool
    norm: bool  # conv (no bias) → BN, else a conv with bias


@dataclass(frozen=True)
class StageSpec:
    in_channels: int
    out_channels: int
    groups: int
    stride: int
    branches: tuple[BranchSpec, ...]
    identity: bool


@dataclass(frozen=True)
class BlockSpec:
    dims: int
    stages: tuple[StageSpec, ...]
    size: int
    seed: int


@st.composite
def stages(draw, dims: int, in_channels: int) -> StageSpec:
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if in_channels % g == 0]))
    out_channels = groups * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    shapes = draw(st.lists(st.sampled_from(SHAPES_2D), min_size=1, max_size=4))
    branches = tuple(
        BranchSpec(kernel=shape if dims == 2 else shape[-1:], grouped=draw(st.booleans()),
                   norm=draw(st.booleans()))
        for shape in shapes
    )
    identity_possible = stride == 1 and in_channels == out_channels
    identity = identity_possible and draw(st.booleans())
    return StageSpec(in_channels, out_channels, groups, stride, branches, identity)


@st.composite
def blocks(draw) -> BlockSpec:
    dims = draw(st.sampled_from([1, 2]))
    channels = draw(st.sampled_from([2, 3, 4, 6]))
    first = draw(stages(dims, channels))
    chosen = [first]
    if draw(st.booleans()):
        chosen.append(draw(stages(dims, first.out_channels)))
    return BlockSpec(dims, tuple(chosen), size=draw(st.integers(5, 10)),
                     seed=draw(st.integers(0, 2**16)))


class Stage(nn.Module):
    def __init__(self, spec: StageSpec, dims: int) -> None:
        super().__init__()
        conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
        norm_cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        branches = []
        for branch in spec.branches:
            conv = conv_cls(spec.in_channels, spec.out_channels, branch.kernel,
                            stride=spec.stride, padding=tuple(k // 2 for k in branch.kernel),
                            groups=spec.groups if branch.grouped else 1,
                            bias=not branch.norm)
            branches.append(nn.Sequential(conv, norm_cls(spec.out_channels)) if branch.norm
                            else conv)
        self.branches = nn.ModuleList(branches)
        self.identity = norm_cls(spec.in_channels) if spec.identity else None

    def forward(self, x):
        terms = [branch(x) for branch in self.branches]
        if self.identity is not None:
            terms.append(self.identity(x))
        return reduce(operator.add, terms)


class Block(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage(stage, spec.dims) for stage in spec.stages)

    def forward(self, x):
        for i, stage in enumerate(self.stages):
            x = stage(x) if i == 0 else stage(torch.relu(x))
        return x


@given(blocks())
def test_parallel_branches_fuse_into_one_conv_per_stage(spec: BlockSpec) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = randomize_bn_stats(Block(spec), seed=spec.seed).double().eval()
    x = random_input((2, spec.stages[0].in_channels) + (spec.size,) * spec.dims,
                     seed=spec.seed, dtype=torch.float64)

    fused = repfuse.fuse(model, x)

    assert len(modules_of(fused, nn.Conv1d, nn.Conv2d)) == len(spec.stages)
    assert modules_of(fused, _BatchNorm) == []
    assert calls_to(fused, operator.add) == 0
    assert calls_to(fused, torch.relu) == len(spec.stages) - 1
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= F64_RTOL
