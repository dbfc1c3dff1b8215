"""Attention and dynamic networks, train form, small enough for tests (32x32 inputs).

Each net has BatchNorms that fold into the convs before them and a *dynamic* part, a product of
two activations or an input-dependent resampling or weight, that no exact rewrite may touch:

- :func:`se_resnet_tiny`: squeeze-and-excitation (Hu et al. 2018, "Squeeze-and-Excitation
  Networks") on every residual branch: ``x * sigmoid(fc2(relu(fc1(gap(x)))))``.
- :func:`cbam_resnet_tiny`: CBAM (Woo et al. 2018, "CBAM: Convolutional Block Attention
  Module"): a channel gate from average- and max-pooled features through one shared MLP, then a
  spatial gate from a 7x7 conv-BN over the channel-wise max and mean.
- :func:`sknet_tiny`: selective kernel units (Li et al. 2019, "Selective Kernel Networks"):
  conv-BN-ReLU branches of kernel 1, 3, 5 and 7 on one input, fused by a softmax attention
  across the branches.
- :func:`nonlocal_resnet_tiny`: a non-local block (Wang et al. 2018, "Non-local Neural
  Networks"), embedded Gaussian: ``x + bn(W_z(softmax(theta^T phi) g))``.
- :func:`residual_attention_tiny`: an attention module of the Residual Attention Network (Wang et
  al. 2017, "Residual Attention Network for Image Classification"): a trunk branch and a
  bottom-up top-down mask branch (max pools, bilinear upsampling, a skip connection, sigmoid),
  combined as ``(1 + mask) * trunk``.
- :func:`stn_tiny`: a spatial transformer (Jaderberg et al. 2015, "Spatial Transformer
  Networks") in front of a small conv net: a localization net regresses an affine ``theta``,
  ``F.affine_grid`` and ``F.grid_sample`` warp the input.
- :func:`dynamic_conv_tiny`: dynamic convolution (Chen et al. 2020, "Dynamic Convolution:
  Attention over Convolution Kernels"): per sample, a softmax attention over ``K`` kernels
  aggregates one kernel and bias, applied with a grouped conv over the batch.
- :func:`vit_convstem_tiny`: a transformer (Vaswani et al. 2017, "Attention Is All You Need";
  Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") on the tokens of a conv-BN stem
  (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"), whose self-attention
  has separate Q, K and V ``nn.Linear`` projections of one tensor.

The stochastic-depth ResNet is :func:`repfuse.models.resnet.resnet_tiny_droppath`.

Every model traces with ``torch.fx.symbolic_trace``: shapes are only passed on as arguments
(``x.size()``, ``x.shape[0]``), never branched on, and reshapes use ``flatten``/``unflatten``
with ``-1`` where they can. The ResNet-style nets use post-activation residual units (He et al.
2016, conv-BN-ReLU), so every BatchNorm follows a conv.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.models.layers import ConvBN, he_init_convs
from repfuse.models.registry import register_model

ModuleFactory = Callable[[int], nn.Module]
BlockFactory = Callable[[int, int, int], nn.Module]

TINY_WIDTHS = (16, 32, 64)


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    """``relu(bn(conv(x)))`` with padding ``kernel_size // 2``, as the children ``conv``
    (a :class:`~repfuse.models.layers.ConvBN`) and ``act``."""
    conv = ConvBN(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups)
    return nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU()))


# --- residual units and the tiny ResNet skeleton ---------------------------------------------


class BasicBlock(nn.Module):
    """A post-activation residual unit (He et al. 2016, Fig. 2) with optional attention on its
    residual branch, where SE and CBAM put it (Hu et al. 2018, Fig. 3; Woo et al. 2018, Fig. 3):
    ``relu(attention(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        attention: ModuleFactory | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = ConvBN(out_channels, out_channels, 3, 1, padding=1)
        self.attention = attention(out_channels) if attention is not None else None
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBN(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        if self.attention is not None:
            out = self.attention(out)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A 3x3 conv-BN-ReLU ``stem``, one block per stage (``layer1..layer3``, strides 1, 2, 2),
    global average pool and ``fc``, for 32x32 inputs.

    Args:
        block: ``block(in_channels, out_channels, stride)`` builds one block.
        widths: Output channels of the stages; the stem has ``widths[0]``.
        num_classes: Outputs of ``fc``.
        after_stage: ``{stage: factory}``: ``factory(channels)`` is appended to that stage
            (1-based), e.g. a non-local block.
    """

    def __init__(
        self,
        block: BlockFactory,
        widths: Sequence[int] = TINY_WIDTHS,
        num_classes: int = 10,
        after_stage: dict[int, ModuleFactory] | None = None,
    ) -> None:
        super().__init__()
        after_stage = after_stage or {}
        self.stem = conv_bn_relu(3, widths[0], 3)
        in_channels = widths[0]
        for index, channels in enumerate(widths, start=1):
            layers = [block(in_channels, channels, 1 if index == 1 else 2)]
            if index in after_stage:
                layers.append(after_stage[index](channels))
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_channels = channels
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


# --- squeeze-and-excitation ------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018, Fig. 2): ``x * sigmoid(fc2(relu(fc1(gap(x)))))``,
    the two fully connected layers as 1x1 convs with bias, ``channels // reduction`` hidden."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


# --- CBAM ------------------------------------------------------------------------------------


class ChannelGate(nn.Module):
    """CBAM's channel attention (Woo et al. 2018, Eq. 2): one MLP, applied to the global average
    and the global max of ``x``, ``x * sigmoid(mlp(avg) + mlp(max))``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        # The same MLP is called twice: its weights are shared by the two descriptors.
        logits = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return x * torch.sigmoid(logits)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM's spatial attention (Woo et al. 2018, Eq. 3): ``x * sigmoid(bn(conv7x7([max_c x,
    mean_c x])))``, with the BatchNorm of the authors' code."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = ConvBN(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Sequential):
    """The convolutional block attention module (Woo et al. 2018, Fig. 1): channel gate, then
    spatial gate."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__(
            OrderedDict(channel=ChannelGate(channels, reduction), spatial=SpatialGate())
        )


# --- selective kernel ------------------------------------------------------------------------


class SelectiveKernel(nn.Module):
    """A selective kernel unit (Li et al. 2019, Fig. 1), with one branch per kernel size.

    Split: branch ``i`` is ``relu(bn(conv_{k_i}(x)))``, padding ``k_i // 2``, all with the same
    stride and groups. Fuse: ``z = relu(bn(fc(gap(sum_i U_i))))`` with ``d = max(C / r, L)``
    hidden channels. Select: ``a = softmax_i(A_i z)`` per channel, ``V = sum_i a_i * U_i``. The
    ``A_i`` are stacked into one bias-free 1x1 conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_sizes: Sequence[int] = (1, 3, 5, 7),
        groups: int = 1,
        reduction: int = 4,
        min_hidden: int = 8,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.num_branches = len(kernel_sizes)
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, out_channels, k, stride, groups) for k in kernel_sizes
        )
        hidden = max(out_channels // reduction, min_hidden)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fuse = conv_bn_relu(out_channels, hidden, 1)
        self.select = nn.Conv2d(hidden, out_channels * self.num_branches, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        features = torch.stack([branch(x) for branch in self.branches], 1)  # N, M, C, H, W
        z = self.fuse(self.pool(features.sum(1)))
        logits = self.select(z).unflatten(1, (self.num_branches, self.out_channels))
        return (features * logits.softmax(1)).sum(1)


class SKBlock(nn.Module):
    """An SKNet residual unit (Li et al. 2019, Table 1): 1x1 conv-BN-ReLU, a grouped selective
    kernel unit (carrying the stride), 1x1 conv-BN, plus the shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 4):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, out_channels, 1)
        self.sk = SelectiveKernel(out_channels, out_channels, stride, groups=groups)
        self.conv3 = ConvBN(out_channels, out_channels, 1)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBN(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.sk(self.conv1(x))) + identity)


# --- non-local -------------------------------------------------------------------------------


class NonLocalBlock(nn.Module):
    """A non-local block, embedded Gaussian version (Wang et al. 2018, Eq. 1-3 and Fig. 2).

    ``theta``, ``phi`` and ``g`` are 1x1 convs (with bias) of ``x`` to ``inner`` channels;
    ``f = softmax_j(theta_i . phi_j)`` over all positions; ``y_i = sum_j f_ij g_j``; the output
    is ``x + bn(W_z(y))`` with ``W_z`` a 1x1 conv back to ``channels``.
    """

    def __init__(self, channels: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = ConvBN(inner, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        theta = self.theta(x).flatten(2)  # N, C', HW
        phi = self.phi(x).flatten(2)
        g = self.g(x)
        affinity = torch.softmax(torch.matmul(theta.transpose(1, 2), phi), dim=-1)  # N, HW, HW
        y = torch.matmul(g.flatten(2), affinity.transpose(1, 2))  # N, C', HW
        return x + self.out(y.reshape_as(g))


# --- residual attention ----------------------------------------------------------------------


class AttentionModule(nn.Module):
    """An attention module of the Residual Attention Network (Wang et al. 2017, Fig. 2 and
    Sec. 3.3) with ``p = 1, t = 2, r = 1`` and two down-sampling levels.

    Trunk: two residual units. Mask: 3x3/2 max pool, a unit (whose output also feeds a skip
    unit), 3x3/2 max pool, two units, bilinear upsampling (x2) plus the skip, a unit, bilinear
    upsampling (x2), then 1x1 conv-BN-ReLU, 1x1 conv-BN and a sigmoid. Output: a residual unit
    of ``(1 + mask) * trunk`` (attention residual learning, Eq. 3). A residual unit precedes it
    all. The units are post-activation :class:`BasicBlock` s (the paper uses pre-activation
    bottlenecks, whose first BatchNorm follows an addition, not a conv). The input side must be
    a multiple of 4.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        def unit() -> BasicBlock:
            return BasicBlock(channels, channels)

        self.pre = unit()
        self.trunk = nn.Sequential(unit(), unit())
        self.down1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.mask1 = unit()
        self.skip1 = unit()
        self.down2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.mask2 = nn.Sequential(unit(), unit())
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.mask3 = unit()
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.mask_out = nn.Sequential(
            conv_bn_relu(channels, channels, 1), ConvBN(channels, channels, 1), nn.Sigmoid()
        )
        self.post = unit()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask1(self.down1(x))
        skip = self.skip1(mask)
        mask = self.mask2(self.down2(mask))
        mask = self.mask3(self.up2(mask) + skip)
        mask = self.mask_out(self.up1(mask))
        return self.post((1 + mask) * trunk)


class ResidualAttentionNet(nn.Module):
    """A conv-BN-ReLU stem, a strided residual unit, an :class:`AttentionModule` at 16x16, a
    strided residual unit, global average pool and ``fc`` (Wang et al. 2017, Table 2, scaled
    down to one attention module)."""

    def __init__(self, widths: Sequence[int] = TINY_WIDTHS, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0], 3)
        self.layer1 = BasicBlock(widths[0], widths[1], stride=2)
        self.attention = AttentionModule(widths[1])
        self.layer2 = BasicBlock(widths[1], widths[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.attention(self.layer1(self.stem(x))))
        return self.fc(self.avgpool(x).flatten(1))


# --- spatial transformer ---------------------------------------------------------------------


class SpatialTransformer(nn.Module):
    """A spatial transformer (Jaderberg et al. 2015, Fig. 2) with an affine transform.

    Localization net: two conv-BN-ReLU + 2x2 max pool stages, a 2x2 adaptive average pool and
    an MLP to the six entries of ``theta``. The last layer starts at the identity transform
    plus a small input-dependent part, so the warp is near the identity but not constant. Grid
    generator ``F.affine_grid``, sampler ``F.grid_sample`` (bilinear, zero padding), both with
    ``align_corners=False``.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.localization = nn.Sequential(
            conv_bn_relu(in_channels, 8, 3),
            nn.MaxPool2d(2),
            conv_bn_relu(8, 16, 3),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.regressor = nn.Sequential(nn.Linear(16 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 6))
        with torch.no_grad():
            self.regressor[2].weight.mul_(0.1)
            self.regressor[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        theta = self.regressor(self.localization(x).flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


class STNConvNet(nn.Module):
    """A :class:`SpatialTransformer` in front of a small classifier: conv-BN-ReLU, 2x2 max pool,
    conv-BN-ReLU, global average pool and ``fc`` (Jaderberg et al. 2015, Sec. 4.1)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.transformer = SpatialTransformer(3)
        self.features = nn.Sequential(
            conv_bn_relu(3, 16, 3), nn.MaxPool2d(2), conv_bn_relu(16, 32, 3)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.transformer(x))
        return self.fc(self.avgpool(x).flatten(1))


# --- dynamic convolution ---------------------------------------------------------------------


class DynamicConv2d(nn.Module):
    """Dynamic convolution (Chen et al. 2020, Eq. 1-3 and Fig. 3): ``K`` kernels ``W_k`` and
    biases ``b_k``, and per sample an attention ``pi(x) = softmax(fc2(relu(fc1(gap(x)))) / tau)``
    over them; the sample is convolved with ``sum_k pi_k W_k`` plus ``sum_k pi_k b_k``.

    The per-sample convs run as one grouped conv over the batch: the ``N`` samples are stacked
    along channels (``1 x N*C x H x W``), the ``N`` aggregated kernels along output channels,
    with ``N * groups`` groups. Only tensor ops, no Python branch on a value, so ``torch.fx``
    traces it; ``x.shape[0]`` is only passed on as the group count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.temperature = temperature
        per_group = in_channels // groups
        self.weight = nn.Parameter(
            torch.empty(num_kernels, out_channels, per_group, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels))
        hidden = max(4, in_channels // reduction)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_kernels),
        )
        # Each kernel as a lone conv would be (He et al. 2015, fan_in); the aggregate is a convex
        # combination of them.
        fan_in = per_group * kernel_size * kernel_size
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            self.bias.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def forward(self, x: Tensor) -> Tensor:
        attention = torch.softmax(self.attention(x) / self.temperature, dim=1)  # N, K
        per_group = self.in_channels // self.groups
        kernel = (attention @ self.weight.flatten(1)).reshape(
            -1, per_group, self.kernel_size, self.kernel_size
        )  # N * out, in / groups, k, k
        bias = (attention @ self.bias).flatten()  # N * out
        stacked = x.flatten(0, 1).unsqueeze(0)  # 1, N * in, H, W
        out = F.conv2d(
            stacked, kernel, bias, self.stride, self.padding, 1, self.groups * x.shape[0]
        )
        return out.squeeze(0).unflatten(0, (-1, self.out_channels))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"num_kernels={self.weight.shape[0]}, temperature={self.temperature}"
        )


class DynamicConvNet(nn.Module):
    """A conv-BN-ReLU stem, two dynamic perceptrons (Chen et al. 2020, Fig. 3: dynamic conv, BN,
    ReLU) with stride 2, global average pool and ``fc``."""

    def __init__(
        self, widths: Sequence[int] = TINY_WIDTHS, num_classes: int = 10, num_kernels: int = 4
    ) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0], 3)
        layers = []
        for in_channels, out_channels in zip(widths[:-1], widths[1:], strict=True):
            conv = DynamicConv2d(
                in_channels, out_channels, 3, stride=2, padding=1, num_kernels=num_kernels
            )
            layers.append(
                nn.Sequential(
                    OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels), act=nn.ReLU())
                )
            )
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


# --- self-attention on conv-stem tokens ------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017, Eq. 1 and Sec. 3.2.2)
    on ``N x L x D`` tokens: separate ``q``, ``k`` and ``v`` linear projections of the same
    input, ``softmax(q k^T / sqrt(d)) v`` per head, and the output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # N, heads, L, d

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        attention = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attention, v).transpose(1, 2).flatten(2)  # N, L, D
        return self.proj(out)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (Dosovitskiy et al. 2021, Eq. 2-3):
    ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStemTransformer(nn.Module):
    """A conv stem (3x3/2 conv-BN-ReLU, 3x3/2 conv-BN; Xiao et al. 2021) whose ``D x H/4 x W/4``
    output becomes ``H W / 16`` tokens (``flatten(2).transpose(1, 2)``), a learned position
    embedding, ``depth`` :class:`TransformerBlock` s, a final LayerNorm, the mean over tokens
    and ``head``. The position embedding fixes the input to ``image_size``."""

    def __init__(
        self,
        image_size: int = 32,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn_relu(3, dim // 2, 3, stride=2), ConvBN(dim // 2, dim, 3, 2, padding=1)
        )
        num_tokens = (image_size // 4) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        he_init_convs(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed  # N, L, D
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(1))


# --- registered models -----------------------------------------------------------------------


@register_model(
    "se_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny SE-ResNet, squeeze-and-excitation per block (Hu et al. 2018, SE Networks)",
)
def se_resnet_tiny(*, num_classes: int = 10) -> TinyResNet:
    """Three basic blocks, widths 16, 32, 64, each with an SE module (reduction 4)."""

    def block(in_channels: int, out_channels: int, stride: int) -> BasicBlock:
        return BasicBlock(in_channels, out_channels, stride, attention=SqueezeExcitation)

    return TinyResNet(block, num_classes=num_classes)


@register_model(
    "cbam_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny ResNet with CBAM channel + spatial attention per block (Woo et al. 2018)",
)
def cbam_resnet_tiny(*, num_classes: int = 10) -> TinyResNet:
    """Three basic blocks, widths 16, 32, 64, each with a CBAM module (reduction 4, 7x7)."""

    def block(in_channels: int, out_channels: int, stride: int) -> BasicBlock:
        return BasicBlock(in_channels, out_channels, stride, attention=CBAM)

    return TinyResNet(block, num_classes=num_classes)


@register_model(
    "sknet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny SKNet, selective kernel units with kernels 1/3/5/7 (Li et al. 2019)",
)
def sknet_tiny(*, num_classes: int = 10) -> TinyResNet:
    """Three SK blocks, widths 16, 32, 64, each with a 4-group selective kernel unit whose
    branches have kernels 1, 3, 5 and 7."""
    return TinyResNet(SKBlock, num_classes=num_classes)


@register_model(
    "nonlocal_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny ResNet with an embedded-Gaussian non-local block (Wang et al. 2018)",
)
def nonlocal_resnet_tiny(*, num_classes: int = 10) -> TinyResNet:
    """Three basic blocks, widths 16, 32, 64, and a non-local block after the second stage
    (16x16 positions)."""
    return TinyResNet(BasicBlock, num_classes=num_classes, after_stage={2: NonLocalBlock})


@register_model(
    "residual_attention_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny Residual Attention Network, one trunk+mask module (Wang et al. 2017)",
)
def residual_attention_tiny(*, num_classes: int = 10) -> ResidualAttentionNet:
    """One attention module (two-level mask branch) between two strided residual units."""
    return ResidualAttentionNet(num_classes=num_classes)


@register_model(
    "stn_tiny",
    input_shape=(1, 3, 32, 32),
    description="Spatial transformer (affine_grid/grid_sample) before a conv net (Jaderberg 2015)",
)
def stn_tiny(*, num_classes: int = 10) -> STNConvNet:
    """An affine spatial transformer in front of a two-conv classifier."""
    return STNConvNet(num_classes)


@register_model(
    "dynamic_conv_tiny",
    input_shape=(1, 3, 32, 32),
    description="Dynamic convolution, attention over 4 kernels per sample (Chen et al. 2020)",
)
def dynamic_conv_tiny(*, num_classes: int = 10) -> DynamicConvNet:
    """A conv stem and two dynamic conv-BN-ReLU layers of ``K = 4`` kernels."""
    return DynamicConvNet(num_classes=num_classes)


@register_model(
    "vit_convstem_tiny",
    input_shape=(1, 3, 32, 32),
    description="Transformer on conv-stem tokens, Q/K/V Linears of one tensor (Vaswani 2017)",
)
def vit_convstem_tiny(*, num_classes: int = 10) -> ConvStemTransformer:
    """A conv-BN stem to 8x8 tokens of width 32, two 4-head transformer blocks."""
    return ConvStemTransformer(num_classes=num_classes)
