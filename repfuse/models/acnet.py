"""ACNet (Ding et al. 2019, "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks") on ResNet-18, train and deploy form.

Train form: ResNet-18 in which every 3x3 conv-BN is an Asymmetric Convolution Block (ACB,
Ding et al. 2019, Fig. 3): ``bn(conv3x3(x)) + bn(conv1x3(x)) + bn(conv3x1(x))``, all three with
the same stride, the 1x3 with padding ``(0, 1)`` and the 3x1 with padding ``(1, 0)`` so that
they are the middle row and column of the 3x3 (padding 1). By additivity of convolution the
three fold into one 3x3 kernel: the "kernel skeleton" gets the extra weight. The 7x7 stem and
the 1x1 projection shortcuts stay conv-BN, as in the paper.

Deploy form (``deploy=True``): the plain ResNet-18 of :mod:`repfuse.models.resnet` with a bias on
every conv, which is where the paper says an ACNet ends up ("the same structure as the
original"). Its paths are those of the train form's units (:mod:`repfuse.models.unit_resnet`).
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.layers import ConvBN, init_branch_convs
from repfuse.models.registry import register_model
from repfuse.models.resnet import BasicBlock, ResNet
from repfuse.models.unit_resnet import ConvSite, UnitResNet


class ACBlock(nn.Module):
    """An Asymmetric Convolution Block (Ding et al. 2019, Sec. 3.2) for a k x k conv, k odd:
    ``square(x) + horizontal(x) + vertical(x)`` with a k x k, a 1 x k and a k x 1 conv-BN of the
    same stride, padded so that all three are centred on the same pixel."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.square = ConvBN(in_channels, out_channels, kernel_size, stride, padding=pad)
        self.horizontal = ConvBN(
            in_channels, out_channels, (1, kernel_size), stride, padding=(0, pad)
        )
        self.vertical = ConvBN(
            in_channels, out_channels, (kernel_size, 1), stride, padding=(pad, 0)
        )
        convs = (self.square.conv, self.horizontal.conv, self.vertical.conv)
        init_branch_convs(*convs, gain=2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.horizontal(x) + self.vertical(x)


def acnet_unit(site: ConvSite) -> nn.Module:
    """An :class:`ACBlock` for every 3x3 conv; the 7x7 stem stays a plain conv-BN."""
    if site.kernel_size == 3:
        return ACBlock(site.in_channels, site.out_channels, 3, site.stride)
    padding = site.kernel_size // 2
    return ConvBN(site.in_channels, site.out_channels, site.kernel_size, site.stride, padding)


@register_model(
    "acnet_resnet18",
    input_shape=(1, 3, 224, 224),
    description="ACNet ResNet-18, 3x3+1x3+3x1 ACBs (Ding et al. 2019, Asymmetric Conv Blocks)",
    supports_deploy=True,
    reparameterized=True,
)
def acnet_resnet18(*, deploy: bool = False, num_classes: int = 1000) -> nn.Module:
    """ACNet ResNet-18; deployed it is ResNet-18 with conv biases (11,684,712 parameters)."""
    if deploy:
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, deploy=True)
    return UnitResNet(acnet_unit, (2, 2, 2, 2), num_classes)


@register_model(
    "acnet_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny ACNet ResNet [1, 1, 1, 1], widths 8-64 (Ding et al. 2019, ACNet) for tests",
    supports_deploy=True,
    reparameterized=True,
)
def acnet_resnet_tiny(*, deploy: bool = False, num_classes: int = 10) -> nn.Module:
    """ACNet on ``resnet_tiny``: four blocks of widths 8, 16, 32, 64 for 32x32 inputs."""
    widths = (8, 16, 32, 64)
    if deploy:
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes, widths=widths, deploy=True)
    return UnitResNet(acnet_unit, (1, 1, 1, 1), num_classes, widths=widths)
