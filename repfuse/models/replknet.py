"""A RepLKNet stage (Ding et al. 2022, "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel
Design in CNNs"), train and deploy form.

A stage alternates RepLK blocks and ConvFFN blocks (Ding et al. 2022, Fig. 4), each a residual
``x + f(x)`` whose ``f`` starts with a BatchNorm (pre-norm):

- RepLK block: ``f = pw2(relu(large_kernel(relu(pw1(x)))))`` with ``pw1`` = BN -> 1x1 conv-BN,
  ``large_kernel`` = a 31x31 depthwise conv-BN plus a parallel 5x5 depthwise conv-BN (padding
  15 and 2, so they are centred alike), summed: the small kernel is the paper's structural
  reparameterization, and ``pw2`` = 1x1 conv-BN.
- ConvFFN: ``f = pw2(gelu(pw1(x)))`` with ``pw1`` = BN -> 1x1 conv-BN expanding 4x and ``pw2`` =
  1x1 conv-BN.

The residual stays in the deploy form: it adds the block input to a non-linear path.

Deploy form (``deploy=True``): ``large_kernel`` is one 31x31 depthwise conv with bias; each
``pw1``/``pw2`` is one 1x1 conv with bias (the pre-norm BatchNorm folds into the 1x1 conv after
it exactly, since a 1x1 conv has no padding to see the BN's shift). Paths follow the unit
convention of :mod:`repfuse.models.layers`.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from repfuse.models.layers import ConvBN, conv_bn, deploy_conv, init_branch_convs
from repfuse.models.registry import register_model


class PreNormConvBN(nn.Sequential):
    """``bn(conv1x1(norm(x)))``: a BatchNorm, then a 1x1 conv-BN (Ding et al. 2022, Fig. 4)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            )
        )


def pre_norm_conv_bn(in_channels: int, out_channels: int, deploy: bool) -> nn.Module:
    """A :class:`PreNormConvBN`, or in deploy form the one 1x1 conv with bias it becomes."""
    if deploy:
        return deploy_conv(in_channels, out_channels, 1)
    return PreNormConvBN(in_channels, out_channels)


class LargeSmallKernelConv(nn.Module):
    """A depthwise large-kernel conv-BN and a parallel depthwise small-kernel conv-BN, summed
    (Ding et al. 2022, Sec. 3, guideline 3): ``large(x) + small(x)``."""

    def __init__(self, channels: int, kernel_size: int = 31, small_kernel_size: int = 5) -> None:
        super().__init__()
        self.large = ConvBN(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.small = ConvBN(
            channels, channels, small_kernel_size, padding=small_kernel_size // 2, groups=channels
        )
        init_branch_convs(self.large.conv, self.small.conv, gain=2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.large(x) + self.small(x)


class RepLKBlock(nn.Module):
    """A RepLK block (Ding et al. 2022, Fig. 4): ``x + pw2(relu(lk(relu(pw1(x)))))``."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 31,
        small_kernel_size: int = 5,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.pw1 = pre_norm_conv_bn(channels, channels, deploy)
        self.pw1_act = nn.ReLU()
        if deploy:
            padding = kernel_size // 2
            self.large_kernel: nn.Module = deploy_conv(
                channels, channels, kernel_size, padding=padding, groups=channels
            )
        else:
            self.large_kernel = LargeSmallKernelConv(channels, kernel_size, small_kernel_size)
        self.lk_act = nn.ReLU()
        self.pw2 = conv_bn(channels, channels, 1, deploy=deploy)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pw1_act(self.pw1(x))
        out = self.lk_act(self.large_kernel(out))
        return x + self.pw2(out)


class ConvFFN(nn.Module):
    """RepLKNet's ConvFFN (Ding et al. 2022, Fig. 4): ``x + pw2(gelu(pw1(x)))``, ``pw1``
    expanding the channels ``expansion`` times."""

    def __init__(self, channels: int, expansion: int = 4, deploy: bool = False) -> None:
        super().__init__()
        hidden = channels * expansion
        self.pw1 = pre_norm_conv_bn(channels, hidden, deploy)
        self.act = nn.GELU()
        self.pw2 = conv_bn(hidden, channels, 1, deploy=deploy)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(x)))


class RepLKStage(nn.Sequential):
    """``depth`` pairs of :class:`RepLKBlock` and :class:`ConvFFN` on ``channels`` channels."""

    def __init__(
        self,
        channels: int,
        depth: int,
        kernel_size: int = 31,
        small_kernel_size: int = 5,
        deploy: bool = False,
    ) -> None:
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(RepLKBlock(channels, kernel_size, small_kernel_size, deploy))
            blocks.append(ConvFFN(channels, deploy=deploy))
        super().__init__(*blocks)


@register_model(
    "replknet_stage",
    input_shape=(1, 64, 56, 56),
    description="RepLKNet stage, 2x (31x31+5x5 RepLK block, ConvFFN) (Ding et al. 2022, 31x31)",
    supports_deploy=True,
    reparameterized=True,
)
def replknet_stage(*, deploy: bool = False) -> RepLKStage:
    """The first stage of a RepLKNet-31 (two RepLK/ConvFFN pairs at 56x56), with 64 channels."""
    return RepLKStage(64, 2, deploy=deploy)


@register_model(
    "replknet_tiny",
    input_shape=(1, 16, 32, 32),
    description="Tiny RepLKNet stage, one 31x31+5x5 RepLK block and a ConvFFN (Ding et al. 2022)",
    supports_deploy=True,
    reparameterized=True,
)
def replknet_tiny(*, deploy: bool = False) -> RepLKStage:
    """One RepLK/ConvFFN pair on 16 channels, still with the 31x31 kernel, for tests."""
    return RepLKStage(16, 1, deploy=deploy)
