"""Diverse Branch Block (Ding et al. 2021, "Diverse Branch Block: Building a Convolution as an
Inception-like Unit") on ResNet-18, train and deploy form.

Train form: ResNet-18 in which the 7x7 stem and every 3x3 conv-BN is a DBB (Ding et al. 2021,
Fig. 2) for a k x k conv of stride s and padding p = k // 2, the sum of four branches:

(a) ``kxk``: k x k conv-BN (stride s, padding p);
(b) ``one_by_one``: 1x1 conv-BN (stride s, padding 0), present when groups < out channels;
(c) ``avg``: 1x1 conv -> :class:`BNAndPad` (pad p) -> AvgPool(k, stride s, padding 0) -> BN;
(d) ``one_by_one_kxk``: 1x1 conv -> :class:`BNAndPad` (pad p) -> k x k conv (stride s,
    padding 0) -> BN, with ``in_channels`` internal channels.

Branches (c) and (d) compose a 1x1 conv with a k x k operator (the average pool is a k x k
depthwise conv with weights 1/k^2, transform V). Such a composition is exact only if the k x k
operator sees the 1x1 branch's *bias* (here the BN shift) where it pads, not zero: the paper's
``BNAndPad`` does exactly that, padding the BN output with the value the BN gives a zero input.

Depth concatenation (transform IV): in the first block of each stage, the 1x1 conv of branch
(d) of ``conv1`` is two 1x1 convs whose outputs are concatenated along channels,
``cat([conv_a(x), conv_b(x)])``, the first with ``c // 2`` and the second with ``c - c // 2``
of the ``c`` internal channels. It equals one 1x1 conv with the two weights stacked.

Deploy form (``deploy=True``): every DBB becomes one k x k conv with bias, so the network is the
plain ResNet-18 of :mod:`repfuse.models.resnet` with conv biases (paths as in
:mod:`repfuse.models.unit_resnet`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repfuse.models.layers import ConvBN, init_branch_convs
from repfuse.models.registry import register_model
from repfuse.models.resnet import BasicBlock, ResNet
from repfuse.models.unit_resnet import ConvSite, UnitResNet


class BNAndPad(nn.Module):
    """BatchNorm, then pad by ``pad`` pixels with the value the BatchNorm gives a zero input
    (Ding et al. 2021, Sec. 3.2 and its code's ``BNAndPadLayer``).

    ``y = F.pad(bn(x), [pad] * 4)``, then each of the four border strips of ``y`` is overwritten
    with the per-channel value ``bn(0) = beta - mu * gamma / sqrt(var + eps)`` (running
    statistics, also in training, like the paper's code). So ``BNAndPad(x) = bn(zero_pad(x))``
    in eval mode: a conv with padding 0 after it sees what it would see if the 1x1 conv-BN
    before it ran on a zero-padded input, and the two compose into one conv exactly.
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        output = self.bn(x)
        if self.pad == 0:
            return output
        # bn(0) = beta - mu * gamma / sqrt(var + eps), from the BN's own tensors as the
        # paper's code computes it (so the value stays live in a traced graph).
        bn = self.bn
        pad_values = (bn.bias.detach() - bn.running_mean * bn.weight.detach()
                      / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        pad = self.pad
        output = F.pad(output, [pad, pad, pad, pad])
        output[:, :, 0:pad, :] = pad_values
        output[:, :, -pad:, :] = pad_values
        output[:, :, :, 0:pad] = pad_values
        output[:, :, :, -pad:] = pad_values
        return output


class ConcatConv1x1(nn.Module):
    """Two 1x1 convs without bias on the same input, concatenated along channels (transform IV
    of Ding et al. 2021): ``cat([first(x), second(x)], dim=1)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        split = out_channels // 2
        self.first = nn.Conv2d(in_channels, split, 1, bias=False)
        self.second = nn.Conv2d(in_channels, out_channels - split, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=1)


class DiverseBranchBlock(nn.Module):
    """A Diverse Branch Block (Ding et al. 2021, Fig. 2) standing for a ``kernel_size`` conv-BN
    with padding ``kernel_size // 2``: the sum of branches (a)-(d) of the module docstring.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: k, odd.
        stride: Stride of every branch.
        groups: Groups of every conv; branch (b) exists only if ``groups < out_channels``.
        concat_1x1: Make branch (d)'s 1x1 conv a :class:`ConcatConv1x1` (transform IV).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        concat_1x1: bool = False,
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.kxk = ConvBN(in_channels, out_channels, kernel_size, stride, pad, groups=groups)
        self.one_by_one = None
        if groups < out_channels:
            self.one_by_one = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
        self.avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                bn_pad=BNAndPad(out_channels, pad),
                pool=nn.AvgPool2d(kernel_size, stride, padding=0),
                bn=nn.BatchNorm2d(out_channels),
            )
        )
        internal = in_channels
        if concat_1x1:
            if groups != 1:
                raise ValueError("a depth-concatenated 1x1 conv is only built with groups=1")
            first: nn.Module = ConcatConv1x1(in_channels, internal)
        else:
            first = nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False)
        self.one_by_one_kxk = nn.Sequential(
            OrderedDict(
                conv1=first,
                bn_pad=BNAndPad(internal, pad),
                conv2=nn.Conv2d(
                    internal, out_channels, kernel_size, stride, 0, groups=groups, bias=False
                ),
                bn=nn.BatchNorm2d(out_channels),
            )
        )
        last_convs = [self.kxk.conv, self.avg.conv, self.one_by_one_kxk.conv2]
        if self.one_by_one is not None:
            last_convs.append(self.one_by_one.conv)
        init_branch_convs(*last_convs, gain=2.0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.kxk(x)
        if self.one_by_one is not None:
            out = out + self.one_by_one(x)
        out = out + self.avg(x)
        return out + self.one_by_one_kxk(x)


def dbb_unit(site: ConvSite) -> nn.Module:
    """A :class:`DiverseBranchBlock` for the stem and every 3x3 conv; depth concatenation in
    branch (d) of ``conv1`` of the first block of each stage."""
    concat_1x1 = site.path.endswith(".0.conv1")
    return DiverseBranchBlock(
        site.in_channels,
        site.out_channels,
        site.kernel_size,
        site.stride,
        concat_1x1=concat_1x1,
    )


@register_model(
    "dbb_resnet18",
    input_shape=(1, 3, 224, 224),
    description="DBB ResNet-18, 7x7 and 3x3 convs as DBBs (Ding et al. 2021, Diverse Branch Block)",
    supports_deploy=True,
    reparameterized=True,
)
def dbb_resnet18(*, deploy: bool = False, num_classes: int = 1000) -> nn.Module:
    """DBB ResNet-18; deployed it is ResNet-18 with conv biases (11,684,712 parameters)."""
    if deploy:
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, deploy=True)
    return UnitResNet(dbb_unit, (2, 2, 2, 2), num_classes)


@register_model(
    "dbb_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny DBB ResNet [1, 1, 1, 1], widths 8-64 (Ding et al. 2021, DBB) for tests",
    supports_deploy=True,
    reparameterized=True,
)
def dbb_resnet_tiny(*, deploy: bool = False, num_classes: int = 10) -> nn.Module:
    """DBB on ``resnet_tiny``: four blocks of widths 8, 16, 32, 64 for 32x32 inputs."""
    widths = (8, 16, 32, 64)
    if deploy:
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes, widths=widths, deploy=True)
    return UnitResNet(dbb_unit, (1, 1, 1, 1), num_classes, widths=widths)
