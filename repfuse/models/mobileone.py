"""MobileOne (Vasu et al. 2023, "MobileOne: An Improved One millisecond Mobile Backbone"), train
and deploy form.

A MobileOne block (Vasu et al. 2023, Fig. 3) is a depthwise half and a pointwise half, each the
sum of reparameterizable branches followed by ReLU:

- depthwise: ``k`` over-parameterized 3x3 depthwise conv-BN branches (stride s, padding 1), a
  1x1 depthwise conv-BN "scale" branch (stride s, padding 0), and a BatchNorm skip when the
  stride is 1;
- pointwise: ``k`` 1x1 conv-BN branches and a BatchNorm skip when input and output channels
  agree (no scale branch: the main kernel is already 1x1).

Deploy form (``deploy=True``): each half is one conv with bias (3x3 depthwise, 1x1 dense) and
its ReLU; the paths of these convs are those of the train form's units (see
:mod:`repfuse.models.layers`).

Architecture (Vasu et al. 2023, Sec. 3): a stem block (3x3, stride 2, ``min(64, 64 a1)``
channels), then stages of ``2, 8, 5, 5, 1`` blocks of widths ``64 a1, 128 a2, 256 a3, 256 a3,
512 a4`` whose first blocks have strides ``2, 2, 2, 1, 2``, global average pool and a linear
classifier. Stages 4 and 5 have the same width and stage 5 does not downsample, so they are one
stage of 10 blocks here (``stage3``), as in the paper's code. MobileOne-S0 has
``a = (0.75, 1.0, 1.0, 2.0)`` and ``k = 4``: widths 48, 48, 128, 256, 1024. The stem is a
MobileOne half with one 3x3 branch and the scale branch (no skip: 3 != 48 channels), as in the
paper's code.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from repfuse.models.layers import (
    ConvBN,
    StagedClassifier,
    deploy_conv,
    init_branch_convs,
    unit_with_activation,
)
from repfuse.models.registry import register_model


class MobileOneConv(nn.Module):
    """One half of a MobileOne block without its activation (Vasu et al. 2023, Fig. 3): the sum
    of ``num_branches`` k x k conv-BN branches (padding k // 2), a 1x1 conv-BN "scale" branch
    if k > 1, and a BatchNorm skip if ``in_channels == out_channels`` and ``stride == 1``.
    All convs share ``stride`` and ``groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.branches = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
            for _ in range(num_branches)
        )
        self.scale = None
        if kernel_size > 1:
            self.scale = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
        has_skip = in_channels == out_channels and stride == 1
        self.skip = nn.BatchNorm2d(in_channels) if has_skip else None
        convs = [branch.conv for branch in self.branches]
        if self.scale is not None:
            convs.append(self.scale.conv)
        init_branch_convs(*convs, gain=0.25 if has_skip else 2.0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return out


def mobileone_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    groups: int,
    num_branches: int,
    deploy: bool,
) -> nn.Module:
    """A :class:`MobileOneConv`, or in deploy form the one conv with bias it becomes."""
    if deploy:
        padding = kernel_size // 2
        return deploy_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
    return MobileOneConv(in_channels, out_channels, kernel_size, stride, groups, num_branches)


class MobileOneBlock(nn.Sequential):
    """A MobileOne block (Vasu et al. 2023, Fig. 3): ``depthwise`` (3x3 depthwise half, with
    the stride), ``depthwise_act``, ``pointwise`` (1x1 half), ``pointwise_act``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_branches: int,
        deploy: bool = False,
    ) -> None:
        depthwise = mobileone_conv(
            in_channels, in_channels, 3, stride, in_channels, num_branches, deploy
        )
        pointwise = mobileone_conv(in_channels, out_channels, 1, 1, 1, num_branches, deploy)
        super().__init__(
            OrderedDict(
                depthwise=depthwise,
                depthwise_act=nn.ReLU(),
                pointwise=pointwise,
                pointwise_act=nn.ReLU(),
            )
        )


class MobileOne(StagedClassifier):
    """MobileOne (Vasu et al. 2023, Sec. 3): ``stem``, ``stage1..stage4``, global average pool
    and ``fc``.

    Args:
        widths: Channels of the stem and of the four stages.
        blocks_per_stage: Blocks of the four stages; the first block of each has stride 2.
        num_branches: k, the over-parameterized branches of each half.
        num_classes: Outputs of ``fc``.
        deploy: Build the deploy form, one conv with bias per half.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int, int],
        blocks_per_stage: tuple[int, int, int, int],
        num_branches: int,
        num_classes: int = 1000,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        in_channels = widths[0]
        stem = mobileone_conv(3, in_channels, 3, 2, 1, 1, deploy)
        self.stem = unit_with_activation(stem, nn.ReLU())
        stages = []
        for width, num_blocks in zip(widths[1:], blocks_per_stage, strict=True):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if block_index == 0 else 1
                blocks.append(MobileOneBlock(in_channels, width, stride, num_branches, deploy))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)


@register_model(
    "mobileone_s0",
    input_shape=(1, 3, 224, 224),
    description="MobileOne-S0, k=4 (Vasu et al. 2023, MobileOne: One millisecond Mobile Backbone)",
    supports_deploy=True,
    reparameterized=True,
)
def mobileone_s0(*, deploy: bool = False, num_classes: int = 1000) -> MobileOne:
    """MobileOne-S0 (Vasu et al. 2023): 2,078,504 parameters deployed (paper: 2.1M)."""
    return MobileOne((48, 48, 128, 256, 1024), (2, 8, 10, 1), 4, num_classes, deploy)


@register_model(
    "mobileone_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny MobileOne [1, 2, 2, 1], k=3, widths 8-64 (Vasu et al. 2023) for tests",
    supports_deploy=True,
    reparameterized=True,
)
def mobileone_tiny(*, deploy: bool = False, num_classes: int = 10) -> MobileOne:
    """A six-block MobileOne with three branches per half for 32x32 inputs."""
    return MobileOne((8, 8, 16, 32, 64), (1, 2, 2, 1), 3, num_classes, deploy)
