"""Bugs the property tests found, each shrunk to a minimal model, kept as a test.

A test marked ``xfail(strict=True)`` would be a bug still open: it
starts passing (and so fails as XPASS) once the bug is fixed; then drop the mark. The random
generators steer around an open bug (see the comment naming the test here) so that CI stays
green meanwhile.
"""

from __future__ import annotations

import torch
from conftest import random_input, reference64, rel_err
from torch import Tensor, nn

import repfuse


class ConcatAlongComputedDim(nn.Module):
    """Two convs concatenated along ``dim=x.dim() - 3``: the channel axis, computed in the graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=x.dim() - 3)


def test_concat_along_a_computed_dim_is_left_alone_or_merged():
    """merge_branches read ``dim % len(shape)`` on the cat's dim, a Node here (TypeError)."""
    model = ConcatAlongComputedDim().double().eval()
    x = random_input((1, 2, 5, 5), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    with torch.no_grad():
        assert rel_err(reference64(model, x), fused(x)) <= 1e-10


class DilatedEvenAndOddBranches(nn.Module):
    """``conv(k=2, dilation=2) + conv(k=3, dilation=2)``: dense sizes 3 and 5, centred."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, (2, 1), padding=(1, 0), dilation=(2, 1), bias=False)
        self.b = nn.Conv2d(2, 2, (3, 1), padding=(2, 0), dilation=(2, 1), bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


def test_branches_of_one_dilation_whose_sizes_differ_by_an_odd_number_merge_exactly():
    """Found by the long property run on 4aff8a1: merge_branches padded the sparse kernels
    (sizes 2 and 3) instead of the dense ones (3 and 5), off centre: wrong shape or values.
    Fixed in algebra._aligned (densify unless every size difference is even)."""
    model = DilatedEvenAndOddBranches().double().eval()
    x = random_input((2, 2, 5, 5), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1
    with torch.no_grad():
        out = fused(x)
    assert out.shape == (2, 2, 5, 5)
    assert rel_err(reference64(model, x), out) <= 1e-10
