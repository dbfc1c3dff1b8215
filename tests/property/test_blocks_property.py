"""Property: any random block of linear branches fuses to the same function, and to one conv
whenever the block is fully mergeable.

Hypothesis draws a *block*: 1 to 5 branches reading one input, combined by a sum (in any
spelling: ``+``, ``torch.add``, ``Tensor.add``, ``sum(...)``, balanced or left-nested), a sum
with one term subtracted, or a channel concatenation. A branch is a chain of

- convs: 1-, 2- or 3-D, kernel sizes 1/3/5/7 per axis (asymmetric too; 2 where the padding can
  still line the output up), dilation, groups (dense, grouped, depthwise), bias or not, padding
  aligned on the kernel centre (as a number or ``'same'``) or not, any padding mode, written as
  ``nn.ConvNd`` or ``F.convNd``;
- eval batch norms, per-channel scale/shift in several spellings, average pools, the identity
  (also as ``nn.Identity``, eval dropout or ``x * 1``, which may sit anywhere in a chain);
- sequential pairs ``1x1 → kxk``, ``kxk → 1x1`` and ``1x1 → avg-pool`` (DBB's branches);
- sometimes a non-linear op between two links, a module called twice, a module shared by two
  branches, an output read twice (``y + y``, or a branch's output returned as well), a
  non-linear op on the input or on the result.

The model runs in float32 or float64 (batch norm statistics randomized). Two properties:

1. **Always**: :func:`repfuse.fuse` returns a model whose output equals the unfused model run
   in float64 (1e-10 relative for a float64 model; for a float32 one 1e-5, or 10x the unfused
   float32 model's own error if that is larger), and it never has more convs or batch norms.
2. **Fully mergeable blocks** (every branch linear, composable and centre-aligned, zero padding,
   nothing shared, nothing read twice) become exactly one conv: the graph's only calls are
   that conv and the optional non-linear ops on the input and the result. A lone chain of two
   links is composed by ``compose_linear`` only when that does not cost more; whether it does
   is the cost model's business, so such a chain is checked with ``allow_costlier=True``; so
   is a block whose dilated branches align only as a costlier dense kernel.

The same blocks inside a forward that branches on a shape (traced specialized) or on values
(captured in parts) fuse to the same function, with the same rewrites.

The number of examples comes from the hypothesis profile (``tests/conftest.py``): ``ci`` by
default, ``--hypothesis-profile=long`` for the long run.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from functools import reduce

import pytest
import torch
import torch.nn.functional as F
from conftest import random_input, reference64
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm

import repfuse
from repfuse.models import randomize_bn_stats
from repfuse.passes import run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
NORM_MODULES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL_MODULES = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
POOL_FUNCTIONS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
ACTIVATIONS = ("relu", "relu_module", "tanh", "gelu", "hardswish", "leaky_relu", "abs",
               "square", "clamp", "maxpool")
SUM_STYLES = ("operator", "torch_add", "method", "builtin_sum", "balanced")
# Not a plain sum: ``t0 - t1 + t2 + ...`` (only the added terms may merge).
OTHER_COMBINES = ("with_sub", "concat", "concat_negative_dim")
SCALES = ("mul_add", "mul", "rmul", "div", "sub_from", "add_scalar", "sub")
NOOPS = ("identity", "dropout", "times_one")
# Tolerances relative to max |reference| (the verifier's defaults for these dtypes).
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}


# --- the spec of a block --------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str = "zeros"
    functional: bool = False

    def dense(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))

    def numeric_padding(self) -> tuple[int, ...]:
        if self.padding == "valid":
            return (0,) * len(self.kernel)
        if self.padding == "same":  # stride 1 and odd dense kernels here
            return tuple((k - 1) // 2 for k in self.dense())
        return self.padding

    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)

    def pads(self) -> bool:
        return any(p != 0 for p in self.numeric_padding())


@dataclass(frozen=True)
class Norm:
    channels: int
    shared_with: int | None = None  # index of an earlier branch whose norm module is reused


@dataclass(frozen=True)
class Scale:
    channels: int
    spelling: str  # see ScaleShift.forward

    def has_shift(self) -> bool:
        return self.spelling in ("mul_add", "sub_from", "add_scalar", "sub")


@dataclass(frozen=True)
class Pool:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    functional: bool

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(k // 2 for k in self.kernel)


@dataclass(frozen=True)
class Act:
    name: str


@dataclass(frozen=True)
class Noop:
    """Computes the identity in eval mode: ``nn.Identity``, dropout, ``x * 1``."""

    name: str  # "identity" | "dropout" | "times_one"


Step = Conv | Norm | Scale | Pool | Act | Noop


@dataclass(frozen=True)
class Branch:
    kind: str  # conv | norm | scale | identity | pool | pair_1k | pair_k1 | conv_pool | twice
    steps: tuple[Step, ...]
    shared_conv_with: int | None = None  # reuse the first conv module of an earlier branch


@dataclass(frozen=True)
class Block:
    dims: int
    in_channels: int
    stride: tuple[int, ...]
    size: int
    dtype: torch.dtype
    branches: tuple[Branch, ...]
    combine: str  # a SUM_STYLES entry or "concat"
    pre_act: str | None
    post_act: str | None
    reuse: str  # "none" | "double" (y + y) | "tap" (also return branch 0's output)
    seed: int

    def input_shape(self) -> tuple[int, ...]:
        return (2, self.in_channels) + (self.size,) * self.dims

    def out_size(self) -> tuple[int, ...]:
        """Every branch's output size: that of a centre-aligned kernel of this stride."""
        return tuple((self.size - 1) // s + 1 for s in self.stride)


# --- what the passes can merge ---------------------------------------------------------------


def _links(branch: Branch) -> list[tuple[int, Step]]:
    """The convs and pools of a branch (norms and scales fold into them), with positions."""
    return [(i, s) for i, s in enumerate(branch.steps) if isinstance(s, (Conv, Pool))]


def branch_kernel(branch: Branch, dims: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(dense size, padding)`` of the one kernel a linear branch composes to; None when the
    branch does not compose exactly (or is not linear, or pads other than with zeros)."""
    if any(isinstance(s, Act) for s in branch.steps):
        return None
    links = _links(branch)
    if any(isinstance(s, Conv) and s.padding_mode != "zeros" for _, s in links):
        return None
    if not links:  # identity, norm or scale: a 1x1 kernel
        return (1,) * dims, (0,) * dims
    if len(links) == 1:
        return _size_and_padding(links[0][1])
    (i, first), (j, second) = links
    # A shift (bias, norm or scale shift) before the second link is padded with zeros by it:
    # exact only if the second link does not pad.
    second_pads = second.pads() if isinstance(second, Conv) else any(second.padding)
    shift = first.bias or any(isinstance(s, Norm) or (isinstance(s, Scale) and s.has_shift())
                              for s in branch.steps[i + 1:j])
    if second_pads and shift:
        return None
    if first.pointwise():  # 1x1 → kxk or 1x1 → pool: the second one's kernel
        return _size_and_padding(second)
    if isinstance(second, Conv) and second.pointwise():  # kxk → 1x1: the first one's
        return _size_and_padding(first)
    return None


def _size_and_padding(link: Conv | Pool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(link, Conv):
        return link.dense(), link.numeric_padding()
    return link.kernel, link.padding


def aligned(kernels: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """The algebra's condition: every kernel centred in the largest, ``P − p = (K − k)/2``."""
    dims = len(kernels[0][0])
    largest = [max(size[a] for size, _ in kernels) for a in range(dims)]
    offsets = set()
    for size, padding in kernels:
        grow = [big - k for big, k in zip(largest, size, strict=True)]
        if any(g % 2 for g in grow):
            return False
        offsets.add(tuple(p + g // 2 for p, g in zip(padding, grow, strict=True)))
    return len(offsets) == 1


def has_conv(branch: Branch) -> bool:
    return any(isinstance(s, Conv) for s in branch.steps)


def fully_mergeable(block: Block) -> bool:
    """True when the passes must leave exactly one conv (see the module docstring)."""
    if block.reuse != "none" or any(b.shared_conv_with is not None for b in block.branches):
        return False
    if any(isinstance(s, Norm) and s.shared_with is not None
           for b in block.branches for s in b.steps):
        return False
    if any(b.kind == "twice" for b in block.branches):
        return False
    if not any(has_conv(b) for b in block.branches):
        return False
    if block.combine == "with_sub" and len(block.branches) > 1:
        return False
    if block.combine.startswith("concat") and (len(block.branches) < 2
                                               or not all(has_conv(b) for b in block.branches)):
        return False
    if len(block.branches) == 1:
        branch = block.branches[0]
        if any(isinstance(s, Act) for s in branch.steps):
            return False
        if len(_links(branch)) == 1:
            return True  # one conv with norms/scales after it: the fold passes
        return branch_kernel(branch, block.dims) is not None
    kernels = [branch_kernel(b, block.dims) for b in block.branches]
    if any(k is None for k in kernels):
        return False
    return aligned(kernels)


# --- drawing a block -------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def groups_for(draw, in_channels: int, out_channels: int) -> int:
    return draw(st.sampled_from(divisors(math.gcd(in_channels, out_channels))))


def out_length(size: int, kernel: int, padding: int, stride: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@st.composite
def kernel_sizes(draw, dims: int, plain: bool, largest: int = 7) -> tuple[int, ...]:
    choices = [k for k in ([1, 3, 5] if dims == 3 else [1, 3, 5, 7]) if k <= largest]
    if not plain:
        choices = [*choices, 2]  # even: never centred; kept only where the output lines up
    if draw(st.booleans()):
        return (draw(st.sampled_from(choices)),) * dims
    return tuple(draw(st.sampled_from(choices)) for _ in range(dims))


@st.composite
def convs(draw, dims: int, size: int, in_channels: int, out_channels: int,
          stride: tuple[int, ...], plain: bool, pointwise: bool = False) -> Conv:
    """A conv whose output has the block's size for this stride (``plain``: centred, zero
    padding, odd kernels)."""
    groups = draw(groups_for(in_channels, out_channels))
    if pointwise:
        return Conv(in_channels, out_channels, (1,) * dims, (1,) * dims, (0,) * dims,
                    (1,) * dims, groups, draw(st.booleans()), functional=draw(st.booleans()))
    kernel = draw(kernel_sizes(dims, plain))
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) if k > 1 else 1 for k in kernel)
    padding: tuple[int, ...] | str | None = None
    if not plain and draw(st.integers(0, 2)) == 0:
        # Off-centre padding that still yields the block's output size (needs a stride > 1).
        dense = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True))
        target = tuple((size - 1) // s + 1 for s in stride)
        options = [[p for p in range(k) if out_length(size, k, p, s) == t]
                   for k, s, t in zip(dense, stride, target, strict=True)]
        if all(options):
            padding = tuple(draw(st.sampled_from(o)) for o in options)
    if padding is None:  # centred: an even dense kernel cannot be, so make it odd
        kernel = tuple(k + 1 if d * (k - 1) % 2 else k
                       for k, d in zip(kernel, dilation, strict=True))
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        if all(s == 1 for s in stride) and draw(st.integers(0, 4)) == 0:
            padding = "same"
    if padding == (0,) * dims and draw(st.integers(0, 3)) == 0:
        padding = "valid"
    numeric = padding if isinstance(padding, tuple) else tuple(
        d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    mode = "zeros"
    if not plain and any(numeric) and max(numeric) < size and draw(st.integers(0, 4)) == 0:
        mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    return Conv(in_channels, out_channels, kernel, stride, padding, dilation, groups,
                draw(st.booleans()), mode, functional=mode == "zeros" and draw(st.booleans()))


@st.composite
def tails(draw, channels: int, plain: bool, most: int = 2) -> tuple[Step, ...]:
    """Up to ``most`` of: a norm, a scale; sometimes (not ``plain``) a non-linear op among them.
    """
    steps: list[Step] = []
    if draw(st.booleans()):
        steps.append(Norm(channels))
    if most > len(steps) and draw(st.integers(0, 3)) == 0:
        steps.append(Scale(channels, draw(st.sampled_from(SCALES))))
    if not plain and steps and draw(st.integers(0, 5)) == 0:
        steps.insert(draw(st.integers(0, len(steps))), Act(draw(st.sampled_from(ACTIVATIONS))))
    if draw(st.integers(0, 5)) == 0:
        steps.insert(draw(st.integers(0, len(steps))), Noop(draw(st.sampled_from(NOOPS))))
    return tuple(steps)


@st.composite
def branches(draw, dims: int, size: int, in_channels: int, out_channels: int,
             stride: tuple[int, ...], plain: bool, concat: bool) -> Branch:
    same_shape = in_channels == out_channels and all(s == 1 for s in stride)
    kinds = ["conv", "conv", "pair_1k", "pair_k1", "conv_pool"]
    if in_channels == out_channels:
        kinds.append("pool")
    if same_shape and not concat:
        kinds += ["norm", "scale", "identity"]
        if not plain:
            kinds.append("twice")
    kind = draw(st.sampled_from(kinds))
    conv = convs(dims, size, in_channels, out_channels, stride, plain)
    if kind == "conv":
        first = draw(conv)
        return Branch(kind, (first, *draw(tails(out_channels, plain))))
    if kind == "norm":
        return Branch(kind, (Norm(in_channels),))
    if kind == "scale":
        return Branch(kind, (Scale(in_channels, draw(st.sampled_from(["mul_add", "mul"]))),))
    if kind == "identity":
        return Branch(kind, (Noop(draw(st.sampled_from(NOOPS))),) if draw(st.booleans()) else ())
    if kind == "pool":
        pool = Pool(draw(kernel_sizes(dims, plain=True, largest=size)), stride,
                    draw(st.booleans()))
        return Branch(kind, (pool, *draw(tails(out_channels, plain, most=1))))
    if kind == "twice":  # one conv module applied twice, a non-linear op between or not
        first = draw(convs(dims, size, in_channels, out_channels, stride, plain=True))
        middle = (Act(draw(st.sampled_from(ACTIVATIONS))),) if draw(st.booleans()) else ()
        return Branch(kind, (first, *middle, first))
    if kind == "conv_pool":
        pointwise = draw(convs(dims, size, in_channels, out_channels, (1,) * dims, plain,
                               pointwise=True))
        between = draw(tails(out_channels, plain, most=1))
        pool = Pool(draw(kernel_sizes(dims, plain=True, largest=size)), stride,
                    draw(st.booleans()))
        return Branch(kind, (pointwise, *between, pool))
    mid = draw(st.integers(1, 8))
    if kind == "pair_1k":
        first = draw(convs(dims, size, in_channels, mid, (1,) * dims, plain, pointwise=True))
        second = draw(convs(dims, size, mid, out_channels, stride, plain))
    else:
        first = draw(convs(dims, size, in_channels, mid, stride, plain))
        inner = tuple((size - 1) // s + 1 for s in stride)
        second = draw(convs(dims, inner[0], mid, out_channels, (1,) * dims, plain,
                            pointwise=True))
    between = draw(tails(mid, plain, most=1))
    after = draw(tails(out_channels, plain, most=1))
    return Branch(kind, (first, *between, second, *after))


@st.composite
def blocks(draw, plain_only: bool = False) -> Block:
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    plain = plain_only or draw(st.booleans())  # aim at a fully mergeable block
    in_channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
    combine = draw(st.sampled_from(SUM_STYLES * 3 + OTHER_COMBINES))
    concat = combine.startswith("concat")
    out_channels = in_channels if draw(st.booleans()) else draw(st.sampled_from([1, 2, 4, 6, 8]))
    stride = (draw(st.sampled_from([1, 1, 2, 3])),) * dims
    if not plain and draw(st.integers(0, 3)) == 0:
        stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    size = draw(st.integers(*{1: (5, 12), 2: (5, 9), 3: (4, 6)}[dims]))
    count = draw(st.integers(1, 5))
    drawn = []
    for _ in range(count):
        channels = out_channels
        if concat:
            channels = in_channels if draw(st.booleans()) else draw(st.integers(1, 6))
        drawn.append(draw(branches(dims, size, in_channels, channels, stride, plain, concat)))
    if not plain and len(drawn) >= 2 and draw(st.integers(0, 3)) == 0:
        drawn = share_a_module(draw, drawn)
    if plain and combine == "with_sub":
        combine = "operator"
    maybe_act = st.one_of(st.none(), st.sampled_from(ACTIVATIONS))
    pre_act = draw(maybe_act) if not plain_only and draw(st.integers(0, 3)) == 0 else None
    post_act = draw(maybe_act) if draw(st.integers(0, 2)) == 0 else None
    reuse = "none" if plain else draw(st.sampled_from(["none", "none", "double", "tap"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return Block(dims, in_channels, stride, size, dtype, tuple(drawn), combine, pre_act,
                 post_act, reuse, draw(st.integers(0, 2**16)))


def share_a_module(draw, drawn: list[Branch]) -> list[Branch]:
    """Let a later branch call the first conv (or the norm) module of an earlier one."""
    plain_convs = [i for i, b in enumerate(drawn) if b.kind == "conv"]
    if len(plain_convs) < 2:
        return drawn
    owner, user = sorted(draw(st.permutations(plain_convs))[:2])
    owner_steps, user_steps = drawn[owner].steps, drawn[user].steps
    options = []
    if owner_steps[0].out_channels == user_steps[0].out_channels:
        options.append("conv")
    owner_norm = next((s for s in owner_steps if isinstance(s, Norm)), None)
    user_norm = next((s for s in user_steps if isinstance(s, Norm)), None)
    if owner_norm is not None and user_norm is not None \
            and owner_norm.channels == user_norm.channels:
        options.append("norm")
    if not options:
        return drawn
    if draw(st.sampled_from(options)) == "conv":  # the same module: the same hyperparameters
        drawn[user] = Branch("conv", (owner_steps[0], *user_steps[1:]), shared_conv_with=owner)
    else:
        drawn[user] = Branch("conv", tuple(
            Norm(s.channels, shared_with=owner) if isinstance(s, Norm) else s
            for s in user_steps))
    return drawn


# --- building the model ------------------------------------------------------------------------


class FunctionalConv(nn.Module):
    """``F.convNd(x, self.weight, self.bias, ...)``: a conv written functionally."""

    def __init__(self, spec: Conv, dims: int) -> None:
        super().__init__()
        template = CONV_MODULES[dims](spec.in_channels, spec.out_channels, spec.kernel,
                                      groups=spec.groups, bias=spec.bias)
        self.weight = template.weight
        self.bias = template.bias
        self.spec, self.dims = spec, dims

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        return CONV_FUNCTIONS[self.dims](x, self.weight, self.bias, spec.stride, spec.padding,
                                         spec.dilation, spec.groups)


class ScaleShift(nn.Module):
    """A per-channel scale and/or shift by parameters, in one of several spellings."""

    def __init__(self, spec: Scale, dims: int) -> None:
        super().__init__()
        shape = (spec.channels,) + (1,) * dims
        self.g = nn.Parameter(torch.rand(shape) + 0.5)
        self.b = nn.Parameter(torch.randn(shape) * 0.1)
        self.spelling = spec.spelling

    def forward(self, x: Tensor) -> Tensor:
        if self.spelling == "mul_add":
            return x * self.g + self.b
        if self.spelling == "mul":
            return x * self.g
        if self.spelling == "rmul":
            return self.g * x
        if self.spelling == "div":
            return x / 1.5
        if self.spelling == "add_scalar":
            return x + 0.25
        if self.spelling == "sub":
            return x - self.b
        return self.b - x  # "sub_from"


class FunctionalPool(nn.Module):
    def __init__(self, spec: Pool, dims: int) -> None:
        super().__init__()
        self.spec, self.dims = spec, dims

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        return POOL_FUNCTIONS[self.dims](x, spec.kernel, spec.stride, spec.padding)


class Activation(nn.Module):
    """A non-linear op, written functionally (traced through) unless it is ``relu_module``."""

    def __init__(self, name: str, dims: int) -> None:
        super().__init__()
        self.name, self.dims = name, dims
        self.relu = nn.ReLU() if name == "relu_module" else None

    def forward(self, x: Tensor) -> Tensor:
        name = self.name
        if self.relu is not None:
            return self.relu(x)
        if name == "relu":
            return torch.relu(x)
        if name == "tanh":
            return x.tanh()
        if name == "gelu":
            return F.gelu(x)
        if name == "hardswish":
            return F.hardswish(x)
        if name == "leaky_relu":
            return F.leaky_relu(x, 0.1)
        if name == "abs":
            return torch.abs(x)
        if name == "square":
            return x * x
        if name == "clamp":
            return torch.clamp(x, -0.5, 0.5)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[self.dims]
        return pool(x, 3, 1, 1)


def build_step(step: Step, dims: int) -> nn.Module:
    if isinstance(step, Conv):
        if step.functional:
            return FunctionalConv(step, dims)
        return CONV_MODULES[dims](step.in_channels, step.out_channels, step.kernel,
                                  step.stride, step.padding, step.dilation, step.groups,
                                  step.bias, step.padding_mode)
    if isinstance(step, Norm):
        return NORM_MODULES[dims](step.channels)
    if isinstance(step, Scale):
        return ScaleShift(step, dims)
    if isinstance(step, Pool):
        if step.functional:
            return FunctionalPool(step, dims)
        return POOL_MODULES[dims](step.kernel, step.stride, step.padding)
    if isinstance(step, Noop):
        return {"identity": nn.Identity, "dropout": lambda: nn.Dropout(0.3),
                "times_one": TimesOne}[step.name]()
    return Activation(step.name, dims)


class TimesOne(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 1


class RandomBlock(nn.Module):
    """The block a :class:`Block` describes; shared modules are one object in two lists."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block
        self.branches = nn.ModuleList()
        for branch in block.branches:
            modules: list[nn.Module] = []
            for index, step in enumerate(branch.steps):
                if index == 0 and branch.shared_conv_with is not None:
                    modules.append(self.branches[branch.shared_conv_with][0])
                elif isinstance(step, Norm) and step.shared_with is not None:
                    owner = block.branches[step.shared_with].steps
                    position = next(i for i, s in enumerate(owner) if isinstance(s, Norm))
                    modules.append(self.branches[step.shared_with][position])
                elif branch.kind == "twice" and index == len(branch.steps) - 1:
                    modules.append(modules[0])  # the same conv, called again
                else:
                    modules.append(build_step(step, block.dims))
            self.branches.append(nn.ModuleList(modules))
        self.pre = Activation(block.pre_act, block.dims) if block.pre_act else None
        self.post = Activation(block.post_act, block.dims) if block.post_act else None

    def forward(self, x: Tensor):
        if self.pre is not None:
            x = self.pre(x)
        terms = []
        for branch in self.branches:
            t = x
            for module in branch:
                t = module(t)
            terms.append(t)
        y = combine(terms, self.block.combine, self.block.dims)
        if self.block.reuse == "double":
            y = y + y
        if self.post is not None:
            y = self.post(y)
        if self.block.reuse == "tap":
            return y, terms[0]
        return y


def combine(terms: list[Tensor], style: str, dims: int) -> Tensor:
    if style == "concat":
        return torch.cat(terms, dim=1)
    if style == "concat_negative_dim":
        # A constant dim (a computed one is left unmerged: see test_regressions.py).
        return torch.cat(terms, dim=-1 - dims)
    if style == "with_sub":
        return reduce(operator.add, terms[2:], terms[0] - terms[1]) if len(terms) > 1 \
            else terms[0]
    if style == "operator":
        return reduce(operator.add, terms)
    if style == "torch_add":
        return reduce(torch.add, terms)
    if style == "method":
        return reduce(lambda a, b: a.add(b), terms)
    if style == "builtin_sum":
        return sum(terms)
    while len(terms) > 1:  # balanced: pairwise, level by level
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


def build(block: Block) -> RandomBlock:
    with torch.random.fork_rng():
        torch.manual_seed(block.seed)
        model = RandomBlock(block)
    return randomize_bn_stats(model, seed=block.seed).to(block.dtype).eval()


# --- the checks ------------------------------------------------------------------------------


def _call_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op.startswith("call_")]


def _is_conv(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in CONV_MODULES.values()
    return node.op == "call_function" and node.target in CONV_FUNCTIONS.values()


def _is_norm(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _BatchNorm)
    return node.op == "call_function" and node.target is F.batch_norm


def count(gm: GraphModule, predicate) -> int:
    return sum(1 for n in _call_nodes(gm) if predicate(gm, n))


def outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def assert_equal_to_reference(model: nn.Module, fused: nn.Module, block: Block,
                              x: Tensor) -> None:
    rtol, atol = TOLERANCE[block.dtype]
    expected = reference64(model, x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = outputs(fused, x)
    baseline = outputs(model, x)  # the unfused model in its own dtype
    assert len(actual) == len(expected)
    for ref, got, base in zip(expected, actual, baseline, strict=True):
        assert got.shape == ref.shape and got.dtype == block.dtype
        scale = ref.abs().max().item()
        error = (got.double() - ref).abs().max().item()
        own = (base.double() - ref).abs().max().item()
        allowed = max(atol + rtol * scale, 10 * own)
        note(f"max|ref| {scale:.3g}, fused error {error:.3g}, unfused {block.dtype} error "
             f"{own:.3g}, allowed {allowed:.3g}")
        assert error <= allowed


def lone_chain(block: Block) -> bool:
    """One branch of two links (conv → conv or conv → pool): composing it is a cost decision."""
    return len(block.branches) == 1 and len(_links(block.branches[0])) == 2


def costly_dilation(fused: nn.Module) -> bool:
    """True when a merge stayed because aligning dilated kernels would expand them densely at
    a higher cost: like a lone chain's composition, a cost decision."""
    return any("expands dilated kernels densely" in d.reason
               for d in repfuse.history(fused).declined)


def fuse_regardless_of_cost(model: nn.Module, x: Tensor) -> GraphModule:
    gm = repfuse.trace(model, x)
    run_pipeline(gm, allow_costlier=True)
    return gm


def check_block(block: Block) -> bool:
    """Both properties for one block; returns whether it was fully mergeable."""
    model = build(block)
    x = random_input(block.input_shape(), seed=block.seed, dtype=block.dtype)
    mergeable = fully_mergeable(block)
    note(f"fully mergeable: {mergeable}")

    original = repfuse.trace(model, x)
    fused = repfuse.fuse(model, x)
    note(fused.code)
    for declined in repfuse.history(fused).declined:
        note(f"declined by {declined.pass_name}: {declined.reason}")

    assert_equal_to_reference(model, fused, block, x)
    assert count(fused, _is_conv) <= count(original, _is_conv)
    assert count(fused, _is_norm) <= count(original, _is_norm)
    if mergeable:
        if lone_chain(block) or costly_dilation(fused):
            fused = fuse_regardless_of_cost(model, x)
            note(fused.code)
            assert_equal_to_reference(model, fused, block, x)
        extra = sum(len(_call_nodes(repfuse.trace(Activation(name, block.dims), x)))
                    for name in (block.pre_act, block.post_act) if name is not None)
        calls = _call_nodes(fused)
        assert count(fused, _is_conv) == 1, "a fully mergeable block must become one conv"
        assert len(calls) == 1 + extra, [n.format_node() for n in calls]
    return mergeable


SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@SETTINGS
@given(blocks())
def test_random_block_fuses_to_the_same_function(block: Block) -> None:
    mergeable = check_block(block)
    event(f"{block.dims}-D, {len(block.branches)} branches, "
          f"{'mergeable' if mergeable else 'not fully mergeable'}")


@SETTINGS
@given(blocks(plain_only=True))
def test_mergeable_block_becomes_one_conv(block: Block) -> None:
    assume(fully_mergeable(block))
    assert check_block(block)
    event(f"{block.dims}-D, {len(block.branches)} branches, {block.combine}")


class Wrapped(nn.Module):
    """A block inside a forward torch.fx cannot trace as written: a branch on a shape (traced
    specialized to the example's shape) or on values (the block is captured as a part)."""

    def __init__(self, block: nn.Module, on: str) -> None:
        super().__init__()
        self.block, self.on = block, on

    def forward(self, x: Tensor):
        condition = x.shape[1] > 0 if self.on == "shape" else x.abs().sum() >= 0
        if condition:
            return self.block(x)
        return x  # never taken: both conditions always hold


@SETTINGS
@given(blocks(), st.sampled_from(["shape", "values"]))
def test_block_in_an_untraceable_forward_fuses_to_the_same_function(block: Block, on: str):
    inner = build(block)
    model = Wrapped(inner, on).eval()
    x = random_input(block.input_shape(), seed=block.seed, dtype=block.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", repfuse.RepfuseWarning)  # "fused only in parts"
        fused = repfuse.fuse(model, x)
    info = repfuse.capture_info(fused)
    assert info.partial == (on == "values")
    part = fused if on == "shape" else fused.block
    assert isinstance(part, GraphModule)
    assert_equal_to_reference(model, fused, block, x)
    alone = repfuse.fuse(inner, x)  # the same rewrites as when fused on its own
    assert count(part, _is_conv) == count(alone, _is_conv)
    assert count(part, _is_norm) == count(alone, _is_norm)
    event(f"{on}: {'partial' if info.partial else 'specialized'}")
