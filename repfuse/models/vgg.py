"""VGG with BatchNorm (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition"; BatchNorm after each conv per Ioffe & Szegedy 2015), train and
deploy form.

Each conv layer is a named unit ``Sequential(conv=Conv2d, bn=BatchNorm2d, relu=ReLU)``; like
torchvision's ``vgg*_bn`` the conv keeps its bias although a BatchNorm follows, so folding has a
conv bias to carry through (``b' = beta + (b - mu) * gamma / sqrt(var + eps)``).

The deploy form (``deploy=True``) is the network after folding: the units are
``Sequential(conv=Conv2d, relu=ReLU)`` and a ``Linear -> BatchNorm1d`` pair becomes one
``Linear`` with bias. Naming the children (rather than numbering them inside a flat
``Sequential``) keeps every module path of the train form, minus the BatchNorms, in the deploy
form, so a fused train-form state dict loads directly. Dropout stays; it is the identity in eval.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from repfuse.models.registry import register_model

# A VGG configuration: output channels of a 3x3 conv unit, or "M" for a 2x2 max pool.
VGGConfig = tuple[int | str, ...]

VGG11_CONFIG: VGGConfig = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG_TINY_CONFIG: VGGConfig = (16, "M", 32, "M", 64, 64, "M")


def conv_unit(in_channels: int, out_channels: int, deploy: bool) -> nn.Sequential:
    """A 3x3 conv (with bias), BatchNorm (train form only) and ReLU, as named children."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    if not deploy:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    # Not in place: a forward hook on the conv or BatchNorm must see its own output.
    layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


def make_features(config: VGGConfig, deploy: bool, in_channels: int = 3) -> nn.Sequential:
    """The convolutional trunk described by ``config`` (Simonyan & Zisserman 2015, Table 1)."""
    layers: list[nn.Module] = []
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif isinstance(entry, int):
            layers.append(conv_unit(in_channels, entry, deploy))
            in_channels = entry
        else:
            raise ValueError(f"a VGG config entry is a channel count or 'M', got {entry!r}")
    return nn.Sequential(*layers)


def imagenet_classifier(num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """The three fully connected layers of Simonyan & Zisserman 2015 on a 512x7x7 input."""
    return nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


def tiny_classifier(
    in_features: int, num_classes: int, deploy: bool, dropout: float = 0.5
) -> nn.Sequential:
    """``fc1 -> bn1 -> relu -> dropout -> fc2``; in deploy form ``fc1`` (with bias) replaces
    ``fc1 -> bn1``. The train-form ``fc1`` has no bias: the BatchNorm's shift subsumes it
    (Ioffe & Szegedy 2015, Sec. 3.2), so the fold must create one."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["fc1"] = nn.Linear(in_features, in_features, bias=deploy)
    if not deploy:
        layers["bn1"] = nn.BatchNorm1d(in_features)
    layers["relu"] = nn.ReLU()
    layers["dropout"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(layers)


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2015): ``features``, adaptive average pool, flatten,
    ``classifier``.

    Args:
        features: The convolutional trunk, e.g. from :func:`make_features`.
        pool_size: Output side of the adaptive average pool (7 for ImageNet VGG).
        classifier: The fully connected head, taking ``channels * pool_size**2`` features.
    """

    def __init__(self, features: nn.Sequential, pool_size: int, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = classifier
        # He et al. 2015 ("Delving Deep into Rectifiers") with fan_out, as torchvision; unlike
        # torchvision, conv biases keep PyTorch's nonzero default so that folding must use them.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.classifier(x)


@register_model(
    "vgg11_bn",
    input_shape=(1, 3, 224, 224),
    description="VGG-11 with BatchNorm (Simonyan & Zisserman 2015, Very Deep Conv Networks)",
    supports_deploy=True,
)
def vgg11_bn(*, deploy: bool = False, num_classes: int = 1000) -> VGG:
    """VGG-11 ("configuration A") with BatchNorm: 132,868,840 parameters with 1000 classes."""
    return VGG(make_features(VGG11_CONFIG, deploy), 7, imagenet_classifier(num_classes))


@register_model(
    "vgg_tiny",
    input_shape=(1, 3, 32, 32),
    description="Tiny VGG with BatchNorm and a Linear-BatchNorm1d head (Simonyan & Zisserman 2015)",
    supports_deploy=True,
)
def vgg_tiny(*, deploy: bool = False, num_classes: int = 10) -> VGG:
    """A four-conv VGG for 32x32 inputs whose head has ``Linear -> BatchNorm1d``, so folding a
    BatchNorm into a linear layer is exercised too."""
    features = make_features(VGG_TINY_CONFIG, deploy)
    return VGG(features, 1, tiny_classifier(64, num_classes, deploy))
