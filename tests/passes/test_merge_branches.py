"""``merge_branches``: linear branches of one input, added or concatenated, become one conv.

Train-form blocks of the reparameterization papers (RepVGG, ACNet, MobileOne, RepLKNet,
UniRepLKNet, RepViT, DBB), written with modules, functionally, and with every spelling of the
sum, are fused by the default pipeline (or by ``fold_batchnorm`` then ``merge_branches``).
Each positive case checks the graph (one conv left, no batch norm, no add/cat, the rewrite
counts) and the numbers against the unfused model in float64: 1e-10 for a float64 fold, 1e-5
for a float32 one. Negative cases check that the graph is unchanged (or that only the mergeable
part changed), that the reason is given, and that the outputs still match.
"""

from __future__ import annotations

import operator
from operator import setitem

import pytest
import torch
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
from repfuse.passes import PassResult, fold_batchnorm, merge_branches, run_pipeline

# fx cannot record `y[index] = v` on a Proxy; a wrapped global `setitem` records it as an
# operator.setitem call_function node (whose generated code is the slice assignment).
torch.fx.wrap("setitem")

F64 = torch.float64
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADDS = (operator.add, torch.add, "add")
CATS = (torch.cat, torch.concat, torch.concatenate)
CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM_CLS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    return randomize_bn_stats(model, seed).eval()


def conv_bn(in_ch: int, out_ch: int, kernel, stride=1, padding=0, groups=1, dilation=1,
            dims: int = 2) -> nn.Sequential:
    """conv (no bias) → batch norm, the train-form branch of every paper here."""
    return nn.Sequential(
        CONV_CLS[dims](in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False),
        NORM_CLS[dims](out_ch),
    )


def fold_then_merge(gm) -> PassResult:
    """``fold_batchnorm`` then ``merge_branches`` alone; the result of the merge."""
    fold_batchnorm(gm)
    return merge_branches(gm)


def applied(result: PassResult) -> dict[str, int]:
    return {name: n for name, n in result.counts().items() if n}


def assert_one_conv(gm, cls: type = nn.Conv2d) -> nn.Module:
    """Exactly one conv module, no norm, no add, no cat, no functional conv: returns it."""
    convs = modules_of(gm, *CONVS)
    assert len(convs) == 1, convs
    assert modules_of(gm, _BatchNorm) == []
    assert calls_to(gm, *ADDS, *CATS) == 0
    assert calls_to(gm, F.conv1d, F.conv2d, F.conv3d, F.batch_norm) == 0
    conv = gm.get_submodule(convs[0])
    assert type(conv) is cls
    return conv


# --- RepVGG ---------------------------------------------------------------------------------

class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): 3x3 conv-BN + 1x1 conv-BN + BN identity, then ReLU."""

    def __init__(self, channels: int = 4, groups: int = 1, stride: int = 1, dims: int = 2,
                 identity: bool = True) -> None:
        super().__init__()
        self.dense = conv_bn(channels, channels, 3, stride, 1, groups, dims=dims)
        self.pointwise = conv_bn(channels, channels, 1, stride, 0, groups, dims=dims)
        self.identity = NORM_CLS[dims](channels) if identity else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


@DTYPES
@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "groups2"])
def test_repvgg_block_becomes_one_conv(groups: int, dtype: torch.dtype) -> None:
    model = randomized(RepVGGBlock(groups=groups))
    gm, result = fuse_checked(model, random_input((2, 4, 8, 9)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 2, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.groups == groups
    assert calls_to(gm, torch.relu) == 1
    merge = next(r for r in result.rewrites if r.pass_name == "merge_branches")
    assert set(merge.module_paths) == {"dense.0", "dense.1", "pointwise.0", "pointwise.1",
                                       "identity"}


@DTYPES
def test_repvgg_block_with_merge_branches_alone_after_fold_batchnorm(dtype) -> None:
    model = randomized(RepVGGBlock())
    gm, result = fuse_checked(model, random_input((2, 4, 7, 8)), fold_then_merge, dtype)

    assert result.counts() == {"merge_branches": 1}
    assert result.declined == []
    assert_one_conv(gm)


@DTYPES
def test_repvgg_block_with_stride_2_and_no_identity(dtype: torch.dtype) -> None:
    model = randomized(RepVGGBlock(stride=2, identity=False))
    gm, result = fuse_checked(model, random_input((2, 4, 9, 8)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 2, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)


@DTYPES
@pytest.mark.parametrize("dims", [1, 3], ids=["conv1d", "conv3d"])
def test_repvgg_block_in_1d_and_3d(dims: int, dtype: torch.dtype) -> None:
    model = randomized(RepVGGBlock(dims=dims))
    shape = {1: (2, 4, 11), 3: (2, 4, 5, 6, 4)}[dims]

    gm, result = fuse_checked(model, random_input(shape), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 2, "merge_branches": 1}
    conv = assert_one_conv(gm, CONV_CLS[dims])
    assert conv.kernel_size == (3,) * dims


# --- ACNet, MobileOne, RepLKNet, UniRepLKNet, RepViT ------------------------------------------

class ACNetBlock(nn.Module):
    """ACNet (Ding et al. 2019): 3x3 + 1x3 + 3x1 conv-BN, summed by ``sum`` in another order."""

    def __init__(self, in_ch: int = 3, out_ch: int = 5) -> None:
        super().__init__()
        self.square = conv_bn(in_ch, out_ch, 3, padding=1)
        self.horizontal = conv_bn(in_ch, out_ch, (1, 3), padding=(0, 1))
        self.vertical = conv_bn(in_ch, out_ch, (3, 1), padding=(1, 0))

    def forward(self, x):
        return sum([self.horizontal(x), self.square(x), self.vertical(x)])


@DTYPES
def test_acnet_block_summed_with_sum_becomes_one_conv(dtype: torch.dtype) -> None:
    model = randomized(ACNetBlock())
    gm, result = fuse_checked(model, random_input((2, 3, 8, 7)), run_pipeline, dtype)

    # sum() starts from 0: the `0 + a` goes first, then three BN folds and one merge.
    assert applied(result) == {"remove_noops": 1, "fold_batchnorm": 3, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (3, 3) and conv.out_channels == 5


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al. 2023) depthwise stage: k × dw3x3-BN + dw1x1-BN + BN skip."""

    def __init__(self, channels: int = 6, k: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(channels, channels, 3, padding=1, groups=channels) for _ in range(k))
        self.scale = conv_bn(channels, channels, 1, groups=channels)
        self.skip = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.skip(x) + self.scale(x)
        for branch in self.branches:
            y = y + branch(x)
        return torch.relu(y)


@DTYPES
def test_mobileone_depthwise_block_stays_depthwise(dtype: torch.dtype) -> None:
    model = randomized(MobileOneBlock())
    gm, result = fuse_checked(model, random_input((2, 6, 9, 8)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 5, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.groups == conv.in_channels == conv.out_channels == 6
    assert conv.weight.shape == (6, 1, 3, 3)


class RepLKBlock(nn.Module):
    """RepLKNet (Ding et al. 2022): depthwise 13x13 conv-BN + depthwise 5x5 conv-BN."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.large = conv_bn(channels, channels, 13, padding=6, groups=channels)
        self.small = conv_bn(channels, channels, 5, padding=2, groups=channels)

    def forward(self, x):
        return self.large(x) + self.small(x)


@DTYPES
def test_replknet_large_and_small_kernel_merge(dtype: torch.dtype) -> None:
    model = randomized(RepLKBlock())
    gm, result = fuse_checked(model, random_input((2, 4, 15, 14)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 2, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (13, 13) and conv.padding == (6, 6) and conv.groups == 4


class UniRepLKBlock(nn.Module):
    """UniRepLKNet (Ding et al. 2024): dense depthwise 7x7 plus dilated 3x3 (d=2, d=3), -BN."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.dilated2 = conv_bn(channels, channels, 3, padding=2, dilation=2, groups=channels)
        self.large = conv_bn(channels, channels, 7, padding=3, groups=channels)
        self.dilated3 = conv_bn(channels, channels, 3, padding=3, dilation=3, groups=channels)

    def forward(self, x):
        return self.dilated2(x) + self.large(x) + self.dilated3(x)


@DTYPES
def test_unireplknet_dilated_branches_merge_into_dense_kernel(dtype: torch.dtype) -> None:
    model = randomized(UniRepLKBlock())
    gm, result = fuse_checked(model, random_input((2, 4, 12, 13)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 3, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (7, 7) and conv.dilation == (1, 1) and conv.groups == 4


class SharedDilationBlock(nn.Module):
    """Two depthwise branches with the same dilation 2: 3x3 (reach 5) first, then 5x5 (9)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.small = conv_bn(channels, channels, 3, padding=2, dilation=2, groups=channels)
        self.large = conv_bn(channels, channels, 5, padding=4, dilation=2, groups=channels)

    def forward(self, x):
        return self.small(x) + self.large(x)


def test_branches_sharing_one_dilation_merge_exactly() -> None:
    model = randomized(SharedDilationBlock()).double()
    x = random_input((2, 4, 14, 13), dtype=F64)
    expected = reference64(model, x)

    fused = repfuse.fuse(model, x)

    with torch.no_grad():
        actual = fused(x)
    assert actual.shape == expected.shape
    assert rel_err(expected, actual) <= F64_RTOL


class RepViTMixer(nn.Module):
    """RepViT (Wang et al. 2024): dw3x3-BN + dw1x1 conv (bias) + identity, then BN."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.dw3 = conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.dw1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.dw3(x) + self.dw1(x) + x)


@DTYPES
def test_repvit_mixer_with_norm_after_the_sum_becomes_one_conv(dtype: torch.dtype) -> None:
    model = randomized(RepViTMixer())
    gm, result = fuse_checked(model, random_input((2, 6, 8, 8)), run_pipeline, dtype)

    assert applied(result) == {"fold_batchnorm": 2, "merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.groups == 6 and conv.kernel_size == (3, 3)


# --- functional spellings -------------------------------------------------------------------

SUMS = {
    "operator": lambda a, b: a + b,
    "torch.add": torch.add,
    "method": lambda a, b: a.add(b),
}


class FunctionalRepVGG(nn.Module):
    """``F.conv2d(x, w3, None, 1, 1) + F.conv2d(x, w1) + x`` with plain parameters."""

    def __init__(self, add, channels: int = 4) -> None:
        super().__init__()
        self.add = add
        self.kernel_3x3 = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.3)
        self.pointwise_weight = nn.Parameter(torch.randn(channels, channels, 1, 1) * 0.3)

    def forward(self, x):
        a = F.conv2d(x, self.kernel_3x3, None, 1, 1)
        b = F.conv2d(x, self.pointwise_weight)
        return self.add(self.add(a, b), x)


@DTYPES
@pytest.mark.parametrize("spelling", list(SUMS))
def test_functional_block_becomes_one_conv(spelling: str, dtype: torch.dtype) -> None:
    model = FunctionalRepVGG(SUMS[spelling])
    gm, result = fuse_checked(model, random_input((2, 4, 7, 8)), run_pipeline, dtype)

    assert applied(result) == {"merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert "kernel_3x3" not in gm.state_dict() and "pointwise_weight" not in gm.state_dict()


class PartlyLinear(nn.Module):
    """``relu(conv_a(x)) + conv_b(x) + conv_c(x)``: only b and c are linear in ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv_a(x)) + self.conv_b(x) + self.conv_c(x)


@DTYPES
def test_partial_merge_keeps_the_nonlinear_branch(dtype: torch.dtype) -> None:
    gm, result = fuse_checked(PartlyLinear(), random_input((2, 4, 7, 7)), merge_branches, dtype)

    assert result.counts() == {"merge_branches": 1}
    assert set(result.rewrites[0].module_paths) == {"conv_b", "conv_c"}
    assert sorted(modules_of(gm, nn.Conv2d)) == ["conv_a", "conv_b"]
    assert calls_to(gm, torch.relu) == 1 and calls_to(gm, *ADDS) == 1


# --- Diverse Branch Block (DBB) -------------------------------------------------------------

class DBBChain(nn.Module):
    """conv1x1 (no bias) → zero ``F.pad`` 1 → conv3x3 p0 → BN, plus a 3x3 conv-BN branch."""

    def __init__(self, in_ch: int = 4, out_ch: int = 6) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_ch, in_ch, 1, bias=False)
        self.expand = conv_bn(in_ch, out_ch, 3)
        self.square = conv_bn(in_ch, out_ch, 3, padding=1)

    def forward(self, x):
        chain = self.expand(F.pad(self.reduce(x), [1, 1, 1, 1]))
        return self.square(x) + chain


@DTYPES
def test_dbb_chain_branch_becomes_one_conv(dtype: torch.dtype) -> None:
    model = randomized(DBBChain())
    gm, result = fuse_checked(model, random_input((2, 4, 8, 7)), run_pipeline, dtype)

    conv = assert_one_conv(gm)
    assert calls_to(gm, F.pad) == 0
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert result.counts()["merge_branches"] == 1


class BNAndPad(nn.Module):
    """DBB's BN-and-pad layer: the norm's output padded with the norm's bias value."""

    def __init__(self, channels: int, pad: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        y = self.bn(x)
        p = self.pad
        y = F.pad(y, [p, p, p, p])
        bn = self.bn
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        v = v.view(1, -1, 1, 1)
        every = slice(None)
        setitem(y, (every, every, slice(0, p), every), v)  # y[:, :, 0:p, :] = v
        setitem(y, (every, every, slice(-p, None), every), v)  # y[:, :, -p:, :] = v
        setitem(y, (every, every, every, slice(0, p)), v)  # y[:, :, :, 0:p] = v
        setitem(y, (every, every, every, slice(-p, None)), v)  # y[:, :, :, -p:] = v
        return y


class DiverseBranchBlock(nn.Module):
    """DBB (Ding et al. 2021): 3x3-BN, 1x1-BN, 1x1 → BN-and-pad → 3x3 → BN, 1x1 → BN-and-pad
    → avg-pool 3 → BN; all summed."""

    def __init__(self, in_ch: int = 4, out_ch: int = 6) -> None:
        super().__init__()
        self.origin = conv_bn(in_ch, out_ch, 3, padding=1)
        self.pointwise = conv_bn(in_ch, out_ch, 1)
        self.kxk_idconv = nn.Conv2d(in_ch, in_ch, 1, bias=False)
        self.kxk_bnpad = BNAndPad(in_ch)
        self.kxk = conv_bn(in_ch, out_ch, 3)
        self.avg_conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.avg_bnpad = BNAndPad(out_ch)
        self.avg = nn.AvgPool2d(3, 1, 0)
        self.avg_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        out = self.origin(x)
        out = out + self.pointwise(x)
        out = out + self.kxk(self.kxk_bnpad(self.kxk_idconv(x)))
        out = out + self.avg_bn(self.avg(self.avg_bnpad(self.avg_conv(x))))
        return out


def assert_dbb_fused(gm, result: PassResult) -> None:
    conv = assert_one_conv(gm)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.groups == 1
    assert calls_to(gm, F.pad, operator.setitem) == 0
    assert modules_of(gm, nn.AvgPool2d) == []
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    counts = result.counts()
    assert counts["merge_padding"] == 2 and counts["fold_constants"] > 0


@DTYPES
def test_diverse_branch_block_becomes_one_conv(dtype: torch.dtype) -> None:
    model = randomized(DiverseBranchBlock())
    gm, result = fuse_checked(model, random_input((2, 4, 9, 8)), run_pipeline, dtype)
    assert_dbb_fused(gm, result)


def pipeline_until_unchanged(gm) -> PassResult:
    """``run_pipeline`` repeated until a run rewrites nothing (works around the bug above)."""
    result = run_pipeline(gm)
    for _ in range(5):
        again = run_pipeline(gm)
        if not again.rewrites:
            return result
        result.extend(again)
    raise AssertionError("the pipeline keeps rewriting")


@DTYPES
def test_diverse_branch_block_rules_are_exact_when_the_pipeline_is_rerun(dtype) -> None:
    """Every rule a DBB needs applies, exactly, once the pipeline gets another run."""
    model = randomized(DiverseBranchBlock())
    gm, result = fuse_checked(model, random_input((2, 4, 9, 8)), pipeline_until_unchanged,
                              dtype)
    assert_dbb_fused(gm, result)


class DBBWithNonlinearBranch(DiverseBranchBlock):
    """3x3-BN + 1x1-BN + 1x1 → BN-and-pad → 3x3 → BN, plus ``relu(conv1x1(x))``, summed."""

    def forward(self, x):
        out = self.origin(x) + self.pointwise(x)
        out = out + self.kxk(self.kxk_bnpad(self.kxk_idconv(x)))
        return out + torch.relu(self.avg_conv(x))


def test_dbb_chain_merges_after_a_partial_merge_of_the_sum() -> None:
    model = randomized(DBBWithNonlinearBranch()).double()
    gm, result = fuse_checked(model, random_input((2, 4, 9, 8)), run_pipeline, F64)

    assert sorted(modules_of(gm, nn.Conv2d)) == ["avg_conv", "origin.0"]
    assert calls_to(gm, *ADDS) == 1 and calls_to(gm, torch.relu) == 1


# --- concatenation --------------------------------------------------------------------------

class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(4, 3, 1)
        self.square = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.pointwise(x), self.square(x)], 1)


@DTYPES
def test_concat_of_two_convs_becomes_one_conv(dtype: torch.dtype) -> None:
    gm, result = fuse_checked(Inception(), random_input((2, 4, 7, 8)), run_pipeline, dtype)

    assert applied(result) == {"merge_branches": 1}
    conv = assert_one_conv(gm)
    assert conv.out_channels == 8 and conv.kernel_size == (3, 3)


class ConcatWithNonlinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 3, 1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)
        self.c = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), torch.relu(self.c(x))], 1)


@DTYPES
def test_concat_keeps_a_nonlinear_item(dtype: torch.dtype) -> None:
    gm, result = fuse_checked(ConcatWithNonlinear(), random_input((2, 4, 7, 8)), merge_branches,
                              dtype)

    assert applied(result) == {"merge_branches": 1}
    assert set(result.rewrites[0].module_paths) == {"a", "b"}
    assert len(modules_of(gm, nn.Conv2d)) == 2 and "c" in modules_of(gm, nn.Conv2d)
    assert calls_to(gm, torch.relu) == 1 and calls_to(gm, *CATS) == 1


# --- declines and non-candidates: graph unchanged, outputs unchanged ------------------------


class StridedMismatch(nn.Module):
    """2x2 stride 2 + 1x1 stride 2: equal output shapes, but a 1x1 cannot be centred in 2x2."""

    def __init__(self) -> None:
        super().__init__()
        self.even = nn.Conv2d(4, 4, 2, stride=2)
        self.pointwise = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        return self.even(x) + self.pointwise(x)


def test_declines_branches_with_odd_size_difference() -> None:
    result, _ = check_unchanged(StridedMismatch(), (2, 4, 8, 8), merge_branches)

    assert [d.node for d in result.declined] == ["add"]
    assert "odd size difference" in result.declined[0].reason


class Misaligned(nn.Module):
    """3x3 p0 and 1x1 p0, both stride 3: on 9x9 both give 3x3, but the 1x1 reads the 3x3's
    corner tap, not its centre."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Conv2d(4, 4, 3, stride=3)
        self.pointwise = nn.Conv2d(4, 4, 1, stride=3)

    def forward(self, x):
        return self.square(x) + self.pointwise(x)


def test_declines_misaligned_paddings() -> None:
    result, _ = check_unchanged(Misaligned(), (2, 4, 9, 9), merge_branches)

    assert len(result.declined) == 1 and "misaligned" in result.declined[0].reason


class StrideMismatchSameShape(nn.Module):
    """On a 3x3 input a 3x3 stride-2 conv padded by 2 and a 1x1 stride-1 conv both give 3x3
    outputs, so they add; but no single conv has both strides."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(4, 4, 3, stride=2, padding=2)
        self.pointwise = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.strided(x) + self.pointwise(x)


def test_declines_branches_with_different_strides() -> None:
    result, _ = check_unchanged(StrideMismatchSameShape(), (2, 4, 3, 3), merge_branches)

    assert [d.node for d in result.declined] == ["add"]
    assert "strides differ" in result.declined[0].reason


class MisalignedConcat(Misaligned):
    def forward(self, x):
        return torch.cat([self.square(x), self.pointwise(x)], 1)


def test_declines_misaligned_concat() -> None:
    result, _ = check_unchanged(MisalignedConcat(), (2, 4, 9, 9), merge_branches)

    assert [d.node for d in result.declined] == ["cat"]
    assert "misaligned" in result.declined[0].reason


class DifferentInputs(nn.Module):
    """A 3x3 stride-2 conv of ``x`` and a 1x1 conv of ``x[::2, ::2]``: equal shapes, but the
    branches read different tensors, so there is nothing to merge."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1, stride=1)

    def forward(self, x):
        return self.strided(x) + self.pointwise(x[:, :, ::2, ::2])


def test_branches_on_different_inputs_are_not_merged() -> None:
    result, _ = check_unchanged(DifferentInputs(), (2, 4, 8, 8), merge_branches)
    assert result.declined == []


class ReflectPlusZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.pointwise = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.reflect(x) + self.pointwise(x)


def test_reflect_padded_branch_is_not_lifted_and_says_why() -> None:
    result, gm = check_unchanged(ReflectPlusZero(), (2, 4, 7, 7), merge_branches)
    assert sorted(modules_of(gm, nn.Conv2d)) == ["pointwise", "reflect"]
    assert len(result.declined) == 1
    assert "pads with 'reflect'" in result.declined[0].reason
    assert "reflect" in result.declined[0].module_paths


class OnlyOtherBranchNonlinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv_a(x)) + self.conv_b(x)


def test_nonlinear_other_branch_leaves_nothing_to_merge() -> None:
    result, _ = check_unchanged(OnlyOtherBranchNonlinear(), (2, 4, 6, 6), run=run_pipeline)
    # Only horizontal fusion looks at the two convs, and finds it would cost MACs.
    assert [(d.pass_name, "raise MACs" in d.reason) for d in result.declined] == [
        ("merge_siblings", True)]


class BranchOutputReused(nn.Module):
    def __init__(self, third: bool) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(4, 4, 1) if third else None

    def forward(self, x):
        a = self.conv_a(x)
        y = a + self.conv_b(x)
        if self.conv_c is not None:
            y = y + self.conv_c(x)
        return y, a


def test_branch_read_elsewhere_is_not_merged() -> None:
    _, gm = check_unchanged(BranchOutputReused(third=False), (2, 4, 6, 6), merge_branches)
    assert "conv_a" in modules_of(gm, nn.Conv2d)


def test_branch_read_elsewhere_survives_a_merge_of_the_others() -> None:
    model = BranchOutputReused(third=True).double()
    x = random_input((2, 4, 6, 7), dtype=F64)
    expected = reference64(model, x)
    gm = repfuse.trace(model, x)

    result = merge_branches(gm)

    assert result.counts() == {"merge_branches": 1}
    assert set(result.rewrites[0].module_paths) == {"conv_b", "conv_c"}
    assert sorted(modules_of(gm, nn.Conv2d)) == ["conv_a", "conv_b"]
    with torch.no_grad():
        out, a = gm(x)
    assert rel_err(expected[0], out) <= F64_RTOL and rel_err(expected[1], a) <= F64_RTOL


class BiasedPointwiseIntoPadded(nn.Module):
    """A branch conv1x1 (bias) → conv3x3 p1: the zero padding would see the bias, so the
    chain stops at the 1x1 and this branch reads the 1x1's output, not ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(4, 4, 1, bias=True)
        self.expand = nn.Conv2d(4, 4, 3, padding=1)
        self.square = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.expand(self.reduce(x)) + self.square(x)


def test_biased_1x1_into_padded_3x3_stops_the_chain() -> None:
    _, gm = check_unchanged(BiasedPointwiseIntoPadded(), (2, 4, 6, 7), merge_branches)
    assert sorted(modules_of(gm, nn.Conv2d)) == ["expand", "reduce", "square"]


def test_biased_1x1_into_padded_3x3_survives_the_pipeline() -> None:
    model = BiasedPointwiseIntoPadded().double()
    x = random_input((2, 4, 6, 7), dtype=F64)
    gm, result = fuse_checked(model, x, run_pipeline, F64)

    assert result.rewrites == []
    assert "reduce" in modules_of(gm, nn.Conv2d)
    reasons = [d.reason for d in result.declined if d.pass_name == "compose_linear"]
    assert len(reasons) == 1 and "bias" in reasons[0]
