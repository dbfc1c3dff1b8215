"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), train and deploy form.

The train form is the torchvision architecture ("v1.5": a bottleneck's stride sits on its 3x3
conv, not its first 1x1): every conv has ``bias=False`` and is followed by a BatchNorm, and a
projection shortcut is ``downsample = Sequential(conv1x1, BatchNorm)``.

The deploy form (``deploy=True``) is the network after every BatchNorm has been folded into the
conv before it: each conv has a bias and no BatchNorm follows. Module paths are those of the
train form minus the BatchNorm modules, so ``downsample`` stays a ``Sequential`` holding its one
conv (key ``downsample.0.weight``), and a fused train-form state dict loads directly.

An optional stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth") drops
each block's residual branch per sample during training, with the paper's linear decay rule.
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.registry import register_model


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (Huang et al. 2016, "Deep Networks with Stochastic
    Depth"), applied per sample.

    In training, each sample's branch is zeroed with probability ``p`` and otherwise scaled by
    ``1 / (1 - p)``, so its expectation is unchanged; in eval it is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_probability = 1.0 - self.p
        # One Bernoulli draw per sample, broadcast over every other dimension.
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_probability)
        return x * mask / keep_probability

    def extra_repr(self) -> str:
        return f"p={self.p}"


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 3x3 convolution with padding 1."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)


def _shortcut(in_channels: int, out_channels: int, stride: int, deploy: bool) -> nn.Sequential:
    """The projection shortcut: conv1x1 + BatchNorm, or in deploy form the conv alone (with bias)
    at the same index, so its key stays ``downsample.0.weight``."""
    if deploy:
        return nn.Sequential(conv1x1(in_channels, out_channels, stride, bias=True))
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (He et al. 2016, Fig. 2), as in ResNet-18/34.

    ``relu(drop_path(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``; in deploy form the
    BatchNorms are absent and the convs carry a bias.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Sequential | None = None,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv1 = conv3x3(in_channels, planes, stride, bias=deploy)
        if not deploy:
            self.bn1 = nn.BatchNorm2d(planes)
        # Not in place (unlike torchvision): a forward hook on a conv or BatchNorm must see its
        # own output, not that output rectified afterwards.
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, bias=deploy)
        if not deploy:
            self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)

        out = self.conv1(x)
        if not self.deploy:
            out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        if not self.deploy:
            out = self.bn2(out)

        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    """A 1x1 / 3x3 / 1x1 conv-BN bottleneck and a shortcut (He et al. 2016, Fig. 5), as in
    ResNet-50/101/152, with the stride on the 3x3 conv (torchvision's "v1.5").

    The last 1x1 conv expands to ``planes * 4`` channels; in deploy form the BatchNorms are
    absent and the convs carry a bias.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Sequential | None = None,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes, bias=deploy)
        if not deploy:
            self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, bias=deploy)
        if not deploy:
            self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels, bias=deploy)
        if not deploy:
            self.bn3 = nn.BatchNorm2d(out_channels)
        # Not in place: see BasicBlock.
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)

        out = self.conv1(x)
        if not self.deploy:
            out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        if not self.deploy:
            out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        if not self.deploy:
            out = self.bn3(out)

        return self.relu(self.drop_path(out) + identity)


class ResNet(nn.Module):
    """ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1).

    Stem ``conv1`` 7x7/2 + ``bn1`` + ReLU + 3x3/2 max pool, four stages ``layer1..layer4`` of
    ``blocks_per_stage`` blocks (the first block of stages 2-4 has stride 2), global average
    pool and ``fc``. Stage ``i`` has ``widths[i]`` planes; the stem has ``widths[0]`` channels.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: Number of blocks in each of the four stages.
        num_classes: Outputs of ``fc``.
        widths: Planes of the four stages (torchvision: 64, 128, 256, 512).
        deploy: Build the deploy form: convs with bias, no BatchNorm.
        drop_path_rate: Drop probability of the last block; block ``l`` of ``L`` drops with
            probability ``drop_path_rate * l / L`` (Huang et al. 2016, linear decay rule).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int = 1000,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        deploy: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        stem_channels = widths[0]
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=deploy)
        if not deploy:
            self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        total_blocks = sum(blocks_per_stage)
        block_number = 0  # 1-based over the whole network, for the linear decay rule
        in_channels = stem_channels
        stages = []
        stage_shapes = zip(widths, blocks_per_stage, strict=True)
        for stage_index, (planes, num_blocks) in enumerate(stage_shapes):
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                block_stride = stride if block_index == 0 else 1
                out_channels = planes * block.expansion
                downsample = None
                if block_stride != 1 or in_channels != out_channels:
                    downsample = _shortcut(in_channels, out_channels, block_stride, deploy)
                block_number += 1
                blocks.append(
                    block(
                        in_channels,
                        planes,
                        stride=block_stride,
                        downsample=downsample,
                        deploy=deploy,
                        drop_path_rate=drop_path_rate * block_number / total_blocks,
                    )
                )
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

        # torchvision's initialization: He et al. 2015 ("Delving Deep into Rectifiers") with
        # fan_out for convs; conv biases (deploy form only) and the fc keep PyTorch's defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.deploy:
            x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


@register_model(
    "resnet18",
    input_shape=(1, 3, 224, 224),
    description="ResNet-18, BasicBlock [2, 2, 2, 2] (He et al. 2016, Deep Residual Learning)",
    supports_deploy=True,
)
def resnet18(
    *, deploy: bool = False, drop_path_rate: float = 0.0, num_classes: int = 1000
) -> ResNet:
    """ResNet-18 (He et al. 2016, Table 1): 11,689,512 parameters with 1000 classes."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), num_classes, deploy=deploy, drop_path_rate=drop_path_rate
    )


@register_model(
    "resnet50",
    input_shape=(1, 3, 224, 224),
    description="ResNet-50 v1.5, Bottleneck [3, 4, 6, 3] (He et al. 2016, Deep Residual Learning)",
    supports_deploy=True,
)
def resnet50(
    *, deploy: bool = False, drop_path_rate: float = 0.0, num_classes: int = 1000
) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2016, Table 1): 25,557,032 parameters with 1000 classes."""
    return ResNet(
        Bottleneck, (3, 4, 6, 3), num_classes, deploy=deploy, drop_path_rate=drop_path_rate
    )


@register_model(
    "resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny ResNet, BasicBlock [1, 1, 1, 1], widths 8-64 (He et al. 2016) for tests",
    supports_deploy=True,
)
def resnet_tiny(
    *, deploy: bool = False, drop_path_rate: float = 0.0, num_classes: int = 10
) -> ResNet:
    """A four-block ResNet with widths 8, 16, 32, 64 for 32x32 inputs, small enough for tests."""
    return ResNet(
        BasicBlock,
        (1, 1, 1, 1),
        num_classes,
        widths=(8, 16, 32, 64),
        deploy=deploy,
        drop_path_rate=drop_path_rate,
    )


@register_model(
    "resnet_tiny_droppath",
    input_shape=(1, 3, 32, 32),
    description="resnet_tiny with stochastic depth 0.1 (Huang et al. 2016, Stochastic Depth)",
    supports_deploy=True,
)
def resnet_tiny_droppath(
    *, deploy: bool = False, drop_path_rate: float = 0.1, num_classes: int = 10
) -> ResNet:
    """``resnet_tiny`` with drop path (Huang et al. 2016); the identity in eval mode."""
    return resnet_tiny(deploy=deploy, drop_path_rate=drop_path_rate, num_classes=num_classes)
