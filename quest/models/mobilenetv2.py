"""CIFAR MobileNetV2 of the CRD benchmark (RepDistiller `models/mobilenetv2.py`, `mobile_half`).

Expansion T = 6, width 0.5, first conv stride 2, last 1×1 conv `conv2` to 1280 channels
(conv-BN-ReLU). Same parameter names as RepDistiller. QuEST map: the output of `conv2` (after its
ReLU), the map that feeds the pooled classifier: 1280×2×2 at 32 px.
Changes that leave the state dict untouched: non-in-place ReLUs, adaptive pooling (RepDistiller
sizes a fixed AvgPool2d from `input_size`), `in_channels`.
"""

import torch
from torch import nn

from .vgg import init_fan_out


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3×3, linear pointwise project; residual when shapes allow.

    Unlike torchvision, the expansion conv is kept even when T = 1 (RepDistiller layout).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        expansion: int = 6,
        width_mult: float = 0.5,
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        # t (expansion), c (width), n (repeats), s (stride of the first repeat)
        setting = [
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            out = int(c * width_mult)
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(channels, out, stride, t))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))

        init_fan_out(self)  # RepDistiller's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller `mobile_half`: T = 6, width 0.5."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)
