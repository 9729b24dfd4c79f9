"""The stand-in identity network of the tests and demos (`idguard_jax.networks.identity.
StandInIdentityCNN`), NCHW: three strided 3x3 convs with ReLU and a linear embedding. No
upstream network: it lets the PyTorch anchor run at the tiny size. Attribute names are the
Flax module's (conv1..conv3, fc)."""
from __future__ import annotations

import torch
from torch import nn


class StandIn(nn.Module):
    """(B, 3, 56, 56) -> feature map (B, 4*width, 7, 7); embedding (B, embed_dim)."""

    def __init__(self, width: int = 16, embed_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, 2, 1)
        self.fc = nn.Linear(4 * width, embed_dim)

    def features(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = torch.relu(conv(x))
        return x

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))
