"""Convolutions as values (:class:`repfuse.algebra.Kernel`) and their combinators.

Every combined kernel is run on random float64 inputs and compared with the separate kernels
run directly with ``torch.nn.functional`` (``F.conv*``, ``F.avg_pool*``, ``torch.cat``):

- ``parallel_sum``: ``conv(x, ΣW_i, Σb_i) == Σ conv_i(x)`` once the kernels are centre-aligned;
- ``concat``:       ``conv(x, [W_i], [b_i]) == cat([conv_i(x)], 1)``;
- ``compose``:      ``conv(x, W, b) == conv_B(conv_A(x))``.

Declines are checked for the key phrase of their reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_RTOL, random_input, rel_err
from torch import Tensor

from repfuse.algebra import (
    Kernel,
    avgpool_kernel,
    compose,
    composed_weight_shape,
    concat,
    densify,
    identity_kernel,
    pad_to,
    parallel_sum,
    regroup,
)

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * dims


def random_kernel(
    in_channels: int,
    out_channels: int,
    size: int | tuple[int, ...],
    *,
    dims: int = 2,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    bias: bool = True,
) -> Kernel:
    """A kernel with N(0, 1) weights (and bias), float64."""
    size = _tuple(size, dims)
    weight = torch.randn(out_channels, in_channels // groups, *size, dtype=F64)
    b = torch.randn(out_channels, dtype=F64) if bias else None
    return Kernel.of(weight, b, _tuple(stride, dims), _tuple(padding, dims),
                     _tuple(dilation, dims), groups)


def run(kernel: Kernel, x: Tensor) -> Tensor:
    """The kernel run with ``F.conv*`` directly (independent of :meth:`Kernel.apply`)."""
    conv = CONV[kernel.spatial_dims]
    return conv(x, kernel.weight, kernel.bias, kernel.stride, kernel.padding, kernel.dilation,
                kernel.groups)


def assert_same_map(expected: Tensor, combined: Kernel | str, x: Tensor) -> None:
    assert isinstance(combined, Kernel), combined
    actual = run(combined, x)
    assert actual.shape == expected.shape
    assert rel_err(expected, actual) <= F64_RTOL


# --- parallel_sum ---------------------------------------------------------------------------

def mixed_branches_2d(channels: int, stride: int) -> list[Kernel]:
    """3x3, 1x1, 1x3, 3x1, depthwise 5x5 and grouped 3x3, all centred, one stride."""
    c = channels
    return [
        random_kernel(c, c, 3, stride=stride, padding=1),
        random_kernel(c, c, 1, stride=stride, padding=0),
        random_kernel(c, c, (1, 3), stride=stride, padding=(0, 1)),
        random_kernel(c, c, (3, 1), stride=stride, padding=(1, 0)),
        random_kernel(c, c, 5, stride=stride, padding=2, groups=c),
        random_kernel(c, c, 3, stride=stride, padding=1, groups=2),
    ]


def test_parallel_sum_of_all_branch_kinds_with_identity() -> None:
    branches = [*mixed_branches_2d(4, 1), identity_kernel(4, 1, 2)]
    x = random_input((2, 4, 9, 10), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(sum(run(k, x) for k in branches), merged, x)
    assert merged.kernel_size == (5, 5) and merged.padding == (2, 2)
    assert merged.groups == 1 and merged.stride == (1, 1)


def test_parallel_sum_with_stride_2() -> None:
    branches = mixed_branches_2d(4, 2)
    x = random_input((2, 4, 11, 10), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(sum(run(k, x) for k in branches), merged, x)
    assert merged.stride == (2, 2) and merged.kernel_size == (5, 5)


def test_parallel_sum_conv1d() -> None:
    branches = [
        random_kernel(6, 6, 3, dims=1, padding=1),
        random_kernel(6, 6, 1, dims=1),
        random_kernel(6, 6, 5, dims=1, padding=2, groups=6),
        random_kernel(6, 6, 3, dims=1, padding=1, groups=3),
        identity_kernel(6, 3, 1, groups=2),
    ]
    x = random_input((2, 6, 13), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(sum(run(k, x) for k in branches), merged, x)
    assert merged.kernel_size == (5,) and merged.padding == (2,)


def test_parallel_sum_conv3d() -> None:
    branches = [
        random_kernel(4, 4, 3, dims=3, padding=1),
        random_kernel(4, 4, 1, dims=3),
        random_kernel(4, 4, (1, 3, 3), dims=3, padding=(0, 1, 1)),
        random_kernel(4, 4, (3, 1, 1), dims=3, padding=(1, 0, 0), groups=4),
        identity_kernel(4, 1, 3),
    ]
    x = random_input((2, 4, 5, 6, 7), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(sum(run(k, x) for k in branches), merged, x)
    assert merged.kernel_size == (3, 3, 3) and merged.padding == (1, 1, 1)


def test_parallel_sum_of_dilated_branches_with_dense_large_kernel() -> None:
    """UniRepLKNet: a dense depthwise 7x7 plus dilated 3x3 (d=2, d=3) with the same reach."""
    c = 4
    branches = [
        random_kernel(c, c, 3, padding=2, dilation=2, groups=c),
        random_kernel(c, c, 7, padding=3, groups=c),
        random_kernel(c, c, 3, padding=3, dilation=3, groups=c),
    ]
    x = random_input((2, c, 12, 11), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(sum(run(k, x) for k in branches), merged, x)
    assert merged.kernel_size == (7, 7) and merged.dilation == (1, 1)
    assert merged.padding == (3, 3) and merged.groups == c


@pytest.mark.parametrize("small_first", [
    pytest.param(True, id="small_first"),
    pytest.param(False, id="large_first"),
])
def test_parallel_sum_of_branches_sharing_one_dilation(small_first: bool) -> None:
    c = 4
    large = random_kernel(c, c, 5, padding=4, dilation=2, groups=c)
    small = random_kernel(c, c, 3, padding=2, dilation=2, groups=c)
    branches = [small, large] if small_first else [large, small]
    x = random_input((2, c, 16, 15), dtype=F64)

    merged = parallel_sum(branches)

    assert_same_map(run(large, x) + run(small, x), merged, x)


@pytest.mark.parametrize("combine", [parallel_sum, concat], ids=["sum", "concat"])
def test_dilated_kernels_of_odd_size_difference_are_aligned_densely(combine) -> None:
    """(3,1) and (2,1) taps at dilation 2 span 5 and 3 pixels: centred only when dense (the
    sparse sizes differ by 1). Found by the property tests."""
    c = 2
    a = random_kernel(c, c, (3, 1), padding=(2, 0), dilation=(2, 1), bias=False)
    b = random_kernel(c, c, (2, 1), padding=(1, 0), dilation=(2, 1), bias=False)
    x = random_input((2, c, 5, 5), dtype=F64)
    expected = run(a, x) + run(b, x) if combine is parallel_sum else torch.cat(
        [run(a, x), run(b, x)], 1)

    assert_same_map(expected, combine([a, b]), x)


@pytest.mark.parametrize(("sizes", "dilations", "common"), [
    pytest.param((1, 3), (1, 2), 2, id="1x1+3x3d2"),
    pytest.param((3, 3, 1), (2, 4, 1), 2, id="3x3d2+3x3d4+1x1"),
    pytest.param((1, 3, 3), (1, 6, 12), 6, id="aspp"),
    pytest.param((3, 5), (2, 1), 1, id="dense-when-needed"),
])
@pytest.mark.parametrize("combine", [parallel_sum, concat], ids=["sum", "concat"])
def test_dilated_kernels_keep_their_common_dilation(sizes, dilations, common, combine) -> None:
    """Kernels are aligned in the gcd of their dilations (and half size differences), not
    densely: a 1x1 beside a 3x3 of dilation 2 is a 3x3 of dilation 2."""
    c = 3
    kernels = [random_kernel(c, c, k, padding=d * (k - 1) // 2, dilation=d)
               for k, d in zip(sizes, dilations, strict=True)]
    x = random_input((2, c, 30, 29), dtype=F64)
    outputs = [run(k, x) for k in kernels]
    expected = sum(outputs) if combine is parallel_sum else torch.cat(outputs, 1)

    merged = combine(kernels)

    assert_same_map(expected, merged, x)
    assert merged.dilation == (common, common)
    reach = max(d * (k - 1) + 1 for k, d in zip(sizes, dilations, strict=True))
    assert merged.kernel_size == ((reach - 1) // common + 1,) * 2


@pytest.mark.parametrize(("branches", "phrase"), [
    (lambda: [random_kernel(4, 4, 3, padding=1), random_kernel(4, 4, 1, stride=2)],
     "strides differ"),
    (lambda: [random_kernel(4, 4, 3, padding=1), random_kernel(4, 4, 1, padding=1)],
     "misaligned"),
    (lambda: [random_kernel(4, 4, 3, padding=0), random_kernel(4, 4, (1, 3), padding=0)],
     "misaligned"),
    (lambda: [random_kernel(4, 4, 2, stride=2), random_kernel(4, 4, 1, stride=2)],
     "odd size difference"),
], ids=["strides", "misaligned_padding", "misaligned_unpadded", "odd_size_difference"])
def test_parallel_sum_declines(branches, phrase: str) -> None:
    reason = parallel_sum(branches())
    assert isinstance(reason, str) and phrase in reason


# --- lifted ops -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("groups", [1, 2, 6], ids=["dense", "groups2", "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_identity_kernel_is_the_identity(size: int, groups: int, dims: int) -> None:
    x = random_input((2, 6, *[7, 6, 5][:dims]), dtype=F64)
    kernel = identity_kernel(6, size, dims, groups=groups)
    assert kernel.groups == groups and kernel.kernel_size == (size,) * dims
    assert torch.equal(run(kernel, x), x)


def test_identity_kernel_rejects_even_size() -> None:
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(4, 2, 2)


@pytest.mark.parametrize(("size", "stride", "padding"), [
    ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (0, 0)), ((3, 3), (2, 2), (1, 1)),
    ((3, 2), (1, 2), (1, 0)),
])
def test_avgpool_kernel_equals_avg_pool(size, stride, padding) -> None:
    x = random_input((2, 5, 9, 8), dtype=F64)
    expected = F.avg_pool2d(x, size, stride, padding, count_include_pad=True)
    kernel = avgpool_kernel(5, size, stride, padding)
    assert kernel.groups == 5
    assert_same_map(expected, kernel, x)


def test_avgpool_kernel_1d_and_3d() -> None:
    x1 = random_input((2, 3, 10), dtype=F64)
    assert_same_map(F.avg_pool1d(x1, 3, 2, 1), avgpool_kernel(3, (3,), (2,), (1,)), x1)
    x3 = random_input((2, 3, 6, 5, 4), dtype=F64)
    assert_same_map(F.avg_pool3d(x3, 2, 2), avgpool_kernel(3, (2,) * 3, (2,) * 3, (0,) * 3), x3)


@pytest.mark.parametrize(("size", "dilation", "padding", "groups"), [
    ((3, 3), (2, 2), (2, 2), 1), ((3, 3), (3, 1), (3, 1), 2), ((5, 3), (2, 3), (1, 0), 4),
])
def test_densify_is_the_dilated_conv(size, dilation, padding, groups) -> None:
    kernel = random_kernel(4, 8, size, padding=padding, dilation=dilation, groups=groups)
    x = random_input((2, 4, 15, 14), dtype=F64)

    dense = densify(kernel)

    assert dense.dilation == (1, 1)
    assert dense.kernel_size == tuple(d * (k - 1) + 1 for d, k in zip(dilation, size,
                                                                       strict=True))
    assert_same_map(run(kernel, x), dense, x)


def test_regroup_4_to_2_to_1_is_the_same_map() -> None:
    kernel = random_kernel(8, 12, 3, padding=1, stride=2, groups=4)
    x = random_input((2, 8, 9, 9), dtype=F64)
    expected = run(kernel, x)

    two = regroup(kernel, 2)
    one = regroup(two, 1)

    assert (two.groups, one.groups) == (2, 1)
    assert two.weight.shape == (12, 4, 3, 3) and one.weight.shape == (12, 8, 3, 3)
    assert_same_map(expected, two, x)
    assert_same_map(expected, one, x)
    assert_same_map(expected, regroup(kernel, 1), x)


def test_regroup_rejects_a_non_divisor() -> None:
    with pytest.raises(ValueError, match="regroup"):
        regroup(random_kernel(6, 6, 1, groups=3), 2)


@pytest.mark.parametrize(("size", "padding", "target"), [
    ((1, 1), (0, 0), (3, 3)), ((3, 3), (1, 1), (7, 7)), ((1, 3), (0, 1), (5, 3)),
    ((3, 1), (2, 0), (5, 5)),
])
def test_pad_to_is_the_same_map(size, padding, target) -> None:
    kernel = random_kernel(4, 6, size, padding=padding, groups=2)
    x = random_input((2, 4, 10, 9), dtype=F64)

    padded = pad_to(kernel, target)

    assert padded.kernel_size == target
    assert_same_map(run(kernel, x), padded, x)


# --- concat ---------------------------------------------------------------------------------

def test_concat_equals_cat_of_the_separate_convs() -> None:
    kernels = [
        random_kernel(4, 3, 1),
        random_kernel(4, 5, 3, padding=1),
        random_kernel(4, 4, 5, padding=2, groups=2),
        random_kernel(4, 4, (1, 3), padding=(0, 1), groups=4),
    ]
    x = random_input((2, 4, 8, 9), dtype=F64)

    merged = concat(kernels)

    assert_same_map(torch.cat([run(k, x) for k in kernels], 1), merged, x)
    assert merged.out_channels == 16 and merged.kernel_size == (5, 5) and merged.groups == 1


def test_concat_with_stride_and_conv1d() -> None:
    kernels = [random_kernel(3, 2, 3, dims=1, stride=2, padding=1),
               random_kernel(3, 4, 1, dims=1, stride=2)]
    x = random_input((2, 3, 11), dtype=F64)
    assert_same_map(torch.cat([run(k, x) for k in kernels], 1), concat(kernels), x)


@pytest.mark.parametrize("small_first", [
    pytest.param(True, id="small_first"),
    pytest.param(False, id="large_first"),
])
def test_concat_of_kernels_sharing_one_dilation(small_first: bool) -> None:
    large = random_kernel(4, 3, 5, padding=4, dilation=2)
    small = random_kernel(4, 2, 3, padding=2, dilation=2)
    kernels = [small, large] if small_first else [large, small]
    x = random_input((2, 4, 16, 15), dtype=F64)
    assert_same_map(torch.cat([run(k, x) for k in kernels], 1), concat(kernels), x)


def test_concat_declines_misaligned_kernels() -> None:
    reason = concat([random_kernel(4, 3, 3, padding=0), random_kernel(4, 3, 1, padding=0)])
    assert isinstance(reason, str) and "misaligned" in reason


# --- compose --------------------------------------------------------------------------------

def assert_composes(first: Kernel, second: Kernel, x: Tensor, **options) -> Kernel:
    combined = compose(first, second, **options)
    assert_same_map(run(second, run(first, x)), combined, x)
    assert composed_weight_shape(first, second) == tuple(combined.weight.shape)
    return combined


def test_compose_dilated_strided_then_dilated() -> None:
    first = random_kernel(4, 6, 3, stride=2, padding=2, dilation=2)
    second = random_kernel(6, 5, 3, dilation=3, groups=1)
    combined = assert_composes(first, second, random_input((2, 4, 23, 21), dtype=F64))
    assert combined.kernel_size == (17, 17)  # (k_B' − 1)·s_A + k_A' = (7 − 1)·2 + 5


def test_compose_kxk_then_1x1_with_strided_first() -> None:
    first = random_kernel(4, 6, 3, stride=2, padding=1)
    second = random_kernel(6, 5, 1)
    combined = assert_composes(first, second, random_input((2, 4, 11, 10), dtype=F64))
    assert combined.kernel_size == (3, 3) and combined.stride == (2, 2)
    assert combined.padding == (1, 1)


def test_compose_bias_free_1x1_then_padded_3x3() -> None:
    first = random_kernel(4, 6, 1, bias=False)
    second = random_kernel(6, 5, 3, padding=1)
    combined = assert_composes(first, second, random_input((2, 4, 8, 9), dtype=F64))
    assert combined.kernel_size == (3, 3) and combined.padding == (1, 1)


def test_compose_declines_1x1_with_bias_then_padded_3x3() -> None:
    reason = compose(random_kernel(4, 6, 1), random_kernel(6, 5, 3, padding=1))
    assert isinstance(reason, str) and "bias" in reason


def test_compose_1x1_with_bias_then_pad_with_bias_is_exact() -> None:
    """DBB's BN-and-pad: the 1x1 conv's output padded with its own bias, then a 3x3, p=0."""
    first = random_kernel(4, 6, 1)
    second = random_kernel(6, 5, 3, padding=0)
    x = random_input((2, 4, 7, 8), dtype=F64)
    y = run(first, x)
    n, c, h, w = y.shape
    padded = first.bias.reshape(1, c, 1, 1).expand(n, c, h + 2, w + 2).clone()
    padded[:, :, 1:-1, 1:-1] = y  # the bias value on the 1-wide border
    expected = run(second, padded)
    padded_second = Kernel(second.weight, second.bias, second.stride, (1, 1),
                           second.dilation, second.groups)

    combined = compose(first, padded_second, pad_value_is_bias=True)

    assert_same_map(expected, combined, x)
    assert combined.padding == (1, 1)


def test_compose_two_strided_kxk_when_the_second_does_not_pad() -> None:
    first = random_kernel(4, 6, 3, stride=2, padding=1)
    second = random_kernel(6, 5, 3, stride=2, padding=0)
    combined = assert_composes(first, second, random_input((2, 4, 17, 18), dtype=F64))
    assert combined.kernel_size == (7, 7) and combined.stride == (4, 4)
    assert combined.padding == (1, 1)


def test_compose_declines_kxk_then_padded_kxk() -> None:
    reason = compose(random_kernel(4, 6, 3, padding=1), random_kernel(6, 5, 3, padding=1))
    assert isinstance(reason, str) and "no padding" in reason


def test_compose_conv_then_avgpool_is_deep_rebirth_streamline() -> None:
    first = random_kernel(4, 6, 3, padding=1)
    pool = avgpool_kernel(6, (2, 2), (2, 2), (0, 0))
    x = random_input((2, 4, 10, 12), dtype=F64)
    expected = F.avg_pool2d(run(first, x), 2, 2)

    combined = compose(first, pool)

    assert_same_map(expected, combined, x)
    assert combined.kernel_size == (4, 4) and combined.stride == (2, 2)
    assert combined.padding == (1, 1) and combined.groups == 1


def test_compose_depthwise_then_depthwise_stays_depthwise() -> None:
    first = random_kernel(6, 6, 3, padding=1, groups=6)
    second = random_kernel(6, 6, 3, groups=6)
    combined = assert_composes(first, second, random_input((2, 6, 9, 8), dtype=F64))
    assert combined.groups == 6 and combined.weight.shape == (6, 1, 5, 5)


def test_compose_groups_2_then_groups_4_gives_groups_2() -> None:
    first = random_kernel(8, 8, 3, padding=1, groups=2)
    second = random_kernel(8, 12, 1, groups=4)
    combined = assert_composes(first, second, random_input((2, 8, 7, 7), dtype=F64))
    assert combined.groups == 2 and combined.weight.shape == (12, 4, 3, 3)


def test_compose_conv1d_and_conv3d() -> None:
    first1, second1 = random_kernel(3, 4, 3, dims=1, padding=1), random_kernel(4, 2, 3, dims=1)
    assert_composes(first1, second1, random_input((2, 3, 12), dtype=F64))
    first3 = random_kernel(3, 4, 3, dims=3, padding=1, stride=2)
    second3 = random_kernel(4, 2, 1, dims=3)
    assert_composes(first3, second3, random_input((2, 3, 6, 7, 5), dtype=F64))


def test_compose_declines_channels_that_do_not_chain() -> None:
    reason = compose(random_kernel(4, 6, 1), random_kernel(5, 5, 1))
    assert isinstance(reason, str) and "do not chain" in reason
