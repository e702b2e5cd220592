"""VGG networks: the CIFAR VGG-BN of the CRD benchmark and the ImageNet-style VGG-9-BN of MIT-67.

CIFAR (RepDistiller `models/vgg.py`, same parameter names): five conv blocks `block0..block4`
(each `nn.Sequential` of conv-BN-ReLU triples whose last ReLU is removed, so a block ends at a BN),
max-pools `pool0..pool3`, global average pool `pool4`, Linear `classifier`. RepDistiller applies
each block's last ReLU with `F.relu` in `forward`; here it is a module `relu0..relu4` (no parameters,
so the state dict is unchanged), which gives both QuEST taps a name:
- `block4`: BN output *before* the ReLU, the vgg13 teacher map of the paper (512×4×4 at 32 px);
- `relu4`: the same map after the ReLU, the vgg8 student map (DEFAULT_LAYER for every vgg).
Every ReLU is non-in-place, otherwise `relu4` would overwrite the tensor hooked at `block4` (the
original QuEST code had that defect). As in RepDistiller, `pool3` is only applied to 64-px inputs,
so 32-px inputs reach block4 at 4×4. Pooling is adaptive, so 28-px inputs work (block4 at 3×3).

MIT-67 VGG-9-BN (valeoai/QuEST `VGG_ImageNet.py`, `vgg9`, same parameter names): `features` is
the torchvision-style sequence [64,M,128,M,256,256,M,512,512,M,512,512,M] of conv(bias)-BN-ReLU,
`classifier` = (AdaptiveAvgPool2d(1), Flatten, Linear(512, num_classes)). QuEST taps the 4th and
5th max-pools, `features.21` (512×14×14 at 224 px) and `features.28` (512×7×7).
"""

import math

import torch
from torch import nn

# Per-block conv widths (RepDistiller cfg S, A, B, D, E).
CIFAR_VGG_CFG: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}

VGG_PRE_RELU_LAYER = "block4"
VGG_POST_RELU_LAYER = "relu4"
VGG9_POOL4_LAYER = "features.21"
VGG9_POOL5_LAYER = "features.28"

_VGG9_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def init_fan_out(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """RepDistiller / QuEST init: He (fan_out) convs, unit BN, zero biases, N(0, linear_std) Linear
    weights (None keeps PyTorch's default Linear weight, as RepDistiller's WRN does)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _conv_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [
            nn.Conv2d(in_channels, w, kernel_size=3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
        ]
        in_channels = w
    return nn.Sequential(*layers[:-1])  # the block ends at its BN: the pre-ReLU tap


class VGG(nn.Module):
    """CIFAR VGG with BN (RepDistiller `vggN_bn`)."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        block_in = [in_channels] + [widths[-1] for widths in cfg[:-1]]
        for i, (widths, c_in) in enumerate(zip(cfg, block_in)):
            self.add_module(f"block{i}", _conv_block(widths, c_in))
            self.add_module(f"relu{i}", nn.ReLU())
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        init_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_size = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if input_size == 64:  # RepDistiller: the 4th max-pool only for 64-px (Tiny-ImageNet) inputs
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def _cifar_vgg(name: str):
    def build(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(CIFAR_VGG_CFG[name], num_classes, in_channels)

    build.__name__ = name
    build.__doc__ = f"RepDistiller `{name}_bn` (CIFAR VGG with BatchNorm)."
    return build


vgg8 = _cifar_vgg("vgg8")
vgg11 = _cifar_vgg("vgg11")
vgg13 = _cifar_vgg("vgg13")
vgg16 = _cifar_vgg("vgg16")
vgg19 = _cifar_vgg("vgg19")


class VGG9BN(nn.Module):
    """MIT-67 student, 224-px ImageNet-style VGG-9 with BN (QuEST `VGG_ImageNet.vgg9`)."""

    def __init__(self, num_classes: int = 67, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for v in _VGG9_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v)]
                layers.append(nn.ReLU())
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)
        )
        init_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg9_bn(num_classes: int = 67, in_channels: int = 3) -> VGG9BN:
    return VGG9BN(num_classes, in_channels)
