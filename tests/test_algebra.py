"""The fold algebra of :mod:`repfuse.algebra`, checked against ``torch.nn.functional``.

Each fold is applied to random weights and compared, on random inputs in float64, with the
unfused computation written directly with ``F.conv*``/``F.linear``/``F.batch_norm``:

- into the output:  ``conv(x, s·W, s·b + t) == s * conv(x, W, b) + t`` per output channel;
- into the input:   ``conv(x, W', b') == conv(s * x + t, W, b)`` per input channel.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, rel_err
from torch import Tensor, nn

from repfuse.algebra import (
    ChannelAffine,
    batchnorm_affine,
    fold_affine_into_input,
    fold_affine_into_output,
)

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SPATIAL = {1: (11,), 2: (9, 8), 3: (7, 6, 5)}


def random_affine(channels: int, shift: bool = True) -> ChannelAffine:
    """A per-channel map with scales away from 1 (some negative) and O(1) shifts."""
    scale = torch.rand(channels, dtype=F64) * 2.5 + 0.25
    scale[::3] *= -1
    offset = torch.randn(channels, dtype=F64) if shift else torch.zeros(channels, dtype=F64)
    return ChannelAffine(scale, offset)


def per_channel(vector: Tensor, ndim: int, axis: int = 1) -> Tensor:
    """``vector`` shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def apply(affine: ChannelAffine, x: Tensor, axis: int = 1) -> Tensor:
    return per_channel(affine.scale, x.dim(), axis) * x + per_channel(affine.shift, x.dim(), axis)


# --- batch norm as an affine map ------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_batchnorm_affine_matches_eval_batch_norm(affine: bool) -> None:
    channels, eps = 6, 1e-3
    mean = torch.randn(channels, dtype=F64)
    var = torch.rand(channels, dtype=F64) + 0.2
    weight = torch.randn(channels, dtype=F64) if affine else None
    bias = torch.randn(channels, dtype=F64) if affine else None
    x = torch.randn(3, channels, 5, 4, dtype=F64)

    expected = F.batch_norm(x, mean, var, weight, bias, False, 0.1, eps)
    folded = batchnorm_affine(mean, var, weight, bias, eps)

    assert folded.scale.dtype == F64 and folded.shift.dtype == F64
    assert rel_err(expected, apply(folded, x)) <= F64_RTOL


def test_batchnorm_affine_computes_in_float64_from_float32_statistics() -> None:
    channels = 5
    mean, var = torch.randn(channels), torch.rand(channels) + 0.5
    weight, bias = torch.randn(channels), torch.randn(channels)
    x = torch.randn(2, channels, 3, dtype=F64)

    folded = batchnorm_affine(mean, var, weight, bias, 1e-5)
    expected = F.batch_norm(x, mean.double(), var.double(), weight.double(), bias.double(),
                            False, 0.1, 1e-5)

    assert folded.scale.dtype == F64
    assert rel_err(expected, apply(folded, x)) <= F64_RTOL


# --- folding into the producing layer -------------------------------------------------------

# (dims, in, out, groups, stride, padding, dilation)
CONV_CASES = [
    (dims, cin, cout, groups, stride, padding, dilation)
    for dims in (1, 2, 3)
    for cin, cout, groups in ((4, 6, 1), (4, 6, 2), (4, 8, 4))  # dense, grouped, depthwise
    for stride, padding, dilation in ((1, 0, 1), (2, 1, 2))
]


def conv_id(case: tuple) -> str:
    dims, cin, cout, groups, stride, padding, dilation = case
    return f"{dims}d-{cin}to{cout}-g{groups}-s{stride}p{padding}d{dilation}"


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_id)
def test_fold_into_output_of_conv(case: tuple, has_bias: bool) -> None:
    dims, cin, cout, groups, stride, padding, dilation = case
    weight = torch.randn(cout, cin // groups, *([3] * dims), dtype=F64)
    bias = torch.randn(cout, dtype=F64) if has_bias else None
    affine = random_affine(cout)
    x = torch.randn(2, cin, *SPATIAL[dims], dtype=F64)
    conv = CONV[dims]
    options = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}

    new_weight, new_bias = fold_affine_into_output(weight, bias, affine, groups=groups)

    expected = apply(affine, conv(x, weight, bias, **options))
    assert rel_err(expected, conv(x, new_weight, new_bias, **options)) <= F64_RTOL


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_into_output_of_conv_transpose(dims: int, groups: int, has_bias: bool) -> None:
    # in/groups != out/groups, so mixing up the two channel indices would show.
    cin, cout = 6, {1: 5, 2: 8, 3: 9}[groups]
    weight = torch.randn(cin, cout // groups, *([3] * dims), dtype=F64)
    bias = torch.randn(cout, dtype=F64) if has_bias else None
    affine = random_affine(cout)
    x = torch.randn(2, cin, *SPATIAL[dims], dtype=F64)
    conv_t = CONV_T[dims]
    options = {"stride": 2, "padding": 1, "output_padding": 1, "groups": groups}

    new_weight, new_bias = fold_affine_into_output(weight, bias, affine, groups=groups,
                                                   transposed=True)

    expected = apply(affine, conv_t(x, weight, bias, **options))
    assert rel_err(expected, conv_t(x, new_weight, new_bias, **options)) <= F64_RTOL


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_fold_into_output_of_linear(has_bias: bool) -> None:
    weight = torch.randn(7, 5, dtype=F64)
    bias = torch.randn(7, dtype=F64) if has_bias else None
    affine = random_affine(7)
    x = torch.randn(4, 3, 5, dtype=F64)

    new_weight, new_bias = fold_affine_into_output(weight, bias, affine)

    expected = apply(affine, F.linear(x, weight, bias), axis=-1)
    assert rel_err(expected, F.linear(x, new_weight, new_bias)) <= F64_RTOL


# --- folding into the consuming layer -------------------------------------------------------

UNPADDED_CASES = [
    (dims, cin, cout, groups, stride, dilation)
    for dims in (1, 2, 3)
    for cin, cout, groups in ((4, 6, 1), (4, 6, 2), (4, 8, 4))
    for stride, dilation in ((1, 1), (2, 2))
]


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "case", UNPADDED_CASES,
    ids=lambda c: f"{c[0]}d-{c[1]}to{c[2]}-g{c[3]}-s{c[4]}d{c[5]}",
)
def test_fold_into_input_of_unpadded_conv(case: tuple, has_bias: bool) -> None:
    dims, cin, cout, groups, stride, dilation = case
    weight = torch.randn(cout, cin // groups, *([3] * dims), dtype=F64)
    bias = torch.randn(cout, dtype=F64) if has_bias else None
    affine = random_affine(cin)
    x = torch.randn(2, cin, *SPATIAL[dims], dtype=F64)
    conv = CONV[dims]
    options = {"stride": stride, "dilation": dilation, "groups": groups}

    new_weight, new_bias = fold_affine_into_input(weight, bias, affine, groups=groups)

    expected = conv(apply(affine, x), weight, bias, **options)
    assert rel_err(expected, conv(x, new_weight, new_bias, **options)) <= F64_RTOL


CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_into_input_is_exact_with_non_zero_padding_modes(
    dims: int, mode: str, groups: int
) -> None:
    conv = CONV_MODULES[dims](4, 6, 3, padding=1, groups=groups, padding_mode=mode).double()
    affine = random_affine(4)
    x = torch.randn(2, 4, *SPATIAL[dims], dtype=F64)

    fused = copy.deepcopy(conv)
    new_weight, new_bias = fold_affine_into_input(conv.weight, conv.bias, affine, groups=groups)
    with torch.no_grad():
        fused.weight.copy_(new_weight)
        fused.bias.copy_(new_bias)
        expected = conv(apply(affine, x))
        actual = fused(x)

    assert rel_err(expected, actual) <= F64_RTOL


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_fold_into_input_of_linear(has_bias: bool) -> None:
    weight = torch.randn(7, 5, dtype=F64)
    bias = torch.randn(7, dtype=F64) if has_bias else None
    affine = random_affine(5)
    x = torch.randn(4, 3, 5, dtype=F64)

    new_weight, new_bias = fold_affine_into_input(weight, bias, affine)

    expected = F.linear(apply(affine, x, axis=-1), weight, bias)
    assert rel_err(expected, F.linear(x, new_weight, new_bias)) <= F64_RTOL


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no_shift"])
def test_fold_into_input_with_zero_padding_is_exact_only_without_shift(shift: bool) -> None:
    weight = torch.randn(6, 4, 3, 3, dtype=F64)
    bias = torch.randn(6, dtype=F64)
    affine = random_affine(4, shift=shift)
    x = torch.randn(2, 4, 7, 7, dtype=F64)

    new_weight, new_bias = fold_affine_into_input(weight, bias, affine)
    error = rel_err(F.conv2d(apply(affine, x), weight, bias, padding=1),
                    F.conv2d(x, new_weight, new_bias, padding=1))

    assert affine.has_shift() is shift
    if shift:
        assert error > 1e-2  # the border sees 0 where the original conv saw the shift
    else:
        assert error <= F64_RTOL


# --- composition, broadcasting, validation --------------------------------------------------

def test_then_composes_two_maps_in_order() -> None:
    first, second = random_affine(5), random_affine(5)
    x = torch.randn(3, 5, 4, dtype=F64)

    composed = first.then(second)

    assert rel_err(apply(second, apply(first, x)), apply(composed, x)) <= F64_RTOL
    # Affine maps do not commute: the other order is a different map.
    assert rel_err(apply(second, apply(first, x)), apply(second.then(first), x)) > 1e-3


def test_from_scalars_broadcasts_scalars_and_vectors() -> None:
    scale = torch.randn(4, dtype=F64)
    affine = ChannelAffine.from_scalars(4, scale=scale, shift=0.5)
    x = torch.randn(2, 4, 3, dtype=F64)

    assert affine.channels == 4
    assert rel_err(per_channel(scale, 3) * x + 0.5, apply(affine, x)) <= F64_RTOL
    assert not ChannelAffine.from_scalars(4, scale=2.0).has_shift()


def test_channel_affine_rejects_mismatched_vectors() -> None:
    with pytest.raises(ValueError, match="equal length"):
        ChannelAffine(torch.ones(3, dtype=F64), torch.zeros(4, dtype=F64))


# --- dtype: computed in float64, returned in the weight's dtype -----------------------------

@pytest.mark.parametrize("direction", ["output", "input"])
def test_float32_weights_are_folded_in_float64_and_cast_back(direction: str) -> None:
    weight32 = torch.randn(6, 2, 3, 3)
    bias32 = torch.randn(6)
    channels = 6 if direction == "output" else 4
    affine = random_affine(channels)
    fold = fold_affine_into_output if direction == "output" else fold_affine_into_input

    w32, b32 = fold(weight32, bias32, affine, groups=2)
    w64, b64 = fold(weight32.double(), bias32.double(), affine, groups=2)

    assert w32.dtype == torch.float32 and b32.dtype == torch.float32
    assert w64.dtype == F64 and b64.dtype == F64
    # Bitwise: the float32 result is the float64 result rounded once, not float32 arithmetic.
    assert torch.equal(w32, w64.float())
    assert torch.equal(b32, b64.float())


def test_missing_bias_is_created_in_the_weight_dtype() -> None:
    weight = torch.randn(3, 4, dtype=torch.bfloat16)
    new_weight, new_bias = fold_affine_into_output(weight, None, random_affine(3))

    assert new_weight.dtype == torch.bfloat16 and new_bias.dtype == torch.bfloat16
    assert new_bias.shape == (3,)
