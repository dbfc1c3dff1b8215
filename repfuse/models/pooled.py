"""A VGG-style network whose stages end in conv -> average pool, train, deploy and streamlined
deploy form: the test bed of Deep Rebirth's streamline merging (Li et al. 2018, "Deep Rebirth:
Accelerating Deep Neural Network Execution on Mobile Devices").

Each stage is VGG's stack of 3x3 conv units (Simonyan & Zisserman 2015, "Very Deep
Convolutional Networks for Large-Scale Image Recognition"), conv-BN-ReLU, except that its last
conv-BN feeds a 2x2, stride 2 average pool directly and the ReLU comes after the pool (average
rather than max pooling as in Gatys et al. 2016, "Image Style Transfer Using Convolutional
Neural Networks"). The head is a global average pool, flatten and one linear layer (Lin et al.
2014, "Network in Network").

Nothing non-linear lies between a stage's last conv and its pool, so the two compose into one
conv (Deep Rebirth's streamline merging): a k x k conv with stride 1 and padding p, then a
P x P average pool with stride P and no padding, is one ``(k + P - 1)`` square conv with stride
P and padding p, whose kernel is the conv's kernel summed over the P x P window shifts, divided
by ``P**2``. Here conv3x3/p1 -> avgpool2/s2 is conv4x4/s2/p1: 16 taps at a quarter of the
positions, 4 MACs per input pixel and channel pair where the 3x3 conv spent 9.

Forms:

- train form: conv units ``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d[, relu=ReLU])``;
- deploy form (``deploy=True``): the same paths minus the BatchNorms, each conv with a bias;
  a train-form state dict with its BatchNorms folded loads with
  :func:`repfuse.models.load_fused_state_dict`;
- streamlined deploy form (``deploy=True, streamlined=True``): also each stage's last conv and
  its pool are one conv4x4/s2/p1 at the path of that conv, and the pool is gone; a fused model
  loads into it with :func:`repfuse.export.deploy.load_by_structure`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from repfuse.models.layers import he_init_convs
from repfuse.models.registry import register_model

# Output channels of the 3x3 conv units of each stage; every stage ends in a 2x2 average pool.
# VGG-11 (Simonyan & Zisserman 2015, configuration A) with its max pools made average pools.
VGG_AVGPOOL_STAGES: tuple[tuple[int, ...], ...] = (
    (64,), (128,), (256, 256), (512, 512), (512, 512)
)
VGG_AVGPOOL_TINY_STAGES: tuple[tuple[int, ...], ...] = ((8, 8), (16, 16), (32, 32))

POOL = 2  # side and stride of each stage's average pool


def conv_unit(
    in_channels: int,
    out_channels: int,
    *,
    activation: bool,
    deploy: bool,
    streamlined: bool = False,
) -> nn.Sequential:
    """A 3x3/p1 conv, BatchNorm (train form) and ReLU (if ``activation``) as named children.

    With ``streamlined`` (deploy form only) the conv is the 4x4/s2/p1 conv that this unit's
    conv3x3/p1 and the stage's 2x2/s2 average pool compose into.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if streamlined:
        layers["conv"] = nn.Conv2d(in_channels, out_channels, 3 + POOL - 1, POOL, padding=1)
    else:
        layers["conv"] = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=deploy)
    if not deploy:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    if activation:
        # Not in place: a forward hook on the conv or BatchNorm must see its own output.
        layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


def make_stage(
    in_channels: int, widths: Sequence[int], *, deploy: bool, streamlined: bool
) -> nn.Sequential:
    """``conv1 .. convN`` units (conv-BN-ReLU, the last conv-BN only), ``pool`` (2x2/s2 average,
    absent when streamlined) and ``relu``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, channels in enumerate(widths, start=1):
        last = index == len(widths)
        layers[f"conv{index}"] = conv_unit(
            in_channels,
            channels,
            activation=not last,
            deploy=deploy,
            streamlined=streamlined and last,
        )
        in_channels = channels
    if not streamlined:
        layers["pool"] = nn.AvgPool2d(kernel_size=POOL, stride=POOL)
    layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


class PooledVGG(nn.Module):
    """VGG-style stages ending in conv -> 2x2 average pool, then global average pool, flatten
    and ``fc`` (see the module docstring).

    Args:
        stages: Output channels of the 3x3 conv units of each stage.
        num_classes: Outputs of ``fc``.
        deploy: Build the deploy form: convs with bias, no BatchNorm.
        streamlined: With ``deploy``, also compose each stage's last conv with its pool into a
            conv4x4/s2/p1 (Deep Rebirth's streamline merging).
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        num_classes: int = 1000,
        deploy: bool = False,
        streamlined: bool = False,
    ) -> None:
        super().__init__()
        if streamlined and not deploy:
            raise ValueError("streamlined=True describes a deploy form; pass deploy=True too")
        in_channels = 3
        features = []
        for widths in stages:
            features.append(
                make_stage(in_channels, widths, deploy=deploy, streamlined=streamlined)
            )
            in_channels = widths[-1]
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        he_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


@register_model(
    "vgg_avgpool",
    input_shape=(1, 3, 224, 224),
    description="VGG-11 with BN, stages ending conv->avgpool, GAP head (Simonyan & Zisserman 2015)",
    supports_deploy=True,
)
def vgg_avgpool(
    *, deploy: bool = False, streamlined: bool = False, num_classes: int = 1000
) -> PooledVGG:
    """VGG-11's convs (configuration A) with BatchNorm, 2x2 average pools after each stage's last
    conv-BN and a global-average-pool head: 9,736,232 parameters with 1000 classes."""
    return PooledVGG(VGG_AVGPOOL_STAGES, num_classes, deploy=deploy, streamlined=streamlined)


@register_model(
    "vgg_avgpool_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny VGG with BN, three stages ending conv->avgpool (Simonyan & Zisserman 2015)",
    supports_deploy=True,
)
def vgg_avgpool_tiny(
    *, deploy: bool = False, streamlined: bool = False, num_classes: int = 10
) -> PooledVGG:
    """Three stages of two conv units, widths 8, 16, 32, for 32x32 inputs."""
    return PooledVGG(VGG_AVGPOOL_TINY_STAGES, num_classes, deploy=deploy, streamlined=streamlined)
