"""Wide ResNets of the CRD benchmark (RepDistiller `models/wrn.py`), same parameter names.

Pre-activation blocks; after `block3` the network applies `bn1` and `relu` before pooling.
QuEST map: the output of the `relu` module, ReLU(BN(block3 output)), 64·k×8×8 at 32 px.
Changes that leave the state dict untouched: non-in-place ReLUs, adaptive pooling, `in_channels`,
no dropout (every CRD WRN uses drop rate 0).
"""

import torch
from torch import nn

from .vgg import init_fan_out


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 + shortcut (1×1 `convShortcut` when the width changes)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # camelCase kept: it is a state-dict key of the released checkpoints.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # As in the original: a width-changing block's shortcut sees the activated input,
        # an identity shortcut the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + shortcut


class NetworkBlock(nn.Module):
    """One stage; the wrapper exists only for the `blockN.layer.i` state-dict names."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_fan_out(self, linear_std=None)  # RepDistiller's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels)


def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels)
