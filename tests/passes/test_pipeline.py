"""The pipeline: passes run together to a fixed point, their provenance and history, and cost.

A mixed model needs all three default passes, in an order where one rewrite enables the next
(the dropout between a bias and a ReLU must go before nothing else is left to fold).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    F64_RTOL,
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
from repfuse.passes import (
    DEFAULT_PIPELINE,
    FoldBatchNorm,
    fold_batchnorm,
    fold_scale_bias,
    run_passes,
    run_pipeline,
)
from repfuse.passes.base import META_KEY


class Mixed(nn.Module):
    """conv→bn→·s→+b→dropout→relu→bn→conv1x1→mean→bn1d→linear→bn1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.s = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.b = nn.Parameter(torch.randn(8, 1, 1))
        self.drop = nn.Dropout(0.2)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn_in = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)
        self.bn_out = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn1(self.conv1(x)) * self.s + self.b
        y = self.conv2(self.bn2(torch.relu(self.drop(y))))
        return self.bn_out(self.fc(self.bn_in(y.mean((2, 3)))))


# The graph that should remain: every linear op folded into two layers (the global mean moves
# before the 1x1 conv, which then folds into the Linear head).
FUSED_SIGNATURE = [
    ("placeholder", "x"), ("call_module", "conv1"), ("call_function", str(torch.relu)),
    ("call_method", "mean"), ("call_module", "fc"), ("output", "output"),
]
FUSED_ORIGINS = {
    "conv1": {"conv1", "bn1", "s", "b"},
    "fc": {"bn2", "conv2", "bn_in", "fc", "bn_out"},
}
def mixed_model() -> nn.Module:
    return randomize_bn_stats(Mixed(), seed=3).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_pipeline_reaches_fixed_point_on_mixed_model(dtype: torch.dtype) -> None:
    gm, result = fuse_checked(mixed_model(), random_input((2, 3, 8, 8)), run_pipeline, dtype)

    assert result.passes == DEFAULT_PIPELINE
    applied = {"remove_noops": 1, "fold_batchnorm": 4, "fold_scale_bias": 2,
               "hoist_global_pool": 1, "compose_linear": 1}
    assert result.counts() == {name: applied.get(name, 0) for name in DEFAULT_PIPELINE}
    assert result.declined == []
    assert [(n.op, str(n.target)) for n in gm.graph.nodes] == FUSED_SIGNATURE
    assert modules_of(gm, _BatchNorm, nn.Dropout) == []
    assert set(gm.state_dict()) == {f"{p}.{t}" for p in FUSED_ORIGINS for t in ("weight", "bias")}
    # A second run finds nothing more to do.
    again = run_pipeline(gm)
    assert again.rewrites == [] and again.declined == []


def test_provenance_accumulates_through_chained_rewrites() -> None:
    model = mixed_model().double()
    gm = repfuse.trace(model, random_input((2, 3, 8, 8), dtype=torch.float64))

    result = run_pipeline(gm)

    nodes = {n.name: n for n in gm.graph.nodes}
    for path, origins in FUSED_ORIGINS.items():
        node = next(n for n in nodes.values() if n.op == "call_module" and n.target == path)
        record = node.meta[META_KEY]
        assert record.node == node.name and record.module == path
        assert set(record.module_paths) == origins
        assert record.pass_name in ("fold_batchnorm", "fold_scale_bias", "compose_linear")
    # Each rewrite covers the origins of the node it replaced, plus its own.
    by_node = {r.node: r for r in result.rewrites if r.module is not None}
    for rewrite in by_node.values():
        for replaced in rewrite.replaced:
            if replaced in by_node:
                assert set(by_node[replaced].module_paths) <= set(rewrite.module_paths)
    dropout = [r for r in result.rewrites if r.pass_name == "remove_noops"]
    assert [r.module_paths for r in dropout] == [("drop",)]


class ScaledNorm(nn.Module):
    """conv→·s→bn: the norm folds only once the scale has folded into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.s = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) * self.s)


def test_history_accumulates_over_separate_calls() -> None:
    model = randomize_bn_stats(ScaledNorm().double(), seed=5).eval()
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)

    first = fold_batchnorm(gm)
    assert first.rewrites == [] and [d.node for d in first.declined] == ["bn"]
    second = fold_scale_bias(gm)
    third = fold_batchnorm(gm)

    history = repfuse.history(gm)
    assert history.passes == ("fold_batchnorm", "fold_scale_bias")
    assert history.rewrites == second.rewrites + third.rewrites
    assert history.counts() == {"fold_batchnorm": 1, "fold_scale_bias": 1}
    assert history.declined == []  # the norm declined first was folded by the third call
    assert set(third.rewrites[0].module_paths) == {"conv", "s", "bn"}
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


def test_history_lists_a_repeated_decline_once() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    model = randomize_bn_stats(model.double(), seed=2).eval()
    x = random_input((2, 4, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)

    first = fold_batchnorm(gm)
    second = fold_batchnorm(gm)

    assert first.declined == second.declined and len(second.declined) == 1
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL
    assert repfuse.history(gm).declined == second.declined


def _save_and_load(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_saved_and_loaded_fused_model_computes_the_same() -> None:
    model = mixed_model().double()
    x = random_input((2, 3, 8, 8), dtype=torch.float64)

    loaded = _save_and_load(repfuse.fuse(model, x))

    assert modules_of(loaded, _BatchNorm, nn.Dropout) == []
    with torch.no_grad():
        assert rel_err(reference64(model, x), loaded(x)) <= F64_RTOL


def test_history_survives_save_and_load() -> None:
    fused = repfuse.fuse(mixed_model().double(), random_input((2, 3, 8, 8), dtype=torch.float64))

    loaded = _save_and_load(fused)

    assert len(repfuse.history(fused).rewrites) == 9
    assert repfuse.history(loaded).to_dict() == repfuse.history(fused).to_dict()


def test_history_of_an_untouched_graph_is_empty() -> None:
    gm = repfuse.trace(nn.ReLU(), random_input((2, 3)))
    assert repfuse.history(gm).rewrites == []


def test_unknown_pass_name_lists_the_known_passes() -> None:
    gm = repfuse.trace(mixed_model(), random_input((2, 3, 8, 8)))
    with pytest.raises(repfuse.RepfuseError, match="unknown pass 'fold_everything'") as info:
        run_pipeline(gm, ["fold_batchnorm", "fold_everything"])
    for name in DEFAULT_PIPELINE:
        assert name in str(info.value)
    with pytest.raises(repfuse.RepfuseError, match="unknown pass"):
        repfuse.fuse(mixed_model(), random_input((2, 3, 8, 8)), passes="remove_noops,nope")


def test_passes_named_by_comma_separated_string() -> None:
    model = mixed_model().double()
    x = random_input((2, 3, 8, 8), dtype=torch.float64)

    fused = repfuse.fuse(model, x, passes="remove_noops, fold_batchnorm")

    result = repfuse.history(fused)
    assert result.counts() == {"remove_noops": 1, "fold_batchnorm": 4}
    assert modules_of(fused, _BatchNorm, nn.Dropout) == []
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= F64_RTOL


# --- work proportional to the graph ---------------------------------------------------------

@dataclass(frozen=True)
class CountingFoldBatchNorm(FoldBatchNorm):
    """``fold_batchnorm`` that records every node it is asked to look at."""

    visits: list = field(default_factory=list)

    def visit(self, node, rewriter):
        self.visits.append(node.name)
        return super().visit(node, rewriter)


def test_long_chain_folds_with_linear_work() -> None:
    pairs = 400
    layers = []
    for _ in range(pairs):
        layers += [nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)]
    model = randomize_bn_stats(nn.Sequential(*layers).double(), seed=11).eval()
    x = random_input((1, 2, 3, 3), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    nodes = len(gm.graph.nodes)
    counting = CountingFoldBatchNorm()

    result = run_passes(gm, [counting])

    assert result.counts() == {"fold_batchnorm": pairs}
    assert modules_of(gm, _BatchNorm) == []
    assert len(modules_of(gm, nn.Conv2d)) == pairs
    assert len(gm.graph.nodes) == nodes - pairs
    assert len(counting.visits) <= 10 * nodes  # a rescan after each rewrite would be ~pairs²
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL
