"""VGGFace as ID-Guard's `net/vggface.py` defines it (claudio-unipv layout), NCHW:
`forward` and `features` apply ID-Guard's data-dependent denorm first, no mean subtraction.
Attribute names reproduce the official keys; widths shrink for tests."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def denorm(x):
    """ID-Guard's utils.denorm: [-1, 1] -> [0, 1] if the tensor's min is below 0, else as is."""
    return ((x + 1) / 2).clamp(0, 1) if x.min() < 0 else x


def resize_image(x, size: int):
    """ID-Guard's resize_image: bilinear, align_corners=True, to size x size."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


class ConvBlock(nn.Module):
    def __init__(self, *units: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 1, 1) for a, b in zip(units[:-1], units[1:]))

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return F.max_pool2d(x, 2, 2, 0, ceil_mode=True)


class VggFace(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512, 512), fc_width: int = 4096,
                 classes: int = 2622):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.conv1 = ConvBlock(3, w1, w1)
        self.conv2 = ConvBlock(w1, w2, w2)
        self.conv3 = ConvBlock(w2, w3, w3, w3)
        self.conv4 = ConvBlock(w3, w4, w4, w4)
        self.conv5 = ConvBlock(w4, w5, w5, w5)
        self.dropout = nn.Dropout(0.5)
        self.fc1 = nn.Linear(7 * 7 * w5, fc_width)
        self.fc2 = nn.Linear(fc_width, fc_width)
        self.fc3 = nn.Linear(fc_width, classes)

    def features(self, x):
        x = denorm(x)
        for block in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = block(x)
        return x

    def descriptor(self, x):
        """ReLU(fc2) in eval mode (the 4096-D face descriptor)."""
        h = self.dropout(F.relu(self.fc1(self.features(x).flatten(1))))
        return F.relu(self.fc2(h))

    def forward(self, x):
        return self.fc3(self.dropout(self.descriptor(x)))
