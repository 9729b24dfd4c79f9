"""insightface arcface_torch `IResNet(IBasicBlock, layers)`
(`recognition/arcface_torch/backbones/iresnet.py`), NCHW. Attribute names reproduce the official
keys (`features` is the final BatchNorm1d, as upstream)."""
from __future__ import annotations

from torch import nn


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, layers=(3, 4, 14, 3), num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False),
                                       nn.BatchNorm2d(planes))
            units = [IBasicBlock(inplanes, planes, 2, downsample)]
            units += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*units))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(p=0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def feature_map(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.bn2(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def forward(self, x):
        return self.features(self.fc(self.dropout(self.feature_map(x).flatten(1))))
