"""``remove_noops``: identities, eval-mode dropout and arithmetic with a neutral scalar.

Every model here is ``relu(noop(conv(x)))``; once the no-op is removed, the graph must be the
graph of ``relu(conv(x))`` and compute the unfused model's output.
"""

from __future__ import annotations

import operator

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
from repfuse.models.resnet import DropPath
from repfuse.passes import remove_noops

NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
DROPOUT_CALLS = (F.dropout, F.dropout2d, torch.dropout)
ARITHMETIC = (operator.mul, operator.truediv, operator.add, operator.sub)


class ConvNoopRelu(nn.Module):
    def __init__(self, noop=None, module: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.noop = noop
        self.drop = module

    def forward(self, x):
        y = self.conv(x)
        if self.drop is not None:
            y = self.drop(y)
        if self.noop is not None:
            y = self.noop(self, y)
        return torch.relu(y)


PLAIN = ConvNoopRelu()

# (id, functional no-op, module no-op)
REMOVED = [
    ("nn.Dropout", None, nn.Dropout(0.3)),
    ("nn.Dropout2d", None, nn.Dropout2d(0.3)),
    ("nn.Identity", None, nn.Identity()),
    ("F.dropout(training=self.training)", lambda m, y: F.dropout(y, 0.3, m.training), None),
    ("F.dropout(p=0)", lambda m, y: F.dropout(y, 0.0), None),
    ("x*1", lambda m, y: y * 1, None),
    ("x/1", lambda m, y: y / 1, None),
    ("x+0", lambda m, y: y + 0, None),
    ("x-0.0", lambda m, y: y - 0.0, None),
]


@DTYPES
@pytest.mark.parametrize(("noop", "module"), [c[1:] for c in REMOVED], ids=[c[0] for c in REMOVED])
def test_removes_noop(noop, module, dtype: torch.dtype) -> None:
    model = ConvNoopRelu(noop, module).train()  # traced in eval all the same
    x = random_input((2, 3, 6, 6))

    gm, result = fuse_checked(model, x, remove_noops, dtype)

    assert result.counts() == {"remove_noops": 1}
    assert result.declined == []
    assert result.rewrites[0].node == "conv"
    assert modules_of(gm, *NOOP_MODULES) == []
    assert calls_to(gm, *DROPOUT_CALLS, *ARITHMETIC) == 0
    assert signature(gm) == signature(repfuse.trace(PLAIN, x))


def test_records_the_removed_module_path() -> None:
    gm = repfuse.trace(ConvNoopRelu(module=nn.Dropout(0.1)), random_input((1, 3, 4, 4)))
    result = remove_noops(gm)
    assert result.rewrites[0].module_paths == ("drop",)
    assert result.rewrites[0].replaced == ("drop",)


def _seeded_run(module: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Run with a fixed RNG state, so two runs of the same dropout draw the same mask."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return module(x)


def test_functional_dropout_defaulting_to_training_is_kept() -> None:
    model = ConvNoopRelu(lambda m, y: F.dropout(y, 0.5)).double()
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = remove_noops(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert calls_to(gm, F.dropout) == 1
    assert "training=True" in result.declined[0].reason
    expected = _seeded_run(model, x)
    assert (expected == 0).any()  # the dropout really drops
    assert rel_err(expected, _seeded_run(gm, x)) <= F64_RTOL


def test_dropout_module_in_training_mode_is_kept() -> None:
    model = ConvNoopRelu(module=nn.Dropout(0.5)).double()
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    gm.get_submodule("drop").train()
    before = signature(gm)

    result = remove_noops(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert [d.node for d in result.declined] == ["drop"]
    assert "training mode" in result.declined[0].reason
    assert rel_err(_seeded_run(model.train(), x), _seeded_run(gm, x)) <= F64_RTOL


class IntegerTimesOne(nn.Module):
    def forward(self, x, index):
        return x * (index * 1)  # index * 1 stays integer; x * 1.0 would not


def test_times_one_on_an_integer_tensor_is_kept() -> None:
    model = IntegerTimesOne()
    x = random_input((2, 5), dtype=torch.float64)
    index = torch.arange(10).reshape(2, 5)
    gm = repfuse.trace(model, (x, index))
    before = signature(gm)

    result = remove_noops(gm)

    assert result.rewrites == [] and result.declined == []
    assert signature(gm) == before
    with torch.no_grad():
        assert rel_err(reference64(model, x, index), gm(x, index)) <= F64_RTOL


class ResidualWithDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop_path = DropPath(0.2)

    def forward(self, x):
        return x + self.drop_path(self.conv(x))


def test_drop_path_vanishes_when_traced() -> None:
    model = ResidualWithDropPath().double().train()
    x = random_input((2, 3, 6, 6), dtype=torch.float64)

    gm = repfuse.trace(model, x)

    assert modules_of(gm, DropPath) == []
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_function",
                                              "output"]
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL
