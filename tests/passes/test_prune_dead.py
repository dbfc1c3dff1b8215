"""``prune_dead``: channels and heads that are constant or unread leave the graph, exactly.

Positive cases check the layers' channel counts, the MACs (computed by hand from the shapes) and
the numbers against the unpruned model in float64 (1e-10 for float64, 1e-5 for float32). Each
decline reason has a negative case: the reason is asserted and the graph and its outputs are
unchanged (``check_unchanged``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    F64_RTOL,
    check_unchanged,
    fuse_checked,
    modules_of,
    random_input,
    reference64,
    rel_err,
)
from torch import nn

import repfuse
from repfuse.cost import graph_cost
from repfuse.models import randomize_bn_stats
from repfuse.models.attention import SelfAttention
from repfuse.passes import PruneDead, prune_dead, run_passes, run_pipeline

F64 = torch.float64


def dead_rows(layer: nn.Module, rows: list[int], bias: list[float] | None = None) -> None:
    """Zero the filters of output channels ``rows`` (and set their bias): constant channels."""
    with torch.no_grad():
        layer.weight[rows] = 0
        if bias is not None:
            layer.bias[rows] = torch.tensor(bias, dtype=layer.bias.dtype)


def conv_macs(batch: int, c_in: int, c_out: int, k: int, h: int, w: int, groups: int = 1) -> int:
    """MACs of a conv producing ``batch x c_out x h x w``."""
    return batch * c_out * h * w * (c_in // groups) * k * k


def pruned(result) -> list:
    return [r for r in result.rewrites if r.pass_name == "prune_dead"]


# --- constant channels into pointwise readers ---------------------------------------------------


class SlimUnit(nn.Module):
    """conv3x3 -> BN with γ = 0 on two channels -> ReLU -> a reader (1x1 conv or padded 3x3)."""

    def __init__(self, reader_kernel: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.reader = nn.Conv2d(8, 4, reader_kernel, padding=reader_kernel // 2)
        randomize_bn_stats(self, seed=2)
        with torch.no_grad():
            self.bn.weight[[2, 5]] = 0  # network slimming: γ = 0, β stays
            self.bn.bias[2], self.bn.bias[5] = 0.7, -0.3

    def forward(self, x):
        return self.reader(torch.relu(self.bn(self.conv(x))))


@DTYPES
def test_bn_gamma_zero_channels_leave_conv_and_fold_into_a_pointwise_reader(dtype) -> None:
    x = random_input((2, 3, 8, 8))

    gm, result = fuse_checked(SlimUnit(), x, run_pipeline, dtype)

    assert result.counts()["prune_dead"] == 1
    assert (gm.get_submodule("conv").out_channels, gm.get_submodule("reader").in_channels) == (
        6, 6)
    assert graph_cost(gm).macs == conv_macs(2, 3, 6, 3, 8, 8) + conv_macs(2, 6, 4, 1, 8, 8)
    rewrite = pruned(result)[0]
    assert rewrite.exact and "[2, 5]" in rewrite.detail and "folded into its bias" in rewrite.detail
    assert rewrite.cost_before.macs - rewrite.cost_after.macs == conv_macs(2, 3, 2, 3, 8, 8) + (
        conv_macs(2, 2, 4, 1, 8, 8))


@DTYPES
def test_only_the_zero_constant_leaves_for_a_padded_reader(dtype) -> None:
    """relu(-0.3) = 0 is what the padding holds too; relu(0.7) is not, and stays."""
    x = random_input((2, 3, 8, 8))

    gm, result = fuse_checked(SlimUnit(reader_kernel=3), x, run_pipeline, dtype)

    assert gm.get_submodule("conv").out_channels == 7
    assert "[5]" in pruned(result)[0].detail
    [decline] = [d for d in result.declined if d.pass_name == "prune_dead"]
    assert decline.reason == (
        "channel 2 of 'conv' (Conv2d) is the constant 0.7 where 'reader' (Conv2d) reads it, "
        "but 'reader' (Conv2d) is a zero-padded 3x3 conv: at the border it reads the "
        "padding's 0, not the constant")


class PoolHead(nn.Module):
    """conv3x3 -> ReLU -> global average pool -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        dead_rows(self.conv, [0, 4], [0.5, 0.25])

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


@DTYPES
def test_a_constant_passes_a_global_pool_into_the_linear_head(dtype) -> None:
    gm, result = fuse_checked(PoolHead(), random_input((2, 4, 6, 6)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    assert gm.get_submodule("conv").out_channels == 4 and gm.get_submodule("fc").in_features == 4
    assert graph_cost(gm).macs == conv_macs(2, 4, 4, 3, 6, 6) + 2 * 4 * 3


class Upsampling(nn.Module):
    """A transposed conv whose output channel 1 has an all-zero filter, read by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 5, 2, stride=2)
        self.reader = nn.Conv2d(5, 3, 1)
        with torch.no_grad():
            self.up.weight[:, 1] = 0  # (C_in, C_out, k, k): column 1 writes output 1
            self.up.bias[1] = 0.8

    def forward(self, x):
        return self.reader(F.silu(self.up(x)))


@DTYPES
def test_a_dead_output_of_a_transposed_conv_folds_into_its_reader(dtype) -> None:
    gm, result = fuse_checked(Upsampling(), random_input((2, 4, 3, 3)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    up = gm.get_submodule("up")
    assert isinstance(up, nn.ConvTranspose2d) and up.out_channels == 4
    assert gm.get_submodule("reader").in_channels == 4


@DTYPES
def test_widths_kept_a_multiple_of_eight_when_asked(dtype) -> None:
    """Nine dead filters of 32: 23 channels would be left; with ``multiple_of=8``, 24."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1))
    dead_rows(model[0], list(range(0, 27, 3)), [0.5] * 9)
    run = PruneDead(multiple_of=8)

    gm, result = fuse_checked(model, random_input((2, 3, 6, 6)),
                              lambda g: run_passes(g, [run]), dtype)

    assert gm.get_submodule("0").out_channels == 24 and gm.get_submodule("2").in_channels == 24
    [decline] = result.declined
    assert decline.reason == ("channel 0 of '0' (Conv2d) stays: kept so that '0' (Conv2d) keeps "
                              "a multiple of 8 channels (faster kernels)")


class Ignored(nn.Module):
    """A live producer whose channels 1 and 6 its only reader ignores (zero columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.reader = nn.Conv2d(8, 5, 3, padding=1)
        with torch.no_grad():
            self.reader.weight[:, [1, 6]] = 0

    def forward(self, x):
        return self.reader(F.gelu(self.conv(x)))


@DTYPES
def test_channels_every_reader_ignores_go_whatever_their_value(dtype) -> None:
    gm, result = fuse_checked(Ignored(), random_input((2, 4, 6, 6)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    assert (gm.get_submodule("conv").out_channels, gm.get_submodule("reader").in_channels) == (
        6, 6)
    assert graph_cost(gm).macs == conv_macs(2, 4, 6, 3, 6, 6) + conv_macs(2, 6, 5, 3, 6, 6)


class MlpBlock(nn.Module):
    """Tokens -> Linear -> GELU -> Linear, with dead hidden channels (zero fc1 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        dead_rows(self.fc1, [0, 3, 9], [0.2, -1.0, 1.5])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@DTYPES
def test_dead_hidden_channels_of_an_mlp_fold_gelu_of_the_bias(dtype) -> None:
    gm, result = fuse_checked(MlpBlock(), random_input((2, 5, 8)), prune_dead, dtype)

    assert (gm.get_submodule("fc1").out_features, gm.get_submodule("fc2").in_features) == (
        13, 13)
    assert graph_cost(gm).macs == 2 * 5 * (8 * 13 + 13 * 8)

class TwoHeads(nn.Module):
    """Linear -> two Linear readers (nothing to compose), with dead rows in the first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.left, self.right = nn.Linear(6, 4), nn.Linear(6, 3)
        dead_rows(self.fc, [2], [0.4])

    def forward(self, x):
        h = self.fc(x)
        return self.left(h), self.right(h)


def test_dead_rows_of_an_exported_addmm_leave_it() -> None:
    # the inference IR writes a linear as addmm(b, x, Wᵀ): the rebuilt layer must read x
    model = TwoHeads().double()
    x = random_input((5, 8), dtype=F64)
    program = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions()
    gm = repfuse.trace(program.module(), x)

    result = prune_dead(gm)

    assert len(pruned(result)) == 1
    assert [m.out_features for m in gm.modules() if isinstance(m, nn.Linear)][:1] == [5]
    with torch.no_grad():
        for expected, actual in zip(reference64(model, x), gm(x), strict=True):
            assert rel_err(expected, actual) <= F64_RTOL


# --- dependency groups ----------------------------------------------------------------------


class Residual(nn.Module):
    """``reader(relu(branch(relu(conv1(x))) + shortcut(x)))``: a post-activation residual unit."""

    def __init__(self, dead_in_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.reader = nn.Conv2d(6, 5, 1)
        dead_rows(self.branch, [1, 3], [0.5, -0.2])
        if dead_in_shortcut:
            dead_rows(self.shortcut, [1], [0.1])

    def forward(self, x):
        return self.reader(torch.relu(self.branch(torch.relu(self.conv1(x))) + self.shortcut(x)))


@DTYPES
def test_a_residual_channel_dead_in_every_addend_goes_from_both(dtype) -> None:
    gm, result = fuse_checked(Residual(True), random_input((2, 4, 6, 6)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    sizes = [gm.get_submodule(p).out_channels for p in ("branch", "shortcut")]
    assert sizes == [5, 5] and gm.get_submodule("reader").in_channels == 5
    [decline] = result.declined
    assert decline.reason == (
        "channel 3 of 'branch' (Conv2d) is read by the residual add 'add' (add), and is live "
        "in 'shortcut' (Conv2d)")


def test_a_channel_dead_in_one_residual_addend_only_stays() -> None:
    result, _ = check_unchanged(Residual(False), (2, 4, 6, 6), prune_dead)

    [decline] = result.declined
    assert decline.node == "branch"
    assert decline.reason == (
        "channels 1, 3 of 'branch' (Conv2d) are read by the residual add 'add' (add), and are "
        "live in 'shortcut' (Conv2d)")


class Concat(nn.Module):
    """``cat([b(x), relu(a(x))])`` read by a 1x1 conv, and ``relu(a(x))`` read by ``partner``."""

    def __init__(self, partner_kernel: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 1)
        self.reader = nn.Conv2d(9, 5, 1)
        self.partner = nn.Conv2d(6, 2, partner_kernel, padding=partner_kernel // 2)
        dead_rows(self.a, [2], [0.5])

    def forward(self, x):
        a = torch.relu(self.a(x))
        return self.reader(torch.cat([self.b(x), a], 1)) + self.partner(a).sum(1, keepdim=True)


@DTYPES
def test_concatenation_shifts_the_channel_by_the_inputs_before_it(dtype) -> None:
    model = Concat(partner_kernel=1)
    gm, result = fuse_checked(model, random_input((2, 4, 6, 6)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    reader = gm.get_submodule("reader")
    assert reader.in_channels == 8 and gm.get_submodule("partner").in_channels == 5
    # the column of cat channel 3 + 2 = 5 went; the others are the original ones
    kept = [0, 1, 2, 3, 4, 6, 7, 8]
    assert torch.equal(reader.weight, model.reader.weight[:, kept].to(dtype))


def test_a_concat_partner_that_cannot_fold_the_constant_keeps_it() -> None:
    result, _ = check_unchanged(Concat(partner_kernel=3), (2, 4, 6, 6), prune_dead)

    [decline] = result.declined
    assert decline.reason == (
        "channel 2 of 'a' (Conv2d) is the constant 0.5 where 'partner' (Conv2d) reads it, but "
        "'partner' (Conv2d) is a zero-padded 3x3 conv: at the border it reads the padding's 0, "
        "not the constant")


class Chunked(nn.Module):
    """One conv's output cut by ``chunk`` (or sliced) into two halves for two readers."""

    def __init__(self, slicing: bool) -> None:
        super().__init__()
        self.slicing = slicing
        self.a = nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(4, 5, 1)
        self.d = nn.Conv2d(4, 5, 1)
        dead_rows(self.a, [1, 6, 7], [0.5, 0.2, -0.4])

    def forward(self, x):
        y = torch.sigmoid(self.a(x))
        if self.slicing:
            first, second = y[:, :4], y[:, 4:]
        else:
            first, second = torch.chunk(y, 2, 1)
        return self.c(first) + self.d(second)


@pytest.mark.parametrize("slicing", [False, True], ids=["chunk", "slices"])
@DTYPES
def test_split_pieces_shrink_with_their_source(slicing: bool, dtype) -> None:
    gm, result = fuse_checked(Chunked(slicing), random_input((2, 4, 5, 5)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    assert [gm.get_submodule(p).in_channels for p in ("c", "d")] == [3, 2]
    assert gm.get_submodule("a").out_channels == 5


class Depthwise(nn.Module):
    """MobileNet's pointwise -> depthwise -> pointwise, with a dead first pointwise channel."""

    def __init__(self, padding: int, groups: int = 6) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(4, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=padding, groups=groups)
        self.pw2 = nn.Conv2d(6, 5, 1)
        dead_rows(self.pw1, [2, 3], [0.5, 0.75])

    def forward(self, x):
        return self.pw2(torch.relu(self.dw(torch.relu(self.pw1(x)))))


@DTYPES
def test_an_unpadded_depthwise_conv_loses_the_matching_channel(dtype) -> None:
    gm, result = fuse_checked(Depthwise(padding=0), random_input((2, 4, 7, 7)), prune_dead,
                              dtype)

    dw = gm.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 4, 4)
    assert gm.get_submodule("pw2").in_channels == 4
    assert graph_cost(gm).macs == conv_macs(2, 4, 4, 1, 7, 7) + conv_macs(
        2, 4, 4, 3, 5, 5, groups=4) + conv_macs(2, 4, 5, 1, 5, 5)


@DTYPES
def test_a_grouped_conv_loses_a_whole_group(dtype) -> None:
    """Groups of 2: channels 2 and 3 form group 1, dead in both."""
    gm, result = fuse_checked(Depthwise(padding=0, groups=3), random_input((2, 4, 7, 7)),
                              prune_dead, dtype)

    dw = gm.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 4, 2)


def test_a_constant_through_a_padded_depthwise_conv_stays() -> None:
    result, _ = check_unchanged(Depthwise(padding=1), (2, 4, 7, 7), prune_dead)

    [decline] = result.declined
    assert decline.reason == (
        "channels 2, 3 of 'pw1' (Conv2d) vary where 'pw2' (Conv2d) reads them: 'dw' (Conv2d) "
        "pads with zeros, which makes a constant uneven at the borders")


class PreActivation(nn.Module):
    """``conv3x3(relu(bn(a(x) + b(x))))``: the BN follows an add, so no conv takes it, and it
    has ``γ = 0`` on channel 1 with ``β < 0``: a zero constant, which the padded conv can lose."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        randomize_bn_stats(self, seed=4)
        with torch.no_grad():
            self.bn.weight[1], self.bn.bias[1] = 0.0, -0.5

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.a(x) + self.b(x))))


@DTYPES
def test_a_batch_norm_on_the_way_is_sliced_and_its_zero_scale_makes_the_constant(dtype) -> None:
    x = random_input((2, 4, 6, 6))
    gm, result = fuse_checked(PreActivation(), x, prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    bn = gm.get_submodule("bn")
    assert bn.num_features == 5 and bn.running_mean.shape == (5,)
    assert [gm.get_submodule(p).out_channels for p in ("a", "b")] == [5, 5]
    assert gm.get_submodule("conv").in_channels == 5


# --- attention heads --------------------------------------------------------------------------


class Attention(nn.Module):
    """The zoo's explicit q/k/v self-attention (4 heads of 4), then a Linear."""

    def __init__(self, zero: str) -> None:
        super().__init__()
        self.attn = SelfAttention(16, 4)
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            if zero == "value":  # head 1: zero value filter, its bias a constant value
                self.attn.v.weight[4:8] = 0
            elif zero == "output":  # head 2: its output-projection columns are zero
                self.attn.proj.weight[:, 8:12] = 0
            elif zero == "query":  # head 0: constant queries, but its values are live
                self.attn.q.weight[0:4] = 0

    def forward(self, x):
        return self.fc(self.attn(x))


@pytest.mark.parametrize("zero", ["value", "output"])
@DTYPES
def test_a_dead_head_leaves_q_k_v_and_the_output_projection(zero: str, dtype) -> None:
    x = random_input((2, 5, 16))
    gm, result = fuse_checked(Attention(zero), x, prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    sizes = [gm.get_submodule(f"attn.{p}").out_features for p in "qkv"]
    assert sizes == [12, 12, 12] and gm.get_submodule("attn.proj").in_features == 12
    assert "heads [1]" in pruned(result)[0].detail or "heads [2]" in pruned(result)[0].detail
    assert graph_cost(gm).macs == 2 * 5 * (3 * 16 * 12 + 12 * 16 + 16 * 3)


def test_a_head_with_live_values_stays() -> None:
    result, _ = check_unchanged(Attention("query"), (2, 5, 16), prune_dead)

    [decline] = result.declined
    assert decline.reason.startswith("channels 0, 1, 2, 3 of 'attn.q' (Linear) are live in "
                                     "'attn.v' (Linear)")


class FusedQkv(nn.Module):
    """timm's attention: one qkv Linear, reshape to (B, N, 3, heads, d), permute, unbind, and
    ``scaled_dot_product_attention`` (or the explicit softmax product)."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.fused = 4, 4, fused
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        with torch.no_grad():
            self.qkv.weight[32 + 4:32 + 8] = 0  # head 1's value filter
            self.proj.weight[:, 12:16] = 0  # head 3 unread

    def forward(self, x):
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


@pytest.mark.parametrize("fused", [False, True], ids=["softmax_matmul", "sdpa"])
@DTYPES
def test_heads_of_a_fused_qkv_projection(fused: bool, dtype) -> None:
    gm, result = fuse_checked(FusedQkv(fused), random_input((2, 5, 16)), prune_dead, dtype)

    assert result.counts() == {"prune_dead": 1}
    assert gm.get_submodule("qkv").out_features == 24
    assert gm.get_submodule("proj").in_features == 8


class Multihead(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool = False, mask: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.need_weights, self.mask = need_weights, mask
        with torch.no_grad():
            self.attn.in_proj_weight[32 + 4:32 + 8] = 0  # head 1's value filter
            self.attn.out_proj.weight[:, 12:16] = 0  # head 3 unread

    def forward(self, x):
        mask = torch.zeros(x.shape[0], x.shape[0]) if self.mask else None
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return out + weights.sum() if self.need_weights else out


@pytest.mark.parametrize("batch_first", [True, False])
@DTYPES
def test_multihead_attention_becomes_its_explicit_form_without_dead_heads(
        batch_first: bool, dtype) -> None:
    gm, result = fuse_checked(Multihead(batch_first), random_input((5, 2, 16)), prune_dead,
                              dtype)

    assert result.counts() == {"prune_dead": 1}
    assert modules_of(gm, nn.MultiheadAttention) == []
    assert sorted(modules_of(gm, nn.Linear)) == ["attn.k_proj", "attn.out_proj", "attn.q_proj",
                                                 "attn.v_proj"]
    assert gm.get_submodule("attn.v_proj").out_features == 8
    assert gm.get_submodule("attn.out_proj").in_features == 8
    rewrite = pruned(result)[0]
    assert "heads [1, 3]" in rewrite.detail
    assert rewrite.cost_before.macs - rewrite.cost_after.macs == 10 * 16 * 8 * 4


def test_multihead_attention_whose_weights_are_read_stays() -> None:
    result, _ = check_unchanged(Multihead(True, need_weights=True), (2, 5, 16), prune_dead)

    assert result.declined[0].reason == (
        "heads 1, 3 of 'attn' (MultiheadAttention) stay: its attention weights are read too "
        "(their average over heads would change without the removed heads)")


# --- what must stay, and subnormals -------------------------------------------------------------


class Outputs(nn.Module):
    def __init__(self, reader: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.norm = nn.GroupNorm(2, 6)
        self.reader = reader
        dead_rows(self.conv, [2], [0.5])

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.reader == "norm":
            return self.norm(y)
        if self.reader == "size":
            return y.flatten(2).mean(2) * y.size(1)
        return y


@pytest.mark.parametrize("reader, reason", [
    ("output", "channel 2 of 'conv' (Conv2d) must stay: it is an output of the model"),
    ("norm", "channel 2 of 'conv' (Conv2d) must stay: 'norm' (GroupNorm) reads it and mixes "
             "channels"),
    ("size", "channel 2 of 'conv' (Conv2d) must stay: its channel count is read by 'size' "
             "(size)"),
])
def test_channels_read_whole_stay(reader: str, reason: str) -> None:
    result, _ = check_unchanged(Outputs(reader), (2, 4, 5, 5), prune_dead)

    assert [d.reason for d in result.declined] == [reason]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.reader = nn.Conv2d(6, 4, 1)
        dead_rows(self.conv, [1], [0.5])

    def forward(self, x):
        return self.reader(torch.relu(self.conv(x))) + self.reader(torch.relu(self.conv(-x)))


def test_a_layer_called_twice_is_not_sliced() -> None:
    result, _ = check_unchanged(Shared(), (2, 4, 5, 5), prune_dead)

    assert all("is called at 2 sites" in d.reason for d in result.declined)


def test_subnormal_weights_are_flushed_to_zero() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = tiny / 16
        model[0].bias[1] = -tiny / 4
    x = random_input((2, 3, 6, 6))
    gm = repfuse.trace(copy.deepcopy(model), x)

    result = prune_dead(gm)

    assert result.counts() == {"prune_dead": 1}
    assert "2 subnormal weights" in result.rewrites[0].detail
    assert int((gm.get_submodule("0").weight.abs() < tiny).sum()) == int(
        (gm.get_submodule("0").weight == 0).sum())
    assert rel_err(reference64(model, x), gm(x)) <= 1e-6


def test_nothing_to_prune_in_random_weights_and_a_second_run_finds_nothing() -> None:
    model = SlimUnit()
    x = random_input((2, 3, 8, 8), dtype=F64)
    gm = repfuse.trace(copy.deepcopy(model).double(), x)
    run_pipeline(gm)

    again = prune_dead(gm)
    assert again.rewrites == [] and again.declined == []
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL
    random = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    fresh = prune_dead(repfuse.trace(random, x.float()))
    assert fresh.rewrites == [] and fresh.declined == []
