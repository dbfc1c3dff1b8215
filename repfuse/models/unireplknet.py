"""The dilated reparam block of UniRepLKNet (Ding et al. 2024, "UniRepLKNet: A Universal
Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, Time-Series and Image
Recognition"), train and deploy form.

Train form: a depthwise 13x13 conv-BN plus parallel depthwise *dilated* small-kernel conv-BNs,
summed (Ding et al. 2024, Sec. 3.2, Fig. 2). For K = 13 the paper's branches are kernel sizes
``(5, 7, 3, 3, 3)`` with dilations ``(1, 2, 3, 4, 5)``: a k x k kernel of dilation r is a sparse
kernel of size ``r (k - 1) + 1``, i.e. 5, 13, 7, 9, 11, all within 13x13. Each branch has
padding ``r (k - 1) / 2`` so that every output is centred like the 13x13 one. A BatchNorm
follows the sum, as the depthwise conv of a UniRepLKNet block is followed by its norm.

Deploy form (``deploy=True``): one 13x13 depthwise conv with bias (each dilated kernel expanded
with zeros between its taps, padded centred to 13x13, all summed, and the BatchNorm folded).
"""

from __future__ import annotations

from torch import Tensor, nn

from repfuse.models.layers import ConvBN, deploy_conv, init_branch_convs
from repfuse.models.registry import register_model

# (kernel size, dilation) of the dilated branches for each large kernel size (Ding et al. 2024).
DILATED_BRANCHES = {
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
}


class DilatedReparamConv(nn.Module):
    """UniRepLKNet's dilated reparam block (Ding et al. 2024, Fig. 2) and the BatchNorm after it:
    ``norm(origin(x) + sum_i dilated[i](x))``, every conv depthwise.

    Args:
        channels: Channels (every conv is depthwise).
        kernel_size: The large kernel K; :data:`DILATED_BRANCHES` gives its dilated branches.
    """

    def __init__(self, channels: int, kernel_size: int = 13) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f"no dilated branches are defined for kernel size {kernel_size}; "
                f"known: {sorted(DILATED_BRANCHES)}"
            )
        self.origin = ConvBN(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.dilated = nn.ModuleList(
            ConvBN(
                channels,
                channels,
                size,
                padding=dilation * (size - 1) // 2,
                dilation=dilation,
                groups=channels,
            )
            for size, dilation in DILATED_BRANCHES[kernel_size]
        )
        self.norm = nn.BatchNorm2d(channels)
        convs = [self.origin.conv] + [branch.conv for branch in self.dilated]
        init_branch_convs(*convs, gain=1.0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin(x)
        for branch in self.dilated:
            out = out + branch(x)
        return self.norm(out)


class UniRepLKMixer(nn.Module):
    """The spatial mixer of a UniRepLKNet block: ``dwconv``, a :class:`DilatedReparamConv` in
    train form, one depthwise ``kernel_size`` conv with bias in deploy form."""

    def __init__(self, channels: int, kernel_size: int = 13, deploy: bool = False) -> None:
        super().__init__()
        if deploy:
            padding = kernel_size // 2
            self.dwconv: nn.Module = deploy_conv(
                channels, channels, kernel_size, padding=padding, groups=channels
            )
        else:
            self.dwconv = DilatedReparamConv(channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x)


@register_model(
    "unireplknet_block",
    input_shape=(1, 32, 32, 32),
    description="UniRepLKNet dilated reparam block, 13x13 + 5 dilated (Ding et al. 2024)",
    supports_deploy=True,
    reparameterized=True,
)
def unireplknet_block(*, deploy: bool = False, channels: int = 32) -> UniRepLKMixer:
    """A 13x13 dilated reparam block with its BatchNorm on 32 channels."""
    return UniRepLKMixer(channels, 13, deploy)
