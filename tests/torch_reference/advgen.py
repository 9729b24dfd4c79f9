"""ID-Guard's perturbation generator, ResnetGenerator(norm_type='batch', input_nc=6) (the
reference's `net/advGen.py::ResnetGenerator`), NCHW, keys model0.{i} and
model0.{10..15}.conv_block.{j}."""
from __future__ import annotations

from torch import nn


class ResnetBlock(nn.Module):
    """x + conv_block(x); conv_block = [reflpad1, conv3, BN, ReLU, reflpad1, conv3, BN]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """(B, 6, H, W) -> (B, 3, H, W) in (-1, 1).

    SELU outside the blocks, ReLU inside; no conv bias except on the last conv.
    """

    def __init__(self, input_nc: int = 6, output_nc: int = 3, ngf: int = 64, n_blocks: int = 6):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=False),
                  nn.BatchNorm2d(ngf), nn.SELU(True)]
        for i in range(2):
            c = ngf * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c),
                       nn.SELU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=False),
                       nn.BatchNorm2d(c // 2), nn.SELU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, bias=True), nn.Tanh()]
        self.model0 = nn.Sequential(*layers)

    def forward(self, x):
        return self.model0(x)
