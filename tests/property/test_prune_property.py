"""Property: ``prune_dead`` removes exactly the dead channels a few plain rules allow, and the
pruned model computes what the unpruned one does.

Hypothesis draws a block ``reader(act(a(x) [+ s(x)]))`` with dead filters in ``a`` (zero rows,
random biases), an optional residual partner ``s`` dead on the same channels or not, an
activation and a reader. The rules, applied by hand: a dead channel's value at the reader is
``act(b_a [+ b_s])`` if ``s`` is dead there too, else it varies; it goes if it is constant and
the reader folds it (a 1x1 or unpadded conv, a global pool then a Linear) or it is 0; at least
one channel stays. The pruned ``a`` must have exactly that many channels fewer, and the outputs
must match the unpruned model in float64 to 1e-10.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, random_input, reference64, rel_err
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import repfuse
from repfuse.passes import prune_dead

pytestmark = pytest.mark.usefixtures("one_thread")


ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "none": lambda t: t}


@dataclass(frozen=True)
class Spec:
    channels: int
    dead: tuple[int, ...]
    biases: tuple[float, ...]  # of a's dead channels
    residual: str  # "none" | "dead_in_both" | "dead_in_one"
    activation: str
    reader: str  # "1x1" | "3x3_padded" | "3x3_valid" | "pool_linear"
    seed: int


@st.composite
def specs(draw) -> Spec:
    channels = draw(st.integers(2, 7))
    dead = draw(st.lists(st.integers(0, channels - 1), min_size=1, max_size=channels,
                         unique=True))
    # zero is common after a ReLU (β ≤ 0), so draw it on purpose
    biases = tuple(draw(st.sampled_from([0.0, -0.5, 0.3, 1.25])) for _ in dead)
    return Spec(channels, tuple(sorted(dead)), biases,
                draw(st.sampled_from(["none", "dead_in_both", "dead_in_one"])),
                draw(st.sampled_from(sorted(ACTIVATIONS))),
                draw(st.sampled_from(["1x1", "3x3_padded", "3x3_valid", "pool_linear"])),
                draw(st.integers(0, 2**16)))


class Block(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.a = nn.Conv2d(3, spec.channels, 3, padding=1)
        self.s = nn.Conv2d(3, spec.channels, 1) if spec.residual != "none" else None
        if spec.reader == "pool_linear":
            self.reader = nn.Linear(spec.channels, 4)
        else:
            kernel, padding = (1, 0) if spec.reader == "1x1" else (
                3, 1 if spec.reader == "3x3_padded" else 0)
            self.reader = nn.Conv2d(spec.channels, 4, kernel, padding=padding)
        with torch.no_grad():
            dead = list(spec.dead)
            self.a.weight[dead] = 0
            self.a.bias[dead] = torch.tensor(spec.biases)
            if spec.residual == "dead_in_both":
                self.s.weight[dead] = 0

    def forward(self, x):
        y = self.a(x)
        if self.s is not None:
            y = y + self.s(x)
        y = ACTIVATIONS[self.spec.activation](y)
        if self.spec.reader == "pool_linear":
            return self.reader(y.mean((2, 3)))
        return self.reader(y)


def expected_removed(model: Block) -> int:
    spec = model.spec
    if spec.residual == "dead_in_one":
        return 0
    removable = 0
    for c in spec.dead:
        value = model.a.bias[c] + (model.s.bias[c] if model.s is not None else 0)
        value = ACTIVATIONS[spec.activation](value.reshape(1)).item()
        if spec.reader != "3x3_padded" or value == 0:
            removable += 1
    return min(removable, spec.channels - 1)


@given(specs())
def test_prune_dead_removes_what_the_rules_allow_and_keeps_the_function(spec: Spec) -> None:
    model = Block(spec).double().eval()
    x = random_input((2, 3, 6, 6), seed=spec.seed, dtype=torch.float64)
    gm = repfuse.trace(copy.deepcopy(model), x)

    prune_dead(gm)

    assert gm.get_submodule("a").out_channels == spec.channels - expected_removed(model)
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL
