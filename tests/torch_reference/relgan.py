"""The RelGAN generator G(n_c=3, n_z=5, n_repeat=6) with SwitchNorm2d (elvisyjlin/RelGAN-PyTorch
`nn/G.py`), NCHW.

Evaluated as ID-Guard runs it: in eval() mode, so the norms read their running buffers. Attribute
names reproduce the official keys (`conv_in.1.mean_weight`, `resb.3.f.4.running_var`, ...).
"""
from __future__ import annotations

import torch
from torch import nn


class SwitchNorm2d(nn.Module):
    """Eval-mode SwitchNorm2d: a softmax mix of instance, layer and running batch statistics."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, c, 1))
        self.register_buffer("running_var", torch.zeros(1, c, 1))

    def forward(self, x):
        assert not self.training, "this reference implements eval mode only"
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)  # unbiased
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
        wm = torch.softmax(self.mean_weight, 0)
        wv = torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * self.running_mean
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * self.running_var
        out = ((flat - mean) / (var + self.eps).sqrt()).reshape(n, c, h, w)
        return out * self.weight + self.bias


def _block(conv: nn.Module, c: int, relu: bool = True) -> list[nn.Module]:
    return [conv, SwitchNorm2d(c)] + ([nn.ReLU()] if relu else [])


class ResidualBlock(nn.Module):
    """x + f(x); f = [conv3, SN, ReLU, conv3, SN], keys f.{0,1,3,4}."""

    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Sequential(*_block(nn.Conv2d(dim, dim, 3, 1, 1), dim),
                               *_block(nn.Conv2d(dim, dim, 3, 1, 1), dim, relu=False))

    def forward(self, x):
        return x + self.f(x)


class G(nn.Module):
    """forward(img (B, n_c, H, W), z (B, n_z)) -> tanh image (B, n_c, H, W)."""

    def __init__(self, n_c: int = 3, n_z: int = 5, n_repeat: int = 6):
        super().__init__()
        self.conv_in = nn.Sequential(*_block(nn.Conv2d(n_c + n_z, 64, 7, 1, 3), 64))
        self.down1 = nn.Sequential(*_block(nn.Conv2d(64, 128, 4, 2, 1), 128))
        self.down2 = nn.Sequential(*_block(nn.Conv2d(128, 256, 4, 2, 1), 256))
        self.resb = nn.Sequential(*[ResidualBlock(256) for _ in range(n_repeat)])
        self.up2 = nn.Sequential(*_block(nn.ConvTranspose2d(256, 128, 4, 2, 1), 128))
        self.up1 = nn.Sequential(*_block(nn.ConvTranspose2d(128, 64, 4, 2, 1), 64))
        self.conv_out = nn.Sequential(nn.Conv2d(64, n_c, 7, 1, 3), nn.Tanh())

    @staticmethod
    def _input(img, z):
        planes = z.view(z.size(0), z.size(1), 1, 1).expand(-1, -1, img.size(2), img.size(3))
        return torch.cat([img, planes], dim=1)

    def forward(self, img, z):
        h = self.resb(self.down2(self.down1(self.conv_in(self._input(img, z)))))
        return self.conv_out(self.up1(self.up2(h)))

    def mid_features(self, img, z):
        """conv_in -> down1 -> down2 -> resb[0..2]: (B, 256, H/4, W/4)."""
        h = self.down2(self.down1(self.conv_in(self._input(img, z))))
        return self.resb[:3](h)


@torch.no_grad()
def randomize_switch_norms_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Move every SwitchNorm2d affine parameter, mixing weight and running statistic off its
    default, so that a dropped or swapped one cannot pass a parity test."""
    for m in module.modules():
        if isinstance(m, SwitchNorm2d):
            c = m.weight.shape[1]
            m.weight.copy_(1 + 0.3 * torch.randn(1, c, 1, 1, generator=generator))
            m.bias.copy_(0.2 * torch.randn(1, c, 1, 1, generator=generator))
            m.mean_weight.copy_(torch.randn(3, generator=generator))
            m.var_weight.copy_(torch.randn(3, generator=generator))
            m.running_mean.copy_(0.2 * torch.randn(1, c, 1, generator=generator))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(1, c, 1, generator=generator))
    return module
