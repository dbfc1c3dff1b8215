"""The tensor math of exact channel pruning, with no torch.fx in it.

A conv, transposed conv or linear layer ``y = W*x + b`` (shapes as in :mod:`repfuse.algebra`)
has two kinds of channels that cost work and change nothing:

- an **output channel with an all-zero filter** computes ``y_o = b_o`` everywhere, on every
  input: a constant (:func:`zero_output_channels`);
- an **input channel with all-zero weights** (an all-zero column ``W[:, c]``) is ignored by the
  layer (:func:`zero_input_channels`).

Removing a channel from the layers that write and read it is exact when every reader either
ignores it or can take its constant value ``v`` into its bias:
``W*x + b = W'*x' + (b + Σ_{k} W[:, c, k]·v_c)`` (:func:`conv_of_constant`, :func:`slice_layer`),
where ``x'`` lacks channel ``c`` and ``W'`` lacks its column. That holds for a linear layer and
for a conv that reads ``v`` through every tap, i.e. one that does not pad with zeros (its
border taps would read 0 where the unpruned model reads ``v``); for ``v = 0`` it holds always.

All results are computed in float64 and cast back to the dtype and device of the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repfuse.algebra import FOLD_DTYPE, input_channel_of_weight


def zero_channels(weight: Tensor, groups: int = 1, transposed: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """Bool masks of the output channels whose whole filter is zero and of the input channels
    that no weight reads, from one scan of the weight.

    Conv/linear: output ``o`` is dead when ``W[o] == 0``; input ``c = group·(C_in/g) + i`` is
    ignored when ``W[o, i] == 0`` for every ``o`` of its group. Transposed conv: output
    ``o = group·(C_out/g) + j`` is dead when ``W[i, j] == 0`` for every ``i`` of the group;
    input ``c`` is ignored when ``W[c] == 0``. A dead output channel is its bias.
    """
    zero = weight.detach().eq(0)
    if transposed:
        c_in, out_per_group = zero.shape[0], zero.shape[1]
        per = zero.reshape(groups, c_in // groups, out_per_group, -1)
        dead = per.all(dim=3).all(dim=1).reshape(-1)
        return dead, zero.reshape(c_in, -1).all(dim=1)
    out_channels, in_per_group = zero.shape[0], zero.shape[1]
    per = zero.reshape(groups, out_channels // groups, in_per_group, -1).all(dim=3)
    return zero.reshape(out_channels, -1).all(dim=1), per.all(dim=1).reshape(-1)


def zero_output_channels(weight: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """The output channels whose whole filter is zero (see :func:`zero_channels`)."""
    return zero_channels(weight, groups, transposed)[0]


def zero_input_channels(weight: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """The input channels no weight reads: an all-zero column (see :func:`zero_channels`)."""
    return zero_channels(weight, groups, transposed)[1]


def all_normal(tensor: Tensor | None) -> bool:
    """True when no entry of ``tensor`` is zero or subnormal (``min |w| ≥ tiny``): then it has
    no dead filter, no ignored column and nothing to flush."""
    if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(tensor.detach().abs().amin() >= torch.finfo(tensor.dtype).tiny)


def subnormal_count(tensor: Tensor | None) -> int:
    """How many entries of ``tensor`` are subnormal (non-zero, below ``finfo.tiny``).

    float16 is left out (counted 0): its subnormals start at ``6.1e-5``, within the range of
    ordinary small weights, and CPUs compute float16 layers in float32, where they are normal
    numbers and cost nothing extra."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float16:
        return 0
    t, tiny = tensor.detach(), torch.finfo(tensor.dtype).tiny
    below = int(torch.count_nonzero((t < tiny) & (t > -tiny)))  # zeros and subnormals
    return below - int(torch.count_nonzero(t == 0)) if below else 0


def flush_subnormals(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` with its subnormal entries set to zero.

    A subnormal ``w`` (``0 < |w| < finfo.tiny``: ``1.2e-38`` in float32) contributes
    ``w·x`` to a sum whose other terms are normal numbers; it changes the sum by less than one
    rounding step unless every other term is as small. Dropping it is exact up to rounding, and
    CPUs handle subnormal operands in microcode, tens of times slower than normal ones.
    """
    tiny = torch.finfo(tensor.dtype).tiny
    tensor = tensor.detach()
    return torch.where(tensor.abs() < tiny, torch.zeros_like(tensor), tensor)


def conv_of_constant(
    weight: Tensor, bias: Tensor | None, values: Tensor, *, groups: int = 1
) -> Tensor:
    """The output of a conv or linear layer on an input that is ``values[c]`` everywhere on
    channel ``c``, read without padding: ``y_o = b_o + Σ_{i,k} W[o, i, k]·v_{c(o, i)}``.

    Float64, one entry per output channel. With ``values`` zero except on some channels, this is
    the new bias of the layer once those channels are removed from its input (exact for a
    linear layer and a conv that does not pad with zeros).
    """
    w64 = weight.detach().to(FOLD_DTYPE)
    sums = w64.reshape(w64.shape[0], w64.shape[1], -1).sum(dim=2)  # (C_out, C_in/g)
    v = values.to(FOLD_DTYPE).to(weight.device)
    index = input_channel_of_weight(weight, groups)
    total = (sums * v[index]).sum(dim=1)
    if bias is not None:
        total = total + bias.detach().to(FOLD_DTYPE)
    return total


def slice_layer(
    weight: Tensor,
    bias: Tensor | None,
    keep_out: Tensor,
    keep_in: Tensor,
    *,
    groups: int = 1,
    transposed: bool = False,
    constants: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, int]:
    """A layer restricted to the channels ``keep_out``/``keep_in`` (bool masks): new weight,
    bias and groups.

    ``constants`` (one float per input channel, read only where ``keep_in`` is False) are the
    values of the removed input channels: their contribution ``Σ_k W[o, c, k]·v_c`` moves into
    the bias (:func:`conv_of_constant`); a layer with no bias gets one when that is non-zero.
    A grouped layer loses whole groups only: every removed channel's group must be removed on
    both sides (``ValueError`` otherwise). Transposed convs are sliced only with one group.
    """
    keep_out = keep_out.to(torch.bool).cpu()
    keep_in = keep_in.to(torch.bool).cpu()
    new_bias = bias
    removed_in = ~keep_in
    if constants is not None and bool(removed_in.any()):
        folded = torch.where(removed_in, constants.to(FOLD_DTYPE).cpu(),
                             torch.zeros((), dtype=FOLD_DTYPE))
        if bool(folded.ne(0).any()):
            if transposed:
                raise ValueError("a transposed conv spreads a constant input unevenly near "
                                 "the borders; only zero constants can be removed from it")
            new_bias = conv_of_constant(weight, bias, folded, groups=groups).to(
                dtype=weight.dtype, device=weight.device)
    if transposed:
        if groups != 1:
            raise ValueError("a grouped transposed conv is not sliced")
        new_weight = weight.detach()[keep_in.to(weight.device)][:, keep_out.to(weight.device)]
    elif groups == 1:
        new_weight = weight.detach()[keep_out.to(weight.device)][:, keep_in.to(weight.device)]
    else:
        keep_groups = _whole_groups(keep_out, keep_in, groups)
        new_weight = weight.detach()[keep_out.to(weight.device)]
        groups = int(keep_groups.sum())
    if new_bias is not None:
        new_bias = new_bias.detach()[keep_out.to(new_bias.device)]
    return new_weight.contiguous(), None if new_bias is None else new_bias.contiguous(), groups


def _whole_groups(keep_out: Tensor, keep_in: Tensor, groups: int) -> Tensor:
    """The kept groups, when ``keep_out`` and ``keep_in`` keep or drop whole groups alike."""
    out_groups = keep_out.reshape(groups, -1)
    in_groups = keep_in.reshape(groups, -1)
    kept = out_groups[:, 0]
    whole = (out_groups == kept[:, None]).all() and (in_groups == kept[:, None]).all()
    if not whole:
        raise ValueError("a grouped conv can only lose whole groups (inputs and outputs)")
    return kept


def grouped_output_constants(
    weight: Tensor, bias: Tensor | None, const_in: Tensor, values: Tensor, *, groups: int,
    pads_with_zeros: bool,
) -> tuple[Tensor, Tensor]:
    """Which outputs of a grouped conv are constant, and their values (float64).

    Output ``o`` is the constant ``b_o`` when its filter is zero, and
    ``b_o + Σ_{i,k} W[o, i, k]·v_{c(o,i)}`` when every input it reads is constant and the conv
    does not pad with zeros (or every such input is 0, which zero padding reproduces).
    """
    dead = zero_output_channels(weight, groups)
    index = input_channel_of_weight(weight, groups)
    const_in = const_in.to(weight.device)
    values = values.to(FOLD_DTYPE).to(weight.device)
    reads_const = const_in[index].all(dim=1)
    if pads_with_zeros:
        reads_const = reads_const & values.eq(0)[index].all(dim=1)
    const_out = dead | reads_const
    filled = torch.where(const_in, values, torch.zeros_like(values))
    out_values = conv_of_constant(weight, bias, filled, groups=groups)
    zero_bias = torch.zeros(weight.shape[0], dtype=FOLD_DTYPE, device=weight.device)
    bias64 = zero_bias if bias is None else bias.detach().to(FOLD_DTYPE)
    out_values = torch.where(dead, bias64, out_values)
    return const_out, torch.where(const_out, out_values, torch.zeros_like(out_values))

