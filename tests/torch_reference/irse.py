"""TreB1eN/pSp IR-SE50 `Backbone(num_layers=50, mode='ir_se')` at 112 px and pSp's ID-loss input
geometry (TreB1eN/InsightFace_Pytorch `model.py::Backbone`), NCHW. Attribute names reproduce the
official keys."""
from __future__ import annotations

import torch
from torch import nn


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth),
            SEModule(depth))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    def __init__(self, units=(3, 4, 14, 3), drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(64), nn.PReLU(64))
        body, cin = [], 64
        for depth, n in zip((64, 128, 256, 512), units):
            body += [BottleneckIRSE(cin, depth, 2)]
            body += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
            cin = depth
        self.body = nn.Sequential(*body)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(drop_ratio),
                                          nn.Flatten(), nn.Linear(512 * 7 * 7, 512),
                                          nn.BatchNorm1d(512))

    def feature_map(self, x):
        """output_layer.0's output (B, 512, 7, 7)."""
        return self.output_layer[0](self.body(self.input_layer(x)))

    def forward(self, x):
        e = self.output_layer(self.body(self.input_layer(x)))
        return e / torch.norm(e, 2, 1, True)


def psp_extract_input(x):
    """pSp IDLoss.extract_feats' input: a 256 image cropped to rows 35:223, cols 32:220, then
    AdaptiveAvgPool2d((112, 112))."""
    return nn.functional.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))
