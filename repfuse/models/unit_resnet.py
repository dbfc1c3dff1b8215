"""A ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition") whose k x k conv-BN
layers are pluggable units, for the reparameterized ResNets of ACNet and DBB.

:class:`UnitResNet` is :class:`repfuse.models.resnet.ResNet` with ``BasicBlock`` (ResNet-18/34)
in which the stem conv and every 3x3 conv, each with its BatchNorm, is a *unit* built by a
factory (see :mod:`repfuse.models.layers` for the unit convention). The module paths are chosen
so that the deploy form of such a model *is* ``ResNet(BasicBlock, ..., deploy=True)`` from
:mod:`repfuse.models.resnet`, as the papers promise (the converted network has the original
architecture): the stem unit sits at ``conv1``, a block's units at ``conv1`` and ``conv2``, and a
projection shortcut is ``downsample = Sequential(ConvBN)``, whose one unit sits at the path
``downsample.0`` of the deploy form's 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from repfuse.models.layers import ConvBN


@dataclass(frozen=True)
class ConvSite:
    """Where a unit goes: its module path in the model and the conv it stands for (padding is
    ``kernel_size // 2``)."""

    path: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int


UnitFactory = Callable[[ConvSite], nn.Module]


class UnitBasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016, Fig. 2) with units for its two 3x3 conv-BNs:
    ``relu(conv2(relu(conv1(x))) + shortcut(x))``."""

    def __init__(
        self,
        unit: UnitFactory,
        path: str,
        in_channels: int,
        planes: int,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = unit(ConvSite(f"{path}.conv1", in_channels, planes, 3, stride))
        # Not in place: a forward hook on a unit must see its own output.
        self.relu = nn.ReLU()
        self.conv2 = unit(ConvSite(f"{path}.conv2", planes, planes, 3, 1))
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(ConvBN(in_channels, planes, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + identity)


class UnitResNet(nn.Module):
    """ResNet-18/34 (He et al. 2016, Table 1) in train form with pluggable units: the stem unit
    ``conv1`` (7x7, stride 2) + ReLU + 3x3/2 max pool, four stages ``layer1..layer4`` of
    :class:`UnitBasicBlock`, global average pool and ``fc``.

    Args:
        unit: Builds the unit for each :class:`ConvSite` (the stem and every 3x3 conv).
        blocks_per_stage: Blocks of each of the four stages.
        num_classes: Outputs of ``fc``.
        widths: Planes of the four stages; the stem has ``widths[0]`` channels.
    """

    def __init__(
        self,
        unit: UnitFactory,
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int = 1000,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        in_channels = widths[0]
        self.conv1 = unit(ConvSite("conv1", 3, in_channels, 7, 2))
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        stage_shapes = zip(widths, blocks_per_stage, strict=True)
        for stage_index, (planes, num_blocks) in enumerate(stage_shapes):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                path = f"layer{stage_index + 1}.{block_index}"
                blocks.append(UnitBasicBlock(unit, path, in_channels, planes, stride))
                in_channels = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        # No He fan_out re-initialization as in repfuse.models.resnet: applied to every branch
        # of every unit, it takes the eval-mode logits of DBB ResNet-18 to ~1e6. The units
        # initialize their branches with repfuse.models.layers.init_branch_convs instead.

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))
