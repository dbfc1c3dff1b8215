"""The cost model: per-node MACs/params/bytes against hand counts, the ``pays`` rule, and the
per-rewrite estimates adding up to the measured graph totals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_input
from torch import nn

import repfuse
from repfuse.cost import NodeCost, graph_cost, layer_cost, node_cost, pays
from repfuse.models import create_model, get_spec
from repfuse.passes import run_pipeline


def test_conv_node_cost_matches_a_hand_count() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)).eval()
    x = random_input((2, 4, 9, 8))
    gm = repfuse.trace(model, x)
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    out = model(x)
    cost = node_cost(gm, conv)
    assert cost.macs == out.numel() * (4 // 2) * 9
    assert cost.params == 6 * 2 * 9 + 6
    assert cost.bytes == (x.numel() + out.numel() + cost.params) * 4


def test_views_move_no_bytes_and_elementwise_ops_no_macs() -> None:
    class Net(nn.Module):
        def forward(self, x):
            return torch.relu(x).flatten(1)

    x = random_input((2, 3, 4, 4))
    gm = repfuse.trace(Net(), x)
    costs = {n.name: node_cost(gm, n) for n in gm.graph.nodes}
    assert costs["flatten"] == NodeCost()
    assert costs["relu"] == NodeCost(0, 0, 2 * x.numel() * 4)


def test_layer_cost_of_a_linear() -> None:
    cost = layer_cost((5, 8), (3, 8), (3, 5), 4)
    assert cost == NodeCost(3 * 5 * 8, 5 * 8 + 5, (3 * 8 + 3 * 5 + 45) * 4)


@pytest.mark.parametrize(("before", "after", "reason"), [
    (NodeCost(10, 1, 100), NodeCost(11, 1, 10), "raise MACs"),
    (NodeCost(10, 1, 100), NodeCost(10, 1, 101), "raise the bytes"),
])
def test_a_merge_that_costs_more_says_why(before, after, reason) -> None:
    assert reason in pays(before, after)


@pytest.mark.parametrize(("before", "after"), [
    (NodeCost(10, 1, 100), NodeCost(10, 1, 100)),
    (NodeCost(10, 1, 100), NodeCost(9, 50, 500)),  # fewer MACs: more weights are allowed
])
def test_a_merge_that_does_not_cost_more_pays(before, after) -> None:
    assert pays(before, after) is None


@pytest.mark.parametrize("name", ["googlenet_tiny", "vgg_avgpool_tiny", "repvgg_tiny",
                                  "mobileone_tiny", "resnet_tiny"])
def test_per_rewrite_cost_changes_add_up_to_the_measured_totals(name: str) -> None:
    model = create_model(name)
    x = random_input(get_spec(name).input_shape)
    gm = repfuse.trace(model, x)
    before = graph_cost(gm)
    fused = copy.deepcopy(gm)
    result = run_pipeline(fused)
    after = graph_cost(fused)
    change = sum((r.cost_change for r in result.rewrites), NodeCost())
    assert result.rewrites
    assert before.macs + change.macs == after.macs
    assert before.bytes + change.bytes == after.bytes
    by_pass = result.cost_change_by_pass()
    assert sum(c.macs for c in by_pass.values()) == change.macs
    assert math.isclose(sum(c.bytes for c in by_pass.values()), change.bytes)


def test_conversion_reports_cost_per_pass_ending_at_the_measured_cost() -> None:
    from repfuse.convert import convert

    model = create_model("vgg_avgpool_tiny")
    result = convert(model, random_input(get_spec("vgg_avgpool_tiny").input_shape),
                     verify=None)
    rows = result.to_dict()["cost"]["by_pass"]
    assert [r["pass"] for r in rows] == list(result.passes.passes)
    assert rows[-1]["macs"] == result.cost_after.macs < result.cost_before.macs
    assert rows[-1]["bytes"] == result.cost_after.bytes
    composed = next(r for r in rows if r["pass"] == "compose_linear")
    assert composed["rewrites"] == 3
