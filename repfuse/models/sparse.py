"""Train forms with the zeros that sparsity training leaves, for exact pruning (``prune_dead``).

Each model is an ordinary architecture of the zoo; its ``sparsify`` step (run by
:func:`repfuse.models.create_model` after the random BatchNorm statistics) writes the exact
zeros that the training method named in its docstring produces. Which channels and heads are
zero is drawn from the model's seed.

- :func:`slim_vgg_tiny`: network slimming (Liu et al. 2017, "Learning Efficient Convolutional
  Networks through Network Slimming") on a VGG: half of the channels of every BatchNorm have
  ``γ = 0`` and ``β ≠ 0``, so they output the constant ``relu(β)``, not zero.
- :func:`slim_resnet_tiny`: network slimming on a bottleneck ResNet: half of the channels inside
  each bottleneck (``bn1``, ``bn2``) are dead, and a few channels of every stage's residual
  stream are dead in *both* addends (the block's ``bn3`` and its shortcut's BatchNorm).
- :func:`resnet_tiny_dead_addend`: a ResNet whose residual branches have dead channels
  (``bn2.γ = 0``) that are live in the shortcut: none of them may be removed.
- :func:`vit_pruned_heads_tiny`: a transformer with pruned heads in the explicit q/k/v-Linear
  form, and dead MLP channels.
- :func:`mha_pruned_heads_tiny`: the same with ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from repfuse.models.attention import ConvStemTransformer, TransformerBlock
from repfuse.models.registry import register_model
from repfuse.models.resnet import Bottleneck, ResNet, resnet_tiny
from repfuse.models.vgg import VGG, make_features, tiny_classifier

SLIM_VGG_CONFIG = (32, "M", 64, "M", 128, 128, "M")
DEAD_FRACTION = 0.5  # network slimming prunes 50-70% of a CIFAR VGG's channels (Liu et al.)


def _choose(generator: torch.Generator, count: int, fraction: float) -> Tensor:
    """``round(fraction · count)`` distinct indices in ``[0, count)``, at least one."""
    chosen = max(1, round(fraction * count))
    return torch.randperm(count, generator=generator)[:chosen].sort().values


def kill_channels(bn: nn.modules.batchnorm._BatchNorm, channels: Tensor,
                  generator: torch.Generator) -> None:
    """Set ``γ = 0`` on ``channels`` of ``bn``, with a shift ``β ~ N(0, 0.5²)``: what an L1
    penalty on γ with proximal (soft-threshold) updates leaves; β is not penalized, so the
    channel outputs the constant β."""
    with torch.no_grad():
        bn.weight[channels] = 0
        shift = torch.randn(len(channels), generator=generator) * 0.5
        bn.bias[channels] = shift.to(bn.bias)


def _batchnorms(modules: Iterable[tuple[str, nn.Module]]):
    return [(path, m) for path, m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- network slimming --------------------------------------------------------------------------


def _slim_every_batchnorm(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1000)
    for _, bn in _batchnorms(model.named_modules()):
        kill_channels(bn, _choose(generator, bn.num_features, DEAD_FRACTION), generator)


@register_model(
    "slim_vgg_tiny",
    input_shape=(1, 3, 32, 32),
    description="VGG after network slimming: half of every BN's gamma is 0 (Liu et al. 2017)",
    sparsify=_slim_every_batchnorm,
)
def slim_vgg_tiny(*, num_classes: int = 10) -> VGG:
    """A four-conv VGG (widths 32, 64, 128, 128) with a ``Linear -> BatchNorm1d`` head, trained
    with network slimming (Liu et al. 2017): an L1 penalty on every BatchNorm's γ. Proximal
    updates leave γ exactly 0 on the pruned half of the channels; β is not penalized, so those
    channels output ``relu(β)``: a constant that is zero only where ``β ≤ 0``. Before a zero-padded
    3x3 conv only those can go exactly; before the global pool and the head, all of them."""
    features = make_features(SLIM_VGG_CONFIG, deploy=False)
    return VGG(features, 1, tiny_classifier(128, num_classes, deploy=False))


def _slim_resnet(model: nn.Module, seed: int) -> None:
    """Half of ``bn1``/``bn2`` in every bottleneck; and per stage, an eighth of the residual
    channels in both the block's ``bn3`` and its shortcut's BatchNorm."""
    generator = torch.Generator().manual_seed(seed + 2000)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            for bn in (block.bn1, block.bn2):
                kill_channels(bn, _choose(generator, bn.num_features, DEAD_FRACTION), generator)
        last = stage[-1]
        stream = _choose(generator, last.bn3.num_features, 1 / 8)
        for block in stage:
            kill_channels(block.bn3, stream, generator)
            if block.downsample is not None:
                kill_channels(block.downsample[1], stream, generator)


@register_model(
    "slim_resnet_tiny",
    input_shape=(1, 3, 32, 32),
    description="Bottleneck ResNet after network slimming, dead channels in blocks and streams",
    sparsify=_slim_resnet,
)
def slim_resnet_tiny(*, num_classes: int = 10) -> ResNet:
    """A bottleneck ResNet (He et al. 2016; torchvision v1.5), one block per stage, planes 16,
    32, 64, 128, after network slimming (Liu et al. 2017 prune inside the bottlenecks). Inside
    a bottleneck, a dead ``bn2`` channel feeds a 1x1 conv and always goes; a dead ``bn1``
    channel feeds the padded 3x3 and goes only where ``relu(β) = 0``. The residual channels
    that a group-lasso penalty zeroes in every addend of a stage (Wen et al. 2016, "Learning
    Structured Sparsity in Deep Neural Networks") go too: the next stage reads them through
    1x1 convs, the head through the global pool."""
    return ResNet(Bottleneck, (1, 1, 1, 1), num_classes, widths=(16, 32, 64, 128))


def _dead_in_branch(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 3000)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            kill_channels(block.bn2, _choose(generator, block.bn2.num_features, 0.25),
                          generator)


@register_model(
    "resnet_tiny_dead_addend",
    input_shape=(1, 3, 32, 32),
    description="resnet_tiny with channels dead in the residual branch only (must all stay)",
    sparsify=_dead_in_branch,
)
def resnet_tiny_dead_addend(*, num_classes: int = 10) -> ResNet:
    """``resnet_tiny`` after slimming of the residual branches only: a quarter of every block's
    ``bn2`` has ``γ = 0``. Those channels are constant in the branch but the shortcut carries
    them live, so the sum varies: exact pruning must keep every one of them (pruning tools that
    remove a channel by its branch's γ change the function here)."""
    return resnet_tiny(num_classes=num_classes)


# --- pruned attention heads ----------------------------------------------------------------------


def _zero_heads(attention: nn.Module, generator: torch.Generator,
                value_rows: Tensor | None = None, value_bias: bool = False,
                output_columns: Tensor | None = None) -> None:
    """Zero the value filter of heads ``value_rows`` (and their value bias if ``value_bias``)
    and the output-projection columns of heads ``output_columns``, in the explicit form
    (``q``, ``k``, ``v``, ``proj``) or ``nn.MultiheadAttention``."""
    with torch.no_grad():
        if isinstance(attention, nn.MultiheadAttention):
            dim = attention.embed_dim
            v_weight = attention.in_proj_weight[2 * dim:]
            v_bias = attention.in_proj_bias[2 * dim:]
            out_weight = attention.out_proj.weight
        else:
            v_weight, v_bias = attention.v.weight, attention.v.bias
            out_weight = attention.proj.weight
        head_dim = out_weight.shape[1] // attention.num_heads
        for head in (value_rows if value_rows is not None else []):
            rows = slice(int(head) * head_dim, (int(head) + 1) * head_dim)
            v_weight[rows] = 0
            if value_bias:
                v_bias[rows] = 0
            else:  # a value bias that stays makes the head's output a constant
                v_bias[rows] = torch.randn(head_dim, generator=generator).to(v_bias) * 0.5
        for head in (output_columns if output_columns is not None else []):
            out_weight[:, int(head) * head_dim:(int(head) + 1) * head_dim] = 0


def _prune_transformer(model: nn.Module, seed: int) -> None:
    """Block 0: one head's value filter zero, its bias not (a constant head); block 1: one
    head's output columns zero and another head gated off entirely. A quarter of every MLP's
    hidden channels dead (zero ``fc1`` rows; ``gelu(b)`` is a constant)."""
    generator = torch.Generator().manual_seed(seed + 4000)
    blocks = list(model.blocks)
    order = torch.randperm(blocks[0].attn.num_heads, generator=generator)
    _zero_heads(blocks[0].attn, generator, value_rows=order[:1])
    if len(blocks) > 1:
        _zero_heads(blocks[1].attn, generator, value_rows=order[1:2], value_bias=True,
                    output_columns=order[2:3])
    for block in blocks:
        fc1 = block.mlp[0]
        rows = _choose(generator, fc1.out_features, 0.25)
        with torch.no_grad():
            fc1.weight[rows] = 0


@register_model(
    "vit_pruned_heads_tiny",
    input_shape=(1, 3, 32, 32),
    description="Transformer with pruned heads (q/k/v Linears) and dead MLP channels",
    sparsify=_prune_transformer,
)
def vit_pruned_heads_tiny(*, num_classes: int = 10) -> ConvStemTransformer:
    """``vit_convstem_tiny`` (width 32, 4 heads, 2 blocks) after head pruning: Voita et al. 2019
    ("Analyzing Multi-Head Self-Attention") gate heads with L0 penalties, and a closed gate
    folded into the value projection zeroes the head's value filter and bias; a group-lasso
    penalty on the value weights alone (Michel et al. 2019 prune by importance; structured
    sparsity by Wen et al. 2016) leaves the bias, so the head outputs that bias for every token;
    one on the output projection zeroes the head's columns there. The MLPs' hidden channels
    get the same group lasso: dead rows of ``fc1`` output ``gelu(b)``."""
    return ConvStemTransformer(num_classes=num_classes)


class MultiheadBlock(TransformerBlock):
    """:class:`~repfuse.models.attention.TransformerBlock` with ``nn.MultiheadAttention``
    (batch first) as its attention, called without returning the attention weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__(dim, num_heads, mlp_ratio)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MultiheadTransformer(ConvStemTransformer):
    """:class:`~repfuse.models.attention.ConvStemTransformer` whose blocks use
    ``nn.MultiheadAttention``."""

    def __init__(self, dim: int = 32, num_heads: int = 4, depth: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__(dim=dim, depth=depth, num_heads=num_heads, num_classes=num_classes)
        self.blocks = nn.Sequential(*(MultiheadBlock(dim, num_heads) for _ in range(depth)))


@register_model(
    "mha_pruned_heads_tiny",
    input_shape=(1, 3, 32, 32),
    description="Transformer with pruned heads in nn.MultiheadAttention, dead MLP channels",
    sparsify=_prune_transformer,
)
def mha_pruned_heads_tiny(*, num_classes: int = 10) -> MultiheadTransformer:
    """:func:`vit_pruned_heads_tiny` with ``nn.MultiheadAttention`` in place of the explicit
    projections: the same heads pruned the same way."""
    return MultiheadTransformer(num_classes=num_classes)
