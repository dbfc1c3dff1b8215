"""The external corpus: third-party models as their libraries build them, named, never changed.

Each :class:`Spec` names a model the way its library's factory takes it (``timm.create_model``,
``torchvision.models.get_model``, ultralytics' ``YOLO``/``RTDETR`` on a yaml), with random
weights (nothing is downloaded) and the input size it runs at. The checks in
``test_corpus.py`` are generic: nothing here or there names a model class.

Input sizes are the smallest the model's own code accepts at reasonable cost (64x64 for most;
inception needs 96, the detectors their stride multiples), so the whole tier fits in CI.

:data:`KEEPS_BATCHNORM` is the expectation table: how many BatchNorm calls a model legitimately
keeps after fusion, and why (no exact fold exists). It is meant to stay short and honest: an
entry says which structure prevents the fold, and the count is checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    """One corpus model: ``library`` builds ``name`` with ``kwargs`` and runs it on a
    ``1 x 3 x size x size`` input."""

    library: str  # "timm", "torchvision" or "ultralytics"
    name: str  # the factory's model name (ultralytics: its yaml)
    size: int = 64
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    factory: str = ""  # ultralytics: the class its package exports for this yaml (default YOLO)

    @property
    def id(self) -> str:
        return f"{self.library}/{self.name}"


def _timm(name: str, size: int = 64, **kwargs: object) -> Spec:
    return Spec("timm", name, size, kwargs)


def _tv(name: str, size: int = 64, **kwargs: object) -> Spec:
    return Spec("torchvision", name, size, kwargs)


def _yolo(cfg: str, size: int = 64, factory: str = "YOLO") -> Spec:
    return Spec("ultralytics", cfg, size, {}, factory)


# timm: every family with BatchNorm or reparameterizable blocks (deploy form:
# timm.utils.reparameterize_model).
TIMM = [
    # byobnet: RepVGG blocks (3x3 + 1x1 + identity BN), SE in d2se
    _timm("repvgg_a0"),
    _timm("repvgg_b1g4"),
    _timm("repvgg_d2se"),
    _timm("gernet_s"),
    _timm("resnext26ts"),
    # MobileOne (over-parameterized k branches), FastViT (RepMixer, RepCPE, MobileOne stem)
    _timm("mobileone_s0"),
    _timm("mobileone_s1"),
    _timm("fastvit_t8"),
    # RepGhost, GhostNet v1/v2/v3 (v3 has reparameterizable branches)
    _timm("repghostnet_050"),
    _timm("ghostnet_050"),
    _timm("ghostnetv3_050"),
    # RepViT, EfficientViT (MIT and MSRA), LeViT (BN after Linear), SHViT
    _timm("repvit_m0_9"),
    _timm("efficientvit_b0"),
    _timm("efficientvit_m0", img_size=64),
    _timm("levit_128", img_size=64),
    _timm("shvit_s1"),
    # RegNet, MobileNet v3/v4, EfficientNet (same padding in tf_), MixNet, LCNet, HGNet v2
    _timm("regnetx_002"),
    _timm("regnety_002"),
    _timm("mobilenetv3_small_050"),
    _timm("mobilenetv4_conv_small_035"),
    _timm("efficientnet_b0"),
    _timm("tf_efficientnet_b0"),
    _timm("mixnet_s"),
    _timm("lcnet_050"),
    _timm("hgnetv2_b0"),
    # ResNet / ResNeXt / SE / ResNeSt / SK, DLA, Res2Net
    _timm("resnet18d"),
    _timm("seresnext26d_32x4d"),
    _timm("resnest14d"),
    _timm("skresnet18"),
    _timm("dla46_c"),
    # Inception, VGG, DenseNet, CSPNet, VoVNet, RexNet, MobileViT, StarNet
    _timm("inception_v3", 96),
    _timm("vgg11_bn"),
    _timm("densenet121"),
    _timm("cs3darknet_focus_s"),
    _timm("ese_vovnet19b_dw"),
    _timm("rexnet_100"),
    _timm("mobilevit_xxs"),
    _timm("starnet_s1"),
]

# torchvision classification models with BatchNorm (deploy form: torch.fx's conv-BN fuse).
TORCHVISION = [
    _tv("resnet18"),
    _tv("resnext50_32x4d"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small"),
    _tv("efficientnet_b0"),
    _tv("shufflenet_v2_x0_5"),
    _tv("googlenet", init_weights=True),
    _tv("inception_v3", 96, init_weights=True),
    _tv("densenet121"),
    _tv("mnasnet0_5"),
    _tv("regnet_y_400mf"),
    _tv("vgg11_bn"),
]

# Detection and segmentation: ultralytics from their yaml (deploy form: ultralytics' own
# fuse()), torchvision's detectors and segmenters (no deploy form of their own).
DETECTION = [
    _yolo("yolov8n.yaml"),
    _yolo("yolov8n-seg.yaml"),
    _yolo("yolov8n-pose.yaml"),
    _yolo("yolov9t.yaml"),
    _yolo("yolov10n.yaml"),
    _yolo("yolo11n.yaml"),
    _yolo("yolo11n-seg.yaml"),
    _yolo("yolo11n-obb.yaml"),
    _yolo("yolo11n-cls.yaml"),
    _yolo("yolo26n.yaml"),
    _yolo("rtdetr-l.yaml", factory="RTDETR"),
    # every box kept (score threshold 0): random weights score no box above the default
    _tv("fasterrcnn_mobilenet_v3_large_320_fpn", 128, weights_backbone=None, min_size=128,
        max_size=128, box_score_thresh=0.0),
    _tv("deeplabv3_mobilenet_v3_large", 128, weights_backbone=None),
    _tv("lraspp_mobilenet_v3_large", 128, weights_backbone=None),
    _tv("fcn_resnet50", 128, weights_backbone=None),
]

CORPUS: list[Spec] = TIMM + TORCHVISION + DETECTION

# model id -> (BatchNorm calls that stay, why no exact fold exists). Checked exactly: a model
# that keeps fewer than its entry says fails too, so the table cannot go stale.
_DENSENET = (
    62, "pre-activation BN (58 norm1, 3 transitions, norm5) of a concatenation whose parts "
        "feed later layers too (no producer to fold into), followed by a ReLU (no consumer)")
KEEPS_BATCHNORM: dict[str, tuple[int, str]] = {
    "timm/densenet121": _DENSENET,
    "torchvision/densenet121": _DENSENET,
}
