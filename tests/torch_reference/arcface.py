"""ID-Guard's ArcFace (`net/arcface.py::ResNet`, foamliu SE-IR ResNet), NCHW.

Attribute names reproduce the official state_dict keys. `features` is ID-Guard's method (the bn2
map); `forward` the embedding bn3(fc(...)).
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_prelus_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Move every PReLU slope off torch's 0.25 default (and below zero for some), so that a
    converter which drops or misplaces a slope cannot pass a parity test."""
    for m in module.modules():
        if isinstance(m, nn.PReLU):
            m.weight.copy_(0.6 * torch.rand(m.weight.shape, generator=generator) - 0.2)
    return module


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class SEBlock(nn.Module):
    """keys fc.0 / fc.2 (Linear with bias), fc.1 (scalar PReLU)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.PReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class IRBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()  # one scalar slope, used twice
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.se = SEBlock(planes)

    def forward(self, x):
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.se(self.bn2(self.conv2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 23, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, bias=False)  # no padding: 112 -> 110
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stride = 1 if stage == 1 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes))
            units = [IRBlock(inplanes, planes, stride, downsample)]
            units += [IRBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*units))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.bn3 = nn.BatchNorm1d(512)

    def features(self, x):
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn2(x)

    def forward(self, x):
        x = self.dropout(self.features(x))
        return self.bn3(self.fc(x.flatten(1)))
