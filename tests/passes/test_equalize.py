"""``equalize``: exact cross-layer equalization between conv/linear layers.

Positive cases check the graph (one rewrite per group, the same ops in the same number, the
per-channel ranges balanced) and the numbers (float64 to 1e-10 and float32 to 1e-5 against
the model in float64). Negative cases check, per decline reason, the reason and an unchanged
graph (conftest.check_unchanged).
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
    random_input,
    reference64,
    rel_err,
    signature,
)
from torch import nn

import repfuse
from repfuse.equalization import (
    input_channel_ranges,
    output_channel_ranges,
    range_ratio,
)
from repfuse.graph import layer_view
from repfuse.models import create_model, randomize_bn_stats
from repfuse.passes import DEFAULT_PIPELINE, REGISTRY, run_passes
from repfuse.passes.equalize import Equalize, layer_weights
from repfuse.verify.compare import default_tolerance
from repfuse.verify.localize import localize


def equalize(gm):
    return run_passes(gm, [Equalize()])


def imbalance(*layers: nn.Module, seed: int = 0) -> None:
    """Spread the output channels of each layer over three decades, as BN folding with tiny
    running variances does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            channels = layer.weight.shape[1 if isinstance(layer, nn.ConvTranspose2d) else 0]
            spread = torch.exp(torch.empty(channels).uniform_(-3.5, 3.5, generator=g))
            if isinstance(layer, nn.ConvTranspose2d):
                layer.weight.mul_(spread.reshape(1, -1, 1, 1))
            else:
                layer.weight.mul_(spread.reshape(-1, *([1] * (layer.weight.dim() - 1))))


def layer_ops(gm) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes if n.op != "placeholder"]


class Chain(nn.Module):
    """conv -> ReLU -> max pool -> grouped conv -> LeakyReLU -> depthwise conv -> PReLU ->
    zero pad -> conv -> global pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.prelu = nn.PReLU(8)
        self.conv4 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)
        imbalance(self.conv1, self.conv2, self.conv3, self.conv4, self.fc)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.linspace(-0.3, 0.6, 8))

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.leaky_relu(self.conv2(x), 0.1)
        x = F.pad(self.prelu(self.conv3(x)), (1, 1, 1, 1))
        x = F.adaptive_avg_pool2d(self.conv4(x), 1)
        return self.fc(torch.flatten(x, 1))


class FanOut(nn.Module):
    """One conv's channels read by two convs (one scale shared by both), whose outputs are
    concatenated and read by a third: the concat's two producers share that reader."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Conv2d(9, 3, 3, padding=1)
        imbalance(self.stem, self.left, self.right, self.head)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        both = torch.cat([torch.relu(self.left(h)), F.leaky_relu(self.right(h), 0.2)], dim=1)
        return self.head(both)


class Split(nn.Module):
    """A conv whose channels are split in two halves, each read by its own conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(5, 4, 3, padding=1)
        imbalance(self.conv, self.a, self.b)

    def forward(self, x):
        first, second = torch.split(torch.relu(self.conv(x)), [3, 5], dim=1)
        return self.a(first) + self.b(second)


class ConcatWithInput(nn.Module):
    """A conv's channels concatenated with the (unscaled) input before the next conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.next = nn.Conv2d(8, 4, 3, padding=1)
        imbalance(self.conv, self.next)

    def forward(self, x):
        return self.next(torch.cat([x, torch.relu(self.conv(x))], 1))


class Transposed(nn.Module):
    """A transposed conv between two convs (producer of one set, reader of the other)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.out = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
        imbalance(self.down, self.up, self.out)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.down(x)))))


class Functional(nn.Module):
    """F.conv2d / F.linear with parameters read by get_attr, on a 3-D token tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1))
        self.lin1 = nn.Linear(6, 10)
        self.lin2 = nn.Linear(10, 4)
        imbalance(self.lin1, self.lin2)
        with torch.no_grad():
            self.w1.mul_(torch.logspace(-2, 2, 8).reshape(-1, 1, 1, 1))

    def forward(self, x):
        h = F.conv2d(torch.relu(F.conv2d(x, self.w1, self.b1, padding=1)), self.w2)
        tokens = h.flatten(2).transpose(1, 2)  # N x HW x C: channels last for the linears
        return self.lin2(F.relu(self.lin1(tokens)))


# (id, model, input shape, layers per equalized group)
MODELS = [
    ("chain", Chain, (2, 3, 12, 12), [5]),
    ("fan_out_concat", FanOut, (2, 3, 7, 7), [4]),
    ("split", Split, (2, 3, 7, 7), [3]),
    ("concat_with_input", ConcatWithInput, (2, 3, 6, 6), [2]),
    ("transposed", Transposed, (2, 3, 8, 8), [3]),
    ("functional", Functional, (2, 3, 6, 6), [2, 2]),  # a transpose separates the two pairs
]


def layer_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if layer_view(gm, n) is not None)


@DTYPES
@pytest.mark.parametrize(("name", "factory", "shape", "groups"), MODELS,
                         ids=[m[0] for m in MODELS])
def test_equalize_is_exact_and_keeps_the_ops(dtype, name, factory, shape, groups) -> None:
    model = factory().eval()
    x = random_input(shape)
    traced = repfuse.trace(copy.deepcopy(model).to(dtype), x.to(dtype))

    gm, result = fuse_checked(model, x, equalize, dtype)

    assert result.counts() == {"equalize": len(groups)}
    assert all(r.exact and r.pass_name == "equalize" for r in result.rewrites)
    assert all(f"over {n} layers" in r.detail for r, n in zip(result.rewrites, groups,
                                                               strict=True))
    assert layer_count(gm) == layer_count(traced)
    if name != "functional":  # functional layers become modules at their weights' path
        assert layer_ops(gm) == layer_ops(traced)  # same ops and modules, new weights
    weights = {n.target: layer_view(gm, n).weight for n in gm.graph.nodes
               if n.op == "call_module" and layer_view(gm, n) is not None}
    assert any(not torch.equal(w, traced.get_submodule(t).weight) for t, w in weights.items()
               if t in dict(traced.named_modules()))


def test_chain_balances_each_pair_and_lowers_the_range_ratio() -> None:
    model = Chain().double().eval()
    x = random_input((2, 3, 12, 12), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    before = {n.target: layer_view(gm, n) for n in gm.graph.nodes if layer_view(gm, n)}
    worst_before = max(range_ratio(output_channel_ranges(layer_weights(v))) for v in
                       before.values())

    equalize(gm)

    after = {n.target: layer_view(gm, n) for n in gm.graph.nodes if layer_view(gm, n)}
    pairs = [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "conv4")]
    for producer, reader in pairs:
        r1 = output_channel_ranges(layer_weights(after[producer]))
        r2 = input_channel_ranges(layer_weights(after[reader]))
        assert torch.allclose(r1, r2, rtol=1e-6, atol=0), (producer, reader)
    worst_after = max(range_ratio(output_channel_ranges(layer_weights(v))) for v in after.values())
    assert worst_after < worst_before
    assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


def test_equalize_is_opt_in_registered_and_idempotent() -> None:
    assert "equalize" in REGISTRY and "equalize" not in DEFAULT_PIPELINE
    model = Chain().double().eval()
    x = random_input((2, 3, 12, 12), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    equalize(gm)
    before = signature(gm)

    again = equalize(gm)

    assert again.rewrites == [] and signature(gm) == before


@pytest.mark.parametrize("name", ["repvgg_tiny", "mobileone_tiny"])
def test_fused_reparameterized_models_equalize_exactly(name: str) -> None:
    model = randomize_bn_stats(create_model(name), 1).double().eval()
    x = random_input((2, 3, 32, 32), dtype=torch.float64)
    fused = repfuse.fuse(model, x)

    result = equalize(fused)

    assert result.counts() == {"equalize": 1}
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= F64_RTOL
    report = repfuse.verify(model, fused, x)
    assert report.passed
    assert repfuse.history(fused).rewrites[-1].pass_name == "equalize"


def test_region_rewrite_stands_only_for_its_outputs() -> None:
    """The scaled activations inside a group must not be compared with the original ones:
    the rewrite replaces them, and stands for the group's outputs only."""
    model = Chain().double().eval()
    x = random_input((2, 3, 12, 12), dtype=torch.float64)
    gm = repfuse.trace(model, x)

    rewrite = equalize(gm).rewrites[0]

    assert [old for old, _ in rewrite.stands_for] == ["fc"]
    assert {"relu", "conv1", "conv4", "flatten"} <= set(rewrite.replaced)
    localization = localize(model, gm, [(x,)], default_tolerance(torch.float64))
    assert localization.method == "provenance"
    assert localization.first is None  # no checkpoint diverges
    assert localization.compared >= 1


# --- declines ---------------------------------------------------------------------------


class Pair(nn.Module):
    """conv -> ``between`` -> conv."""

    def __init__(self, between, in_c: int = 4, mid: int = 6) -> None:
        super().__init__()
        self.first = nn.Conv2d(in_c, mid, 3, padding=1)
        self.second = nn.Conv2d(mid, 3, 3, padding=1)
        self.between = between
        imbalance(self.first, self.second)

    def forward(self, x):
        return self.second(self.between(self.first(x)))


NOT_HOMOGENEOUS = [
    ("relu6", nn.ReLU6(), "ReLU6", "clips at a fixed value"),
    ("hardtanh", nn.Hardtanh(), "Hardtanh", "clips at a fixed value"),
    ("clamp", lambda t: torch.clamp(t, 0, 2), "clamp", "clips at a fixed value"),
    ("silu", nn.SiLU(), "SiLU", "depends on the input's scale"),
    ("gelu", F.gelu, "gelu", "depends on the input's scale"),
    ("hardswish", nn.Hardswish(), "Hardswish", "depends on the input's scale"),
    ("sigmoid", torch.sigmoid, "sigmoid", "depends on the input's scale"),
]


@pytest.mark.parametrize(("name", "op", "label", "why"), NOT_HOMOGENEOUS,
                         ids=[c[0] for c in NOT_HOMOGENEOUS])
def test_declines_non_homogeneous_activation(name, op, label, why) -> None:
    result, _ = check_unchanged(Pair(op), (2, 4, 6, 6), equalize)
    (decline,) = result.declined
    assert decline.node == "first"
    assert "not positively homogeneous" in decline.reason and why in decline.reason
    assert label in decline.reason


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        imbalance(self.conv1, self.conv2)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.conv2(h) + h


def test_declines_residual_sum() -> None:
    result, _ = check_unchanged(Residual(), (2, 4, 6, 6), equalize)
    reasons = {d.node: d.reason for d in result.declined}
    assert "'add' (add), which adds other values to them (a residual sum)" in reasons["conv1"]


class AlsoOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.conv2(h), h


def test_declines_channels_that_are_also_a_graph_output() -> None:
    result, _ = check_unchanged(AlsoOutput(), (2, 4, 6, 6), equalize)
    (decline,) = result.declined
    assert "also an output of the graph" in decline.reason


def test_declines_constant_pad() -> None:
    result, _ = check_unchanged(Pair(lambda t: F.pad(torch.relu(t), (1, 1, 1, 1), value=0.5)),
                                (2, 4, 6, 6), equalize)
    assert "pads with the constant 0.5" in result.declined[0].reason


def test_declines_padding_the_channel_axis() -> None:
    model = Pair(lambda t: F.pad(torch.relu(t), (0, 0, 0, 0, 1, 1)), mid=4)
    model.second = nn.Conv2d(6, 3, 3, padding=1)
    result, _ = check_unchanged(model, (2, 4, 6, 6), equalize)
    assert "pads the channel axis" in result.declined[0].reason


class FlattenSpatial(nn.Module):
    """A linear on a flattened spatial axis: it mixes positions, not channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(25, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(2))


def test_declines_linear_on_another_axis() -> None:
    result, _ = check_unchanged(FlattenSpatial(), (2, 3, 5, 5), equalize)
    assert "flattens axes 2..3 of a 4-D tensor whose channels are on axis 1" in (
        result.declined[0].reason)


def test_declines_mean_over_channels() -> None:
    model = Pair(lambda t: torch.relu(t).mean(1, keepdim=True))
    model.second = nn.Conv2d(1, 3, 3, padding=1)
    result, _ = check_unchanged(model, (2, 4, 6, 6), equalize)
    assert "averages over axes [1]" in result.declined[0].reason


def test_declines_concat_along_another_axis() -> None:
    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv2d(4, 4, 3, padding=1)
            self.second = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):  # the input stacked below the scaled channels, same channels
            return self.second(torch.cat([torch.relu(self.first(x)), x], dim=2))

    result, _ = check_unchanged(Stacked(), (2, 4, 6, 6), equalize)
    assert "concatenates along axis 2, not the channel axis" in result.declined[0].reason


def test_declines_split_along_another_axis() -> None:
    model = Pair(lambda t: torch.split(torch.relu(t), 3, dim=2)[0])
    result, _ = check_unchanged(model, (2, 4, 6, 6), equalize)
    assert "splits along axis 2, not the channel axis 1" in result.declined[0].reason


def test_declines_pool_over_the_channel_axis() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = nn.Linear(4, 6)
            self.lin2 = nn.Linear(3, 2)

        def forward(self, x):  # N x L x 4: channels on the last axis, pooled over
            return self.lin2(F.max_pool1d(torch.relu(self.lin1(x)), 2))

    result, _ = check_unchanged(Tokens(), (2, 5, 4), equalize)
    assert "pools a 3-D tensor whose channels are on axis 2" in result.declined[0].reason


class Shared(nn.Module):
    """The second conv is called twice: new weights would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.second(torch.relu(self.second(torch.relu(self.first(x)))))


def test_declines_shared_layers() -> None:
    result, _ = check_unchanged(Shared(), (2, 4, 6, 6), equalize)
    reasons = {d.node: d.reason for d in result.declined}
    assert "read by a shared layer: 'second' (Conv2d) is called at 2 sites" in reasons["first"]
    assert "'second' (Conv2d) is called at 2 sites" in reasons["second"]


def test_declines_unknown_shapes() -> None:
    model = Pair(nn.ReLU()).double().eval()
    gm = torch.fx.symbolic_trace(model)  # no shape propagation
    before = signature(gm)

    result = equalize(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert "output shape of 'first' (Conv2d) is unknown" in result.declined[0].reason


def test_declines_layer_that_reads_the_channels_on_another_axis() -> None:
    class LastAxis(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.fc = nn.Linear(5, 2)

        def forward(self, x):  # 5x5 spatial: the linear reads the width axis
            return self.fc(torch.relu(self.conv(x)))

    result, _ = check_unchanged(LastAxis(), (2, 3, 5, 5), equalize)
    assert "works on axis 3 of a 4-D tensor whose channels are on axis 1" in (
        result.declined[0].reason)


def test_split_parts_read_together_are_declined() -> None:
    model = Pair(lambda t: torch.cat(torch.split(torch.relu(t), 3, dim=1)[::-1], 1))
    model2 = copy.deepcopy(model)
    # parts reordered by a tuple slice: not one getitem per part
    result, _ = check_unchanged(model2, (2, 4, 6, 6), equalize)
    assert "reads the split's parts other than one by one" in result.declined[0].reason


def test_equalize_in_a_pipeline_runs_after_the_merges() -> None:
    model = randomize_bn_stats(create_model("repvgg_tiny"), 2).double().eval()
    x = random_input((2, 3, 32, 32), dtype=torch.float64)

    fused = repfuse.fuse(model, x, passes=[*DEFAULT_PIPELINE, "equalize"])

    counts = repfuse.history(fused).counts()
    assert counts["equalize"] == 1  # once, on the merged layers
    assert repfuse.history(fused).rewrites[-1].pass_name == "equalize"
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= F64_RTOL


class ShapeReadInside(nn.Module):
    """The hidden activation's shape is read (for a reshape after the chain): equalization
    rescales its values, not its shape, so the read moves to the rescaled copy."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 6, 1)
        self.second = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        n, c, h, w = hidden.shape
        return self.second(hidden).reshape(n, -1, h * w)


def test_a_shape_read_of_a_rescaled_activation_does_not_block_equalization() -> None:
    model = ShapeReadInside().double().eval()
    with torch.no_grad():
        model.first.weight[0] *= 50.0  # an outlier channel to equalize
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    gm = repfuse.trace(model, x)
    result = repfuse.passes.run_pipeline(gm, ["equalize"])
    assert result.counts()["equalize"] == 1
    with torch.no_grad():
        expected = model(x)
        assert (gm(x) - expected).abs().max() <= 1e-10 * expected.abs().max()
