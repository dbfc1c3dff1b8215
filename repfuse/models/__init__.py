"""Example models for repfuse, in train form and (where written by hand) deploy form.

Importing this package registers every model: ResNet-18/50 and a tiny ResNet (He et al. 2016),
VGG-11 with BatchNorm and a tiny VGG (Simonyan & Zisserman 2015). Build one with
:func:`create_model`; list them with :func:`list_models`.
"""

from repfuse.models import resnet, vgg
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
    "create_model",
    "get_spec",
    "list_models",
    "load_fused_state_dict",
    "randomize_bn_stats",
    "register_model",
    "resnet",
    "vgg",
]
