"""Every network of the QuEST paper, and the module path of its QuEST feature map (docs/method.md §2).

`ARCHS` is the one place where an architecture string becomes a model. Feature maps are read with
a forward hook on one named submodule, `model.get_submodule(feature_layer(arch))`, so each map is
the output of exactly one module, called once per forward, and no op after it is in-place.

CIFAR archs mirror RepDistiller's architectures and state-dict names: its `ckpt_epoch_240.pth`
teachers (`torch.load(path)["model"]`) load with `strict=True`. RepDistiller's spellings are
accepted as aliases (`vgg13_bn`, `ResNet50`, `mobile_half`, `ShuffleV1`, `ShuffleV2`).

Taps other than DEFAULT_LAYER:
- CIFAR vgg*: `block4` = block4 BN output *before* ReLU (the vgg13 teacher map of the paper;
  `PRE_RELU_LAYER`); DEFAULT_LAYER `relu4` is the same map after ReLU (the vgg8 student map).
- vgg9_bn (MIT-67): `features.21` = 4th max-pool (512×14×14 at 224 px), `features.28` = 5th
  max-pool (512×7×7, the default).
- tv_resnet18/34/50: `layer3` (256×14×14 for 18/34 at 224 px) for the MIT-67 two-level recipe.
- Every CIFAR ResNet also exposes `layer1`/`layer2`, WRN `block1..3` (pre-activation, before the
  final BN-ReLU), and so on: any `named_modules()` path can be hooked.
"""

import difflib
from collections.abc import Callable

from torch import nn

from . import cifar_resnet, mobilenetv2, shufflenet, torchvision_models, vgg, wrn
from .vgg import VGG9_POOL4_LAYER, VGG9_POOL5_LAYER

ARCHS: dict[str, Callable[..., nn.Module]] = {
    # CIFAR (RepDistiller)
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "resnet8": cifar_resnet.resnet8,
    "resnet14": cifar_resnet.resnet14,
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
    "resnet50": cifar_resnet.resnet50,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "mobilenetv2": mobilenetv2.mobilenetv2,
    "shufflenetv1": shufflenet.shufflenetv1,
    "shufflenetv2": shufflenet.shufflenetv2,
    # MIT-67 student (224 px)
    "vgg9_bn": vgg.vgg9_bn,
    # torchvision (ImageNet, MIT-67); any other torchvision model as "tv:<name>"
    "tv_resnet18": torchvision_models.tv_resnet18,
    "tv_resnet34": torchvision_models.tv_resnet34,
    "tv_resnet50": torchvision_models.tv_resnet50,
}

# Archs whose constructor takes `weights` (pretrained torchvision enums).
_TORCHVISION_ARCHS = {"tv_resnet18", "tv_resnet34", "tv_resnet50"}

ALIASES: dict[str, str] = {
    "vgg8_bn": "vgg8",
    "vgg11_bn": "vgg11",
    "vgg13_bn": "vgg13",
    "vgg16_bn": "vgg16",
    "vgg19_bn": "vgg19",
    "ResNet50": "resnet50",
    "mobile_half": "mobilenetv2",
    "ShuffleV1": "shufflenetv1",
    "ShuffleV2": "shufflenetv2",
    "tv:resnet18": "tv_resnet18",
    "tv:resnet34": "tv_resnet34",
    "tv:resnet50": "tv_resnet50",
}

DEFAULT_LAYER: dict[str, str] = {
    **{name: "relu" for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{
        name: "layer3"
        for name in (
            "resnet8",
            "resnet14",
            "resnet20",
            "resnet32",
            "resnet44",
            "resnet56",
            "resnet110",
            "resnet8x4",
            "resnet32x4",
        )
    },
    "resnet50": "layer4",
    **{name: vgg.VGG_POST_RELU_LAYER for name in vgg.CIFAR_VGG_CFG},
    "mobilenetv2": "conv2",
    "shufflenetv1": "layer3",
    "shufflenetv2": "relu2",
    "vgg9_bn": VGG9_POOL5_LAYER,
    "tv_resnet18": "layer4",
    "tv_resnet34": "layer4",
    "tv_resnet50": "layer4",
}

# CIFAR vgg: block4 BN output before its ReLU (the vgg13 teacher map of the paper).
PRE_RELU_LAYER: dict[str, str] = {name: vgg.VGG_PRE_RELU_LAYER for name in vgg.CIFAR_VGG_CFG}

__all__ = [
    "ALIASES",
    "ARCHS",
    "DEFAULT_LAYER",
    "PRE_RELU_LAYER",
    "VGG9_POOL4_LAYER",
    "VGG9_POOL5_LAYER",
    "build_model",
    "canonical_arch",
    "feature_layer",
]


def canonical_arch(arch: str) -> str:
    """The ARCHS key for `arch` (resolving aliases); `tv:<name>` is returned unchanged."""
    if arch in ARCHS:
        return arch
    if arch in ALIASES:
        return ALIASES[arch]
    if arch.startswith("tv:"):
        return arch
    close = difflib.get_close_matches(arch, [*ARCHS, *ALIASES], n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown arch {arch!r}.{hint} Valid archs: {sorted(ARCHS)}, their aliases "
        f"{sorted(ALIASES)}, or 'tv:<torchvision classification model name>'."
    )


def build_model(
    arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None
) -> nn.Module:
    """Build `arch` with a `num_classes`-way classifier for `in_channels`-channel inputs.

    `weights` (a torchvision enum name such as "IMAGENET1K_V1") is only for torchvision archs;
    CIFAR checkpoints are loaded by the trainer, strictly, after building.
    """
    name = canonical_arch(arch)
    if name.startswith("tv:"):
        return torchvision_models.torchvision_model(name[3:], num_classes, in_channels, weights)
    if name in _TORCHVISION_ARCHS:
        return ARCHS[name](num_classes=num_classes, in_channels=in_channels, weights=weights)
    if weights is not None:
        raise ValueError(
            f"arch {arch!r} has no pretrained weights to name (got weights={weights!r}); "
            "load its checkpoint into the built model instead"
        )
    return ARCHS[name](num_classes=num_classes, in_channels=in_channels)


def feature_layer(arch: str) -> str:
    """Module path of the QuEST feature map of `arch` (docs/method.md §2), for `model.get_submodule`."""
    name = canonical_arch(arch)
    if name not in DEFAULT_LAYER:
        raise ValueError(
            f"no default feature layer for {arch!r}; name the layer explicitly "
            "(a module path from model.named_modules())"
        )
    return DEFAULT_LAYER[name]
