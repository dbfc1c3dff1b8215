"""Idioms of real model code (timm, torchvision, official reparameterization repos), written
here from scratch in their shape, against the default pipeline.

Each model computes what a real block computes, spelled the way its authors spell it: an
assert on ``x.ndim`` inside a BatchNorm subclass, shapes read for a reshape, a global pool whose
kernel size is read from the input, a cropped ACNet branch, a subtracted RepMixer branch. Every
check is against the unfused model in float64.
"""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, F64_RTOL, calls_to, check_unchanged, fuse_checked, modules_of
from conftest import random_input as rand
from torch import nn

import repfuse
from repfuse.passes import (
    compose_linear,
    fold_batchnorm,
    merge_branches,
    resolve_metadata,
    run_pipeline,
)


def randomize_bn(model: nn.Module) -> nn.Module:
    return conftest.randomize_bn(model, seed=1, mean_std=0.5)


class CheckedBatchNormAct(nn.BatchNorm2d):
    """A BatchNorm with a fused activation, checking its input's rank first (the way timm's
    ``BatchNormAct2d`` does), normalizing with the functional form."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class ConvCheckedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = CheckedBatchNormAct(8)

    def forward(self, x):
        return self.bn(self.conv(x))


@DTYPES
def test_batchnorm_checking_its_input_rank_folds(dtype) -> None:
    model = randomize_bn(ConvCheckedBN())
    gm, result = fuse_checked(model, rand((2, 3, 8, 8)), dtype=dtype)
    assert calls_to(gm, F.batch_norm) == 0
    assert modules_of(gm, nn.Conv2d) == ["conv"]
    assert calls_to(gm, torch._assert) == 1  # only the input's rank, checked once
    assert result.counts()["fold_batchnorm"] == 1


def test_the_rank_guard_refuses_an_input_of_another_rank() -> None:
    model = randomize_bn(ConvCheckedBN())
    fused = repfuse.fuse(model, rand((2, 3, 8, 8)))
    with pytest.raises(AssertionError, match="rank 4"):
        fused(rand((3, 8, 8)))  # an unbatched input: the original's assert fails as well
    with pytest.raises(AssertionError):
        model(rand((3, 8, 8)))


def test_resolve_metadata_replaces_rank_reads_and_drops_the_dead_assert() -> None:
    model = randomize_bn(ConvCheckedBN()).double()
    x = rand((2, 3, 8, 8), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    getattrs = sum(1 for n in gm.graph.nodes if n.target is getattr)
    assert getattrs == 2  # x.ndim in the condition and in the message

    result = resolve_metadata(gm)

    assert sum(1 for n in gm.graph.nodes if n.target is getattr) == 0
    assert calls_to(gm, torch._assert) == 1  # the one added for the input's rank
    assert any("always holds" in r.detail for r in result.rewrites)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class ShapeReadForReshape(nn.Module):
    """Reads the conv output's shape, then normalizes and flattens with it (attention code
    reads ``B, C, H, W = x.shape`` before reshaping)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        batch, channels, height, width = y.shape
        y = self.bn(y)
        return y.reshape(batch, channels, height * width).transpose(1, 2)


@DTYPES
def test_shape_read_of_the_conv_output_moves_to_the_folded_conv(dtype) -> None:
    model = randomize_bn(ShapeReadForReshape())
    gm, result = fuse_checked(model, rand((2, 3, 7, 5)), fold_batchnorm, dtype=dtype)
    assert modules_of(gm, nn.BatchNorm2d) == []
    assert result.counts()["fold_batchnorm"] == 1
    with torch.no_grad():  # the shape is read at run time: other sizes work too
        other = rand((3, 3, 4, 9), dtype=dtype)
        expected = model.to(dtype)(other)
        assert torch.allclose(gm(other), expected, rtol=1e-4, atol=1e-5)


class ShapeReadBeforePool(nn.Module):
    """The conv output's shape is read, and the conv composes with a pool after it: the
    composed conv's output has another shape, so nothing stands for the read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        y = self.conv(x)
        size = y.shape[-1]
        return self.pool(y) * size


def test_a_shape_read_no_remaining_tensor_has_declines_the_rewrite() -> None:
    result, _ = check_unchanged(ShapeReadBeforePool(), (2, 3, 9, 9), compose_linear)
    (decline,) = result.declined
    assert "reads the metadata of 'conv' (Conv2d)" in decline.reason


class SqueezeExcite(nn.Module):
    """An SE block pooling with a kernel size read from its input (as the official RepVGG code
    writes it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, channels // 2, 1)
        self.up = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        return inputs * x.view(-1, inputs.size(1), 1, 1)


class ConvBNSE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = SqueezeExcite(8)

    def forward(self, x):
        return self.se(F.relu(self.bn(self.conv(x))))


@DTYPES
def test_a_pool_sized_from_its_input_does_not_stop_the_rest(dtype) -> None:
    model = randomize_bn(ConvBNSE())
    gm, result = fuse_checked(model, rand((2, 3, 6, 6)), dtype=dtype)
    assert modules_of(gm, nn.BatchNorm2d) == []
    assert result.counts()["fold_batchnorm"] == 1


class CroppedACBlock(nn.Module):
    """ACNet's asymmetric block without padding: the 1×k and k×1 branches read the input
    cropped so their outputs line up with the unpadded k×k branch."""

    def __init__(self, channels: int = 4, k: int = 3) -> None:
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(channels, channels, k, bias=False),
                                    nn.BatchNorm2d(channels))
        self.hor = nn.Sequential(nn.Conv2d(channels, channels, (1, k), bias=False),
                                 nn.BatchNorm2d(channels))
        self.ver = nn.Sequential(nn.Conv2d(channels, channels, (k, 1), bias=False),
                                 nn.BatchNorm2d(channels))
        self.crop = k // 2

    def forward(self, x):
        c = self.crop
        return (self.square(x) + self.hor(x[:, :, c:-c, :])
                + self.ver(x[:, :, :, c:-c]))


@DTYPES
@pytest.mark.parametrize("k", [3, 5])
def test_cropped_branches_merge_into_the_full_one(dtype, k) -> None:
    model = randomize_bn(CroppedACBlock(k=k))
    gm, result = fuse_checked(model, rand((2, 4, 9, 11)), dtype=dtype)
    assert len(modules_of(gm, nn.Conv2d)) == 1
    assert calls_to(gm, __import__("operator").getitem) == 0
    assert result.counts()["merge_branches"] == 1


class CropAlone(nn.Module):
    """A cropped branch added to an identity: the merged kernel would still crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, (1, 3))

    def forward(self, x):
        return self.conv(x[:, :, 1:-1, :]) + x[:, :, 1:-1, 1:-1]


def test_a_crop_left_over_declines_the_merge() -> None:
    result, _ = check_unchanged(CropAlone(), (2, 4, 7, 7), merge_branches)
    (decline,) = result.declined
    assert "negative padding" in decline.reason


class AsymmetricCrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.a(x[:, :, 1:, 1:]) + self.b(x[:, :, :-1, :-1])


def test_an_asymmetric_crop_says_why_it_stays() -> None:
    result, _ = check_unchanged(AsymmetricCrop(), (2, 4, 8, 8), merge_branches)
    (decline,) = result.declined
    assert "crops 1 and 0 pixels" in decline.reason


class RepMixerLike(nn.Module):
    """``x + γ · (mixer(x) − norm(x))`` (FastViT's RepMixer, in eval mode): a depthwise conv-BN
    minus a BN of the same input, layer-scaled, plus the input."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.mixer = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels,
                                             bias=False), nn.BatchNorm2d(channels))
        self.norm = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


@DTYPES
def test_a_subtracted_branch_merges_with_a_negated_kernel(dtype) -> None:
    model = randomize_bn(RepMixerLike())
    gm, result = fuse_checked(model, rand((2, 6, 8, 8)), dtype=dtype)
    assert modules_of(gm, nn.BatchNorm2d) == []
    assert len(modules_of(gm, nn.Conv2d)) == 1
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops == []  # one conv: the identity, the subtraction and the scale are in it
    assert result.counts()["merge_branches"] == 2


class SubtractWithAlpha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.sub(self.a(x), self.b(x), alpha=0.5) - torch.relu(x)


@DTYPES
def test_torch_sub_with_alpha_keeps_the_other_terms(dtype) -> None:
    gm, result = fuse_checked(SubtractWithAlpha(), rand((2, 4, 6, 6)), merge_branches,
                              dtype=dtype)
    assert len(modules_of(gm, nn.Conv2d)) == 1
    assert result.counts()["merge_branches"] == 1


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), torch.relu(y)


def test_the_decline_names_the_other_user() -> None:
    result, _ = check_unchanged(randomize_bn(TwoUsers()), (2, 3, 6, 6), fold_batchnorm)
    (decline,) = result.declined
    assert "also used elsewhere, by 'relu' (relu)" in decline.reason


def test_default_pipeline_on_the_idioms_leaves_no_batchnorm() -> None:
    for model, shape in ((ConvCheckedBN(), (1, 3, 8, 8)), (CroppedACBlock(), (1, 4, 7, 7)),
                         (RepMixerLike(), (1, 6, 5, 5)), (ConvBNSE(), (1, 3, 4, 4))):
        model = randomize_bn(model).double()
        x = rand(shape, dtype=torch.float64)
        gm = repfuse.trace(model, x)
        run_pipeline(gm)
        assert modules_of(gm, nn.BatchNorm2d) == [] and calls_to(gm, F.batch_norm) == 0
        with torch.no_grad():
            assert (gm(x) - model(x)).abs().max() <= F64_RTOL * model(x).abs().max()


class BrokenFold(repfuse.passes.FoldBatchNorm):
    """A pass with a bug: it raises on every batch norm it examines."""

    def visit(self, node, rewriter):
        if node.op == "call_module" and "bn" in node.target:
            raise ZeroDivisionError("a bug")
        return super().visit(node, rewriter)


class TwoConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.norm2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm2(self.conv2(self.bn(self.conv(x))))


def test_a_pass_that_raises_declines_that_candidate_and_fuses_the_rest(monkeypatch) -> None:
    from repfuse.errors import PassBugWarning
    from repfuse.passes.base import STRICT_ENV, run_passes

    monkeypatch.delenv(STRICT_ENV)
    model = randomize_bn(TwoConvBN()).double()
    x = rand((2, 3, 7, 7), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    with pytest.warns(PassBugWarning, match="repfuse bug: fold_batchnorm failed"):
        result = run_passes(gm, [BrokenFold()])
    assert modules_of(gm, nn.BatchNorm2d) == ["bn"]  # the candidate it choked on stays
    assert result.counts()["fold_batchnorm"] == 1  # norm2 still folds
    (decline,) = result.declined
    assert "internal error of fold_batchnorm" in decline.reason
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= F64_RTOL * model(x).abs().max()


def test_in_the_test_suite_a_pass_that_raises_fails_loudly() -> None:
    from repfuse.passes.base import run_passes

    gm = repfuse.trace(randomize_bn(TwoConvBN()), rand((2, 3, 7, 7)))
    with pytest.raises(ZeroDivisionError):
        run_passes(gm, [BrokenFold()])


class LinearNorm(nn.Module):
    """A Linear followed by BatchNorm1d over its channels, flattening batch and tokens first
    (LeViT's ``LinearNorm``)."""

    def __init__(self, cin: int = 6, cout: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ChannelsLastLinearBN(nn.Module):
    """A Linear on channels-last pixels, permuted back, then BatchNorm2d and a layer scale
    (the FFN of UniRepLKNet-style blocks)."""

    def __init__(self, channels: int = 5) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        self.bn = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        y = self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.gamma.view(1, -1, 1, 1) * self.bn(y)


class BNThenChannelsLastLinear(nn.Module):
    """BatchNorm2d, then the channels moved last for a Linear (the reverse direction)."""

    def __init__(self, channels: int = 5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, 3)

    def forward(self, x):
        return self.linear(self.bn(x).permute(0, 2, 3, 1))


@DTYPES
@pytest.mark.parametrize("model, shape", [
    pytest.param(LinearNorm, (3, 7, 6), id="linear-flatten-bn1d-reshape_as"),
    pytest.param(ChannelsLastLinearBN, (2, 5, 4, 6), id="linear-permute-bn2d-scale"),
    pytest.param(BNThenChannelsLastLinear, (2, 5, 4, 6), id="bn2d-permute-linear"),
])
def test_batchnorm_folds_across_layout_ops(dtype, model, shape) -> None:
    model = randomize_bn(model())
    gm, result = fuse_checked(model, rand(shape), dtype=dtype)
    assert modules_of(gm, nn.BatchNorm1d, nn.BatchNorm2d) == []
    assert calls_to(gm, __import__("operator").mul) == 0  # the layer scale folded too
    assert len(modules_of(gm, nn.Linear)) == 1
    assert result.counts()["fold_batchnorm"] == 1


class MixingReshape(nn.Module):
    """The Linear's channels are spread over two axes before the BatchNorm: no fold."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.linear(x)  # N x 6
        return self.bn(y.reshape(-1, 3, 2))


def test_a_reshape_that_mixes_the_channels_keeps_the_batchnorm() -> None:
    result, _ = check_unchanged(randomize_bn(MixingReshape()), (4, 4), fold_batchnorm)
    (decline,) = result.declined
    assert "do not keep the layer's channel axis" in decline.reason


class FlattenIntoChannels(nn.Module):
    """A conv output flattened (channels with space) then BatchNorm1d over the flat axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x):
        return self.bn(self.conv(x).flatten(1))


def test_a_flatten_that_merges_the_channel_axis_keeps_the_batchnorm() -> None:
    result, _ = check_unchanged(randomize_bn(FlattenIntoChannels()), (4, 2, 2, 2),
                                fold_batchnorm)
    (decline,) = result.declined
    assert "do not keep the layer's channel axis" in decline.reason


class ASPPLike(nn.Module):
    """Atrous spatial pyramid pooling's conv branches (DeepLab): a 1x1 and 3x3 convs of large
    dilations on one input, concatenated. One conv would need a 9x9 kernel of dilation 6."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(channels, 2, 1)]
            + [nn.Conv2d(channels, 2, 3, padding=d, dilation=d) for d in (6, 12, 24)])

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


def test_dilated_branches_are_priced_before_any_dense_kernel_is_built(monkeypatch) -> None:
    import repfuse.algebra as algebra

    built = []
    real = algebra.redilate  # densify and alignment write dilated kernels through it

    def redilate(kernel, dilation):
        if kernel.weight.device.type != "meta":
            built.append(kernel.kernel_size)
        return real(kernel, dilation)

    monkeypatch.setattr(algebra, "redilate", redilate)
    result, _ = check_unchanged(ASPPLike(), (1, 4, 30, 30), merge_branches)
    (decline,) = result.declined
    assert "expands dilated kernels densely and costs more" in decline.reason
    assert built == []


def test_dilated_branches_merge_when_asked_even_if_costlier() -> None:
    from repfuse.passes.base import run_passes

    model = ASPPLike().double()
    x = rand((1, 4, 30, 30), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    result = run_passes(gm, [repfuse.passes.MergeBranches(allow_costlier=True)])
    assert result.counts()["merge_branches"] == 1
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    # dilations 6, 12, 24 and a 1x1: written in their common dilation 6, a 9x9 covers 49x49
    assert conv.kernel_size == (9, 9) and conv.dilation == (6, 6)
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= F64_RTOL * model(x).abs().max()


class DeadHead(nn.Module):
    """A head whose second branch eval mode computes and drops (a detection model's
    training-only one-to-many head): dead code, removed before the siblings merge."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.live = nn.Conv2d(4, 2, 1)
        self.dead = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        unused = self.dead(y)
        unused = unused.sigmoid() * 2
        return self.live(y)


class DeadButImpure(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        torch.randn_like(y)  # dropping it would change the random numbers drawn after it
        y.add_(1.0)  # in place: its result is unused, its effect is not
        return y


def test_dead_code_is_removed_but_not_effects() -> None:
    from repfuse.passes import remove_noops

    model = DeadHead().double().eval()
    x = rand((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    result = remove_noops(gm)
    assert sorted(modules_of(gm, nn.Conv2d)) == ["live", "stem"]
    assert sum("nothing reads" in r.detail for r in result.rewrites) == 3
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))

    impure = DeadButImpure().double().eval()
    gm = repfuse.trace(impure, x)
    before = [n.target for n in gm.graph.nodes]
    remove_noops(gm)
    assert [n.target for n in gm.graph.nodes] == before


def test_layers_a_rewrite_creates_are_in_the_graphs_mode() -> None:
    gm, _ = fuse_checked(randomize_bn(ConvCheckedBN()), rand((1, 3, 5, 5)))
    assert not gm.training
    assert all(not m.training for m in gm.modules())


class MixedConvBN(nn.Module):
    """MixNet's mixed depthwise conv: channel groups convolved with different kernel sizes,
    concatenated, then one BatchNorm over all of them."""

    def __init__(self, splits=(3, 2, 3)) -> None:
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, 2 * i + 3, padding=i + 1, groups=c, bias=False)
            for i, c in enumerate(splits))
        self.bn = nn.BatchNorm2d(sum(splits))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.relu(self.bn(torch.cat([c(p) for c, p in zip(self.convs, parts,
                                                                    strict=True)], 1)))


@DTYPES
def test_batchnorm_after_a_channel_concat_of_convs_folds_into_each(dtype) -> None:
    model = randomize_bn(MixedConvBN())
    gm, result = fuse_checked(model, rand((2, 8, 7, 7)), dtype=dtype)
    assert modules_of(gm, nn.BatchNorm2d) == []
    assert sorted(modules_of(gm, nn.Conv2d)) == ["convs.0", "convs.1", "convs.2"]
    assert result.counts()["fold_batchnorm"] == 1


class ConcatWithInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), x], 1))


def test_batchnorm_after_a_concat_with_a_non_layer_stays() -> None:
    result, _ = check_unchanged(randomize_bn(ConcatWithInput()), (2, 3, 5, 5), fold_batchnorm)
    (decline,) = result.declined
    assert "concatenates 'x', which is not a conv/linear layer" in decline.reason


class NegativePadCrop(nn.Module):
    """ACNet's cropped branches written with a negative pad (``F.pad(x, [0, 0, -1, -1])``)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.square = nn.Conv2d(channels, channels, 3)
        self.hor = nn.Conv2d(channels, channels, (1, 3))
        self.ver = nn.Conv2d(channels, channels, (3, 1))

    def forward(self, x):
        return (self.square(x) + self.hor(F.pad(x, [0, 0, -1, -1]))
                + self.ver(F.pad(x, [-1, -1])))


@DTYPES
def test_a_negative_pad_is_a_crop(dtype) -> None:
    gm, result = fuse_checked(NegativePadCrop(), rand((2, 4, 8, 9)), dtype=dtype)
    assert len(modules_of(gm, nn.Conv2d)) == 1 and calls_to(gm, F.pad) == 0
    assert result.counts()["merge_branches"] == 1
