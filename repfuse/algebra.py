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
    out_index = output_channel_of_weight(weight, groups, transposed)
    extra = weight.dim() - 2
    scale = affine.scale.to(weight.device)
    new_weight = weight.detach().to(FOLD_DTYPE) * _trailing(scale[out_index], extra)
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
