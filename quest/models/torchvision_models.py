"""torchvision classification models (ImageNet teacher / student, MIT-67).

`weights` is a torchvision enum member name such as "IMAGENET1K_V1", resolved with
`torchvision.models.get_model_weights(name)[weights]`; loading it downloads on first use (cached
under $TORCH_HOME). A pretrained model asked for another number of classes gets a fresh final
Linear; a model asked for `in_channels != 3` gets a fresh stem conv (the first Conv2d), so
pretrained stem weights are then dropped.

QuEST maps of the torchvision ResNets: `layer4` (512×7×7 at 224 px for ResNet-18/34, 2048×7×7 for
ResNet-50) and, for MIT-67, `layer3` (256×14×14 for ResNet-18/34).
"""

import difflib
from functools import partial

import torchvision.models as tvm
from torch import nn


def torchvision_names() -> list[str]:
    """Every classification model of torchvision (the `tv:<name>` archs)."""
    return tvm.list_models(module=tvm)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    # The classifier is the last Linear in registration order for every torchvision classifier
    # with a Linear head (resnet `fc`, vgg `classifier.6`, vit `heads.head`, ...).
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear head to resize to {num_classes}")
    path, old = linears[-1]
    _set_submodule(model, path, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    path, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    _set_submodule(model, path, new)


def torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | None = None
) -> nn.Module:
    """Build torchvision classification model `name`, optionally with pretrained `weights`."""
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown torchvision model {name!r}.{hint} Valid: {names}")
    if weights is None:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        enum = tvm.get_model_weights(name)
        valid = [w.name for w in enum]
        if weights not in valid:
            raise ValueError(f"unknown weights {weights!r} for {name}; valid: {valid}")
        model = tvm.get_model(name, weights=enum[weights])
        if num_classes != len(enum[weights].meta["categories"]):
            _replace_head(model, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


tv_resnet18 = partial(torchvision_model, "resnet18")
tv_resnet34 = partial(torchvision_model, "resnet34")
tv_resnet50 = partial(torchvision_model, "resnet50")
