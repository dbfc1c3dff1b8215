"""RepViT (Wang et al. 2024, "RepViT: Revisiting Mobile CNN From ViT Perspective"), a small train
and deploy form.

Train form (Wang et al. 2024, Fig. 3):

- stem: 3x3/2 conv-BN, GELU, 3x3/2 conv-BN;
- a RepViT block is ``t = token_mixer(x)`` then ``t + channel_mixer(t)``. Where the stride is 1
  the token mixer is :class:`RepViTTokenMixer`, ``bn(dw3x3_bn(x) + dw1x1(x) + x)``: a 3x3
  depthwise conv-BN, a 1x1 depthwise conv *with bias and no BN*, and the identity, summed, then
  a BatchNorm after the sum. Where the stride is 2 the token mixer is a 3x3/2 depthwise conv-BN
  then a 1x1 conv-BN changing the width. The channel mixer is 1x1 conv-BN (2x), GELU, 1x1
  conv-BN. The paper's optional squeeze-and-excitation layers are left out: they are not
  affine and nothing folds through them;
- head: global average pool, then ``BatchNorm1d -> Linear`` (the BN *before* the linear layer).

Deploy form (``deploy=True``): the stride-1 token mixer is one 3x3 depthwise conv with bias,
every conv-BN one conv with bias, and the head one ``nn.Linear`` with the BatchNorm folded into
its input side (exact: a linear layer has no padding). Paths follow the unit convention of
:mod:`repfuse.models.layers`.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from repfuse.models.layers import ConvBN, conv_bn, deploy_conv, init_branch_convs
from repfuse.models.registry import register_model


class RepViTTokenMixer(nn.Module):
    """RepViT's stride-1 token mixer (Wang et al. 2024, Sec. 3.1, "RepVGGDW"):
    ``norm(spatial(x) + pointwise(x) + x)`` with ``spatial`` a 3x3 depthwise conv-BN,
    ``pointwise`` a 1x1 depthwise conv with bias, ``norm`` a BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = ConvBN(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        self.norm = nn.BatchNorm2d(channels)
        init_branch_convs(self.spatial.conv, self.pointwise, gain=0.25)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.spatial(x) + self.pointwise(x) + x)


class RepViTBlock(nn.Module):
    """A RepViT block (Wang et al. 2024, Fig. 3): ``t = token_mixer(x); t + channel_mixer(t)``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels; must equal ``in_channels`` where ``stride == 1``.
        stride: 1 (:class:`RepViTTokenMixer`) or 2 (depthwise 3x3/2 conv-BN, 1x1 conv-BN).
        deploy: Build the deploy form.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        if stride == 1:
            if in_channels != out_channels:
                raise ValueError("a stride-1 RepViT block keeps its width")
            if deploy:
                self.token_mixer: nn.Module = deploy_conv(
                    in_channels, in_channels, 3, padding=1, groups=in_channels
                )
            else:
                self.token_mixer = RepViTTokenMixer(in_channels)
        else:
            self.token_mixer = nn.Sequential(
                OrderedDict(
                    spatial=conv_bn(
                        in_channels, in_channels, 3, stride, groups=in_channels, deploy=deploy
                    ),
                    pointwise=conv_bn(in_channels, out_channels, 1, deploy=deploy),
                )
            )
        hidden = 2 * out_channels
        self.channel_mixer = nn.Sequential(
            OrderedDict(
                expand=conv_bn(out_channels, hidden, 1, deploy=deploy),
                act=nn.GELU(),
                project=conv_bn(hidden, out_channels, 1, deploy=deploy),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


class RepViT(nn.Module):
    """A small RepViT (Wang et al. 2024): ``stem``, ``blocks``, global average pool and the
    ``classifier`` (``BatchNorm1d -> Linear``; one ``Linear`` in deploy form).

    Args:
        widths: Width of each block; the stem outputs ``widths[0]``, and a block that changes
            the width has stride 2.
        num_classes: Outputs of the classifier.
        deploy: Build the deploy form.
    """

    def __init__(
        self, widths: tuple[int, ...], num_classes: int = 10, deploy: bool = False
    ) -> None:
        super().__init__()
        first = widths[0]
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=conv_bn(3, first // 2, 3, 2, deploy=deploy),
                act=nn.GELU(),
                conv2=conv_bn(first // 2, first, 3, 2, deploy=deploy),
            )
        )
        blocks = []
        in_channels = first
        for width in widths:
            stride = 1 if width == in_channels else 2
            blocks.append(RepViTBlock(in_channels, width, stride, deploy))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if deploy:
            self.classifier: nn.Module = nn.Linear(in_channels, num_classes)
        else:
            self.classifier = nn.Sequential(
                OrderedDict(
                    norm=nn.BatchNorm1d(in_channels),
                    linear=nn.Linear(in_channels, num_classes),
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        x = self.avgpool(x).flatten(1)
        return self.classifier(x)


@register_model(
    "repvit_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny RepViT, blocks 16-16-32-32, BN1d-Linear head (Wang et al. 2024, RepViT)",
    supports_deploy=True,
    reparameterized=True,
)
def repvit_tiny(*, deploy: bool = False, num_classes: int = 10) -> RepViT:
    """Four RepViT blocks for 32x32 inputs: two at 16 channels (8x8), a stride-2 block to 32
    channels (4x4) and one more at 32."""
    return RepViT((16, 16, 32, 32), num_classes, deploy)
