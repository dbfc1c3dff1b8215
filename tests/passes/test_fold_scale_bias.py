"""``fold_scale_bias``: ``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x`` by a constant, into a layer.

``c`` is a Python scalar, a parameter or a buffer broadcasting per channel. The op folds into
the conv/linear layer that produces ``x`` (always exact) or, failing that, into the one that
consumes the result (exact unless that layer pads with zeros and the op shifts). Checked
against the unfused model in float64, in float64 (1e-10) and float32 (1e-5).
"""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import (
    F32_RTOL,
    F64_RTOL,
    calls_to,
    check_unchanged,
    fuse_checked,
    modules_of,
    random_input,
    reference64,
    rel_err,
    signature,
)
from torch import nn

import repfuse
from repfuse.passes import fold_scale_bias

F64, F32 = torch.float64, torch.float32
# Every spelling of elementwise arithmetic the pass folds.
ARITHMETIC = (operator.mul, operator.truediv, operator.add, operator.sub,
              torch.mul, torch.div, torch.add, torch.sub, "mul", "div", "add", "sub")

OPS = {
    "x*c": lambda x, c: x * c,
    "c*x": lambda x, c: c * x,
    "x/c": lambda x, c: x / c,
    "x+c": lambda x, c: x + c,
    "x-c": lambda x, c: x - c,
    "c-x": lambda x, c: c - x,
    "torch.add(x,c,alpha=2)": lambda x, c: torch.add(x, c, alpha=2),
    "x.mul(c)": lambda x, c: x.mul(c),
}

def dtype_param(dtype: torch.dtype, *values):
    """One case in ``dtype``, with a readable id."""
    words = [v if isinstance(v, str) else "x".join(map(str, v))
             for v in values[:3] if isinstance(v, (str, tuple))]
    return pytest.param(*values, dtype, id="-".join([*words, str(dtype)[6:]]))


def away_from_zero(shape: tuple[int, ...]) -> torch.Tensor:
    """Values in ±[0.5, 1.5] (mixed signs), safe to divide by."""
    magnitude = torch.rand(shape) + 0.5
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    return magnitude * sign


class LayerThenOp(nn.Module):
    """``op(layer(x), c)`` with ``c`` a Python scalar, a parameter or a buffer."""

    def __init__(self, layer: nn.Module, op_name: str, const: str, shape=None) -> None:
        super().__init__()
        self.layer = layer
        self.op = OPS[op_name]
        if const == "scalar":
            self.c = -1.7
        elif const == "parameter":
            self.c = nn.Parameter(away_from_zero(shape))
        else:
            self.register_buffer("c", away_from_zero(shape))

    def forward(self, x):
        return self.op(self.layer(x), self.c)


CONSTANTS = [
    ("scalar", None),
    ("parameter", (6, 1, 1)),
    ("parameter", (1, 6, 1, 1)),
    ("buffer", (6, 1, 1)),
]


def assert_folded_into_layer(gm, result, rewrites: int, layer_type: type) -> None:
    assert result.counts() == {"fold_scale_bias": rewrites}
    assert result.declined == []
    assert calls_to(gm, *ARITHMETIC) == 0
    assert modules_of(gm, nn.Conv2d, nn.Linear) == ["layer"]
    assert type(gm.get_submodule("layer")) is layer_type
    assert set(gm.state_dict()) == {"layer.weight", "layer.bias"}


@pytest.mark.parametrize(("op_name", "const", "shape", "dtype"), [
    dtype_param(dtype, op_name, const, shape)
    for op_name in OPS for const, shape in CONSTANTS for dtype in (F64, F32)
])
def test_folds_into_preceding_conv(op_name: str, const: str, shape, dtype) -> None:
    model = LayerThenOp(nn.Conv2d(4, 6, 3, padding=1), op_name, const, shape)
    gm, result = fuse_checked(model, random_input((2, 4, 7, 7)), fold_scale_bias, dtype)

    assert_folded_into_layer(gm, result, 1, nn.Conv2d)
    expected_paths = {"layer"} if const == "scalar" else {"layer", "c"}
    assert set(result.rewrites[0].module_paths) == expected_paths


@pytest.mark.parametrize(("op_name", "const", "dtype"), [
    dtype_param(dtype, op_name, "parameter")
    for op_name in OPS for dtype in (F64, F32)
])
def test_folds_channel_vector_into_preceding_linear(op_name: str, const: str, dtype) -> None:
    model = LayerThenOp(nn.Linear(5, 6), op_name, const, (6,))
    gm, result = fuse_checked(model, random_input((3, 4, 5)), fold_scale_bias, dtype)
    assert_folded_into_layer(gm, result, 1, nn.Linear)


class AffineChain(nn.Module):
    """``conv(x) * g + b``: a per-channel scale layer after a conv, as in LayerScale/FrozenBN."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.g = nn.Parameter(away_from_zero((6, 1, 1)))
        self.b = nn.Parameter(torch.randn(6, 1, 1))

    def forward(self, x):
        return self.layer(x) * self.g + self.b


@pytest.mark.parametrize("dtype", [F64, F32],
                         ids=["float64", "float32"])
def test_chain_of_scale_and_bias_folds_into_one_conv(dtype: torch.dtype) -> None:
    gm, result = fuse_checked(AffineChain(), random_input((2, 4, 7, 7)), fold_scale_bias, dtype)

    assert_folded_into_layer(gm, result, 2, nn.Conv2d)
    first, second = result.rewrites
    assert set(first.module_paths) == {"layer", "g"}
    # The second rewrite covers the first one's origins too.
    assert set(second.module_paths) == {"layer", "g", "b"}
    assert second.replaced[0] == first.node


class OpThenLayer(nn.Module):
    """``layer(relu(x) * g + b)``: nothing folds upstream, so the op goes into ``layer``."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...], scale: bool = True,
                 shift: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.g = nn.Parameter(away_from_zero(shape)) if scale else None
        self.b = nn.Parameter(torch.randn(shape)) if shift else None

    def forward(self, x):
        x = torch.relu(x)
        if self.g is not None:
            x = x * self.g
        if self.b is not None:
            x = x + self.b
        return self.layer(x)


# (id, layer factory, constant shape, input shape, scale, shift)
INTO_FOLLOWING = [
    ("scale_bias_conv1x1", lambda: nn.Conv2d(4, 6, 1), (4, 1, 1), (2, 4, 6, 6), True, True),
    ("scale_bias_conv3x3_unpadded", lambda: nn.Conv2d(4, 6, 3, stride=2), (4, 1, 1),
     (2, 4, 9, 9), True, True),
    ("scale_bias_linear", lambda: nn.Linear(4, 6), (4,), (3, 4), True, True),
    ("scale_only_conv3x3_zero_padded", lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 1, 1),
     (2, 4, 6, 6), True, False),
]


@pytest.mark.parametrize(
    ("name", "make_layer", "shape", "input_shape", "scale", "shift", "dtype"),
    [dtype_param(dtype, *case) for case in INTO_FOLLOWING for dtype in (F64, F32)],
)
def test_folds_into_following_layer(
    name, make_layer, shape, input_shape, scale, shift, dtype
) -> None:
    model = OpThenLayer(make_layer(), shape, scale=scale, shift=shift)
    gm, result = fuse_checked(model, random_input(input_shape), fold_scale_bias, dtype)

    layer_type = type(model.layer)
    assert_folded_into_layer(gm, result, int(scale) + int(shift), layer_type)
    assert calls_to(gm, torch.relu) == 1
    assert set(result.rewrites[-1].module_paths) == {"layer", "g", "b"} - (
        set() if shift else {"b"})


def test_bias_before_zero_padded_conv_is_declined() -> None:
    model = OpThenLayer(nn.Conv2d(4, 6, 3, padding=1), (4, 1, 1), scale=False).double()
    x = random_input((2, 4, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = fold_scale_bias(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert [d.node for d in result.declined] == ["add"]
    assert "pads with zeros" in result.declined[0].reason
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


# --- not candidates, and declines -----------------------------------------------------------

class SqueezeExcite(nn.Module):
    """``conv(x) * sigmoid(gate(x))``: a product of two activations, not a scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.gate(x))


def test_product_of_activations_is_not_a_candidate() -> None:
    result, _ = check_unchanged(SqueezeExcite(), (2, 4, 6, 6), fold_scale_bias)
    assert result.declined == []


class ConvTimes(nn.Module):
    def __init__(self, const: torch.Tensor, op=operator.mul) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("c", const)
        self.op = op

    def forward(self, x):
        return self.op(self.conv(x), self.c)


def _with_zero() -> torch.Tensor:
    c = away_from_zero((4, 1, 1))
    c[2] = 0.0
    return c


# (id, model factory, float64 model, phrase). The float64 flag is False where converting the
# model would change what is tested (the dtype mismatch).
DECLINES = [
    ("not_per_channel", lambda: ConvTimes(away_from_zero((1, 1, 6, 6))), True,
     "is not per-channel along axis 1"),
    ("division_by_zero", lambda: ConvTimes(_with_zero(), operator.truediv), True,
     "divides by a constant that contains zero"),
    ("other_dtype", lambda: ConvTimes(away_from_zero((4, 1, 1)).double()), False,
     "the constant is torch.float64 but the data is torch.float32"),
]


@pytest.mark.parametrize(("make_model", "as_float64", "phrase"), [c[1:] for c in DECLINES],
                         ids=[c[0] for c in DECLINES])
def test_declines_and_leaves_graph_unchanged(make_model, as_float64: bool, phrase: str) -> None:
    model = make_model()
    x = random_input((2, 4, 6, 6))
    if as_float64:
        model, x = model.double(), x.double()
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = fold_scale_bias(gm)

    assert result.rewrites == [] and signature(gm) == before
    assert len(result.declined) == 1
    assert phrase in result.declined[0].reason
    with torch.no_grad():
        actual = gm(x)
        assert actual.dtype == model(x).dtype
    expected = reference64(model, x)
    # Dividing by the zero channel gives inf in both; compare where the reference is finite.
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual))
    tolerance = F64_RTOL if as_float64 else F32_RTOL
    assert rel_err(expected[finite], actual[finite]) <= tolerance


def test_constant_over_variable_is_not_a_candidate() -> None:
    """``c / x`` is not affine in ``x``."""
    model = ConvTimes(away_from_zero((4, 1, 1)), lambda y, c: c / y).double()
    x = random_input((2, 4, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    before = signature(gm)

    result = fold_scale_bias(gm)

    assert result.rewrites == [] and result.declined == [] and signature(gm) == before


class NormalizeBytes(nn.Module):
    """``conv(x / 255)`` on a uint8 image: the division also casts the input to float."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x / 255.0)


def test_scale_that_casts_an_integer_input_is_kept_exact() -> None:
    model = NormalizeBytes()
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    gm = repfuse.trace(model, x)

    fold_scale_bias(gm)
    with torch.no_grad():
        actual = gm(x)

    assert actual.dtype == torch.float32
    assert rel_err(reference64(model, x), actual) <= F32_RTOL
