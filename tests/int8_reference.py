"""Symmetric INT8 fake quantization and SQNR in plain numpy: the independent reference that
the quantization readiness tests (``tests/quant``, ``tests/test_cli_quant.py``) hold
``repfuse.quant`` against."""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    """Signal to quantization noise ratio of ``q`` as an approximation of ``w``, in dB."""
    noise = float(((w - q) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((w * w).sum()) / noise)


def int8_weight(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric INT8, [-127, 127], scale max|w|/127 per tensor or per output channel."""
    if per_channel:
        top = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).reshape(-1, *[1] * (w.ndim - 1))
    else:
        top = np.abs(w).max()
    scale = np.where(top > 0, top / 127, 1.0)
    return np.clip(np.rint(w / scale), -127, 127) * scale
