"""BranchyNet (Teerapittayanon, McDanel & Kung 2016, "BranchyNet: Fast Inference via Early
Exiting from Deep Neural Networks"): a trunk with a side branch that classifies early.

At inference a batch leaves at the side branch when the branch is confident: when the entropy
of its softmax (the paper's criterion) is below ``threshold`` for every sample. That decision
is a Python ``if`` on tensor *values*, so the model cannot be traced as a whole: repfuse fuses
its parts (stem, trunk stages, both exits) and keeps the forward as eager Python (partial
capture). The trunk is made of ResNet basic blocks (He et al. 2016).

The deploy form (``deploy=True``) is the network after folding every BatchNorm into the conv
before it: same module paths minus the BatchNorms, a bias on each of those convs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from repfuse.models.registry import register_model
from repfuse.models.resnet import BasicBlock, _shortcut, conv3x3


def conv_unit(in_channels: int, out_channels: int, deploy: bool) -> nn.Sequential:
    """3x3 conv, BatchNorm (train form only), ReLU, as named children."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = conv3x3(in_channels, out_channels, bias=deploy)
    if not deploy:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


class ExitHead(nn.Module):
    """A side branch: conv unit, global average pool, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, deploy: bool = False) -> None:
        super().__init__()
        self.unit = conv_unit(in_channels, in_channels, deploy)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.unit(x)), 1))


def entropy(logits: Tensor) -> Tensor:
    """The entropy of ``softmax(logits)`` per sample, in nats."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


class BranchyNet(nn.Module):
    """A stem, a first stage, an early exit, a second stage and the final head.

    ``forward`` returns the early exit's logits when every sample's entropy there is below
    ``threshold``, else the final head's logits (one code path per batch, as in the paper's
    batch-of-one evaluation).
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10,
                 threshold: float = 0.5, deploy: bool = False) -> None:
        super().__init__()
        first, second, third = widths
        self.threshold = threshold
        self.stem = conv_unit(3, first, deploy)
        self.stage1 = BasicBlock(first, first, deploy=deploy)
        self.exit1 = ExitHead(first, num_classes, deploy)
        self.stage2 = nn.Sequential(
            BasicBlock(first, second, 2, _shortcut(first, second, 2, deploy), deploy=deploy),
            BasicBlock(second, third, 2, _shortcut(second, third, 2, deploy), deploy=deploy),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(third, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage1(self.stem(x))
        early = self.exit1(x)
        if bool((entropy(early) < self.threshold).all()):
            return early
        return self.head(self.stage2(x))


@register_model(
    "branchynet_tiny",
    input_shape=(1, 3, 32, 32),
    description="BranchyNet with an entropy early exit (Teerapittayanon et al. 2016): "
                "traceable only in parts",
    supports_deploy=True,
)
def branchynet_tiny(*, deploy: bool = False, threshold: float = 0.5,
                    num_classes: int = 10) -> BranchyNet:
    """A three-stage BranchyNet for 32x32 inputs, widths 16-64, small enough for tests."""
    return BranchyNet((16, 32, 64), num_classes, threshold, deploy)
