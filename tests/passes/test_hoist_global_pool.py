"""``hoist_global_pool``: global average pooling moves before the pointwise layers before it.

``G(P(x)) = P(G(x))`` for a pointwise affine ``P`` (1x1 stride-1 unpadded conv, BN, scale), so a
``P → G → flatten → Linear`` head becomes ``G → flatten → Linear∘P``. Positive cases check the
rewrite, the layers left and the numbers against the unfused float64 model; negative cases the
reason and an unchanged graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    check_unchanged,
    fuse_checked,
    modules_of,
    random_input,
)
from torch import nn

import repfuse
from repfuse.cost import graph_cost
from repfuse.models import randomize_bn_stats
from repfuse.passes import hoist_global_pool, run_pipeline

F64 = torch.float64


class Head(nn.Module):
    """1x1 conv → BN → global pool (in one of its spellings) → [flatten] → Linear."""

    def __init__(self, pool: str = "adaptive", groups: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv2d(8, 12, 1, groups=groups)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)
        self.pool = pool
        self.gap = nn.AdaptiveAvgPool2d(1)
        randomize_bn_stats(self, seed=3)

    def forward(self, x):
        y = self.bn(self.proj(x))
        if self.pool == "adaptive":
            y = torch.flatten(self.gap(y), 1)
        elif self.pool == "functional":
            y = F.adaptive_avg_pool2d(y, (1, 1)).flatten(1)
        elif self.pool == "mean":
            y = y.mean((2, 3))
        elif self.pool == "mean_negative_dims":
            y = torch.mean(y, dim=[-1, -2])
        return self.fc(y)


@DTYPES
@pytest.mark.parametrize("pool", ["adaptive", "functional", "mean", "mean_negative_dims"])
def test_pointwise_head_folds_into_the_linear_after_the_pool(pool: str, dtype) -> None:
    model = Head(pool)
    x = random_input((2, 8, 7, 6))
    macs_before = graph_cost(repfuse.trace(model.to(dtype), x.to(dtype))).macs

    gm, result = fuse_checked(model, x, hoist_global_pool, dtype)

    assert result.counts() == {"hoist_global_pool": 1} and result.declined == []
    assert modules_of(gm, nn.Conv2d, nn.BatchNorm2d) == []
    (fc,) = modules_of(gm, nn.Linear)
    assert gm.get_submodule(fc).in_features == 8  # reads the pooled input of the 1x1 conv
    assert graph_cost(gm).macs < macs_before


def test_grouped_pointwise_conv_folds_too() -> None:
    gm, result = fuse_checked(Head(groups=4), random_input((2, 8, 5, 5)), hoist_global_pool)
    assert result.counts() == {"hoist_global_pool": 1}


class PoolOnly(nn.Module):
    """1x1 conv → global pool with keepdim, no Linear after: the conv runs on one pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.sigmoid(self.proj(x).mean((2, 3), keepdim=True)) * x[:, :4]


@DTYPES
def test_pool_moves_before_a_pointwise_conv_without_a_head(dtype) -> None:
    gm, result = fuse_checked(PoolOnly(), random_input((2, 8, 6, 6)), hoist_global_pool, dtype)
    assert result.counts() == {"hoist_global_pool": 1}
    pooled = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mean"]
    assert len(pooled) == 1 and pooled[0].args[0].op == "placeholder"


class Blocked(nn.Module):
    def __init__(self, conv: nn.Module, between: nn.Module | None = None) -> None:
        super().__init__()
        self.conv, self.between = conv, between
        self.fc = nn.Linear(conv.out_channels, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.between is not None:
            y = self.between(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize(("conv", "reason"), [
    pytest.param(nn.Conv2d(4, 6, 3, padding=1), "weighs border pixels", id="3x3-padded"),
    pytest.param(nn.Conv2d(4, 6, 3), "weighs border pixels", id="3x3-valid"),
    pytest.param(nn.Conv2d(4, 6, 1, stride=2), "weighs border pixels", id="1x1-strided"),
])
def test_pool_after_a_non_pointwise_conv_is_declined(conv: nn.Module, reason: str) -> None:
    result, _ = check_unchanged(Blocked(conv), (2, 4, 7, 7), hoist_global_pool)
    assert len(result.declined) == 1
    assert reason in result.declined[0].reason


def test_pool_after_an_activation_stays_silently() -> None:
    result, _ = check_unchanged(Blocked(nn.Conv2d(4, 6, 1), nn.ReLU()), (2, 4, 7, 7),
                                hoist_global_pool)
    assert result.declined == []


class PartialMean(nn.Module):
    """A mean over one spatial axis only is not a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.proj(x).mean(3)


def test_mean_over_some_spatial_axes_is_not_a_candidate() -> None:
    model = PartialMean().double().eval()
    gm = repfuse.trace(model, random_input((1, 4, 5, 5), dtype=F64))
    assert hoist_global_pool(gm).rewrites == []


def test_bn_before_pool_and_linear_folds_in_the_full_pipeline() -> None:
    """BN2d → GAP → flatten → Linear: no conv before the BN, so only the hoist can fold it."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    randomize_bn_stats(model, seed=5)
    gm, result = fuse_checked(model, random_input((2, 3, 8, 8)), run_pipeline)
    assert modules_of(gm, nn.BatchNorm2d) == []
    assert result.counts()["hoist_global_pool"] == 1
