"""The passes on the aten ops of ``torch.export`` programs, in both of their forms.

``torch.export.export(m, args)`` writes the training IR (``aten.conv2d``, ``aten.batch_norm``,
``aten.add.Tensor``, ``aten.slice.Tensor``, in-place ``aten.copy_``); ``run_decompositions()``
writes the inference IR (``aten.convolution``, ``_native_batch_norm_legit_no_training`` read
through ``getitem``, ``addmm``, ``slice_scatter``, ``clone``). Each block below is written
here, exported, captured as it is (:func:`repfuse.trace` keeps a GraphModule as it is), and run
through a pass; the result is checked against the unfused module in float64, and every
decline against an unchanged graph.
"""

from __future__ import annotations

import operator

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, random_input, reference64, rel_err, signature
from torch import Tensor, nn
from torch.fx import GraphModule

import repfuse
from repfuse.graph import batchnorm_view, pure_aten
from repfuse.passes import (
    Rewriter,
    fold_batchnorm,
    fold_constants,
    merge_branches,
    merge_padding,
    remove_noops,
    run_pipeline,
)
from repfuse.passes.nonlinear import not_mergeable

aten = torch.ops.aten
IRS = pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "inference_ir"])
NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def randomize_bn(model: nn.Module) -> nn.Module:
    return conftest.randomize_bn(model, seed=2, dtype=torch.float64)


def exported(model: nn.Module, shape: tuple[int, ...],
             decompose: bool = False) -> tuple[GraphModule, Tensor]:
    """``model`` in float64 with random BN statistics, exported and captured as it is."""
    model = randomize_bn(model.double())
    x = random_input(shape, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    if decompose:
        program = program.run_decompositions()
    return repfuse.trace(program.module(), x), x


def targets(gm: GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def check_equal(model: nn.Module, gm: GraphModule, x: Tensor) -> None:
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


def check_unchanged(gm: GraphModule, x: Tensor, run):
    before = signature(gm)
    with torch.no_grad():
        expected = gm(x)
    result = run(gm)
    assert result.rewrites == []
    assert signature(gm) == before
    with torch.no_grad():
        assert rel_err(expected, gm(x)) <= F64_RTOL
    return result


# --- layers and batch norms -------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = cls(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@IRS
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_batchnorm_folds_into_exported_conv(decompose, transposed):
    model = ConvBN(transposed)
    gm, x = exported(model, (2, 4, 9, 9), decompose)

    result = fold_batchnorm(gm)

    assert result.counts() == {"fold_batchnorm": 1}
    assert not NORMS & set(targets(gm))
    assert operator.getitem not in targets(gm)  # the getitem and the tuple op went together
    assert [n for n, m in gm.named_modules() if isinstance(m, nn.modules.conv._ConvNd)] == [
        "conv"]
    assert result.rewrites[0].module_paths == ("conv", "bn")
    check_equal(model, gm, x)


@IRS
def test_batchnorm_exported_in_training_mode_is_declined(decompose):
    model = ConvBN().double().train()
    x = random_input((2, 4, 9, 9), dtype=torch.float64)
    program = torch.export.export(model, (x,))
    if decompose:
        program = program.run_decompositions()
    gm = repfuse.trace(program.module(), x)

    result = check_unchanged(gm, x, fold_batchnorm)

    [decline] = result.declined
    assert decline.reason.endswith("is in training mode: it normalizes with batch statistics, "
                                   "which no fixed weights reproduce")


class LinearBN(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6, bias=bias)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("bias", [True, False], ids=["addmm", "mm"])
def test_batchnorm_folds_into_decomposed_linear(bias):
    model = LinearBN(bias)
    gm, x = exported(model, (5, 8), decompose=True)
    assert (aten.addmm.default if bias else aten.mm.default) in targets(gm)

    result = run_pipeline(gm)

    assert result.counts()["fold_batchnorm"] == 1
    assert not NORMS & set(targets(gm))
    assert isinstance(gm.get_submodule("fc"), nn.Linear)
    check_equal(model, gm, x)


def test_tuple_batchnorm_whose_statistics_are_read_is_no_view():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    stats = [graph.get_attr(name) for name in ("w", "b", "mean", "var")]
    bn = graph.call_function(aten._native_batch_norm_legit_no_training.default,
                             (x, *stats, 0.1, 1e-5))
    out = graph.call_function(operator.getitem, (bn, 0))
    mean = graph.call_function(operator.getitem, (bn, 1))
    graph.output((out, mean))
    root = nn.Module()
    for name in ("w", "b", "mean", "var"):
        root.register_buffer(name, torch.ones(3))
    gm = GraphModule(root, graph)

    assert batchnorm_view(gm, out) is None  # the batch norm cannot go: its mean is read


class ChannelsLastLinearBN(nn.Module):
    """A Linear on channels-last pixels, then a BatchNorm2d (UniRepLKNet's FFN shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_a_batchnorm_the_inference_ir_keeps_from_its_layer_says_why():
    """The inference IR spells a Linear on a 4-D tensor as expand/view/bmm plus a bias add:
    no layer to fold into. The BN stays (the module form folds it) and the history says why."""
    model = ChannelsLastLinearBN()
    gm, x = exported(model, (1, 8, 5, 5), decompose=True)

    result = run_pipeline(gm)

    assert sum(t in NORMS for t in targets(gm)) == 1
    [decline] = [d for d in result.declined if d.pass_name == "fold_batchnorm"]
    assert "(_native_batch_norm_legit_no_training.default[0]) stays: not into its producer" \
        in decline.reason
    assert decline.module_paths == ("bn",)
    check_equal(model, gm, x)
    fused = repfuse.fuse(model, x)  # the module form folds it across the permutes
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


# --- branches: sums, differences, crops ---------------------------------------------------------


class Cropped(nn.Module):
    """ACNet-style: a 3x3 branch and a 1x3 branch on the rows cropped by one pixel at each end,
    the crop's end computed from the input's size."""

    def __init__(self, low: int = 1, high: int = 1, subtract: bool = False) -> None:
        super().__init__()
        self.square = nn.Conv2d(4, 6, 3)
        self.bn_square = nn.BatchNorm2d(6)
        self.row = nn.Conv2d(4, 6, (1, 3))
        self.bn_row = nn.BatchNorm2d(6)
        self.low, self.high, self.subtract = low, high, subtract

    def forward(self, x):
        rows = x[:, :, self.low:x.size(2) - self.high]
        square, row = self.bn_square(self.square(x)), self.bn_row(self.row(rows))
        return square - row if self.subtract else square + row


@IRS
@pytest.mark.parametrize("subtract", [False, True], ids=["sum", "difference"])
def test_cropped_branch_merges_in_an_exported_program(decompose, subtract):
    model = Cropped(subtract=subtract)
    gm, x = exported(model, (2, 4, 8, 9), decompose)
    slices = [n for n in gm.graph.nodes if n.target is aten.slice.Tensor]
    assert [n.args[1:] for n in slices] == [(2, 1, 7)]  # the end as export wrote it: 8 - 1

    result = run_pipeline(gm)

    assert result.counts()["merge_branches"] == 1
    assert [type(m) for m in gm.modules() if isinstance(m, nn.Conv2d)] == [nn.Conv2d]
    assert aten.slice.Tensor not in targets(gm)
    check_equal(model, gm, x)


class CroppedAfterConv(nn.Module):
    """Cropped branches of a conv-BN output: once the BN is folded, the slice reads a node the
    rewrite made (no fake value from export on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.block = Cropped()

    def forward(self, x):
        return self.block(self.bn(self.stem(x)))


@IRS
def test_cropped_branch_of_a_rewritten_node_merges(decompose):
    model = CroppedAfterConv()
    gm, x = exported(model, (2, 3, 8, 9), decompose)

    result = run_pipeline(gm)

    assert result.counts()["merge_branches"] == 1
    assert aten.slice.Tensor not in targets(gm)
    check_equal(model, gm, x)


@IRS
def test_cropped_branch_merges_with_a_dynamic_batch(decompose):
    """A dynamic batch axis: export slices it whole (removed), the rows stay specialized."""
    model = randomize_bn(Cropped().double())
    x = random_input((2, 4, 8, 9), dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    if decompose:
        program = program.run_decompositions()
    gm = repfuse.trace(program.module(), x)

    result = run_pipeline(gm)

    assert result.counts()["remove_noops"] == 1
    assert result.counts()["merge_branches"] == 1
    assert aten.slice.Tensor not in targets(gm)
    other_batch = random_input((3, 4, 8, 9), seed=1, dtype=torch.float64)
    check_equal(model, gm, other_batch)


def test_asymmetric_exported_crop_is_declined():
    gm, x = exported(Cropped(low=0, high=2), (2, 4, 9, 9))
    fold_batchnorm(gm)

    result = check_unchanged(gm, x, merge_branches)

    [decline] = result.declined
    assert "crops 0 and 2 pixels from the two ends of an axis" in decline.reason


class AtenSliceInCode(nn.Module):
    """Code that calls the aten op itself, with an end that fits one input size only."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Conv2d(4, 6, 3)
        self.row = nn.Conv2d(4, 6, (1, 3))

    def forward(self, x):
        return self.square(x) + self.row(aten.slice.Tensor(x, 2, 1, 7))


def test_slice_end_is_not_read_against_the_shape_in_a_traced_graph():
    """A symbolically traced graph runs on any size: ``x[:, :, 1:7]`` is a crop by one pixel
    at each end only for 8 rows, so it is not lifted as one."""
    model = AtenSliceInCode().double().eval()
    x = random_input((2, 4, 8, 9), dtype=torch.float64)
    gm = repfuse.trace(model, x)

    result = check_unchanged(gm, x, merge_branches)

    [decline] = result.declined
    assert "crops by an amount tied to the input's size, not from both ends" in decline.reason


# --- global pooling ----------------------------------------------------------------------------


class PointwiseHead(nn.Module):
    """A 1x1 conv and BN before global average pooling, flattened into a Linear."""

    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)
        self.mean = mean

    def forward(self, x):
        y = self.bn(self.conv(torch.relu(x)))
        pooled = y.mean((2, 3)) if self.mean else torch.flatten(self.pool(y), 1)
        return self.fc(pooled)


@IRS
@pytest.mark.parametrize("mean", [False, True], ids=["adaptive_pool", "mean"])
def test_exported_global_pool_is_hoisted_into_the_head(decompose, mean):
    model = PointwiseHead(mean)
    gm, x = exported(model, (2, 4, 6, 6), decompose)

    result = run_pipeline(gm)

    assert result.counts()["hoist_global_pool"] == 1
    assert [type(m) for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        nn.Linear]  # conv and BN run on the pooled pixel, composed with the head
    check_equal(model, gm, x)


# --- pads overwritten with the BN's value (DBB) -------------------------------------------------


class BorderFilled(nn.Module):
    """A 1x1 conv and BN whose output is zero padded, each border strip then written with the
    BN's output at zero input, and a 3x3 conv without padding after it. ``value`` replaces
    that value (a negative case)."""

    def __init__(self, value: Tensor | None = None) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(4, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 5, 3)
        self.value = value

    def forward(self, x):
        y = F.pad(self.bn(self.pointwise(x)), [1, 1, 1, 1])
        bn = self.bn
        value = self.value if self.value is not None else (
            bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        ).view(1, -1, 1, 1)
        y[:, :, :1] = value[:, :, :1]
        y[:, :, -1:] = value[:, :, -1:]
        y[..., :1] = value[..., :1]
        y[..., -1:] = value[..., -1:]
        return self.conv(y)


@IRS
def test_exported_border_fill_becomes_padding(decompose):
    model = BorderFilled()
    gm, x = exported(model, (2, 4, 7, 8), decompose)
    writes = {aten.copy_.default, aten.slice_scatter.default}
    assert writes & set(targets(gm))

    result = run_pipeline(gm)

    assert result.counts()["merge_padding"] == 1
    assert not (writes | {aten.pad.default, aten.constant_pad_nd.default}) & set(targets(gm))
    assert len([m for m in gm.modules() if isinstance(m, nn.Conv2d)]) == 1  # all composed
    check_equal(model, gm, x)


@IRS
def test_exported_border_fill_becomes_padding_with_a_dynamic_batch(decompose):
    """Export expands the fill to the symbolic batch size and slices/scatters the whole batch
    axis around each write: the fill is still one value per channel."""
    model = randomize_bn(BorderFilled().double())
    x = random_input((2, 4, 7, 8), dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    if decompose:
        program = program.run_decompositions()
    gm = repfuse.trace(program.module(), x)

    result = run_pipeline(gm)

    assert result.counts()["merge_padding"] == 1
    assert len([m for m in gm.modules() if isinstance(m, nn.Conv2d)]) == 1
    check_equal(model, gm, random_input((3, 4, 7, 8), seed=1, dtype=torch.float64))


@IRS
def test_exported_border_fill_that_is_not_per_channel_is_declined(decompose):
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(1, 6, 9, 10, generator=generator, dtype=torch.float64)
    gm, x = exported(BorderFilled(value), (2, 4, 7, 8), decompose)
    fold_batchnorm(gm)
    fold_constants(gm)

    result = check_unchanged(gm, x, merge_padding)

    [decline] = result.declined
    assert "is overwritten in place in a way that is not a per-channel border fill" \
        in decline.reason


# --- copies, repeated ops, constants ------------------------------------------------------------


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_exported_eval_dropout_copy_is_removed():
    model = DropoutHead()
    gm, x = exported(model, (3, 8), decompose=True)
    assert aten.clone.default in targets(gm)

    result = remove_noops(gm)

    assert result.counts() == {"remove_noops": 1}
    assert aten.clone.default not in targets(gm)
    check_equal(model, gm, x)


class WrittenCopy(nn.Module):
    def forward(self, x):
        y = x.clone()
        y[:, :, 0] = 0.0
        return y + x


def test_copy_written_in_place_stays():
    gm, x = exported(WrittenCopy(), (2, 3, 4))

    result = check_unchanged(gm, x, remove_noops)

    [decline] = result.declined
    assert "is written in place, so the copy may differ" in decline.reason


class ContiguousThenView(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 1).contiguous().view(x.shape[0], -1) * 2.0


def test_copy_that_lays_out_the_data_for_a_view_stays():
    gm, x = exported(ContiguousThenView(), (2, 3, 4), decompose=True)
    assert aten.clone.default in targets(gm)

    result = check_unchanged(gm, x, remove_noops)

    assert result.declined == []


class Tokens(nn.Module):
    """Q, K and V projections of one token tensor, added (to keep the test linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.q(x)) * torch.relu(self.k(x)) + self.v(x)


def test_repeated_views_of_one_input_let_sibling_linears_merge():
    model = Tokens()
    gm, x = exported(model, (2, 5, 8), decompose=True)
    assert targets(gm).count(aten.view.default) > 3  # one view of x per projection

    result = run_pipeline(gm)

    assert result.counts()["remove_noops"] == 2
    assert result.counts()["merge_siblings"] == 1
    assert targets(gm).count(aten.addmm.default) == 0
    assert len([m for m in gm.modules() if isinstance(m, nn.Linear)]) == 1
    check_equal(model, gm, x)


class Positions(nn.Module):
    def forward(self, x):
        return x + torch.arange(x.shape[-1], dtype=x.dtype) * 0.5


def test_exported_factory_is_folded_to_a_constant():
    model = Positions()
    gm, x = exported(model, (2, 3, 6), decompose=True)
    assert aten.arange.start_step in targets(gm)

    fold_constants(gm)

    assert aten.arange.start_step not in targets(gm)
    check_equal(model, gm, x)


def test_exported_activations_and_max_pools_are_listed_as_not_mergeable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Hardtanh())
    gm, _ = exported(model, (1, 3, 8, 8), decompose=True)

    kinds = {(item.op, item.kind) for item in not_mergeable(gm)}

    assert kinds == {("relu.default", "activation"), ("hardtanh.default", "activation"),
                     ("max_pool2d_with_indices.default", "max pooling")}


# --- the rewriter's dead code -------------------------------------------------------------------


def test_erase_takes_unread_pure_aten_ops_along_but_not_in_place_ones():
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    written = graph.call_function(aten.add_.Tensor, (y, 1.0))  # mutates y
    pure = graph.call_function(aten.neg.default, (x,))
    doomed = graph.call_function(aten.mul.Tensor, (pure, written))
    graph.output(graph.call_function(aten.relu.default, (doomed,)))
    gm = GraphModule(nn.Module(), graph)
    rewriter = Rewriter(gm)

    rewriter.bypass("test", doomed, x)

    assert targets(gm) == [aten.add_.Tensor, aten.relu.default]
    assert rewriter.is_erased(pure)


def test_pure_aten_is_an_op_that_computes_the_same_value_on_every_call():
    """Only such ops may be evaluated as constants or read once for two calls: a random draw,
    uninitialized memory and an in-place op are not."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    ops = {
        aten.neg.default: (x,),
        aten.view.default: (x, [-1]),
        aten.full.default: ([2], 0.5),
        aten.rand.default: ([2],),
        aten.randn_like.default: (x,),
        aten.empty.memory_format: ([2],),
        aten.empty_like.default: (x,),
        aten.new_empty.default: (x, [2]),
        aten.add_.Tensor: (x, 1.0),
    }
    nodes = {op: graph.call_function(op, args) for op, args in ops.items()}

    pure = {op for op, node in nodes.items() if pure_aten(node)}

    assert pure == {aten.neg.default, aten.view.default, aten.full.default}
