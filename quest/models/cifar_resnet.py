"""CIFAR ResNets of the CRD benchmark: RepDistiller `models/resnet.py` and `models/resnetv2.py`.

Parameter names and shapes match RepDistiller, so its `ckpt_epoch_240.pth` teachers load with
`strict=True`. Changes that leave the state dict untouched:
- no in-place ops, so a forward hook on any module sees exactly the tensor that module returned;
- adaptive average pooling before the classifier, so any input size works (28×28 Fashion-MNIST);
- an `in_channels` argument for the stem conv;
- plain `forward` returning logits (feature maps are taken with hooks by module name).

QuEST map: `layer3` output (post-ReLU) for the resnet.py family, `layer4` for ResNet50.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_resnet(model: nn.Module) -> None:
    # RepDistiller's init: He (fan_out) convs, unit BN, default Linear.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, then ReLU (resnet.py naming: `downsample`)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """resnet.py: three stages of (depth - 2) / 6 basic blocks, widths `num_filters[1:]`."""

    def __init__(
        self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"basic-block resnet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        _init_resnet(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    """resnetv2.py bottleneck (1×1, 3×3, 1×1 ×4); identity shortcut is an empty `Sequential`."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    """resnetv2.py: ImageNet-style 4-stage bottleneck ResNet with a 3×3 stride-1 stem for 32 px.

    Despite the file name it is post-activation. 32×32 input gives a 2048×4×4 `layer4` map.
    """

    def __init__(self, num_blocks: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        _init_resnet(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


_NARROW = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]  # the "x4" variants


def resnet8(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(8, _NARROW, num_classes, in_channels)


def resnet14(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(14, _NARROW, num_classes, in_channels)


def resnet20(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(20, _NARROW, num_classes, in_channels)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(32, _NARROW, num_classes, in_channels)


def resnet44(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(44, _NARROW, num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(56, _NARROW, num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(110, _NARROW, num_classes, in_channels)


def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(8, _WIDE, num_classes, in_channels)


def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(32, _WIDE, num_classes, in_channels)


def resnet50(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """RepDistiller `ResNet50` (resnetv2.py), the CIFAR ResNet50 teacher."""
    return ResNetV2([3, 4, 6, 3], num_classes, in_channels)
