"""``merge_siblings``: sibling convs/linears on one tensor become one wider layer + split.

Positive cases check the rewrite count, the layers and splits left, and the numbers against the
unfused model in float64 (1e-10 for float64, 1e-5 for float32). Negative cases check the
reason and that the graph is unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    F64_RTOL,
    calls_to,
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
from repfuse.passes import MergeSiblings, PassResult, merge_siblings, run_passes, run_pipeline

F64 = torch.float64


class ThreePointwise(nn.Module):
    """GoogLeNet's Inception head: three 1x1 convs on one input, each followed by ReLU, only
    one of them concatenated directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 1, bias=False)
        self.c = nn.Conv2d(8, 2, 1)
        self.b2 = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = self.b2(F.relu(self.b(x)))
        c = torch.sigmoid(self.c(x))
        return torch.cat([a, b], 1) * c.mean()


@DTYPES
def test_three_pointwise_siblings_become_one_conv_and_a_split(dtype) -> None:
    model = ThreePointwise()
    x = random_input((2, 8, 7, 9))

    gm, result = fuse_checked(model, x, merge_siblings, dtype)

    assert result.counts() == {"merge_siblings": 1} and result.declined == []
    assert sorted(modules_of(gm, nn.Conv2d)) == ["a", "b2"]  # the wide conv took a's path
    wide = gm.get_submodule("a")
    assert (wide.in_channels, wide.out_channels, wide.kernel_size) == (8, 12, (1, 1))
    assert calls_to(gm, torch.split) == 1
    assert result.rewrites[0].cost_change.macs == 0
    assert result.rewrites[0].cost_change.bytes < 0  # x is read once instead of three times


class Siblings(nn.Module):
    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x):
        return [torch.tanh(conv(x)) for conv in self.convs]


def _run_on(model: nn.Module, shape, run) -> tuple[torch.fx.GraphModule, PassResult, list]:
    model = model.double().eval()
    x = random_input(shape, dtype=F64)
    gm = repfuse.trace(model, x)
    before = signature(gm)
    result = run(gm)
    with torch.no_grad():
        expected, actual = reference64(model, x), gm(x)
    for e, a in zip(expected, actual, strict=True):
        assert rel_err(e, a) <= F64_RTOL
    return gm, result, before


@pytest.mark.parametrize(("convs", "reason"), [
    pytest.param((nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.Conv2d(4, 3, 3, padding=1)),
                 "strides differ", id="stride"),
    pytest.param((nn.Conv2d(4, 3, 3, padding=0), nn.Conv2d(4, 3, 3, padding=1)),
                 "paddings are misaligned", id="padding"),
    pytest.param((nn.Conv2d(4, 3, 2), nn.Conv2d(4, 3, 3)), "odd size difference",
                 id="even-odd-kernels"),
    pytest.param((nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 3, 1)), "raise MACs",
                 id="kernel-sizes-cost-more"),
    pytest.param((nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 3, padding=1,
                                                                      groups=4)),
                 "raise MACs", id="depthwise-densified"),
])
def test_siblings_that_cannot_merge_exactly_or_cheaply_are_declined(convs, reason) -> None:
    gm, result, before = _run_on(Siblings(*convs), (2, 4, 9, 9), merge_siblings)
    assert result.rewrites == []
    assert len(result.declined) == 1 and reason in result.declined[0].reason
    assert signature(gm) == before


def test_siblings_of_different_kernel_sizes_merge_when_costlier_is_allowed() -> None:
    model = Siblings(nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Conv2d(4, 2, 5,
                                                                               padding=2))
    gm, result, _ = _run_on(model, (2, 4, 9, 9),
                            lambda gm: run_passes(gm, [MergeSiblings(allow_costlier=True)]))
    assert result.counts() == {"merge_siblings": 1}
    (wide,) = [gm.get_submodule(p) for p in modules_of(gm, nn.Conv2d)]
    assert wide.kernel_size == (5, 5) and wide.padding == (2, 2) and wide.out_channels == 10


def test_only_the_largest_group_of_one_geometry_merges_by_default() -> None:
    model = Siblings(nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 2, 1),
                     nn.Conv2d(4, 5, 1))
    gm, result, _ = _run_on(model, (1, 4, 6, 6), merge_siblings)
    assert result.counts() == {"merge_siblings": 1}
    sizes = sorted(gm.get_submodule(p).out_channels for p in modules_of(gm, nn.Conv2d))
    assert sizes == [3, 10]  # the three 1x1s merged; the 3x3 would cost MACs
    assert "raise MACs" in result.declined[0].reason


class SummedSiblings(nn.Module):
    """Siblings that are added: merge_branches' business (one conv, no split)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_summed_siblings_are_left_to_merge_branches_in_the_pipeline() -> None:
    gm, result = fuse_checked(SummedSiblings(), random_input((2, 4, 6, 6)), run_pipeline)
    assert result.counts()["merge_branches"] == 1 and result.counts()["merge_siblings"] == 0
    assert calls_to(gm, torch.split) == 0 and len(modules_of(gm, nn.Conv2d)) == 1


class SharedSibling(nn.Module):
    """One sibling's module is also called on another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x, y):
        return torch.relu(self.a(x)) * torch.relu(self.b(x)) + self.a(y)


def test_a_sibling_called_elsewhere_keeps_its_module_for_the_other_call() -> None:
    model = SharedSibling().double().eval()
    x, y = random_input((2, 4, 5, 5), 1, F64), random_input((2, 4, 5, 5), 2, F64)
    gm = repfuse.trace(model, (x, y))
    result = merge_siblings(gm)
    assert result.counts() == {"merge_siblings": 1}
    assert "a" in modules_of(gm, nn.Conv2d)  # still called on y, with its own weights
    torch.testing.assert_close(gm.get_submodule("a").weight, model.a.weight)
    with torch.no_grad():
        assert rel_err(reference64(model, x, y), gm(x, y)) <= F64_RTOL


class QKV(nn.Module):
    """Self-attention's projections: three Linear layers on one token tensor."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 6)

    def forward(self, tokens):
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        attention = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return attention @ v


@DTYPES
def test_qkv_linears_become_one_linear_and_a_split(dtype) -> None:
    gm, result = fuse_checked(QKV(), random_input((2, 5, 8)), merge_siblings, dtype)
    assert result.counts() == {"merge_siblings": 1}
    (path,) = modules_of(gm, nn.Linear)
    assert gm.get_submodule(path).out_features == 22
    assert calls_to(gm, torch.split) == 1


def test_sibling_merge_keeps_macs_and_lowers_bytes_in_the_graph_cost() -> None:
    model = ThreePointwise().double().eval()
    x = random_input((2, 8, 7, 9), dtype=F64)
    gm = repfuse.trace(model, x)
    before = graph_cost(gm)
    merge_siblings(gm)
    after = graph_cost(gm)
    assert after.macs == before.macs and after.bytes < before.bytes
    assert after.ops["Conv2d"] == before.ops["Conv2d"] - 2
