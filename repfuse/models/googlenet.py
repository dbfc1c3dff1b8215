"""GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions"), Inception v1 with BatchNorm
as torchvision builds it, train and deploy form.

Every conv layer is a :class:`BasicConv2d`: ``relu(bn(conv(x)))`` with a bias-free conv and a
BatchNorm of ``eps = 0.001`` (Ioffe & Szegedy 2015). An :class:`Inception` module concatenates
four branches read from one input: a 1x1 conv; a 1x1 reduction then a 3x3 conv; a 1x1
reduction then another 3x3 conv (the paper has a 5x5 there; torchvision builds a 3x3, a known
deviation of its port, pytorch/vision#906, kept so that the architecture and the parameter
count are torchvision's); and a 3x3 max pool (stride 1, ``ceil_mode=True``) then a 1x1 conv.
So three 1x1 convs of each module read its input: the convs that Deep Rebirth's branch merging
(Li et al. 2018, "Deep Rebirth: Accelerating Deep Neural Network Execution on Mobile Devices")
runs as one.

Module paths and state-dict keys are torchvision's ``googlenet(aux_logits=False)``. The
auxiliary classifiers are left out: they only run in training. The ReLU is a non-in-place
``nn.ReLU`` child (torchvision calls ``F.relu(inplace=True)``; a forward hook on a BatchNorm
must see its own output), which holds no state.

The deploy form (``deploy=True``) is the network after every BatchNorm has been folded into its
conv: the same paths minus the BatchNorms, each conv with a bias, so a fused train-form state
dict loads with :func:`repfuse.models.load_fused_state_dict`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repfuse.models.layers import KernelSize, he_init_convs
from repfuse.models.registry import register_model

# (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of each Inception module of
# Szegedy et al. 2015, Table 1; "M" marks a max pool. The input width of each module is the sum
# of the previous module's outputs.
INCEPTION_CONFIG: tuple[tuple[str, tuple[int, int, int, int, int, int]] | str, ...] = (
    ("inception3a", (64, 96, 128, 16, 32, 32)),
    ("inception3b", (128, 128, 192, 32, 96, 64)),
    "maxpool3",
    ("inception4a", (192, 96, 208, 16, 48, 64)),
    ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)),
    ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    "maxpool4",
    ("inception5a", (256, 160, 320, 32, 128, 128)),
    ("inception5b", (384, 192, 384, 48, 128, 128)),
)

# ImageNet's per-channel (std, mean), RGB.
IMAGENET_STD_MEAN = ((0.229, 0.485), (0.224, 0.456), (0.225, 0.406))


def to_tensorflow_input_range(x: Tensor) -> Tensor:
    """torchvision's ``transform_input`` for weights ported from TensorFlow: an input normalized
    with ImageNet's mean and std becomes ``x * std / 0.5 + (mean - 0.5) / 0.5`` per channel,
    i.e. the pixel scaled to ``[-1, 1]``."""
    channels = [
        x[:, index : index + 1] * (std / 0.5) + (mean - 0.5) / 0.5
        for index, (std, mean) in enumerate(IMAGENET_STD_MEAN)
    ]
    return torch.cat(channels, 1)


class BasicConv2d(nn.Module):
    """``relu(bn(conv(x)))``: a bias-free conv, BatchNorm (``eps = 0.001``) and ReLU, the conv
    layer of torchvision's GoogLeNet and Inception v3. In deploy form ``relu(conv(x))`` with a
    conv bias and no BatchNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: KernelSize,
        stride: int = 1,
        padding: KernelSize = 0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=deploy
        )
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if not self.deploy:
            x = self.bn(x)
        return self.relu(x)


class Inception(nn.Module):
    """An Inception module (Szegedy et al. 2015, Fig. 2b), torchvision's variant: four branches
    on one input, concatenated along channels in the order 1x1, 3x3, "5x5" (a 3x3 here), pool.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1, deploy=deploy)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, 1, deploy=deploy),
            BasicConv2d(ch3x3red, ch3x3, 3, padding=1, deploy=deploy),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, 1, deploy=deploy),
            BasicConv2d(ch5x5red, ch5x5, 3, padding=1, deploy=deploy),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, 1, deploy=deploy),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015, Table 1) with BatchNorm, as torchvision builds it.

    Stem ``conv1`` 7x7/2, 3x3/2 max pool, ``conv2`` 1x1, ``conv3`` 3x3, 3x3/2 max pool (all max
    pools with ``ceil_mode=True``), nine Inception modules with max pools after 3b (3x3/2) and
    4e (2x2/2), global average pool, dropout 0.2 and ``fc``.

    Args:
        num_classes: Outputs of ``fc``.
        transform_input: Map an ImageNet-normalized input to the ``[-1, 1]`` range of the
            ported TensorFlow weights first, as torchvision's ``transform_input`` does.
        deploy: Build the deploy form: convs with bias, no BatchNorm.
        width_divisor: Divide every channel count by this (1: the paper's widths), for small
            test models.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        transform_input: bool = False,
        deploy: bool = False,
        width_divisor: int = 1,
    ) -> None:
        super().__init__()
        self.transform_input = transform_input

        def width(channels: int) -> int:
            return max(1, channels // width_divisor)

        self.conv1 = BasicConv2d(3, width(64), 7, stride=2, padding=3, deploy=deploy)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(width(64), width(64), 1, deploy=deploy)
        self.conv3 = BasicConv2d(width(64), width(192), 3, padding=1, deploy=deploy)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.stage_names: list[str] = []
        in_channels = width(192)
        for entry in INCEPTION_CONFIG:
            if isinstance(entry, str):
                kernel_size = 2 if entry == "maxpool4" else 3
                self.add_module(entry, nn.MaxPool2d(kernel_size, stride=2, ceil_mode=True))
                self.stage_names.append(entry)
                continue
            name, channels = entry
            module = Inception(in_channels, *(width(c) for c in channels), deploy=deploy)
            self.add_module(name, module)
            self.stage_names.append(name)
            in_channels = module.out_channels

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(in_channels, num_classes)

        # He init, not torchvision's truncated N(0, 0.01): that would shrink the activations by
        # ~10x per layer until the logits no longer depend on the input.
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x = to_tensorflow_input_range(x)
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.maxpool2(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        x = self.dropout(x)
        return self.fc(x)


@register_model(
    "googlenet",
    input_shape=(1, 3, 224, 224),
    description="GoogLeNet (Inception v1) with BN as in torchvision (Szegedy et al. 2015)",
    supports_deploy=True,
)
def googlenet(
    *, deploy: bool = False, num_classes: int = 1000, transform_input: bool = False
) -> GoogLeNet:
    """GoogLeNet as torchvision's ``googlenet(aux_logits=False)``: 6,624,904 parameters with
    1000 classes."""
    return GoogLeNet(num_classes, transform_input=transform_input, deploy=deploy)


@register_model(
    "googlenet_tiny",
    input_shape=(1, 3, 64, 64),
    description="Tiny GoogLeNet, nine Inception modules at 1/8 width (Szegedy et al. 2015)",
    supports_deploy=True,
)
def googlenet_tiny(
    *, deploy: bool = False, num_classes: int = 10, transform_input: bool = False
) -> GoogLeNet:
    """GoogLeNet's full topology with every width divided by 8, for 64x64 inputs."""
    return GoogLeNet(
        num_classes, transform_input=transform_input, deploy=deploy, width_divisor=8
    )
