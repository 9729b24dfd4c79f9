"""The StarGAN generator family (StarGAN v1, AttentionGAN multi-domain, Fixed-Point GAN), NHWC.

All three share one trunk (yunjey/stargan, Ha0Tang/AttentionGAN and mahfuzmohammad/Fixed-Point-GAN
`model.py::Generator`): conv7 -> 2 x (conv4 s2) -> `repeat_num` residual blocks -> 2 x
(conv-transpose4 s2) -> conv7, every conv without bias, each followed by an affine InstanceNorm and
ReLU except the residual adds and the last conv. They differ only in the head.

Submodule names mirror the torch `nn.Sequential` indices (`main.9.main.0.weight` ->
('main_9', 'main_0', 'kernel')), so an official `200000-G.ckpt` converts one to one. The norms
use per-image statistics: the reference never calls `eval()`, so the running buffers stored in the
official files are never read and have no counterpart here.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import InstanceNorm, conv2d, conv_transpose2d

__all__ = ["StarGANFamilyGenerator", "StarGAN", "AttentionGAN", "FixedPointGAN", "VARIANTS"]

Dtype = Any

VARIANTS = ("stargan", "aggan", "fpgan")

# main[0:12] = conv-in, 2 downsampling blocks and this many residual blocks (the feature loss).
_MID_FEATURE_BLOCKS = 3


class _ResidualBlock(nn.Module):
    """x + [conv3, IN, ReLU, conv3, IN](x), (B, H, W, dim); keys main.{0,1,3,4}; no final ReLU."""
    dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(conv2d, self.dim, 3, 1, 1, bias=False, dtype=self.dtype)
        h = nn.relu(InstanceNorm(dtype=self.dtype, name="main_1")(conv(name="main_0")(x)))
        h = InstanceNorm(dtype=self.dtype, name="main_4")(conv(name="main_3")(h))
        return x + h


class StarGANFamilyGenerator(nn.Module):
    """(x (B, H, W, 3) in [-1, 1], c (B, c_dim) labels) -> (image, mid).

    image is (B, H, W, 3); mid is (B, H/4, W/4, 4*conv_dim).

    Heads, by `variant`:
      - 'stargan': tanh(main(cat)).
      - 'aggan': the last conv gives 4 channels; A = sigmoid(channel 0), C = channels 1-3 (raw,
        no tanh); image = C*A + x*(1-A), which can leave [-1, 1].
      - 'fpgan': tanh(x + main(cat)). Upstream G returns the raw residual and its callers apply
        tanh(x + G) outside; this port folds that in so every variant returns the image.
    `cat` = [x, c tiled to H x W] (label planes after the image channels). `mid` is the output
    of main[0:12] (needs repeat_num >= 3), from the same forward pass. H and W must be multiples
    of 4. `dtype` is the compute dtype (parameters stay float32, norm statistics are float32);
    the image is always float32, `mid` is in the compute dtype.
    """
    conv_dim: int = 64
    c_dim: int = 5
    repeat_num: int = 6
    variant: str = "stargan"
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.repeat_num < _MID_FEATURE_BLOCKS:
            raise ValueError(f"repeat_num={self.repeat_num}: main[0:12] needs at least "
                             f"{_MID_FEATURE_BLOCKS} residual blocks")
        dt, d = self.dtype, self.conv_dim
        conv = functools.partial(conv2d, bias=False, dtype=dt)
        convt = functools.partial(conv_transpose2d, bias=False, dtype=dt)

        def norm(i: int) -> InstanceNorm:
            return InstanceNorm(dtype=dt, name=f"main_{i}")

        b, height, width, _ = x.shape
        planes = jnp.broadcast_to(c.astype(x.dtype)[:, None, None, :],
                                  (b, height, width, self.c_dim))
        h = jnp.concatenate([x, planes], axis=-1)
        if dt is not None:
            h = h.astype(dt)
        h = nn.relu(norm(1)(conv(d, 7, 1, 3, name="main_0")(h)))
        h = nn.relu(norm(4)(conv(2 * d, 4, 2, 1, name="main_3")(h)))
        h = nn.relu(norm(7)(conv(4 * d, 4, 2, 1, name="main_6")(h)))
        mid = None
        for k in range(self.repeat_num):
            h = _ResidualBlock(4 * d, dtype=dt, name=f"main_{9 + k}")(h)
            if k == _MID_FEATURE_BLOCKS - 1:
                mid = h
        i = 9 + self.repeat_num
        h = nn.relu(norm(i + 1)(convt(2 * d, 4, 2, 1, name=f"main_{i}")(h)))
        h = nn.relu(norm(i + 4)(convt(d, 4, 2, 1, name=f"main_{i + 3}")(h)))
        out_channels = 4 if self.variant == "aggan" else 3
        out = conv(out_channels, 7, 1, 3, name=f"main_{i + 6}")(h).astype(jnp.float32)

        x32 = x.astype(jnp.float32)
        if self.variant == "stargan":
            image = jnp.tanh(out)
        elif self.variant == "aggan":
            attention = nn.sigmoid(out[..., :1])
            image = out[..., 1:] * attention + x32 * (1.0 - attention)
        else:
            image = jnp.tanh(x32 + out)
        return image, mid


StarGAN = functools.partial(StarGANFamilyGenerator, variant="stargan")
AttentionGAN = functools.partial(StarGANFamilyGenerator, variant="aggan")
FixedPointGAN = functools.partial(StarGANFamilyGenerator, variant="fpgan")
