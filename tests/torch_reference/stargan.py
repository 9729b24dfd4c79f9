"""The official StarGAN / AttentionGAN / Fixed-Point GAN generators (each upstream
`model.py::Generator`), NCHW.

One class covers the three: they share `main` (keys `main.{i}`) and differ in the last conv
(3 or 4 output channels), the trailing Tanh (StarGAN only) and what forward returns.
"""
from __future__ import annotations

import torch
from torch import nn


def _instance_norm(c: int) -> nn.InstanceNorm2d:
    # As in the official files: buffers exist, but the reference runs in train mode
    # (per-image statistics).
    return nn.InstanceNorm2d(c, affine=True, track_running_stats=True)


class ResidualBlock(nn.Module):
    """x + main(x); main = [conv3, IN, ReLU, conv3, IN], keys main.{0,1,3,4}."""

    def __init__(self, dim: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), _instance_norm(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), _instance_norm(dim))

    def forward(self, x):
        return x + self.main(x)


class Generator(nn.Module):
    """variant 'stargan': returns tanh image; 'aggan': (C*A + x*(1-A), A, C); 'fpgan': the raw
    residual (callers compute tanh(x + G(x, c)))."""

    def __init__(self, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6,
                 variant: str = "stargan"):
        super().__init__()
        self.variant = variant
        layers = [nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False), _instance_norm(conv_dim),
                  nn.ReLU(inplace=True)]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False), _instance_norm(2 * d),
                       nn.ReLU(inplace=True)]
            d *= 2
        layers += [ResidualBlock(d) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False), _instance_norm(d // 2),
                       nn.ReLU(inplace=True)]
            d //= 2
        layers.append(nn.Conv2d(d, 4 if variant == "aggan" else 3, 7, 1, 3, bias=False))
        if variant == "stargan":
            layers.append(nn.Tanh())
        self.main = nn.Sequential(*layers)

    def _input(self, x, c):
        planes = c.view(c.size(0), c.size(1), 1, 1).repeat(1, 1, x.size(2), x.size(3))
        return torch.cat([x, planes], dim=1)

    def forward(self, x, c):
        out = self.main(self._input(x, c))
        if self.variant == "aggan":
            attention = torch.sigmoid(out[:, :1]).repeat(1, 3, 1, 1)
            content = out[:, 1:]
            return content * attention + x * (1 - attention), attention, content
        return out

    def mid_features(self, x, c):
        """main[0:12]: (B, 4*conv_dim, H/4, W/4)."""
        return self.main[:12](self._input(x, c))


def manipulate(generator: Generator, x, c):
    """The manipulated image as the reference's `deepfake.py` computes it from each variant."""
    if generator.variant == "aggan":
        return generator(x, c)[0]
    if generator.variant == "fpgan":
        return torch.tanh(x + generator(x, c))
    return generator(x, c)
