"""The tensor math of fusion, once, with no torch.fx in it.

Every function here is pure: it takes weights and returns new weights, computed in float64 and
cast back to the dtype and device of the weight it replaces. The exactness condition of each
fold is stated in its docstring; the passes check those conditions before calling these.

Shapes follow PyTorch:

- conv weight ``W``: ``(C_out, C_in / g, *k)``; transposed conv weight: ``(C_in, C_out / g, *k)``;
  linear weight: ``(C_out, C_in)`` (a linear layer is a 1x1 conv with no spatial axes).
- a per-channel affine map ``a(x) = s * x + t`` is a :class:`ChannelAffine` over one channel axis
  (axis 1 of a conv activation, the last axis of a linear one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FOLD_DTYPE = torch.float64


@dataclass(frozen=True)
class ChannelAffine:
    """``y = scale * x + shift`` along one channel axis; ``scale``/``shift`` are 1-D, float64.

    A batch norm in eval mode, a per-channel scale layer, and ``x * c + d`` with constant ``c``
    and ``d`` are all this map: a depthwise 1x1 convolution with weight ``scale``, bias ``shift``.
    """

    scale: Tensor
    shift: Tensor

    def __post_init__(self) -> None:
        if self.scale.shape != self.shift.shape or self.scale.dim() != 1:
            raise ValueError(
                f"scale and shift must be 1-D of equal length, got {tuple(self.scale.shape)} "
                f"and {tuple(self.shift.shape)}"
            )

    @property
    def channels(self) -> int:
        return self.scale.numel()

    @classmethod
    def from_scalars(
        cls, channels: int, scale: float | Tensor = 1.0, shift: float | Tensor = 0.0
    ) -> ChannelAffine:
        """Broadcast a scalar or per-channel ``scale``/``shift`` to ``channels`` entries."""
        s = torch.as_tensor(scale, dtype=FOLD_DTYPE).reshape(-1)
        t = torch.as_tensor(shift, dtype=FOLD_DTYPE, device=s.device).reshape(-1)
        return cls(s.expand(channels).clone(), t.expand(channels).clone())

    def then(self, other: ChannelAffine) -> ChannelAffine:
        """The map ``other(self(x))``: scale ``s2*s1``, shift ``s2*t1 + t2``."""
        return ChannelAffine(other.scale * self.scale, other.scale * self.shift + other.shift)

    def has_shift(self) -> bool:
        return bool(torch.any(self.shift != 0))


def batchnorm_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> ChannelAffine:
    """Batch norm in eval mode as ``s * x + t``.

    ``s = γ / sqrt(σ² + ε)`` and ``t = β − μ·s`` (``γ = 1``, ``β = 0`` when the norm has no
    affine parameters). Exact; valid only with running statistics, i.e. in eval mode.
    """
    mean = running_mean.to(FOLD_DTYPE)
    var = running_var.to(FOLD_DTYPE)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(FOLD_DTYPE)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(FOLD_DTYPE)
    scale = gamma / torch.sqrt(var + eps)
    return ChannelAffine(scale, beta - mean * scale)


def _cast_back(new: Tensor, like: Tensor) -> Tensor:
    return new.to(dtype=like.dtype, device=like.device)


def _bias64(bias: Tensor | None, channels: int, device: torch.device) -> Tensor:
    if bias is None:
        return torch.zeros(channels, dtype=FOLD_DTYPE, device=device)
    return bias.detach().to(FOLD_DTYPE)


def _trailing(t: Tensor, extra_dims: int) -> Tensor:
    """View a tensor with ``extra_dims`` singleton axes appended (to broadcast over a kernel)."""
    return t.reshape(*t.shape, *([1] * extra_dims))


def output_channel_of_weight(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """For the first two weight axes, the output channel each weight slice writes to.

    Conv/linear: ``W[o, i]`` writes channel ``o``. Transposed conv: ``W[i, j]`` writes channel
    ``(i // (C_in/g)) · (C_out/g) + j``.
    """
    a, b = weight.shape[0], weight.shape[1]
    rows = torch.arange(a, device=weight.device).unsqueeze(1)
    cols = torch.arange(b, device=weight.device).unsqueeze(0)
    if not transposed:
        return rows.expand(a, b)
    in_per_group = a // groups
    return (rows // in_per_group) * b + cols


def input_channel_of_weight(weight: Tensor, groups: int) -> Tensor:
    """For a conv/linear weight ``W[o, i]``: input channel ``(o // (C_out/g))·(C_in/g) + i``."""
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // groups
    rows = torch.arange(out_channels, device=weight.device).unsqueeze(1)
    cols = torch.arange(in_per_group, device=weight.device).unsqueeze(0)
    return (rows // out_per_group) * in_per_group + cols


def fold_affine_into_output(
    weight: Tensor,
    bias: Tensor | None,
    affine: ChannelAffine,
    *,
    groups: int = 1,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fold ``a`` applied *after* a conv, transposed conv or linear layer ``y = W*x + b``.

    ``a(W*x + b) = (s·W)*x + (s·b + t)``, with ``s`` indexed by each weight slice's output
    channel. Always exact: the affine map acts on each output value separately.
    Returns the new weight and bias, in the dtype and device of ``weight``.
    """
    extra = weight.dim() - 2
    scale = affine.scale.to(weight.device)
    if transposed:
        per_slice = scale[output_channel_of_weight(weight, groups, transposed)]
    else:  # slice W[o] writes channel o
        per_slice = scale.unsqueeze(1)
    # float64 · float32 promotes to float64 element by element (exact widening), without a
    # float64 copy of the whole weight first
    new_weight = weight.detach() * _trailing(per_slice.to(FOLD_DTYPE), extra)
    out_channels = affine.channels
    new_bias = _bias64(bias, out_channels, weight.device) * scale + affine.shift.to(weight.device)
    return _cast_back(new_weight, weight), _cast_back(new_bias, weight)


def fold_affine_into_input(
    weight: Tensor,
    bias: Tensor | None,
    affine: ChannelAffine,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``a`` applied *before* a conv or linear layer: ``W*(s·x + t) + b``.

    New weight ``W'[o, i, k] = W[o, i, k]·s[c]``, bias ``b'[o] = b[o] + Σ_{i,k} W[o, i, k]·t[c]``,
    where ``c`` is the input channel of ``W[o, i]``. Exact for a linear layer and for a conv
    that does not pad, or pads by replicating/reflecting/wrapping its input (which commutes with
    a per-channel affine map). Zero padding sees ``0`` where the original saw ``t``, so with
    zero padding it is exact only when ``t = 0``: the caller checks that.
    """
    in_index = input_channel_of_weight(weight, groups)
    extra = weight.dim() - 2
    w64 = weight.detach().to(FOLD_DTYPE)
    scale = affine.scale.to(weight.device)
    shift = affine.shift.to(weight.device)
    new_weight = w64 * _trailing(scale[in_index], extra)
    kernel_sums = w64.reshape(w64.shape[0], w64.shape[1], -1).sum(dim=2)
    shift_per_output = (kernel_sums * shift[in_index]).sum(dim=1)
    new_bias = _bias64(bias, weight.shape[0], weight.device) + shift_per_output
    return _cast_back(new_weight, weight), _cast_back(new_bias, weight)


# --- Convolutions as values: lift, combine, lower --------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """``conv(x, weight, bias; stride, padding, dilation, groups)`` with zero padding, float64.

    Every linear, shift-equivariant op on an ``N×C×spatial`` tensor is one of these: a conv,
    an eval batch norm or per-channel scale (depthwise 1×1), the identity, an average pool.
    :func:`parallel_sum`, :func:`compose` and :func:`concat` combine them exactly or say why
    they cannot.
    """

    weight: Tensor  # (C_out, C_in / groups, *k)
    bias: Tensor  # (C_out,)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def spatial_dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @classmethod
    def of(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Kernel:
        """A kernel from a layer's tensors (any dtype; converted to float64)."""
        w = weight.detach().to(FOLD_DTYPE)
        b = _bias64(bias, w.shape[0], w.device)
        return cls(w, b, tuple(stride), tuple(padding), tuple(dilation), groups)

    def apply(self, x: Tensor) -> Tensor:
        """Run the kernel (for tests and probing)."""
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                3: torch.nn.functional.conv3d}[self.spatial_dims]
        return conv(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride,
                    self.padding, self.dilation, self.groups)


def affine_kernel(affine: ChannelAffine, spatial_dims: int) -> Kernel:
    """A per-channel map ``s·x + t`` as a depthwise 1×…×1 kernel (stride 1, no padding)."""
    channels = affine.channels
    weight = affine.scale.reshape(channels, 1, *([1] * spatial_dims)).clone()
    ones = (1,) * spatial_dims
    return Kernel(weight, affine.shift.clone(), ones, (0,) * spatial_dims, ones, channels)


def identity_kernel(
    channels: int, kernel_size: tuple[int, ...] | int, spatial_dims: int, groups: int = 1
) -> Kernel:
    """The identity as a kernel of odd size ``k``: a 1 at the centre of ``W[c, c mod (C/g)]``.

    Padding ``(k − 1) / 2`` keeps the output aligned with the input; any ``groups`` dividing
    ``channels`` works (``groups = channels``: depthwise).
    """
    size = ntuple(kernel_size, spatial_dims)
    if any(k % 2 == 0 for k in size):
        raise ValueError(f"an identity kernel needs odd sizes, got {size}")
    in_per_group = channels // groups
    weight = torch.zeros(channels, in_per_group, *size, dtype=FOLD_DTYPE)
    centre = tuple(k // 2 for k in size)
    for c in range(channels):
        weight[(c, c % in_per_group, *centre)] = 1.0
    padding = tuple(k // 2 for k in size)
    ones = (1,) * spatial_dims
    return Kernel(weight, torch.zeros(channels, dtype=FOLD_DTYPE), ones, padding, ones, groups)


def avgpool_kernel(
    channels: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> Kernel:
    """``AvgPool(k, s, p)`` as a depthwise kernel of weights ``1/Πk``.

    Exact only if ``p = 0`` or the pool counts the padding (``count_include_pad=True``), with
    ``ceil_mode=False`` and no ``divisor_override``: the caller checks those.
    """
    dims = len(kernel_size)
    weight = torch.full((channels, 1, *kernel_size), 1.0 / math.prod(kernel_size),
                        dtype=FOLD_DTYPE)
    return Kernel(weight, torch.zeros(channels, dtype=FOLD_DTYPE), tuple(stride),
                  tuple(padding), (1,) * dims, channels)


def densify(kernel: Kernel) -> Kernel:
    """A dilated kernel as a dense one: size ``d(k − 1) + 1`` with zeros between taps."""
    if all(d == 1 for d in kernel.dilation):
        return kernel
    return redilate(kernel, (1,) * kernel.spatial_dims)


def regroup(kernel: Kernel, groups: int) -> Kernel:
    """The same map with fewer groups (``groups`` must divide ``kernel.groups``): the weight
    becomes block-diagonal, each new group holding ``kernel.groups / groups`` old ones."""
    if groups == kernel.groups:
        return kernel
    if kernel.groups % groups != 0:
        raise ValueError(f"cannot regroup {kernel.groups} groups into {groups}")
    out_per_old = kernel.out_channels // kernel.groups
    in_per_old = kernel.weight.shape[1]
    in_per_new = kernel.in_channels // groups
    weight = torch.zeros(kernel.out_channels, in_per_new, *kernel.kernel_size,
                         dtype=kernel.weight.dtype, device=kernel.weight.device)
    for old in range(kernel.groups):
        rows = slice(old * out_per_old, (old + 1) * out_per_old)
        offset = (old * in_per_old) % in_per_new
        weight[rows, offset:offset + in_per_old] = kernel.weight[rows]
    return Kernel(weight, kernel.bias, kernel.stride, kernel.padding, kernel.dilation, groups)


def pad_to(kernel: Kernel, size: tuple[int, ...]) -> Kernel:
    """Zero-pad the kernel, centred, to ``size``, raising the padding by ``d·(K − k)/2``.

    The same map when every ``K − k`` is even (the caller checks alignment).
    """
    grow = [big - small for big, small in zip(size, kernel.kernel_size, strict=True)]
    if all(g == 0 for g in grow):
        return kernel
    pads: list[int] = []
    for g in reversed(grow):  # F.pad wants the last axis first
        pads += [g // 2, g - g // 2]
    weight = torch.nn.functional.pad(kernel.weight, pads)
    # Each added tap widens the window by the dilation.
    padding = tuple(p + d * (g // 2) for p, d, g in zip(kernel.padding, kernel.dilation, grow,
                                                       strict=True))
    return Kernel(weight, kernel.bias, kernel.stride, padding, kernel.dilation, kernel.groups)


def dense_size(kernel: Kernel) -> tuple[int, ...]:
    """The size ``d(k − 1) + 1`` per axis a dilated kernel covers (what :func:`densify` makes),
    from its shape alone."""
    return tuple(d * (k - 1) + 1 for d, k in zip(kernel.dilation, kernel.kernel_size,
                                                  strict=True))


def _alignment_reason(kernels: list[Kernel]) -> str | None:
    """Why kernels reading one input cannot be centre-aligned, or None if they can.

    Decided from shapes and settings alone: dilated kernels are not expanded to check.
    """
    first = kernels[0]
    for other in kernels[1:]:
        if other.stride != first.stride:
            return f"strides differ ({list(first.stride)} vs {list(other.stride)})"
        if other.in_channels != first.in_channels:
            return f"input channels differ ({first.in_channels} vs {other.in_channels})"
    sizes = [dense_size(k) for k in kernels]
    size = tuple(max(s[a] for s in sizes) for a in range(first.spatial_dims))
    # Padded to size K, a kernel needs padding p + (K − k)/2; all branches must agree.
    offsets = set()
    for k, own in zip(kernels, sizes, strict=True):
        grow = [big - small for big, small in zip(size, own, strict=True)]
        if any(g % 2 for g in grow):
            return (f"a {list(own)} kernel cannot be centred in a {list(size)} one "
                    "(odd size difference)")
        offsets.add(tuple(p + g // 2 for p, g in zip(k.padding, grow, strict=True)))
    if len(offsets) > 1:
        return ("paddings are misaligned: P − p ≠ (K − k)/2 for some branch "
                f"(paddings once centred: {sorted(offsets)})")
    return None


def redilate(kernel: Kernel, dilation: tuple[int, ...]) -> Kernel:
    """The same map written with a smaller ``dilation`` (dividing the kernel's own on every axis
    where it has more than one tap): zeros between the taps, size ``(k − 1)·d/d' + 1``.
    :func:`densify` is the case ``d' = 1``."""
    factors = tuple(d // new if k > 1 else 1 for d, new, k in zip(
        kernel.dilation, dilation, kernel.kernel_size, strict=True))
    if all(f == 1 for f in factors):
        return Kernel(kernel.weight, kernel.bias, kernel.stride, kernel.padding, dilation,
                      kernel.groups)
    size = tuple((k - 1) * f + 1 for k, f in zip(kernel.kernel_size, factors, strict=True))
    weight = torch.zeros(*kernel.weight.shape[:2], *size, dtype=kernel.weight.dtype,
                         device=kernel.weight.device)
    weight[(slice(None), slice(None), *(slice(None, None, f) for f in factors))] = kernel.weight
    return Kernel(weight, kernel.bias, kernel.stride, kernel.padding, dilation, kernel.groups)


def common_dilation(kernels: list[Kernel]) -> tuple[int, ...]:
    """The largest dilation per axis in which all ``kernels`` can be written and centre-aligned:
    the gcd of their dilations (over kernels with more than one tap there) and of the half
    size differences to the largest extent (each side is padded by whole taps). 1 means dense.
    A 1×1 beside a 3×3 of dilation 2 stays a 3×3 of dilation 2."""
    extents = [dense_size(k) for k in kernels]
    dims = kernels[0].spatial_dims
    common = []
    for axis in range(dims):
        largest = max(e[axis] for e in extents)
        values = [k.dilation[axis] for k in kernels if k.kernel_size[axis] > 1]
        values += [(largest - e[axis]) // 2 for e in extents if e[axis] < largest]
        common.append(math.gcd(*values) if values else 1)
    return tuple(common)


def _aligned(kernels: list[Kernel]) -> list[Kernel]:
    """Kernels written in a common dilation (:func:`common_dilation`), regrouped to a common
    grouping and padded to a common size."""
    dilation = common_dilation(kernels)
    dense = [redilate(k, dilation) for k in kernels]
    groups = math.gcd(*(k.groups for k in dense))
    dense = [regroup(k, groups) for k in dense]
    size = tuple(max(k.kernel_size[a] for k in dense) for a in range(dense[0].spatial_dims))
    return [pad_to(k, size) for k in dense]


def parallel_sum(kernels: list[Kernel]) -> Kernel | str:
    """One kernel computing ``Σ kernel_i(x)``, or the reason it would not be exact.

    Exact iff the strides agree and every kernel centre-aligns with the largest one:
    ``P − p = (K − k)/2`` per axis. Dilated kernels are made dense when dilations differ;
    groupings are expanded to their greatest common divisor (a finer grouping is a special
    case of a coarser one). Weights add, biases add.
    """
    reason = _alignment_reason(kernels)
    if reason is not None:
        return reason
    if len({k.out_channels for k in kernels}) > 1:
        return "output channels differ"
    aligned = _aligned(kernels)
    first = aligned[0]
    weight, bias = first.weight.clone(), first.bias.clone()
    for kernel in aligned[1:]:  # accumulate: a stacked copy of every kernel costs more
        weight += kernel.weight
        bias += kernel.bias
    return Kernel(weight, bias, first.stride, first.padding, first.dilation, first.groups)


def concat(kernels: list[Kernel]) -> Kernel | str:
    """One kernel computing ``cat([kernel_i(x)], dim=1)``, or why not (DBB transform IV).

    The same alignment conditions as :func:`parallel_sum`; output channels are stacked, so
    groupings are expanded to one group unless all kernels share a single group.
    """
    reason = _alignment_reason(kernels)
    if reason is not None:
        return reason
    aligned = _aligned([regroup(k, 1) for k in kernels])
    first = aligned[0]
    weight = torch.cat([k.weight for k in aligned])
    bias = torch.cat([k.bias for k in aligned])
    return Kernel(weight, bias, first.stride, first.padding, first.dilation, 1)


def compose(first: Kernel, second: Kernel, *, pad_value_is_bias: bool = False) -> Kernel | str:
    """One kernel computing ``second(first(x))``, or the reason it would not be exact.

    With ``A = first`` (kernel ``k_A``, stride ``s_A``, padding ``p_A``) and ``B = second``:

    - ``B`` pads ``A``'s output with zeros. The fused kernel instead sees ``A`` applied to
      padded input. That is the same only if ``p_B = 0``, or ``A`` is 1×1 with stride 1 and no
      padding and its output at zero input (its bias) is what ``B``'s padding holds: zero bias,
      or a pad that writes the bias (``pad_value_is_bias``: DBB's BN-and-pad layer).
    - Then the fused kernel has size ``(k_B − 1)·s_A + k_A``, stride ``s_A·s_B``, padding
      ``p_A + p_B·s_A``, weight ``W[o, i] = Σ_{m, j} W_B[o, m, j]·W_A[m, i, · − j·s_A]``
      (a transposed convolution of ``W_B`` by ``W_A``), bias ``b_B + Σ_{m, j} W_B[o, m, j]·b_A[m]``.
    """
    reason = compose_reason(first, second, pad_value_is_bias=pad_value_is_bias)
    if reason is not None:
        return reason
    a, b = densify(first), densify(second)
    groups = math.gcd(a.groups, b.groups)  # mid-channel groups of A must feed those of B
    a, b = regroup(a, groups), regroup(b, groups)
    dims = a.spatial_dims
    # Per group: W[o, i] = Σ_m Σ_j W_B[o, m, j]·W_A[m, i, t − j·s_A], i.e. W_B as a batch of
    # images with C_mid channels, transposed-convolved by W_A (C_mid -> C_in) with stride s_A.
    transpose = {1: torch.nn.functional.conv_transpose1d,
                 2: torch.nn.functional.conv_transpose2d,
                 3: torch.nn.functional.conv_transpose3d}[dims]
    out_per_group, mid_per_group = b.out_channels // groups, a.out_channels // groups
    weight = torch.cat([
        transpose(b.weight[g * out_per_group:(g + 1) * out_per_group],
                  a.weight[g * mid_per_group:(g + 1) * mid_per_group], stride=a.stride)
        for g in range(groups)
    ])
    kernel_sums = b.weight.reshape(b.weight.shape[0], b.weight.shape[1], -1).sum(2)
    bias = b.bias + (kernel_sums * a.bias[input_channel_of_weight(b.weight, groups)]).sum(1)
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    padding = tuple(pa + pb * sa for pa, pb, sa in zip(a.padding, b.padding, a.stride,
                                                       strict=True))
    return Kernel(weight, bias, stride, padding, (1,) * dims, groups)


def compose_reason(first: Kernel, second: Kernel, *, pad_value_is_bias: bool = False
                   ) -> str | None:
    """Why :func:`compose` would refuse ``second(first(x))`` (see there), or None. Cheap: it
    looks at shapes, settings and ``first``'s bias only."""
    if second.in_channels != first.out_channels:
        return f"channels do not chain ({first.out_channels} into {second.in_channels})"
    if all(p == 0 for p in second.padding):
        return None
    if not is_pointwise(first):
        return ("the second conv pads the first one's output with zeros, which the fused "
                "conv cannot reproduce (exact only when the second has no padding)")
    if not pad_value_is_bias:
        return bias_padding_reason(first, None)
    return None


def is_pointwise(kernel: Kernel) -> bool:
    """True for a kernel that maps each pixel on its own: every tap at one position (1×…×1
    or dilation 0 in effect), stride 1, no padding. Such a map commutes with global pooling,
    composes before any conv, and moves a zero border to its bias."""
    return (all(d * (k - 1) == 0 for d, k in zip(kernel.dilation, kernel.kernel_size,
                                                 strict=True))
            and all(s == 1 for s in kernel.stride) and all(p == 0 for p in kernel.padding))


def bias_padding_reason(first: Kernel, fill: Tensor | None) -> str | None:
    """Why ``pad(first(x), p, value=fill)`` is not ``first`` with padding ``p``, or None.

    A pointwise kernel (:func:`is_pointwise`) maps a zero input pixel to its bias, so padding
    its *input* with zeros gives border pixels equal to its bias. Padding its *output* with
    ``fill`` (per channel; None: zeros) is the same map iff ``fill`` equals the bias (up to
    rounding): a bias-free 1×1 conv before a zero-padded conv, or DBB's BN-and-pad layer,
    which pads with the BN's value at zero input.
    """
    if not is_pointwise(first):
        return ("it is not a 1x1 stride-1 unpadded conv, so its output border is not a "
                "constant")
    bias = first.bias.detach()
    if fill is None:
        if bool(torch.any(bias != 0)):
            return ("the second conv pads the first one's output with zeros, where the first "
                    "(1x1) conv's bias would be: exact only for a bias-free 1x1 or a "
                    "pad-with-bias layer")
        return None
    fill = fill.detach().reshape(-1)
    if fill.numel() != bias.numel() or not equal_up_to_rounding(fill, bias):
        return "the pad writes values that differ from the conv's bias"
    return None


def equal_up_to_rounding(a: Tensor, b: Tensor, units: int = 16) -> bool:
    """Equal up to ``units`` units of rounding of the coarser dtype, relative to the larger
    magnitude (a value recomputed in another order, e.g. a BN's value at zero vs its fold)."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    a64 = a.detach().to(FOLD_DTYPE).reshape(-1)
    b64 = b.detach().to(FOLD_DTYPE).reshape(-1).to(a64.device)
    scale = max(float(a64.abs().max()), float(b64.abs().max()), 1e-30)
    return bool((a64 - b64).abs().max() <= units * eps * scale)


def composed_weight_shape(first: Kernel, second: Kernel) -> tuple[int, ...]:
    """The weight shape :func:`compose` gives, from the shapes alone (to price a composition
    before computing it): ``(C_out_B, C_in_A / g, (k'_B − 1)·s_A + k'_A)`` with
    ``g = gcd(g_A, g_B)`` and ``k' = d(k − 1) + 1`` the dense size of a dilated kernel."""
    groups = math.gcd(first.groups, second.groups)
    sizes = tuple(
        (db * (kb - 1)) * sa + da * (ka - 1) + 1
        for ka, da, sa, kb, db in zip(first.kernel_size, first.dilation, first.stride,
                                      second.kernel_size, second.dilation, strict=True)
    )
    return (second.out_channels, first.in_channels // groups, *sizes)


def ntuple(value: int | float | tuple | list, n: int) -> tuple[int, ...]:
    """A per-axis setting as ``n`` ints: a scalar repeated, a sequence of ``n`` kept (a
    one-element sequence repeated, as PyTorch's layers accept)."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (int(value[0]),) * n
        return tuple(int(v) for v in value)
    return (int(value),) * n


def avgpool_reason(padding: tuple[int, ...], ceil_mode: bool, count_include_pad: bool,
                   divisor_override: int | None) -> str | None:
    """Why an average pool is not the convolution :func:`avgpool_kernel` builds, or None.

    The pool divides every window by ``Πk`` only with ``ceil_mode=False`` (no partial last
    window), no ``divisor_override``, and either no padding or the padding counted
    (``count_include_pad=True``).
    """
    if ceil_mode:
        return "it uses ceil_mode, whose last window is partial"
    if divisor_override is not None:
        return "it overrides the divisor"
    if any(padding) and not count_include_pad:
        return "it pads without counting the padding (count_include_pad=False)"
    return None


def negate(kernel: Kernel) -> Kernel:
    """``−kernel(x)``: weight and bias negated (a subtracted branch, ``a − b = a + (−b)``).
    Exact: negation only flips the sign bit."""
    return Kernel(-kernel.weight, -kernel.bias, kernel.stride, kernel.padding, kernel.dilation,
                  kernel.groups)


def scaled(kernel: Kernel, factor: float) -> Kernel:
    """``factor · kernel(x)``: exact for ±1 (a sign flip); other factors round once, as the
    unfused ``alpha`` multiplication does."""
    if factor == 1.0:
        return kernel
    if factor == -1.0:
        return negate(kernel)
    return Kernel(kernel.weight * factor, kernel.bias * factor, kernel.stride, kernel.padding,
                  kernel.dilation, kernel.groups)


def crop_kernel(channels: int, crop: tuple[int, ...]) -> Kernel:
    """Cropping ``crop[a]`` pixels from both ends of each spatial axis, as the identity with
    padding ``−crop``: a conv with negative padding reads only the inner window.

    Not a valid conv on its own (PyTorch refuses negative padding); composed with a following
    unpadded conv, or aligned in a sum with a larger kernel, the padding becomes ``≥ 0``
    (ACNet's cropped 1×k / k×1 branches). :func:`padding_reason` says when it does not.
    """
    dims = len(crop)
    identity = identity_kernel(channels, 1, dims, groups=channels)
    return Kernel(identity.weight, identity.bias, identity.stride, tuple(-c for c in crop),
                  identity.dilation, identity.groups)


def padding_reason(kernel: Kernel) -> str | None:
    """Why ``kernel`` is not a valid conv layer (a crop is left over), or None."""
    if any(p < 0 for p in kernel.padding):
        return (f"the result would need negative padding {list(kernel.padding)} (a crop of "
                "the input that no conv layer expresses)")
    return None


def on_meta(kernel: Kernel) -> Kernel:
    """The same kernel with its tensors on the meta device: the combinators then compute only
    the result's shape and settings, to price a merge before any weight is built."""
    return Kernel(kernel.weight.to("meta"), kernel.bias.to("meta"), kernel.stride,
                  kernel.padding, kernel.dilation, kernel.groups)
