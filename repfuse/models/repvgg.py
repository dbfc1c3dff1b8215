"""RepVGG (Ding et al. 2021, "RepVGG: Making VGG-style ConvNets Great Again"), train and deploy
form.

Train form: every layer is a RepVGG block, ``act(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))``, the
BatchNorm identity branch only where input and output channels agree and the stride is 1
(Ding et al. 2021, Fig. 4). The 1x1 branch has padding 0 so that it lines up with the centre of
the 3x3 kernel (padding 1), at stride 1 and 2 alike.

Deploy form (``deploy=True``): each block is one 3x3 conv with bias and the activation, a plain
VGG-style network. Module paths follow the unit convention of :mod:`repfuse.models.layers`: the
train block's ``conv`` is a :class:`RepVGGConv`, the deploy block's ``conv`` the ``nn.Conv2d``
it reparameterizes into.

Architecture (Ding et al. 2021, Sec. 3.4): five stages; stage 1 is a single block of
width ``min(64, 64a)`` (the stem), stages 2-5 have widths ``64a, 128a, 256a, 512b`` and the
first block of every stage has stride 2. Global average pool and a linear classifier follow.
RepVGG-A has ``[1, 2, 4, 14, 1]`` blocks per stage, RepVGG-B ``[1, 4, 6, 16, 1]``.

Groupwise variants ("g4"): the paper makes the 3rd, 5th, 7th, ..., 21st layers of RepVGG-A,
and also the 23rd, 25th and 27th of RepVGG-B, groupwise, counting the stem as layer 1.
Counting from 1 over the blocks *after* the stem (as :class:`RepVGG` does) these are blocks
2, 4, ..., 26. The groups apply to both the 3x3 and the 1x1 conv of those blocks (the 1x1 must
share the grouping to merge into the 3x3); the identity branch of a grouped block is a grouped
identity kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from repfuse.models.layers import ConvBN, StagedClassifier, deploy_conv, init_branch_convs
from repfuse.models.registry import register_model

# Blocks after the stem (1-based) that are groupwise in the paper's g2/g4 models.
PAPER_GROUPWISE_LAYERS = frozenset(range(2, 27, 2))


class RepVGGConv(nn.Module):
    """The three branches of a RepVGG block (Ding et al. 2021, Fig. 4), summed, no activation.

    ``dense(x) + pointwise(x) + identity(x)``: a 3x3 conv-BN with padding 1, a 1x1 conv-BN with
    padding 0 (same stride and groups), and a BatchNorm when ``in_channels == out_channels``
    and ``stride == 1`` (``identity`` is ``None`` otherwise).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.dense = ConvBN(in_channels, out_channels, 3, stride, padding=1, groups=groups)
        self.pointwise = ConvBN(in_channels, out_channels, 1, stride, padding=0, groups=groups)
        has_identity = in_channels == out_channels and stride == 1
        self.identity = nn.BatchNorm2d(in_channels) if has_identity else None
        gain = 0.25 if has_identity else 2.0
        init_branch_convs(self.dense.conv, self.pointwise.conv, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out


class RepVGGBlock(nn.Sequential):
    """A RepVGG block: ``act(conv(x))`` with ``conv`` a :class:`RepVGGConv` (train form) or one
    3x3 ``nn.Conv2d`` with bias (deploy form).

    Also the "RepConv"/"RepVGGBlock" of YOLOv6 (Li et al. 2022) and YOLOv7 (Wang et al. 2023),
    which differ only in the activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        deploy: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        if deploy:
            conv: nn.Module = deploy_conv(in_channels, out_channels, 3, stride, 1, groups)
        else:
            conv = RepVGGConv(in_channels, out_channels, stride, groups)
        super().__init__(OrderedDict(conv=conv, act=activation()))


class RepVGG(StagedClassifier):
    """RepVGG (Ding et al. 2021, Sec. 3.4): a stem block, four stages of blocks, global average
    pool and ``fc``.

    Args:
        blocks_per_stage: Blocks of stages 2-5 (the stem is one more block).
        width_multipliers: ``(a, b)``; stage widths ``64a, 128a, 256a, 512b``, stem
            ``min(64, 64a)``.
        num_classes: Outputs of ``fc``.
        groupwise_layers: Blocks after the stem, counted from 1, whose convs have ``groups``.
        groups: Groups of those blocks.
        deploy: Build the deploy form, one 3x3 conv with bias per block.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int, int],
        width_multipliers: tuple[float, float],
        num_classes: int = 1000,
        groupwise_layers: frozenset[int] = frozenset(),
        groups: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        a, b = width_multipliers
        widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        in_channels = min(64, int(64 * a))
        self.stem = RepVGGBlock(3, in_channels, stride=2, deploy=deploy)

        layer_index = 0  # 1-based over the blocks after the stem, as the paper's groupwise map
        stages = []
        for width, num_blocks in zip(widths, blocks_per_stage, strict=True):
            blocks = []
            for block_index in range(num_blocks):
                layer_index += 1
                block_groups = groups if layer_index in groupwise_layers else 1
                stride = 2 if block_index == 0 else 1
                blocks.append(RepVGGBlock(in_channels, width, stride, block_groups, deploy))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)


@register_model(
    "repvgg_a0",
    input_shape=(1, 3, 224, 224),
    description="RepVGG-A0, a=0.75 b=2.5 (Ding et al. 2021, RepVGG: VGG-style ConvNets Great)",
    supports_deploy=True,
    reparameterized=True,
)
def repvgg_a0(*, deploy: bool = False, num_classes: int = 1000) -> RepVGG:
    """RepVGG-A0 (Ding et al. 2021): 8,309,384 parameters deployed (paper: 8.30M)."""
    return RepVGG((2, 4, 14, 1), (0.75, 2.5), num_classes, deploy=deploy)


@register_model(
    "repvgg_a1",
    input_shape=(1, 3, 224, 224),
    description="RepVGG-A1, a=1 b=2.5 (Ding et al. 2021, RepVGG: VGG-style ConvNets Great)",
    supports_deploy=True,
    reparameterized=True,
)
def repvgg_a1(*, deploy: bool = False, num_classes: int = 1000) -> RepVGG:
    """RepVGG-A1 (Ding et al. 2021): 12,789,864 parameters deployed (paper: 12.79M)."""
    return RepVGG((2, 4, 14, 1), (1.0, 2.5), num_classes, deploy=deploy)


@register_model(
    "repvgg_b0",
    input_shape=(1, 3, 224, 224),
    description="RepVGG-B0, a=1 b=2.5 (Ding et al. 2021, RepVGG: VGG-style ConvNets Great)",
    supports_deploy=True,
    reparameterized=True,
)
def repvgg_b0(*, deploy: bool = False, num_classes: int = 1000) -> RepVGG:
    """RepVGG-B0 (Ding et al. 2021): 14,339,048 parameters deployed (paper: 14.33M)."""
    return RepVGG((4, 6, 16, 1), (1.0, 2.5), num_classes, deploy=deploy)


@register_model(
    "repvgg_b1g4",
    input_shape=(1, 3, 224, 224),
    description="RepVGG-B1g4, a=2 b=4, groups 4 on blocks 2,4..26 (Ding et al. 2021, RepVGG)",
    supports_deploy=True,
    reparameterized=True,
)
def repvgg_b1g4(*, deploy: bool = False, num_classes: int = 1000) -> RepVGG:
    """RepVGG-B1g4 (Ding et al. 2021): 36,125,416 parameters deployed (paper: 36.12M)."""
    return RepVGG(
        (4, 6, 16, 1),
        (2.0, 4.0),
        num_classes,
        groupwise_layers=PAPER_GROUPWISE_LAYERS,
        groups=4,
        deploy=deploy,
    )


@register_model(
    "repvgg_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny RepVGG [1, 2, 2, 1], a=0.5 b=1, groups 4 in stage 2 (Ding et al. 2021)",
    supports_deploy=True,
    reparameterized=True,
)
def repvgg_tiny(*, deploy: bool = False, num_classes: int = 10) -> RepVGG:
    """A seven-block RepVGG for 32x32 inputs. Both blocks of the second stage (blocks 2 and 3
    after the stem: one strided, one with an identity branch) have ``groups=4``."""
    return RepVGG(
        (1, 2, 2, 1),
        (0.5, 1.0),
        num_classes,
        groupwise_layers=frozenset({2, 3}),
        groups=4,
        deploy=deploy,
    )
