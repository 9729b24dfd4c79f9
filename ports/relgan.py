"""The RelGAN generator (elvisyjlin/RelGAN-PyTorch `G(n_c=3, n_z=5, n_repeat=6)`), NHWC.

As ID-Guard runs it (elvisyjlin/RelGAN-PyTorch `nn/G.py`, called from ID-Guard's `deepfake.py`):
the only target put in `eval()` mode, so its SwitchNorms mix per-image and per-layer statistics
with the RUNNING batch statistics stored in the checkpoint. Trunk: conv7 -> 2 x (conv4 s2) ->
`n_repeat` residual blocks -> 2 x (conv-transpose4 s2) -> conv7 -> tanh, every conv with a bias,
each followed by SwitchNorm and ReLU except the residual adds and the last conv. Widths are fixed
by upstream: 64, 128, 256.

Submodule names mirror the torch keys (`resb.3.f.4.running_var` -> batch_stats
('resb_3', 'f_4', 'var'); `conv_in.1.weight` (1, C, 1, 1) -> params ('conv_in_1', 'scale') (C,)),
so a checkpoint converts with the generic `to_flax` rule.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import affine_params, conv2d, conv_transpose2d

__all__ = ["SwitchNorm", "RelGANGenerator"]

Dtype = Any

# conv_in, down1, down2 and this many residual blocks give the feature loss's mid features.
_MID_FEATURE_BLOCKS = 3


class SwitchNorm(nn.Module):
    """Upstream `SwitchNorm2d(C)` in eval mode, (B, H, W, C) -> (B, H, W, C).

    mean = sum_k softmax(mean_weight)_k * [mean_in, mean_ln, running_mean]_k and likewise var with
    var_weight, where mean_in/var_in are per image and channel over H*W (var_in UNBIASED, / (HW-1)),
    mean_ln = channel mean of mean_in, var_ln = channel mean of (var_in + mean_in^2) - mean_ln^2.
    out = (x - mean) / sqrt(var + eps) * scale + bias. Statistics in float32; H*W must be > 1.
    """
    epsilon: float = 1e-5
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = affine_params(self, c)
        mean_weight = self.param("mean_weight", nn.initializers.ones, (3,), jnp.float32)
        var_weight = self.param("var_weight", nn.initializers.ones, (3,), jnp.float32)
        # Upstream initialises both buffers to zero; checkpoints always overwrite them.
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
        running_var = self.variable("batch_stats", "var", jnp.zeros, (c,), jnp.float32).value

        x32 = x.astype(jnp.float32)
        hw = x.shape[1] * x.shape[2]
        mean_in = jnp.mean(x32, axis=(1, 2), keepdims=True)                       # (B, 1, 1, C)
        var_in = jnp.sum(jnp.square(x32 - mean_in), axis=(1, 2), keepdims=True) / (hw - 1)
        mean_ln = jnp.mean(mean_in, axis=-1, keepdims=True)                      # (B, 1, 1, 1)
        # Upstream's layer variance, kept as defined (it mixes the unbiased var_in in).
        var_ln = jnp.mean(var_in + jnp.square(mean_in), axis=-1, keepdims=True) - jnp.square(mean_ln)

        wm, wv = jax.nn.softmax(mean_weight), jax.nn.softmax(var_weight)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * running_mean
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * running_var
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype or x.dtype)


class _ResidualBlock(nn.Module):
    """x + f(x), f = [conv3, SN, ReLU, conv3, SN] (keys f.{0,1,3,4}); (B, H, W, 256)."""
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        conv = functools.partial(conv2d, dim, 3, 1, 1, bias=True, dtype=self.dtype)
        h = nn.relu(SwitchNorm(dtype=self.dtype, name="f_1")(conv(name="f_0")(x)))
        h = SwitchNorm(dtype=self.dtype, name="f_4")(conv(name="f_3")(h))
        return x + h


class RelGANGenerator(nn.Module):
    """(x (B, H, W, C) in [-1, 1], z (B, n_z) relative attributes) -> (image, mid).

    image = tanh(G([x, z tiled to H x W])) is (B, H, W, C), float32 (C = upstream n_c, 3 for
    RGB); mid is the resb[0..2] output (B, H/4, W/4, 256) in the compute dtype, from the same
    forward pass. H and W must be multiples of 4. `dtype` is the compute dtype (parameters and
    norm statistics stay float32).
    """
    n_z: int = 5
    n_repeat: int = 6
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.n_repeat < _MID_FEATURE_BLOCKS:
            raise ValueError(f"n_repeat={self.n_repeat}: the mid features need at least "
                             f"{_MID_FEATURE_BLOCKS} residual blocks")
        if z.shape != (x.shape[0], self.n_z):
            raise ValueError(f"z has shape {z.shape}; expected (batch, n_z) = "
                             f"({x.shape[0]}, {self.n_z})")
        dt = self.dtype
        conv = functools.partial(conv2d, bias=True, dtype=dt)
        convt = functools.partial(conv_transpose2d, bias=True, dtype=dt)

        def norm(name: str) -> SwitchNorm:
            return SwitchNorm(dtype=dt, name=name)

        b, height, width, channels = x.shape
        planes = jnp.broadcast_to(z.astype(x.dtype)[:, None, None, :], (b, height, width, self.n_z))
        h = jnp.concatenate([x, planes], axis=-1)
        if dt is not None:
            h = h.astype(dt)
        h = nn.relu(norm("conv_in_1")(conv(64, 7, 1, 3, name="conv_in_0")(h)))
        h = nn.relu(norm("down1_1")(conv(128, 4, 2, 1, name="down1_0")(h)))
        h = nn.relu(norm("down2_1")(conv(256, 4, 2, 1, name="down2_0")(h)))
        mid = None
        for k in range(self.n_repeat):
            h = _ResidualBlock(dtype=dt, name=f"resb_{k}")(h)
            if k == _MID_FEATURE_BLOCKS - 1:
                mid = h
        h = nn.relu(norm("up2_1")(convt(128, 4, 2, 1, name="up2_0")(h)))
        h = nn.relu(norm("up1_1")(convt(64, 4, 2, 1, name="up1_0")(h)))
        out = conv(channels, 7, 1, 3, name="conv_out_0")(h).astype(jnp.float32)
        return jnp.tanh(out), mid
