"""Max pooling, LRN and activations are never merged by default, and are listed with reasons."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import random_input
from torch import nn

import repfuse
from repfuse.convert import convert
from repfuse.passes.nonlinear import not_mergeable, summarize


class Stem(nn.Module):
    """conv → LRN → ReLU → maxpool → conv → GELU: Deep Rebirth merges LRN and max pooling only
    by retraining; repfuse must leave all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.pool(torch.relu(self.lrn(self.conv1(x))))
        return F.gelu(self.conv2(F.max_pool2d(y, 1)))


def test_nonlinear_ops_stay_and_are_listed_with_their_reason() -> None:
    model = Stem().eval()
    x = random_input((1, 3, 8, 8))
    result = convert(model, x)

    ops = {item.op for item in result.not_mergeable}
    assert ops == {"LocalResponseNorm", "relu", "MaxPool2d", "max_pool2d", "gelu"}
    kinds = {item.op: item.kind for item in result.not_mergeable}
    assert kinds["MaxPool2d"] == kinds["max_pool2d"] == "max pooling"
    assert kinds["LocalResponseNorm"] == "local response normalization"
    assert all("not mergeable exactly" in item.reason for item in result.not_mergeable)
    pool = next(i for i in result.not_mergeable if i.op == "MaxPool2d")
    assert pool.module_paths == ("pool",)
    # They are still in the fused graph, and it computes what the model does.
    assert not_mergeable(result.fused) == result.not_mergeable
    assert result.report.passed
    summary = result.to_dict()["not_mergeable"]
    assert sum(entry["count"] for entry in summary) == 5


def test_summary_groups_by_op_most_frequent_first() -> None:
    class Net(nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(torch.sigmoid(x)))

    gm = repfuse.trace(Net(), random_input((1, 2, 3, 3)))
    summary = summarize(not_mergeable(gm))
    assert [(s["op"], s["count"]) for s in summary] == [("relu", 2), ("sigmoid", 1)]
