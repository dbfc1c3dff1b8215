"""Building blocks shared by the reparameterizable models (RepVGG, ACNet, DBB, MobileOne, ...).

Every reparameterizable model in this package follows one convention, which is what makes its
train and deploy forms comparable layer by layer:

- A *unit* is a module of the train form that computes an affine, shift-equivariant map of its
  one input: conv-BatchNorm branches, BatchNorm identities, pads and average pools, summed or
  composed, with no activation inside. :class:`ConvBN` is the simplest unit.
- In the deploy form, the module at the *same path* is one ``nn.Conv2d`` (or ``nn.Linear``) with
  a bias that computes the same map, as the paper deploys it. Activations, residual additions
  of non-linear paths, pools and heads sit outside the units and are the same in both forms.

So ``deploy.get_submodule(path)`` is the conv that ``train.get_submodule(path)`` reparameterizes
into, for every conv or linear layer ``path`` of the deploy form.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

KernelSize = int | tuple[int, int]


class ConvBN(nn.Sequential):
    """A convolution without bias followed by a BatchNorm (Ioffe & Szegedy 2015): ``bn(conv(x))``.

    The children are named ``conv`` and ``bn``. Its deploy form is :func:`deploy_conv` with the
    same arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: KernelSize,
        stride: int = 1,
        padding: KernelSize = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    bias=False,
                ),
                bn=nn.BatchNorm2d(out_channels),
            )
        )


def deploy_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: KernelSize,
    stride: int = 1,
    padding: KernelSize = 0,
    groups: int = 1,
) -> nn.Conv2d:
    """The deploy-form conv of a unit: one ``nn.Conv2d`` with a bias."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        groups=groups,
        bias=True,
    )


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    *,
    deploy: bool,
) -> nn.Module:
    """A ``kernel_size`` conv with padding ``kernel_size // 2``: :class:`ConvBN` in train form,
    :func:`deploy_conv` in deploy form."""
    padding = kernel_size // 2
    if deploy:
        return deploy_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
    return ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups)


def init_branch_convs(*convs: nn.Conv2d, gain: float) -> None:
    """Initialize the convs that end the branches of a unit so that their *sum*, not each
    branch, has gain ``gain`` (He et al. 2015, "Delving Deep into Rectifiers"): every weight is
    drawn from ``N(0, gain / (len(convs) * fan_in))``.

    Initialized like lone convs, ``n`` branches would sum to ``n`` times the variance of one,
    and a deep stack of such units grows geometrically in eval mode, where BatchNorm no longer
    renormalizes. ``gain=2`` keeps the second moment through a ReLU. A unit that also sums a
    BatchNorm identity passes its input's whole second moment on through that branch, positive
    mean included (which the next ReLU does not halve), so such units use ``gain=0.25``: with
    it, the logits of MobileOne-S0 with random BatchNorm statistics reach ~1e3 (seeds 0-2:
    0.9e3 to 2.9e3) and those of RepVGG-B1g4 ~1e2, where PyTorch's default init gives ~1e6 for
    MobileOne-S0 and ``gain=1`` ~1e5, while the outputs still depend on the input. Only the
    initial values change, not the model.
    """
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, math.sqrt(gain / (len(convs) * fan_in)))


def he_init_convs(model: nn.Module) -> None:
    """He et al. 2015 ("Delving Deep into Rectifiers") with fan_in for every ``nn.Conv2d``: with
    eval-mode BatchNorms, which do not renormalize, the activations then keep their scale."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def unit_with_activation(unit: nn.Module, activation: nn.Module) -> nn.Sequential:
    """``activation(unit(x))`` as the named children ``conv`` and ``act``."""
    return nn.Sequential(OrderedDict(conv=unit, act=activation))


class StagedClassifier(nn.Module):
    """The classifier shape RepVGG and MobileOne share: ``stem``, ``stage1``..``stage4``, a
    global average pool and ``fc``. Subclasses build those modules in ``__init__``."""

    stem: nn.Module
    stage1: nn.Module
    stage2: nn.Module
    stage3: nn.Module
    stage4: nn.Module
    avgpool: nn.Module
    fc: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))
