"""Capturing model code as third parties write it (:mod:`repfuse.capture`, issue 13).

Small copies, our own, of idioms found in real model code, each checked against the unfused
model run in float64:

- an in-place border write, ``out[:, :, 0:p, :] = v`` (DBB's BN-and-pad layer);
- a kernel built as ``weight + id_tensor.to(weight.device)`` and with ``weight.size()``
  feeding ``view``/``einsum`` (DBB's identity 1x1, OREPA);
- a global pool whose kernel size is read off the tensor, ``F.avg_pool2d(x, x.size(3))``
  (the SE block of the official RepVGG code);
- a detector written like ultralytics' ``DetectionModel``: ``forward(self, x, *args,
  **kwargs)``, a loop reading ``m.f`` and ``m.i`` of every layer, a head caching its anchors;
- an optional argument, ``forward(self, x, targets=None)``;
- a forward that assigns attributes while it is traced, then fails;
- eager code that uses more of a child than its call (a method, a submodule).
"""

from __future__ import annotations

import copy
import operator
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    F64_RTOL,
    TOLERANCE,
    calls_to,
    modules_of,
    random_input,
    reference64,
    rel_err,
)
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.capture import _SpecializingTracer, capture, check_runs, symbolic_trace
from repfuse.models import randomize_bn_stats


def randomized(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    return randomize_bn_stats(model, seed=3).to(dtype).eval()


def assert_matches_reference(model: nn.Module, fused: nn.Module, *inputs: Tensor) -> None:
    """``fused`` (any dtype) against ``model`` run in float64, at that dtype's tolerance."""
    with torch.no_grad():
        actual = fused(*inputs)
    assert actual.dtype == inputs[0].dtype
    assert rel_err(reference64(model, *inputs), actual) <= TOLERANCE[inputs[0].dtype]


def node_targets(gm: GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, padding: int = 1,
            stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                   bias=False), nn.BatchNorm2d(out_channels))


# --- in-place item assignment ---------------------------------------------------------------


class BorderFill(nn.Module):
    """BatchNorm, zero pad, then the border overwritten with the BatchNorm's value at 0, in
    place, as the DBB paper's code writes it; with ``check_shape`` the forward also asks for
    a shape, so only the shape-specializing tracer takes it."""

    def __init__(self, channels: int, pad: int, check_shape: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad
        self.check_shape = check_shape

    def forward(self, x: Tensor) -> Tensor:
        if self.check_shape and x.shape[1] != self.bn.num_features:
            raise ValueError("wrong number of channels")
        out = F.pad(self.bn(x), [self.pad] * 4)
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        value = (self.bn.bias - self.bn.running_mean * scale).view(1, -1, 1, 1)
        out[:, :, 0:self.pad, :] = value
        out[:, :, -self.pad:, :] = value
        out[:, :, :, 0:self.pad] = value
        out[:, :, :, -self.pad:] = value
        return out


class DBBLike(nn.Module):
    """A 3x3 conv-BN plus a 1x1 conv -> border fill -> 3x3 conv (padding 0) -> BN branch."""

    def __init__(self, check_shape: bool = False) -> None:
        super().__init__()
        self.main = conv_bn(4, 6)
        self.reduce = nn.Conv2d(4, 5, 1, bias=False)
        self.fill = BorderFill(5, 1, check_shape)
        self.expand = conv_bn(5, 6, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.expand(self.fill(self.reduce(x)))


@pytest.mark.parametrize("check_shape", [False, True], ids=["symbolic", "specialized"])
def test_border_write_traces_as_four_setitem_nodes(check_shape):
    model = randomized(DBBLike(check_shape))
    x = random_input((2, 4, 7, 7), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    assert calls_to(gm, operator.setitem) == 4
    assert bool(repfuse.capture_info(gm).specialized) == check_shape
    assert "] = " in gm.code  # fx prints the node back as an assignment
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


@DTYPES
@pytest.mark.parametrize("check_shape", [False, True], ids=["symbolic", "specialized"])
def test_border_write_branch_merges_into_one_conv(check_shape, dtype):
    model = randomized(DBBLike(check_shape), dtype)
    x = random_input((2, 4, 7, 7), dtype=dtype)
    fused = repfuse.fuse(model, x)
    assert len(modules_of(fused, nn.Conv2d)) == 1
    assert modules_of(fused, _BatchNorm) == []
    assert calls_to(fused, operator.setitem, F.pad) == 0
    assert_matches_reference(model, fused, x)


def test_specializing_tracer_runs_the_write_on_its_values():
    model = randomized(BorderFill(3, 1, check_shape=True))
    x = random_input((1, 3, 4, 4), dtype=torch.float64)
    tracer = _SpecializingTracer([x])
    graph = tracer.trace(model)
    pad = next(n for n in graph.nodes if n.target is F.pad)
    with torch.no_grad():
        assert torch.equal(tracer.values[pad], model(x))  # the border holds the written value


def test_item_assignment_into_a_list_argument():
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([conv_bn(3, 3), conv_bn(3, 3)])

        def forward(self, xs: list[Tensor]) -> Tensor:
            for i, conv in enumerate(self.convs):
                xs[i] = conv(xs[i])  # written into the caller's list, as detection heads do
            return xs[0] + xs[1]

    model = randomized(Heads())
    xs = [random_input((1, 3, 5, 5), seed=s, dtype=torch.float64) for s in (1, 2)]
    gm = symbolic_trace(copy.deepcopy(model))
    assert calls_to(gm, operator.setitem) == 2
    with torch.no_grad():  # the model is in float64: it is its own reference
        expected = copy.deepcopy(model)([t.clone() for t in xs])
        assert rel_err(expected, gm(list(xs))) <= F64_RTOL


# --- parameters computed with metadata ------------------------------------------------------


class IdentityPlusWeight(nn.Module):
    """A 1x1 conv whose kernel is ``weight + I`` (DBB's identity-based 1x1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 1, 1) * 0.1)
        eye = torch.eye(channels).view(channels, channels, 1, 1)
        self.register_buffer("id_tensor", eye)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # asks for metadata: the specializing tracer answers
            raise ValueError("NCHW expected")
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(x, kernel)


class SizeDerivedKernel(nn.Module):
    """A kernel made from a basis through ``view`` and ``einsum`` over ``weight.size()``."""

    def __init__(self) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.mix = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: Tensor) -> Tensor:
        size = self.basis.size()
        flat = self.basis.view(size[0], -1)
        kernel = torch.einsum("ob,bk->ok", self.mix, flat).view(-1, *size[1:])
        return F.conv2d(x, kernel, padding=1)


def test_to_device_is_recorded_over_the_buffer_and_the_weight():
    model = randomized(IdentityPlusWeight(4))
    x = random_input((1, 4, 5, 5), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    device = next(n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "device")
    assert device.args == (next(n for n in gm.graph.nodes if n.target == "weight"), "device")
    to = next(n for n in gm.graph.nodes if n.target == "to")
    assert to.op == "call_method" and to.args[0].op == "get_attr" and to.args[1] is device
    assert repfuse.capture_info(gm).specialized  # `x.dim()`: the specializing tracer
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


def test_size_derived_kernel_is_recorded_over_the_parameter():
    model = randomized(SizeDerivedKernel())
    x = random_input((1, 4, 5, 5), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    size = next(n for n in gm.graph.nodes if n.target == "size")
    assert size.args[0].op == "get_attr" and size.args[0].target == "basis"
    assert {"view", torch.functional.einsum, F.conv2d} <= set(node_targets(gm))
    fused = repfuse.fuse(model, x)
    assert_matches_reference(model, fused, x)


# --- a global pool sized by the tensor ------------------------------------------------------


class SqueezeExcite(nn.Module):
    """SE as in the official RepVGG code: the pool's kernel is the input's width."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.avg_pool2d(x, kernel_size=x.size(3))
        y = torch.sigmoid(self.up(F.relu(self.down(y))))
        return x * y.view(-1, x.size(1), 1, 1)


class BlockWithSE(nn.Module):
    def __init__(self, check_shape: bool = False) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.se = SqueezeExcite(4, 2)
        self.check_shape = check_shape

    def forward(self, x: Tensor) -> Tensor:
        if self.check_shape and x.shape[-1] != x.shape[-2]:
            raise ValueError("square inputs only")
        return self.se(torch.relu(self.body(x)))


@pytest.mark.parametrize("check_shape", [False, True], ids=["symbolic", "specialized"])
def test_pool_sized_by_the_tensor_is_a_size_node(check_shape):
    model = randomized(BlockWithSE(check_shape))
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    gm = repfuse.trace(model, x)
    pool = next(n for n in gm.graph.nodes if n.target is F.avg_pool2d)
    kernel = pool.kwargs["kernel_size"]
    assert kernel.op == "call_method" and kernel.target == "size" and kernel.args[1:] == (3,)
    assert bool(repfuse.capture_info(gm).specialized) == check_shape
    with torch.no_grad():
        assert rel_err(reference64(model, x), gm(x)) <= F64_RTOL


@DTYPES
@pytest.mark.parametrize("check_shape", [False, True], ids=["symbolic", "specialized"])
def test_pool_sized_by_the_tensor_fuses(check_shape, dtype):
    model = randomized(BlockWithSE(check_shape), dtype)
    x = random_input((2, 3, 6, 6), dtype=dtype)
    fused = repfuse.fuse(model, x)
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)


# --- a detector written like ultralytics' -----------------------------------------------------


class Conv(nn.Module):
    """Conv-BN-SiLU, the detector's basic layer."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Concat(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat(x, self.d)


class Head(nn.Module):
    """Per-level conv branches written into the input list, and a grid computed on the first
    call for each input shape and cached on the module."""

    def __init__(self, channels: tuple[int, ...], outputs: int) -> None:
        super().__init__()
        self.levels = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(Conv(c, c), nn.Conv2d(c, outputs, 1)) for c in channels)
        self.shape = None
        self.grid = torch.empty(0)

    def forward(self, x: list[Tensor]) -> Tensor:
        for i in range(self.levels):
            x[i] = self.branches[i](x[i])
        shape = x[0].shape
        if self.shape != shape:
            self.grid = torch.cat([torch.arange(t.shape[-2] * t.shape[-1], dtype=t.dtype)
                                   for t in x]) / 100
            self.shape = shape
        return torch.cat([t.flatten(2) for t in x], 2) + self.grid


class Detector(nn.Module):
    """Layers built from a table: each layer knows its index ``i``, where its input comes from
    ``f`` (-1: the previous layer) and its ``type``; the forward loops over them."""

    def __init__(self, check_values: bool = False) -> None:
        super().__init__()
        table = [(-1, Conv(3, 8)), (-1, Conv(8, 16, 2)), (-1, Conv(16, 16)),
                 ([-1, 1], Concat()), ([0, -1], Head((8, 32), 5))]
        layers = []
        for i, (source, layer) in enumerate(table):
            layer.i, layer.f, layer.type = i, source, f"detector.{type(layer).__name__}"
            layers.append(layer)
        self.model = nn.Sequential(*layers)
        self.save = {0, 1}
        self.check_values = check_values

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if isinstance(x, dict):
            return self.loss(x, *args, **kwargs)
        return self.predict(x, *args, **kwargs)

    def predict(self, x: Tensor, profile: bool = False, augment: bool = False,
                embed: list[int] | None = None) -> Tensor:
        if augment:
            return self.predict(x.flip(-1)).flip(-1)
        return self._predict_once(x, profile, embed)

    def _predict_once(self, x: Tensor, profile: bool = False,
                      embed: list[int] | None = None) -> Tensor:
        outputs: list[Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else \
                    [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
            if self.check_values and not torch.isfinite(x).all():
                raise ValueError(f"non-finite output of layer {m.i} ({m.type})")
        return x

    def loss(self, batch: dict, *args, **kwargs) -> Tensor:
        raise NotImplementedError


def layer_table(model: nn.Module) -> list[tuple]:
    return [(m.i, m.f, m.type) for m in model.model.children()]


@DTYPES
def test_detector_with_star_args_traces_whole(dtype):
    model = randomized(Detector(), dtype)
    x = random_input((1, 3, 16, 16), dtype=dtype)
    fused = repfuse.fuse(model, x)
    assert isinstance(fused, GraphModule)
    assert not repfuse.capture_info(fused).partial
    placeholders = [n.target for n in fused.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]  # no *args or **kwargs
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)
    assert (fused.save, fused.check_values) == ({0, 1}, False)  # the model's own attributes
    assert copy.deepcopy(fused).save == {0, 1}


@DTYPES
def test_detector_layers_keep_their_attributes_when_the_loop_stays_eager(dtype):
    model = randomized(Detector(check_values=True), dtype)
    x = random_input((1, 3, 16, 16), dtype=dtype)
    with pytest.warns(repfuse.RepfuseWarning, match="control flow depends on tensor values"):
        fused = repfuse.fuse(model, x)
    info = repfuse.capture_info(fused)
    assert [s.path for s in info.skipped] == [""]
    assert info.parts == ["model.0", "model.1", "model.2", "model.3", "model.4"]
    assert all(isinstance(m, GraphModule) for m in fused.model.children())
    assert layer_table(fused) == layer_table(model)
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)
    copied = copy.deepcopy(fused)  # deepcopy rebuilds each GraphModule from its graph
    assert layer_table(copied) == layer_table(model)
    assert_matches_reference(model, copied, x)


class StarArgsChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 3)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.body(x) * (1 + len(args) + len(kwargs))


class EagerCaller(nn.Module):
    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child

    def forward(self, x: Tensor, *args) -> Tensor:
        if x.sum() > 1e9:  # a branch on values: this forward stays eager
            return x
        return self.child(x, *args)


def test_child_with_empty_star_args_is_traced():
    model = randomized(EagerCaller(StarArgsChild()))
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)
    assert repfuse.capture_info(fused).parts == ["child"]
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)


def test_child_given_star_args_is_kept_eager_with_the_reason():
    model = randomized(EagerCaller(StarArgsChild()))
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, (x, torch.ones(1, dtype=torch.float64)))
    skipped = {s.path: s.reason for s in repfuse.capture_info(fused).skipped}
    assert "fills its *args or **kwargs" in skipped["child"]
    assert_matches_reference(model, fused, x, torch.ones(1, dtype=torch.float64))


# --- optional arguments ---------------------------------------------------------------------


class WithTargets(nn.Module):
    """A forward with an optional argument that changes what it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)

    def forward(self, x: Tensor, targets: list[Tensor] | None = None) -> Tensor:
        y = self.body(x)
        if targets is not None:
            for target in targets:
                y = y - target
        return y


class CallsWithTargets(nn.Module):
    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.inner = WithTargets()
        self.by_keyword = by_keyword

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:
            return x
        if self.by_keyword:
            return self.inner(x, targets=None)
        return self.inner(x)


def test_missing_optional_argument_is_bound_to_its_default():
    model = randomized(WithTargets())
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    assert isinstance(fused, GraphModule) and not repfuse.capture_info(fused).partial
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)
    with torch.no_grad():
        assert torch.equal(fused(x, targets=None), fused(x))
    with pytest.raises(AssertionError, match="targets has been specialized to have value None"):
        fused(x, [x])


@pytest.mark.parametrize("by_keyword", [False, True], ids=["left-out", "keyword-None"])
def test_child_called_without_or_with_none_is_traced(by_keyword):
    model = randomized(CallsWithTargets(by_keyword))
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)
    assert repfuse.capture_info(fused).parts == ["inner"]
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)


# --- a failed trace leaves no trace ----------------------------------------------------------


class CachesThenBranches(nn.Module):
    """Caches a tensor on its first call and records each input, then branches on values: a
    trace assigns proxies to ``self.offset`` and appends one to ``self.seen`` before it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.offset: Tensor | None = None
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        self.seen.append(y.shape)
        if self.offset is None:
            self.offset = torch.linspace(0, 1, y.shape[-1], dtype=y.dtype)
        if y.abs().max() > 1e9:
            return y
        return y + self.offset


def test_failed_trace_leaves_the_module_as_it_was():
    model = randomized(CachesThenBranches())
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning, match="control flow depends on tensor values"):
        fused = repfuse.fuse(model, x)
    assert repfuse.capture_info(fused).parts == ["body"]
    assert isinstance(fused.offset, Tensor) and not isinstance(fused.offset, torch.fx.Proxy)
    assert all(isinstance(shape, torch.Size) for shape in fused.seen)
    assert model.offset is None and model.seen == []  # the user's model is not touched
    assert_matches_reference(model, fused, x)


def test_traced_module_keeps_its_attributes_and_the_module_none_of_the_trace():
    model = randomized(BorderFill(3, 1))
    model.note = "kept"
    traced = symbolic_trace(model)
    assert (traced.note, traced.pad) == ("kept", 1)
    assert any(name.startswith("_tensor_constant") for name, _ in traced.named_buffers())
    assert not any(name.startswith("_tensor_constant") for name in vars(model))


# --- eager code that uses more of a child than its call ------------------------------------


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = conv_bn(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.bn(self.conv(x)))

    def decode(self, y: Tensor) -> Tensor:
        return y * 2


class UsesMoreThanTheCall(nn.Module):
    def __init__(self, reads: str) -> None:
        super().__init__()
        self.decoder = Decoder()
        self.other = conv_bn(4, 4)
        self.reads = reads

    def forward(self, x: Tensor) -> Tensor:
        y = self.decoder(x)
        if y.abs().max() > 1e9:
            return y
        if self.reads == "method":
            y = self.decoder.decode(y)
        else:  # a submodule's buffer, which fusing removes
            y = y / self.decoder.bn.running_var.sqrt().view(1, -1, 1, 1)
        return self.other(y)


@pytest.mark.parametrize("reads, name", [("method", "decode"), ("submodule", "bn")])
def test_child_used_beyond_its_call_is_kept_eager(reads, name):
    model = randomized(UsesMoreThanTheCall(reads))
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)
    info = repfuse.capture_info(fused)
    skipped = {s.path: s.reason for s in info.skipped}
    assert f"code outside it uses its '{name}'" in skipped["decoder"]
    assert type(fused.decoder) is Decoder
    assert set(info.parts) == {"other", "decoder.inner"}  # its own children are still fused
    assert modules_of(fused, _BatchNorm) == ["decoder.bn"]
    assert_matches_reference(model, fused, x)


class DecodesWith(nn.Module):
    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().max() > 1e9:
            return x
        return self.decoder.decode(self.decoder(x))


class SharesADecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        decoder = Decoder()
        self.first, self.second = DecodesWith(decoder), DecodesWith(decoder)

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().max() > 1e9:
            return x
        return self.first(x) + self.second(x)


def test_shared_child_used_beyond_its_call_goes_back_at_every_path():
    model = randomized(SharesADecoder())
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    with pytest.warns(repfuse.RepfuseWarning):
        fused = repfuse.fuse(model, x)
    assert type(fused.first.decoder) is Decoder and fused.second.decoder is fused.first.decoder
    assert repfuse.capture_info(fused).parts == ["first.decoder.inner"]
    assert_matches_reference(model, fused, x)


# --- a fused model always runs ---------------------------------------------------------------


class ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x))


def test_fuse_refuses_a_fused_model_that_does_not_run(monkeypatch, capsys):
    def breaking(gm: GraphModule, *args, **kwargs):
        result = repfuse.passes.run_pipeline(gm, *args, **kwargs)
        relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
        relu.args = (relu.args[0], relu.args[0])  # a bug in a pass: relu given two tensors
        gm.recompile()
        return result

    # the module repfuse.convert (the name repfuse.convert is the function)
    monkeypatch.setattr(sys.modules["repfuse.convert"], "run_pipeline", breaking)
    with pytest.raises(repfuse.RepfuseError, match="does not run on the example input: at node "
                                                   r"'relu' in the model \(ConvReLU\)"):
        repfuse.fuse(randomized(ConvReLU()), random_input((1, 3, 6, 6), dtype=torch.float64))
    assert capsys.readouterr().err == ""  # not fx's printout of the failing generated code


def test_check_runs_names_the_node_inside_a_part():
    model = randomized(CallsWithTargets(by_keyword=False))
    x = random_input((1, 3, 5, 5), dtype=torch.float64)
    check_runs(model, x)  # a model that runs passes quietly
    captured = capture(model, x).module
    part = captured.inner
    conv, bn = [n for n in part.graph.nodes if n.op == "call_module"]
    with part.graph.inserting_after(conv):
        flat = part.graph.call_function(torch.flatten, (conv, 2))
    bn.replace_input_with(conv, flat)  # BatchNorm2d now gets a 3-d tensor
    part.recompile()
    with pytest.raises(repfuse.RepfuseError,
                       match=rf"at node 'inner.{bn.name}' in 'inner.body.1' \(BatchNorm2d\)"):
        check_runs(captured, x)


class DeviceTypeBranch(nn.Module):
    """A branch on the input's device type (timm's EfficientViT pads differently for meta
    tensors): metadata, resolved while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "meta":
            x = F.pad(x, (1, 1, 1, 1))
        return self.body(x)


def test_a_branch_on_the_device_type_is_resolved_while_tracing():
    model = randomized(DeviceTypeBranch())
    x = random_input((1, 3, 6, 6), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    info = repfuse.capture_info(fused)
    assert not info.partial
    assert any(".type of x.device" in d for d in info.specialized)
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)


class AutocastOff(nn.Module):
    """Attention code that turns autocast off around a product, naming the device type of its
    input (timm's EfficientViT LiteMLA): torch.autocast takes only a str."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = self.body(x)
        return y * torch.sigmoid(y)


def test_the_device_type_handed_to_autocast_is_a_plain_string():
    model = randomized(AutocastOff())
    x = random_input((2, 3, 6, 6), dtype=torch.float64)
    fused = repfuse.fuse(model, x)
    info = repfuse.capture_info(fused)
    assert not info.partial
    assert any(".type of" in d for d in info.specialized)
    assert modules_of(fused, _BatchNorm) == []
    assert_matches_reference(model, fused, x)
    other = random_input((3, 3, 5, 7), dtype=torch.float64)  # no shape was pinned
    assert_matches_reference(model, fused, other)
