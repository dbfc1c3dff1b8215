"""repfuse.graph's reading of plain-value computations: which traced calls compute a plain value
from metadata (pure, so a reader of a tensor that only feeds them is not a data user)."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from repfuse.graph import is_metadata_helper


def metadata_call(function, *extra):
    """``function(x.size(1), *extra)`` in a graph, and that call's node."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["type"] = torch.Tensor
    size = graph.call_method("size", (x, 1))
    size.meta["type"] = int
    return graph.call_function(function, (size, *extra))


@pytest.mark.parametrize("function", [
    operator.add, operator.floordiv, operator.invert, operator.index, operator.is_not,
    math.isqrt, math.isnan, math.sqrt,
], ids=lambda f: f.__name__)
def test_pure_functions_of_a_size_are_metadata_helpers(function):
    extra = (2,) if function in (operator.add, operator.floordiv, operator.is_not) else ()
    assert is_metadata_helper(metadata_call(function, *extra))


@pytest.mark.parametrize("function", [operator.iadd, operator.iand, operator.iconcat,
                                      operator.setitem], ids=lambda f: f.__name__)
def test_in_place_operators_are_not(function):
    extra = ([1],) if function is operator.iconcat else (2,)
    if function is operator.setitem:
        extra = (0, 1)
    assert not is_metadata_helper(metadata_call(function, *extra))
