"""Small models written the way a new user writes them (issue 14), for the tests of
``tests/test_new_user.py``: the CLI imports them from the working directory (``--arch
user_nets:shape_branch``), so this file is copied there; it needs only torch.

Every factory returns its model in eval mode with random BatchNorm statistics, except
``training_mode`` (a factory that forgets ``.eval()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features,
                                                      generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator)
                                         + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model


class ShapeBranch(nn.Module):
    """Branches on the input's width: plain torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] > 8:
            x = F.avg_pool2d(x, 2)
        return F.relu(self.bn(self.conv(x)))


class TwoInputs(nn.Module):
    """An image and a feature vector in, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn_fc = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, image, extra):
        features = F.relu(self.bn(self.conv(image)))
        return {"logits": features.mean((2, 3)) + self.bn_fc(self.fc(extra)),
                "features": features}


class RepBlockNet(nn.Module):
    """A RepVGG-style block written by hand (3x3-BN + 1x1-BN + BN identity), with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.k3, self.b3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.k1, self.b1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.bid = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.b3(self.k3(x)) + self.b1(self.k1(x)) + self.bid(x))
        return self.fc(self.drop(y.mean((2, 3))))


class RepBlockDeploy(nn.Module):
    """RepBlockNet's deploy form, written by hand: one 3x3 conv with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.conv(x)).mean((2, 3))))


class MetaHead(nn.Module):
    """A submodule named ``meta``: the name of a GraphModule attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.meta = nn.Linear(4, 2)

    def forward(self, x):
        return self.meta(self.bn(self.conv(x)).mean((2, 3)))


def shape_branch() -> nn.Module:
    return _randomized(ShapeBranch()).eval()


def two_inputs() -> nn.Module:
    return _randomized(TwoInputs()).eval()


def rep_block() -> nn.Module:
    return _randomized(RepBlockNet()).eval()


def rep_block_deploy() -> nn.Module:
    return RepBlockDeploy().eval()


def training_mode() -> nn.Module:
    return _randomized(RepBlockNet())  # no .eval(): BatchNorm and dropout train


def nan_weight() -> nn.Module:
    model = rep_block()
    with torch.no_grad():
        model.k3.weight[0, 0, 0, 0] = float("nan")
    return model


def negative_variance() -> nn.Module:
    model = rep_block()
    with torch.no_grad():
        model.b1.running_var[2] = -0.25
    return model


def meta_head() -> nn.Module:
    return _randomized(MetaHead()).eval()
