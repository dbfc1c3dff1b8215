"""Fake quantization and the numbers a quantization report is made of, as pure tensor math.

INT8 as onnxruntime's static quantization does it by default (``QuantType.QInt8`` for weights
and activations):

- **weights**, symmetric: ``scale = max|w| / 127``, ``q = clamp(round(w / scale), -127, 127)``,
  ``ŵ = q · scale``; one scale for the whole tensor (*per-tensor*) or one per output channel
  (*per-channel*, axis 0 of a conv/linear weight, axis 1 of a transposed conv's);
- **activations**, asymmetric over the calibrated range ``[lo, hi]`` widened to include 0:
  ``scale = (hi − lo) / 255``, ``zero = round(−128 − lo / scale)``,
  ``q = clamp(round(x / scale) + zero, −128, 127)``, ``x̂ = (q − zero) · scale``.

Rounding is to nearest, ties to even (numpy's and onnxruntime's). Everything is computed in
float64. ``SQNR = 10·log10(Σ x² / Σ (x − x̂)²)`` in dB: each bit of precision is ~6 dB, so an
8-bit tensor whose values fill its range gives ~40-50 dB and one whose channels sit far below
the largest gives much less.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64
WEIGHT_QMAX = 127  # symmetric int8: [-127, 127]
ACTIVATION_QMIN, ACTIVATION_QMAX = -128, 127
FLOAT16_MAX = 65504.0
FLOAT16_MIN_NORMAL = 2.0 ** -14  # below this float16 is subnormal (fewer significant bits)
FLOAT16_MIN_SUBNORMAL = 2.0 ** -24  # below half of this float16 rounds to zero


def sqnr_db(reference: Tensor, candidate: Tensor) -> float:
    """``10·log10(Σ ref² / Σ (ref − cand)²)``: inf when equal, -inf for a zero reference."""
    ref = reference.detach().to(F64).reshape(-1)
    noise = float(((ref - candidate.detach().to(F64).reshape(-1)) ** 2).sum())
    signal = float((ref * ref).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def weight_scales(weight: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """Symmetric INT8 scales ``max|w| / 127``: one (0-D) or one per index of ``axis`` (shaped
    to broadcast against ``weight``). An all-zero tensor or channel gets scale 1."""
    magnitude = weight.detach().to(F64).abs()
    if per_channel:
        dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
        top = magnitude.amax(dim=dims, keepdim=True) if dims else magnitude
    else:
        top = magnitude.max()
    return torch.where(top > 0, top / WEIGHT_QMAX, torch.ones_like(top))


def quantize_weight(weight: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """``weight`` fake-quantized to symmetric INT8 (float64 values on the INT8 grid)."""
    scale = weight_scales(weight, per_channel, axis)
    w = weight.detach().to(F64)
    return torch.clamp(torch.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale


def weight_sqnr_db(weight: Tensor, per_channel: bool, axis: int = 0) -> float:
    """The SQNR of ``weight`` after symmetric INT8 fake quantization."""
    return sqnr_db(weight, quantize_weight(weight, per_channel, axis))


def channel_sqnr_db(weight: Tensor, per_channel: bool, axis: int = 0) -> Tensor:
    """The SQNR (dB) of each slice along ``axis`` after INT8 fake quantization of the whole
    tensor: with per-tensor scales, what a channel far below the largest one keeps."""
    w = weight.detach().to(F64).movedim(axis, 0).reshape(weight.shape[axis], -1)
    q = quantize_weight(weight, per_channel, axis).movedim(axis, 0).reshape(w.shape)
    noise = ((w - q) ** 2).sum(dim=1)
    signal = (w * w).sum(dim=1)
    ratio = torch.where(noise > 0, signal / noise, torch.full_like(signal, math.inf))
    return 10 * torch.log10(ratio)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of asymmetric INT8 over ``[lo, hi]`` widened to contain 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return 1.0, 0
    scale = (hi - lo) / (ACTIVATION_QMAX - ACTIVATION_QMIN)
    zero = int(round(ACTIVATION_QMIN - lo / scale))
    return scale, max(ACTIVATION_QMIN, min(ACTIVATION_QMAX, zero))


def quantize_activation(x: Tensor, lo: float, hi: float) -> Tensor:
    """``x`` fake-quantized to asymmetric INT8 calibrated on ``[lo, hi]`` (float64)."""
    scale, zero = activation_qparams(lo, hi)
    q = torch.clamp(torch.round(x.detach().to(F64) / scale) + zero, ACTIVATION_QMIN,
                    ACTIVATION_QMAX)
    return (q - zero) * scale


def float16_counts(tensor: Tensor) -> dict[str, int]:
    """How many values float16 cannot hold as they are: ``overflow`` (|x| > 65504, becomes
    inf), ``underflow`` (non-zero, rounds to 0), ``subnormal`` (non-zero, below 2^-14: kept
    with fewer significant bits)."""
    magnitude = tensor.detach().to(F64).abs()
    nonzero = magnitude > 0
    return {
        "overflow": int((magnitude > FLOAT16_MAX).sum()),
        "underflow": int((nonzero & (magnitude < FLOAT16_MIN_SUBNORMAL / 2)).sum()),
        "subnormal": int((nonzero & (magnitude >= FLOAT16_MIN_SUBNORMAL / 2)
                          & (magnitude < FLOAT16_MIN_NORMAL)).sum()),
    }


def subnormal_count(tensor: Tensor) -> int:
    """Non-zero values below the smallest normal number of the tensor's own floating dtype
    (denormals: slow on many CPUs, flushed to zero by others)."""
    if not tensor.is_floating_point():
        return 0
    tiny = torch.finfo(tensor.dtype).tiny
    magnitude = tensor.detach().abs()
    return int(((magnitude > 0) & (magnitude < tiny)).sum())
