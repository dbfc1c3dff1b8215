"""INT8 for real: train small RepVGG and MobileOne networks, quantize them with onnxruntime,
and set the quantization readiness report's predictions next to what happened.

    .venv/bin/pip install -e .[bench]        # scikit-learn, for its bundled digits data set
    .venv/bin/python benchmarks/quant.py [--models repvgg_tiny,mobileone_tiny] [--epochs 10]

Data: scikit-learn's digits (1797 8x8 images shipped with the package), upscaled to 32x32 and
repeated on 3 channels; 1200 images train, 597 test, 128 training images calibrate.
Models: the train forms of ``repfuse.models`` ``repvgg_tiny`` and ``mobileone_tiny`` (10
classes), trained from scratch with Adam for a few CPU minutes.

For each model, three forms are exported to ONNX (opset 17, torch.onnx TorchScript exporter,
which also folds each conv's own batch norm): the *train* form, repfuse's *fused* form, and
the fused form after the ``equalize`` pass (*fused + equalize*). Each is quantized with
onnxruntime's ``quantize_static`` (QDQ, INT8 weights and activations, MinMax calibration on the
calibration images), per tensor and per channel, and run in onnxruntime (all graph
optimizations, so QDQ pairs become integer kernels). Printed:

1. top-1 on the test images: float32 and INT8 (per tensor, per channel), each form;
2. per conv/linear layer of the fused and equalized forms: the report's predicted INT8 weight
   SQNR against the SQNR of the weights onnxruntime actually stored (dequantized from the QDQ
   model), and whether the report flagged the layer;
3. the report's simulated end-to-end SQNR next to the measured SQNR of onnxruntime's INT8
   logits against float32 logits on the test images;
4. the targets of issue 15, each with its measured verdict.

Recorded results live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

import repfuse
from repfuse.models import create_model
from repfuse.passes import run_passes
from repfuse.passes.equalize import Equalize
from repfuse.quant import quant_report, sqnr_db
from repfuse.quant.render import FORM_LABELS, db

FORMS = ("train", "fused", "equalized")


# --- data and training ---------------------------------------------------------------------


def digits(size: int = 32) -> dict[str, torch.Tensor]:
    """scikit-learn's digits upscaled to ``size``x``size``, 3 channels, standardized."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    mean, std = images[:1200].mean(), images[:1200].std()
    images = (images - mean) / std
    return {"train_x": images[:1200], "train_y": labels[:1200], "test_x": images[1200:],
            "test_y": labels[1200:], "calib_x": images[:128]}


def train(model: nn.Module, data: dict, epochs: int, seed: int = 0) -> float:
    """Adam, batch 64, cosine learning rate; returns the training seconds."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(data["train_y"]) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data["train_y"]))
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(model(data["train_x"][batch]), data["train_y"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - start


# --- ONNX and onnxruntime ------------------------------------------------------------------


def export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)


class Calibration(CalibrationDataReader):
    def __init__(self, images: torch.Tensor, batch: int = 32) -> None:
        self.batches = [{"input": images[i:i + batch].numpy()}
                        for i in range(0, len(images), batch)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize(source: Path, target: Path, calibration: torch.Tensor, per_channel: bool) -> None:
    quantize_static(str(source), str(target), Calibration(calibration),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i:i + 128].numpy()})[0]
                           for i in range(0, len(images), 128)])


def top1(logits: np.ndarray, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels.numpy()).mean())


def stored_weights(float_path: Path, qdq_path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per Conv/Gemm of the float model (graph order): name, float weight, and the weight
    onnxruntime stored in the QDQ model, dequantized."""
    float_model, qdq = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    inits = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    qinits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    qnodes = {node.name: node for node in qdq.graph.node}
    out = []
    for node in float_model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in inits:
            continue
        dq = producers.get(qnodes[node.name].input[1]) if node.name in qnodes else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        values = qinits[dq.input[0]].astype(np.float64)
        scale = qinits[dq.input[1]].astype(np.float64)
        zero = qinits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else 0.0
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1:
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        out.append((node.name, inits[node.input[1]].astype(np.float64),
                    (values - zero) * scale))
    return out


# --- one model -----------------------------------------------------------------------------


def forms_of(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    fused = repfuse.fuse(model, example)
    equalized = copy.deepcopy(fused)
    run_passes(equalized, [Equalize()])
    return {"train": model, "fused": fused, "equalized": equalized}


def bench_model(name: str, data: dict, epochs: int, scratch: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(name, randomize_bn=False)  # both tiny models have 10 classes
    seconds = train(model, data, epochs)
    example = data["calib_x"][:1]
    forms = forms_of(model, example)
    calibration = [data["calib_x"][i:i + 32] for i in range(0, 128, 32)]
    start = time.perf_counter()
    report = quant_report(forms["fused"], calibration, original=model, name=name)
    report_seconds = time.perf_counter() - start

    result = {"model": name, "train_s": seconds, "report_s": report_seconds,
              "report": report, "top1": {}, "sqnr": {}, "layers": {}}
    with torch.no_grad():
        result["eager_top1"] = top1(model(data["test_x"]).numpy(), data["test_y"])
    for form, module in forms.items():
        float_path = scratch / f"{name}_{form}.onnx"
        export(module, example, float_path)
        logits = run_onnx(float_path, data["test_x"])
        row = {"float32": top1(logits, data["test_y"])}
        for per_channel in (False, True):
            mode = "per_channel" if per_channel else "per_tensor"
            qpath = scratch / f"{name}_{form}_{mode}.onnx"
            quantize(float_path, qpath, data["calib_x"], per_channel)
            qlogits = run_onnx(qpath, data["test_x"])
            row[mode] = top1(qlogits, data["test_y"])
            result["sqnr"][(form, mode)] = sqnr_db(torch.from_numpy(logits),
                                                   torch.from_numpy(qlogits))
            if form != "train":
                result["layers"][(form, mode)] = [
                    (onnx_name, sqnr_db(torch.from_numpy(w), torch.from_numpy(q)))
                    for onnx_name, w, q in stored_weights(float_path, qpath)]
        result["top1"][form] = row
    return result


# --- printing ------------------------------------------------------------------------------


def print_results(r: dict) -> list[tuple[str, bool, str]]:
    """Print one model's tables; return the targets as (target, met, evidence)."""
    report = r["report"]
    name = r["model"]
    print(f"\n### {name}: trained {r['train_s']:.0f} s, eager float32 top-1 "
          f"{r['eager_top1']:.2f}%, report {r['report_s']:.1f} s\n")
    print("| form | float32 top-1 | INT8 per-tensor top-1 | INT8 per-channel top-1 |")
    print("|---|---|---|---|")
    for form in FORMS:
        row = r["top1"][form]
        print(f"| {FORM_LABELS[form]} | {row['float32']:.2f} | {row['per_tensor']:.2f} | "
              f"{row['per_channel']:.2f} |")

    simulated = {f.form: f for f in report.forms}
    print("\n| form | simulated INT8 SQNR per-tensor / per-channel (report, dB) | "
          "onnxruntime INT8 logits SQNR per-tensor / per-channel (dB) |")
    print("|---|---|---|")
    for form in FORMS:
        sim = simulated[form]
        print(f"| {FORM_LABELS[form]} | {db(sim.per_tensor_db)} / {db(sim.per_channel_db)} | "
              f"{db(r['sqnr'][(form, 'per_tensor')])} / "
              f"{db(r['sqnr'][(form, 'per_channel')])} |")

    print("\n| layer | max/median | predicted per-tensor dB | onnxruntime per-tensor dB | "
          "predicted per-channel dB | onnxruntime per-channel dB | flagged | "
          "fused + equalize: predicted / onnxruntime per-tensor dB |")
    print("|---|---|---|---|---|---|---|---|")
    fused_t = r["layers"][("fused", "per_tensor")]
    fused_c = r["layers"][("fused", "per_channel")]
    eq_t = r["layers"][("equalized", "per_tensor")]
    missed = []
    for i, layer in enumerate(report.layers):
        eq = report.equalized[i]
        measured_t, measured_c = fused_t[i][1], fused_c[i][1]
        if min(measured_t, measured_c) < report.thresholds.sqnr_db and not layer.flagged:
            missed.append(layer.module)
        print(f"| {layer.module} | {layer.range_ratio:.3g} | "
              f"{db(layer.sqnr_per_tensor_db)} | {db(measured_t)} | "
              f"{db(layer.sqnr_per_channel_db)} | {db(measured_c)} | "
              f"{'yes' if layer.flagged else ''} | {db(eq.sqnr_per_tensor_db)} / "
              f"{db(eq_t[i][1])} |")
    for layer in report.layers:
        for cause in layer.batchnorm_causes:
            print(f"\n- {layer.module}: {cause.describe()}")

    worst = min(t for _, t in fused_t)
    worst_eq = min(t for _, t in eq_t)
    top = r["top1"]
    targets = [
        (f"{name}: the report flags every layer whose INT8 weight SQNR (onnxruntime's stored "
         f"weights) is under {report.thresholds.sqnr_db:g} dB", not missed,
         "missed: " + ", ".join(missed) if missed else
         f"{sum(1 for lay in report.layers if lay.flagged)} flagged, none missed"),
        (f"{name}: equalize raises the worst layer's per-tensor weight SQNR", worst_eq > worst,
         f"{db(worst)} -> {db(worst_eq)} dB"),
        (f"{name}: equalize does not lower INT8 top-1",
         top["equalized"]["per_tensor"] >= top["fused"]["per_tensor"]
         and top["equalized"]["per_channel"] >= top["fused"]["per_channel"],
         f"per-tensor {top['fused']['per_tensor']:.2f} -> "
         f"{top['equalized']['per_tensor']:.2f}, per-channel "
         f"{top['fused']['per_channel']:.2f} -> {top['equalized']['per_channel']:.2f}"),
        (f"{name}: fused + equalize per-tensor INT8 within 1 point of float32",
         abs(top["equalized"]["float32"] - top["equalized"]["per_tensor"]) <= 1.0,
         f"{top['equalized']['float32']:.2f} vs {top['equalized']['per_tensor']:.2f}"),
    ]
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="repvgg_tiny,mobileone_tiny")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{torch.get_num_threads()} threads; digits 32x32, 1200 train / 597 test, "
          f"{args.epochs} epochs")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice, per call
    data = digits()
    targets = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            targets += print_results(bench_model(name, data, args.epochs, Path(scratch)))
    print("\n| target | met | measured |")
    print("|---|---|---|")
    for target, met, evidence in targets:
        print(f"| {target} | {'yes' if met else 'NO'} | {evidence} |")


if __name__ == "__main__":
    main()
