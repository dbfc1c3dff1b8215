"""Quantization readiness: what INT8 and float16 will do to a fused model, before quantizing.

``repfuse.quant.quant_report(fused, inputs, original=model)`` measures it (float64, on the
fused model); :mod:`repfuse.quant.render` turns the report into terminal rows, Markdown or an
HTML section. The ``equalize`` pass (:mod:`repfuse.passes.equalize`) is the exact fix it
measures against.
"""

from repfuse.quant.fakequant import (
    quantize_activation,
    quantize_weight,
    sqnr_db,
    weight_sqnr_db,
)
from repfuse.quant.report import (
    ActivationRange,
    BatchNormCause,
    FormSQNR,
    LayerQuant,
    QuantReport,
    Thresholds,
    quant_report,
)

__all__ = [
    "ActivationRange", "BatchNormCause", "FormSQNR", "LayerQuant", "QuantReport", "Thresholds",
    "quant_report", "quantize_activation", "quantize_weight", "sqnr_db", "weight_sqnr_db",
]
