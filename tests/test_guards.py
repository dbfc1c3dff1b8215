"""Guards: models that are unusual but valid fuse exactly; models repfuse cannot fuse are refused
with a one-line reason, never fused wrongly.

Covered: SyncBatchNorm and BatchNorm subclasses, BatchNorm without running statistics, frozen
BatchNorm (torchvision's FrozenBatchNorm2d, written here), quantized modules, float16 and
bfloat16 models, channels_last tensors, parameters that require grad, the meta device and a
device mismatch, forward hooks. Numbers are checked against the unfused model in float64.
"""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
from conftest import (
    DTYPES,
    F32_RTOL,
    F64_RTOL,
    TOLERANCE,
    calls_to,
    modules_of,
    random_input,
    reference64,
    rel_err,
)
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import create_model, randomize_bn_stats


def conv_norm(norm: nn.Module, channels: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), norm, nn.ReLU())


def prepared(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    return randomize_bn_stats(model, seed=5).to(dtype).eval()


def fused_output(fused: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return fused(x)


# --- batch norm variants -------------------------------------------------------------------------


class RenamedBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward (as many libraries define one)."""

    def extra_repr(self) -> str:
        return "renamed " + super().extra_repr()


class CheckingBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A subclass of the private base with its own input check, as detectron2-style code has."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError("expected 4-D input")


class ScaledBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward computes something else: BatchNorm, then doubled."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


@DTYPES
@pytest.mark.parametrize(
    "norm", [nn.SyncBatchNorm, RenamedBatchNorm, CheckingBatchNorm, ScaledBatchNorm],
    ids=["sync", "subclass", "private-base-subclass", "subclass-own-forward"],
)
def test_batchnorm_variants_fold_exactly(norm, dtype):
    model = prepared(conv_norm(norm(4)), dtype)
    x = random_input((2, 3, 6, 6), dtype=dtype)

    fused = repfuse.fuse(model, x)

    assert modules_of(fused, _BatchNorm) == []
    assert not any("batch_norm" in str(n.target) for n in fused.graph.nodes)
    assert modules_of(fused, nn.Conv2d) == ["0"]
    assert rel_err(reference64(model, x), fused_output(fused, x)) <= TOLERANCE[dtype]


def test_subclass_with_its_own_forward_is_not_folded_as_a_plain_batchnorm():
    """Even if it ends up as a call of the module (here: a hand-made graph), the fold pass
    must not treat it as BatchNorm: its forward doubles the result."""

    class KeepScaledNorm(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, ScaledBatchNorm) or super().is_leaf_module(m, name)

    model = prepared(conv_norm(ScaledBatchNorm(4)))
    graph = KeepScaledNorm().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    x = random_input((2, 3, 6, 6), dtype=torch.float64)

    fused = repfuse.fuse(gm, x)

    assert modules_of(fused, ScaledBatchNorm) == ["1"]
    assert rel_err(reference64(model, x), fused_output(fused, x)) <= F64_RTOL


def test_batchnorm_without_running_statistics_is_declined_with_the_reason():
    model = prepared(conv_norm(nn.BatchNorm2d(4, track_running_stats=False)))
    x = random_input((2, 3, 6, 6), dtype=torch.float64)

    fused = repfuse.fuse(model, x)

    assert modules_of(fused, _BatchNorm) == ["1"]
    reasons = [d.reason for d in repfuse.history(fused).declined
               if d.pass_name == "fold_batchnorm"]
    assert reasons == ["'1' (BatchNorm2d) has no running statistics: it normalizes with batch "
                       "statistics, which no fixed weights reproduce"]
    assert rel_err(reference64(model, x), fused_output(fused, x)) <= F64_RTOL


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: statistics and affine parameters as buffers."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        generator = torch.Generator().manual_seed(channels)
        self.register_buffer("weight", torch.rand(channels, generator=generator) + 0.5)
        self.register_buffer("bias", torch.randn(channels, generator=generator) * 0.1)
        self.register_buffer("running_mean", torch.randn(channels, generator=generator) * 0.1)
        self.register_buffer("running_var", torch.rand(channels, generator=generator) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


@DTYPES
def test_frozen_batchnorm_folds_into_the_conv(dtype):
    model = prepared(conv_norm(FrozenBatchNorm2d(4)), dtype)
    x = random_input((2, 3, 6, 6), dtype=dtype)

    fused = repfuse.fuse(model, x)

    assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "call_module",
                                                "output"]  # the conv, the ReLU
    assert calls_to(fused, operator.mul, operator.add) == 0
    assert rel_err(reference64(model, x), fused_output(fused, x)) <= TOLERANCE[dtype]


# --- quantized modules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape", [
        (lambda: nn.Sequential(torch.ao.nn.quantized.Conv2d(3, 4, 3)), (1, 3, 6, 6)),
        (lambda: nn.Sequential(torch.ao.nn.quantized.dynamic.Linear(4, 4)), (1, 4)),
    ], ids=["static-conv", "dynamic-linear"],
)
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch's own
def test_quantized_module_is_refused_in_one_line(make, shape):
    model, x = make(), random_input(shape)
    with pytest.raises(repfuse.CaptureError) as info:
        repfuse.fuse(model, x)
    message = str(info.value)
    assert "'0'" in message and "is a quantized module" in message
    assert "fuse before quantizing" in message
    assert "\n" not in message and info.value.exit_code == 2


# --- dtypes and memory formats -------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)],
                         ids=["float16", "bfloat16"])
def test_half_precision_model_folds_in_float64_and_keeps_its_dtype(dtype, rtol):
    model = prepared(create_model("repvgg_tiny"), torch.float32).to(dtype)
    x = random_input((1, 3, 32, 32), dtype=dtype)

    fused = repfuse.fuse(model, x)

    assert {p.dtype for p in fused.parameters()} == {dtype}
    assert modules_of(fused, _BatchNorm) == []
    out = fused_output(fused, x)
    assert out.dtype == dtype
    truth = reference64(model, x)
    # The fused model's error is that dtype's rounding, like the unfused model's own.
    assert rel_err(truth, out) <= rtol
    report = repfuse.verify(model, fused, x)
    assert report.passed, report.summary_lines()
    assert report.deploy_dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("name", ["resnet_tiny", "repvgg_tiny"])
def test_channels_last_model_and_input(name):
    model = create_model(name).to(memory_format=torch.channels_last)
    x = random_input((2, 3, 32, 32)).to(memory_format=torch.channels_last)

    fused = repfuse.fuse(model, x)

    out = fused_output(fused, x)
    assert rel_err(reference64(model, x), out) <= F32_RTOL
    with torch.no_grad():
        expected = model(x)
    assert out.is_contiguous(memory_format=torch.channels_last) == \
        expected.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_activations_keep_their_memory_format():
    """A conv-BN block on a channels_last input returns channels_last, fused or not."""
    model = prepared(conv_norm(nn.BatchNorm2d(4)), torch.float32).to(
        memory_format=torch.channels_last)
    x = random_input((2, 3, 6, 6)).to(memory_format=torch.channels_last)
    out = fused_output(repfuse.fuse(model, x), x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(reference64(model, x), out) <= F32_RTOL


# --- requires_grad -------------------------------------------------------------------------------


def test_fused_parameters_require_grad_like_the_originals():
    model = create_model("resnet_tiny")
    assert all(p.requires_grad for p in model.parameters())
    x = random_input((1, 3, 32, 32))
    fused = repfuse.fuse(model, x)
    assert modules_of(fused, _BatchNorm) == []
    assert all(p.requires_grad for p in fused.parameters())
    fused(x).sum().backward()  # trainable: gradients flow into the fused convs
    assert fused.get_submodule("conv1").weight.grad is not None


def test_frozen_parameters_stay_frozen_and_trainable_ones_trainable():
    model = create_model("resnet_tiny")
    model.requires_grad_(False)
    model.layer4.requires_grad_(True)  # fine-tune the last stage only
    model.fc.requires_grad_(True)
    fused = repfuse.fuse(model, random_input((1, 3, 32, 32)))
    for name, parameter in fused.named_parameters():
        trainable = name.startswith(("layer4.", "fc."))
        assert parameter.requires_grad == trainable, name


def test_partially_fused_model_keeps_the_flags_too():
    model = create_model("branchynet_tiny")
    model.stem.requires_grad_(False)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, random_input((1, 3, 32, 32)))
    flags = {name: p.requires_grad for name, p in fused.named_parameters()}
    assert flags == {name: not name.startswith("stem.") for name in flags}
    assert "stem.conv.bias" in flags  # created by the fold, frozen like the stem


# --- devices -------------------------------------------------------------------------------------


def test_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = conv_norm(nn.BatchNorm2d(4))
    for x in (random_input((1, 3, 6, 6)), torch.empty(1, 3, 6, 6, device="meta")):
        with pytest.raises(repfuse.CaptureError, match="'0.weight' is on the meta device: the "
                                                       "model has no weights to fold"):
            repfuse.fuse(model, x)


def test_meta_input_is_refused():
    model = prepared(conv_norm(nn.BatchNorm2d(4)), torch.float32)
    with pytest.raises(repfuse.CaptureError, match="example input 0 is on the meta device"):
        repfuse.fuse(model, torch.empty(1, 3, 6, 6, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_fuses_on_its_device_and_refuses_a_cpu_input():
    model = create_model("repvgg_tiny").cuda()
    x = random_input((1, 3, 32, 32))
    with pytest.raises(repfuse.CaptureError, match="the model is on cuda:0 but example input 0 "
                                                   "is on cpu"):
        repfuse.fuse(model, x)
    fused = repfuse.fuse(model, x.cuda())
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    assert rel_err(reference64(model.cpu(), x), fused_output(fused, x.cuda()).cpu()) <= F32_RTOL


# --- hooks ---------------------------------------------------------------------------------------


def test_forward_hooks_are_dropped_with_a_warning_and_verification_notices():
    model = prepared(conv_norm(nn.BatchNorm2d(4)))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    model[2].register_forward_pre_hook(lambda module, args: None)
    x = random_input((2, 3, 6, 6), dtype=torch.float64)

    with pytest.warns(repfuse.RepfuseWarning, match=r"hooks on '0', '2' are not part of the "
                                                    r"traced graph and are dropped"):
        fused = repfuse.fuse(model, x)

    assert repfuse.capture_info(fused).dropped_hooks == ["'0'", "'2'"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fused.modules())
    assert model[0]._forward_hooks and model[2]._forward_pre_hooks  # the original keeps them
    without_hooks = copy.deepcopy(model)
    for module in without_hooks.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    assert rel_err(reference64(without_hooks, x), fused_output(fused, x)) <= F64_RTOL
    with warnings.catch_warnings():  # the verifier's own trace of the reference warns again
        warnings.simplefilter("ignore", repfuse.RepfuseWarning)
        assert not repfuse.verify(model, fused, x).passed  # the hook doubled the conv's output
