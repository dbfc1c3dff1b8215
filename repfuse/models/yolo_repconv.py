"""A small YOLO neck of RepConv blocks (YOLOv6: Li et al. 2022, "YOLOv6: A Single-Stage Object
Detection Framework for Industrial Applications"; YOLOv7: Wang et al. 2023, "YOLOv7: Trainable
bag-of-freebies sets new state-of-the-art for real-time object detectors"), train and deploy
form.

RepConv is the RepVGG block (:class:`repfuse.models.repvgg.RepVGGBlock`): 3x3 conv-BN + 1x1
conv-BN (+ a BatchNorm identity where input and output channels agree and the stride is 1),
summed, then the activation; here SiLU, as YOLOv7's RepConv (YOLOv6 uses ReLU).

The model is a mini PAN (Liu et al. 2018, "Path Aggregation Network for Instance Segmentation")
on two scales, with a stub backbone so that it takes one image:

- backbone: RepConv blocks down to ``c3`` (stride 8, 32 channels) and ``c4`` (stride 16, 64);
- top-down: ``r4 = reduce(c4)`` (1x1 conv-BN-SiLU to 32 channels), nearest 2x upsample,
  concatenate with ``c3``, two RepConvs -> ``p3``;
- bottom-up: a stride-2 RepConv on ``p3``, concatenate with ``r4``, two RepConvs -> ``p4``;
- output: ``p3`` and ``p4`` flattened and concatenated into one ``(N, features)`` tensor.

Deploy form (``deploy=True``): every RepConv one 3x3 conv with bias, ``reduce`` one 1x1 conv
with bias; paths follow the unit convention of :mod:`repfuse.models.layers`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repfuse.models.layers import conv_bn, unit_with_activation
from repfuse.models.registry import register_model
from repfuse.models.repvgg import RepVGGBlock


def rep_conv(
    in_channels: int, out_channels: int, stride: int = 1, deploy: bool = False
) -> RepVGGBlock:
    """YOLOv7's RepConv: a RepVGG block with SiLU."""
    return RepVGGBlock(in_channels, out_channels, stride, deploy=deploy, activation=nn.SiLU)


class RepConvNeck(nn.Module):
    """A two-scale PAN of RepConv blocks with a stub backbone (see the module docstring).

    Args:
        widths: Channels ``(c1, c2, c3, c4)`` of the four backbone strides 2, 4, 8, 16; the
            neck works at ``c3`` channels on both scales.
        deploy: Build the deploy form.
    """

    def __init__(
        self, widths: tuple[int, int, int, int] = (16, 32, 32, 64), deploy: bool = False
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.stem = rep_conv(3, c1, 2, deploy)
        self.dark2 = rep_conv(c1, c2, 2, deploy)
        self.dark3 = nn.Sequential(rep_conv(c2, c3, 2, deploy), rep_conv(c3, c3, 1, deploy))
        self.dark4 = nn.Sequential(rep_conv(c3, c4, 2, deploy), rep_conv(c4, c4, 1, deploy))

        self.reduce = unit_with_activation(conv_bn(c4, c3, 1, deploy=deploy), nn.SiLU())
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down = nn.Sequential(rep_conv(2 * c3, c3, 1, deploy), rep_conv(c3, c3, 1, deploy))
        self.downsample = rep_conv(c3, c3, 2, deploy)
        self.bottom_up = nn.Sequential(
            rep_conv(2 * c3, 2 * c3, 1, deploy), rep_conv(2 * c3, 2 * c3, 1, deploy)
        )

    def forward(self, x: Tensor) -> Tensor:
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        r4 = self.reduce(c4)
        p3 = self.top_down(torch.cat([self.upsample(r4), c3], dim=1))
        p4 = self.bottom_up(torch.cat([self.downsample(p3), r4], dim=1))
        return torch.cat([p3.flatten(1), p4.flatten(1)], dim=1)


@register_model(
    "yolo_repconv_neck",
    input_shape=(1, 3, 64, 64),
    description="Mini two-scale PAN of YOLOv7 RepConv blocks, SiLU (Wang et al. 2023, YOLOv7)",
    supports_deploy=True,
    reparameterized=True,
)
def yolo_repconv_neck(*, deploy: bool = False) -> RepConvNeck:
    """A 64x64-input RepConv neck: eleven RepConvs and one 1x1 reduce conv."""
    return RepConvNeck(deploy=deploy)
