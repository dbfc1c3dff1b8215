"""The quantization readiness report against direct computations written here.

Every figure is recomputed independently: INT8 fake quantization in numpy (round half to even,
as onnxruntime), activation ranges from forward hooks on the unfused model, the simulated INT8
network step by step by hand. Batch norm statistics are randomized, and the outlier cases plant
one tiny running variance (or one large gamma) and check that the report names that batch norm
and channel through the rewrite provenance.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_input
from int8_reference import int8_weight, sqnr_db
from torch import nn

import repfuse
from repfuse.errors import RepfuseError
from repfuse.models import create_model, randomize_bn_stats
from repfuse.quant import quant_report
from repfuse.quant.render import html_section, layer_rows, render_markdown

F64 = torch.float64


def np_int8_activation(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zero = np.clip(np.rint(-128 - lo / scale), -128, 127)
    return (np.clip(np.rint(x / scale) + zero, -128, 127) - zero) * scale


def fused_model(name: str, plant=None, seed: int = 1):
    model = randomize_bn_stats(create_model(name), seed).eval()
    if plant is not None:
        with torch.no_grad():
            plant(model)
    x = random_input((2, 3, 32, 32))
    return model, repfuse.fuse(model, x), x


def tiny_variance(model: nn.Module) -> None:
    model.get_submodule("stage2.0.conv.dense.bn").running_var[3] = 1e-7


@pytest.mark.parametrize("name", ["repvgg_tiny", "mobileone_tiny"])
def test_weight_sqnr_matches_a_direct_fake_quantization(name: str) -> None:
    model, fused, _ = fused_model(name)

    report = quant_report(fused)

    layers = {n.target: m for n in fused.graph.nodes if n.op == "call_module"
              for m in [fused.get_submodule(n.target)] if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [layer.module for layer in report.layers] == list(layers)
    for layer in report.layers:
        w = layers[layer.module].weight.detach().double().numpy()
        assert layer.sqnr_per_tensor_db == pytest.approx(sqnr_db(w, int8_weight(w, False)),
                                                         rel=1e-12)
        assert layer.sqnr_per_channel_db == pytest.approx(sqnr_db(w, int8_weight(w, True)),
                                                          rel=1e-12)
        ranges = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        assert np.allclose(layer.channel_ranges, ranges, rtol=0, atol=0)
        lower_median = np.sort(ranges)[(len(ranges) - 1) // 2]  # torch's median: lower middle
        assert layer.range_ratio == pytest.approx(ranges.max() / lower_median, rel=1e-12)
        q = int8_weight(w, False)
        per_channel = [sqnr_db(w[c], q[c]) for c in range(w.shape[0])]
        assert layer.median_channel_sqnr_db == pytest.approx(
            sorted(per_channel)[(len(per_channel) - 1) // 2], rel=1e-12)
        below = layer.sqnr_per_tensor_db < 30 or layer.sqnr_per_channel_db < 30
        assert not below or layer.flagged  # every layer under 30 dB is flagged


def test_tiny_running_variance_is_traced_to_its_batch_norm() -> None:
    model, fused, _ = fused_model("repvgg_tiny", tiny_variance)

    report = quant_report(fused, original=model)

    (layer,) = [lay for lay in report.layers if lay.module == "stage2.0.conv.dense.conv"]
    assert 3 in layer.outlier_channels
    (cause,) = [c for c in layer.batchnorm_causes if c.channel == 3]
    bn = model.get_submodule("stage2.0.conv.dense.bn")
    assert cause.batchnorm == "stage2.0.conv.dense.bn" and cause.cause == "running_var"
    assert cause.running_var == pytest.approx(1e-7)
    expected = float(bn.weight[3].detach().abs() / torch.sqrt(bn.running_var[3].double() + bn.eps))
    assert cause.factor == pytest.approx(expected, rel=1e-6)
    assert any("running_var 1e-07" in flag and "stage2.0.conv.dense.bn" in flag
               for flag in layer.flags)
    assert "stage2.0.conv.dense.bn" in layer.module_paths  # provenance names the BN
    others = [lay for lay in report.layers if lay.module != layer.module]
    assert all(not lay.batchnorm_causes for lay in others)


def test_large_gamma_is_named_as_the_cause() -> None:
    def big_gamma(model: nn.Module) -> None:
        model.get_submodule("stage3.0.conv.pointwise.bn").weight[5] = 400.0

    model, fused, _ = fused_model("repvgg_tiny", big_gamma)

    report = quant_report(fused, original=model)

    causes = [c for lay in report.layers for c in lay.batchnorm_causes]
    assert [(c.batchnorm, c.channel, c.cause) for c in causes] == [
        ("stage3.0.conv.pointwise.bn", 5, "gamma")]


def test_without_the_original_the_report_says_how_to_trace_outliers() -> None:
    _, fused, _ = fused_model("repvgg_tiny", tiny_variance)

    report = quant_report(fused)

    assert all(not lay.batchnorm_causes for lay in report.layers)
    assert any("pass the original model" in note for note in report.notes)


class Plain(nn.Module):
    """conv -> ReLU -> global average pool -> flatten -> linear: no fusion needed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv.weight.mul_(torch.logspace(-1, 1.5, 6).reshape(-1, 1, 1, 1))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_float16_range_and_subnormal_biases_are_flagged() -> None:
    model = Plain().eval()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = 1e5  # beyond float16's 65504
        model.conv.weight[1, 0, 0, 0] = 1e-9  # rounds to zero in float16
        model.conv.bias[2] = 1e-40  # subnormal in float32
    x = random_input((2, 3, 8, 8))
    gm = repfuse.trace(model, x)

    report = quant_report(gm)

    conv = report.layers[0]
    assert conv.float16["weight_overflow"] == 1
    assert conv.float16["weight_underflow"] == 1
    assert conv.subnormal_biases == 1
    assert conv.float16["bias_underflow"] == 1
    assert "1 weight values overflow float16" in conv.flags
    assert "1 subnormal biases in torch.float32" in conv.flags
    assert report.layers[1].float16["weight_overflow"] == 0


def test_activation_ranges_match_hooks_on_the_model() -> None:
    model = Plain().eval()
    batches = [random_input((2, 3, 8, 8), seed=s) for s in range(3)]
    seen: dict[str, list[torch.Tensor]] = {"conv_in": [], "conv": [], "fc_in": [], "fc": []}
    model64 = copy.deepcopy(model).double()
    def keep(name):
        def hook(module, inputs, output) -> None:
            seen[f"{name}_in"].append(inputs[0])
            seen[name].append(output)
        return hook

    model64.conv.register_forward_hook(keep("conv"))
    model64.fc.register_forward_hook(keep("fc"))
    with torch.no_grad():
        for x in batches:
            model64(x.double())
    gm = repfuse.trace(model, batches[0])

    report = quant_report(gm, batches)

    conv, fc = report.activations
    both = {key: torch.cat([t.reshape(-1) for t in values]) for key, values in seen.items()}
    assert (conv.input_min, conv.input_max) == (float(both["conv_in"].min()),
                                                float(both["conv_in"].max()))
    assert (conv.output_min, conv.output_max) == (float(both["conv"].min()),
                                                  float(both["conv"].max()))
    assert (fc.input_min, fc.input_max) == (float(both["fc_in"].min()),
                                            float(both["fc_in"].max()))
    per_channel = torch.cat(seen["conv"]).abs().amax(dim=(0, 2, 3))
    assert conv.channel_ratio == pytest.approx(float(per_channel.max() / per_channel.median()))
    assert report.batches == 3


def test_simulated_int8_matches_a_hand_written_simulation() -> None:
    """conv -> ReLU -> pool -> flatten -> linear, quantized at the graph input, every layer's
    input and output, by hand in numpy: the report's end-to-end SQNR must agree."""
    model = Plain().double().eval()
    batches = [random_input((2, 3, 8, 8), seed=s, dtype=F64) for s in range(2)]
    w1, b1 = model.conv.weight.detach().numpy(), model.conv.bias.detach().numpy()
    w2, b2 = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()

    def float_parts(x):
        h = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
        f = torch.flatten(F.adaptive_avg_pool2d(torch.relu(h), 1), 1)
        return {"x": x, "conv": h, "flat": f, "fc": model.fc(f)}

    with torch.no_grad():
        runs = [float_parts(x) for x in batches]
    ranges = {k: (min(float(r[k].min()) for r in runs), max(float(r[k].max()) for r in runs))
              for k in runs[0]}

    def simulated(x, per_channel):
        def qa(name, t):
            return torch.from_numpy(np_int8_activation(t.numpy(), *ranges[name]))

        qw1 = torch.from_numpy(int8_weight(w1, per_channel))
        qw2 = torch.from_numpy(int8_weight(w2, per_channel))
        h = qa("conv", F.conv2d(qa("x", x), qw1, torch.from_numpy(b1), padding=1))
        f = qa("flat", torch.flatten(F.adaptive_avg_pool2d(torch.relu(h), 1), 1))
        return qa("fc", F.linear(f, qw2, torch.from_numpy(b2)))

    reference = torch.cat([r["fc"].reshape(-1) for r in runs]).numpy()
    expected = {}
    for per_channel in (False, True):
        with torch.no_grad():
            out = torch.cat([simulated(x, per_channel).reshape(-1) for x in batches]).numpy()
        expected[per_channel] = sqnr_db(reference, out)
    gm = repfuse.trace(model, batches[0])

    report = quant_report(gm, batches)

    fused = next(f for f in report.forms if f.form == "fused")
    assert fused.per_tensor_db == pytest.approx(expected[False], rel=1e-9)
    assert fused.per_channel_db == pytest.approx(expected[True], rel=1e-9)
    assert fused.quant_points == 4  # input, conv output, linear input, linear output
    assert [f.form for f in report.forms] == ["fused", "equalized"]


def test_forms_side_by_side_and_equalize_raises_the_worst_layer() -> None:
    model, fused, x = fused_model("repvgg_tiny", tiny_variance)
    batches = [random_input((4, 3, 32, 32), seed=s) for s in range(2)]

    report = quant_report(fused, batches, original=model, name="repvgg_tiny")

    assert [f.form for f in report.forms] == ["train", "fused", "equalized"]
    assert all(math.isfinite(f.per_tensor_db) for f in report.forms)
    worst, worst_eq = report.worst(), report.worst(equalized=True)
    assert worst_eq.sqnr_per_tensor_db > worst.sqnr_per_tensor_db
    assert len(report.equalization["rewrites"]) == 1
    assert [lay.module for lay in report.equalized] == [lay.module for lay in report.layers]
    assert fused.get_submodule("stage2.0.conv.dense.conv").weight.dtype == torch.float32


def test_report_serializes_and_renders() -> None:
    model, fused, x = fused_model("repvgg_tiny", tiny_variance)

    report = quant_report(fused, [x], original=model, name="repvgg_tiny")

    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == 1 and data["kind"] == "quant_report"
    assert data["flagged"] == [lay.node for lay in report.layers if lay.flags]
    header, rows = layer_rows(data)
    assert len(rows) == len(report.layers) and header[0] == "layer"
    assert layer_rows(report) == (header, rows)  # from the object or from its JSON alike
    markdown = render_markdown(data)
    assert "| stage2.0.conv.dense.conv |" in markdown and "fused + equalize" in markdown
    section = html_section(report)
    assert section.startswith('<section id="quantization">') and "<svg" in section
    assert section.count("<rect") == 1 + 3 * len(report.layers) + 3  # frame, bars, legend


def test_needs_a_graph_or_inputs() -> None:
    with pytest.raises(RepfuseError, match="needs a GraphModule"):
        quant_report(Plain())
