"""Example models for repfuse, in train form and (where written by hand) deploy form.

Importing this package registers every model: ResNet-18/50 and a tiny ResNet (He et al. 2016),
VGG-11 with BatchNorm and a tiny VGG (Simonyan & Zisserman 2015), and the structurally
reparameterized models, whose deploy form merges parallel branches into one conv: RepVGG
(Ding et al. 2021), ACNet (Ding et al. 2019) and DBB (Ding et al. 2021) ResNet-18s, MobileOne
(Vasu et al. 2023), a RepLKNet stage (Ding et al. 2022), UniRepLKNet's dilated reparam block
(Ding et al. 2024), RepViT (Wang et al. 2024) and a YOLO RepConv neck (Wang et al. 2023).
For Deep Rebirth's streamline and branch merging (Li et al. 2018): GoogLeNet (Szegedy et al.
2015) and Inception v3 (Szegedy et al. 2016) with BatchNorm as torchvision builds them, and a
VGG whose stages end in conv -> average pool. Attention and dynamic nets, whose BatchNorms fold
around dynamic parts: SE-ResNet (Hu et al. 2018), CBAM (Woo et al. 2018), SKNet (Li et al.
2019), a non-local block (Wang et al. 2018), a Residual Attention Network module (Wang et al.
2017), a spatial transformer (Jaderberg et al. 2015), dynamic convolution (Chen et al. 2020) and
a transformer on conv-stem tokens (Vaswani et al. 2017). BranchyNet (Teerapittayanon et al.
2016), whose early exit is a Python branch on values, is traceable only in parts. Sparse train
forms, with the exact zeros that network slimming and head pruning leave (``slim_*``,
``*_pruned_heads_tiny``, ``resnet_tiny_dead_addend``), exercise exact pruning.
Build one with :func:`create_model`; list them with :func:`list_models`.
"""

from repfuse.models import (
    acnet,
    attention,
    branchy,
    dbb,
    googlenet,
    inception,
    mobileone,
    pooled,
    replknet,
    repvgg,
    repvit,
    resnet,
    sparse,
    unireplknet,
    vgg,
    yolo_repconv,
)
from repfuse.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    load_fused_state_dict,
    randomize_bn_stats,
    register_model,
)

__all__ = [
    "ModelSpec",
    "acnet",
    "attention",
    "branchy",
    "create_model",
    "dbb",
    "get_spec",
    "googlenet",
    "inception",
    "list_models",
    "load_fused_state_dict",
    "mobileone",
    "pooled",
    "randomize_bn_stats",
    "register_model",
    "replknet",
    "repvgg",
    "repvit",
    "resnet",
    "sparse",
    "unireplknet",
    "vgg",
    "yolo_repconv",
]

