"""Inception v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision"), with BatchNorm as torchvision builds it, train and deploy form.

Every conv layer is a :class:`~repfuse.models.googlenet.BasicConv2d` (bias-free conv, BatchNorm
with ``eps = 0.001``, ReLU). The modules concatenate parallel branches read from one input:

- :class:`InceptionA` (35x35, paper Fig. 5): 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; 3x3 average
  pool (stride 1, padding 1, ``count_include_pad=True``) -> 1x1.
- :class:`InceptionB` (35 -> 17, Fig. 10): 3x3/2; 1x1 -> 3x3 -> 3x3/2; 3x3/2 max pool.
- :class:`InceptionC` (17x17, Fig. 6): 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7;
  average pool -> 1x1. The n x n convs are factorized into 1 x n and n x 1.
- :class:`InceptionD` (17 -> 8): 1x1 -> 3x3/2; 1x1 -> 1x7 -> 7x1 -> 3x3/2; 3x3/2 max pool.
- :class:`InceptionE` (8x8, Fig. 7): 1x1; 1x1 -> [1x3, 3x1]; 1x1 -> 3x3 -> [1x3, 3x1];
  average pool -> 1x1, where ``[a, b]`` are two convs on one tensor, concatenated.

Several 1x1 convs of a module read its input, and InceptionE's 1x3 and 3x1 pairs read one
tensor each: candidates for branch merging (Li et al. 2018, Deep Rebirth), the pairs after
zero-padding both kernels to 3x3. Each average pool feeds a 1x1 conv directly.

Module paths and state-dict keys are torchvision's ``inception_v3(aux_logits=False)``; the
pools are ``nn.AvgPool2d`` / ``nn.MaxPool2d`` children (torchvision calls ``F.avg_pool2d`` /
``F.max_pool2d``), which hold no state. The auxiliary classifier only runs in training and is
left out. The deploy form (``deploy=True``) has the same paths minus the BatchNorms and a bias on
every conv, so a fused train-form state dict loads with
:func:`repfuse.models.load_fused_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from repfuse.models.googlenet import BasicConv2d, to_tensorflow_input_range
from repfuse.models.layers import he_init_convs
from repfuse.models.registry import register_model

Width = Callable[[int], int]


def _average_pool() -> nn.AvgPool2d:
    """The 3x3, stride 1, padding 1 average pool of the A, C and E modules; like
    ``F.avg_pool2d``'s default it counts the zero padding (``count_include_pad=True``)."""
    return nn.AvgPool2d(kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """The 35x35 module (Szegedy et al. 2016, Fig. 5; torchvision's 5x5 branch kept):
    ``64 + 64 + 96 + pool_features`` output channels at full width."""

    def __init__(self, in_channels: int, pool_features: int, width: Width, deploy: bool) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, width(64), 1, deploy=deploy)
        self.branch5x5_1 = BasicConv2d(in_channels, width(48), 1, deploy=deploy)
        self.branch5x5_2 = BasicConv2d(width(48), width(64), 5, padding=2, deploy=deploy)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, width(64), 1, deploy=deploy)
        self.branch3x3dbl_2 = BasicConv2d(width(64), width(96), 3, padding=1, deploy=deploy)
        self.branch3x3dbl_3 = BasicConv2d(width(96), width(96), 3, padding=1, deploy=deploy)
        self.avgpool = _average_pool()
        self.branch_pool = BasicConv2d(in_channels, width(pool_features), 1, deploy=deploy)
        self.out_channels = 2 * width(64) + width(96) + width(pool_features)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(self.avgpool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """The 35 -> 17 grid reduction (Szegedy et al. 2016, Fig. 10): a strided 3x3, a strided
    double 3x3 and a strided max pool, concatenated."""

    def __init__(self, in_channels: int, width: Width, deploy: bool) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, width(384), 3, stride=2, deploy=deploy)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, width(64), 1, deploy=deploy)
        self.branch3x3dbl_2 = BasicConv2d(width(64), width(96), 3, padding=1, deploy=deploy)
        self.branch3x3dbl_3 = BasicConv2d(width(96), width(96), 3, stride=2, deploy=deploy)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.out_channels = width(384) + width(96) + in_channels

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.maxpool(x)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """The 17x17 module with 7x7 convs factorized into 1x7 and 7x1 (Szegedy et al. 2016,
    Fig. 6): ``4 * 192`` output channels at full width."""

    def __init__(self, in_channels: int, channels_7x7: int, width: Width, deploy: bool) -> None:
        super().__init__()
        c7, c192 = width(channels_7x7), width(192)

        def conv(cin: int, cout: int, kernel: tuple[int, int]) -> BasicConv2d:
            padding = (kernel[0] // 2, kernel[1] // 2)
            return BasicConv2d(cin, cout, kernel, padding=padding, deploy=deploy)

        self.branch1x1 = BasicConv2d(in_channels, c192, 1, deploy=deploy)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, deploy=deploy)
        self.branch7x7_2 = conv(c7, c7, (1, 7))
        self.branch7x7_3 = conv(c7, c192, (7, 1))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, deploy=deploy)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1))
        self.branch7x7dbl_5 = conv(c7, c192, (1, 7))
        self.avgpool = _average_pool()
        self.branch_pool = BasicConv2d(in_channels, c192, 1, deploy=deploy)
        self.out_channels = 4 * c192

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(self.avgpool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """The 17 -> 8 grid reduction: 1x1 -> 3x3/2; 1x1 -> 1x7 -> 7x1 -> 3x3/2; 3x3/2 max pool."""

    def __init__(self, in_channels: int, width: Width, deploy: bool) -> None:
        super().__init__()
        c192 = width(192)
        self.branch3x3_1 = BasicConv2d(in_channels, c192, 1, deploy=deploy)
        self.branch3x3_2 = BasicConv2d(c192, width(320), 3, stride=2, deploy=deploy)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c192, 1, deploy=deploy)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, (1, 7), padding=(0, 3), deploy=deploy)
        self.branch7x7x3_3 = BasicConv2d(c192, c192, (7, 1), padding=(3, 0), deploy=deploy)
        self.branch7x7x3_4 = BasicConv2d(c192, c192, 3, stride=2, deploy=deploy)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.out_channels = width(320) + c192 + in_channels

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = self.maxpool(x)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """The 8x8 module with expanded filter banks (Szegedy et al. 2016, Fig. 7): a 1x3 and a 3x1
    conv on one tensor, concatenated, in two branches; ``320 + 768 + 768 + 192 = 2048`` output
    channels at full width."""

    def __init__(self, in_channels: int, width: Width, deploy: bool) -> None:
        super().__init__()
        c384 = width(384)
        self.branch1x1 = BasicConv2d(in_channels, width(320), 1, deploy=deploy)
        self.branch3x3_1 = BasicConv2d(in_channels, c384, 1, deploy=deploy)
        self.branch3x3_2a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1), deploy=deploy)
        self.branch3x3_2b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0), deploy=deploy)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, width(448), 1, deploy=deploy)
        self.branch3x3dbl_2 = BasicConv2d(width(448), c384, 3, padding=1, deploy=deploy)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1), deploy=deploy)
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0), deploy=deploy)
        self.avgpool = _average_pool()
        self.branch_pool = BasicConv2d(in_channels, width(192), 1, deploy=deploy)
        self.out_channels = width(320) + 4 * c384 + width(192)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        branch_pool = self.branch_pool(self.avgpool(x))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class Inception3(nn.Module):
    """Inception v3 (Szegedy et al. 2016, Table 1) with BatchNorm, as torchvision builds it.

    Stem: ``Conv2d_1a_3x3`` (3x3/2), ``Conv2d_2a_3x3`` (3x3), ``Conv2d_2b_3x3`` (3x3, padding
    1), 3x3/2 max pool, ``Conv2d_3b_1x1``, ``Conv2d_4a_3x3`` (3x3), 3x3/2 max pool; then the
    ``Mixed_5*`` A modules, ``Mixed_6a`` (B), the ``Mixed_6*`` C modules, ``Mixed_7a`` (D), the
    ``Mixed_7*`` E modules; global average pool, dropout 0.5 and ``fc``. 299x299 inputs give
    35x35, 17x17 and 8x8 grids; the smallest input is 75x75.

    Args:
        num_classes: Outputs of ``fc``.
        transform_input: Map an ImageNet-normalized input to ``[-1, 1]`` first (torchvision's
            ``transform_input``).
        deploy: Build the deploy form: convs with bias, no BatchNorm.
        width_divisor: Divide every channel count by this (1: the paper's widths).
        pool_features: ``pool_features`` of each A module (torchvision: 32, 64, 64).
        channels_7x7: ``channels_7x7`` of each C module (torchvision: 128, 160, 160, 192).
        num_e_modules: How many E modules (torchvision: 2).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        transform_input: bool = False,
        deploy: bool = False,
        width_divisor: int = 1,
        pool_features: Sequence[int] = (32, 64, 64),
        channels_7x7: Sequence[int] = (128, 160, 160, 192),
        num_e_modules: int = 2,
    ) -> None:
        super().__init__()
        self.transform_input = transform_input

        def width(channels: int) -> int:
            return max(1, channels // width_divisor)

        self.Conv2d_1a_3x3 = BasicConv2d(3, width(32), 3, stride=2, deploy=deploy)
        self.Conv2d_2a_3x3 = BasicConv2d(width(32), width(32), 3, deploy=deploy)
        self.Conv2d_2b_3x3 = BasicConv2d(width(32), width(64), 3, padding=1, deploy=deploy)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(width(64), width(80), 1, deploy=deploy)
        self.Conv2d_4a_3x3 = BasicConv2d(width(80), width(192), 3, deploy=deploy)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)

        # torchvision's names: Mixed_5b, 5c, 5d (A), 6a (B), 6b..6e (C), 7a (D), 7b, 7c (E).
        self.module_names: list[str] = []
        channels = width(192)

        def add(name: str, module: nn.Module) -> None:
            nonlocal channels
            self.add_module(name, module)
            self.module_names.append(name)
            channels = module.out_channels

        for index, features in enumerate(pool_features):
            add(f"Mixed_5{'bcdefgh'[index]}", InceptionA(channels, features, width, deploy))
        add("Mixed_6a", InceptionB(channels, width, deploy))
        for index, c7 in enumerate(channels_7x7):
            add(f"Mixed_6{'bcdefgh'[index]}", InceptionC(channels, c7, width, deploy))
        add("Mixed_7a", InceptionD(channels, width, deploy))
        for index in range(num_e_modules):
            add(f"Mixed_7{'bcdefgh'[index]}", InceptionE(channels, width, deploy))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, num_classes)

        he_init_convs(self)  # rather than torchvision's truncated N(0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x = to_tensorflow_input_range(x)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = self.maxpool1(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        for name in self.module_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = self.dropout(x)
        x = x.flatten(1)
        return self.fc(x)


@register_model(
    "inception_v3",
    input_shape=(1, 3, 299, 299),
    description="Inception v3 with BN, torchvision's (Szegedy et al. 2016, Rethinking Inception)",
    supports_deploy=True,
)
def inception_v3(
    *, deploy: bool = False, num_classes: int = 1000, transform_input: bool = False
) -> Inception3:
    """Inception v3 as torchvision's ``inception_v3(aux_logits=False)``: 23,834,568 parameters
    with 1000 classes (torchvision's 27,161,264 with the auxiliary classifier, whose
    ``InceptionAux(768, 1000)`` holds 3,326,696)."""
    return Inception3(num_classes, transform_input=transform_input, deploy=deploy)


@register_model(
    "inception_v3_tiny",
    input_shape=(1, 3, 75, 75),
    description="Tiny Inception v3, one module of each kind A-E at 1/8 width (Szegedy et al. 2016)",
    supports_deploy=True,
)
def inception_v3_tiny(
    *, deploy: bool = False, num_classes: int = 10, transform_input: bool = False
) -> Inception3:
    """Inception v3's stem and one A, B, C, D and E module each, every width divided by 8, for
    the smallest input the architecture takes, 75x75."""
    return Inception3(
        num_classes,
        transform_input=transform_input,
        deploy=deploy,
        width_divisor=8,
        pool_features=(32,),
        channels_7x7=(128,),
        num_e_modules=1,
    )
