"""dlib's face recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`), NHWC.

The network of dlib's `examples/dnn_face_recognition_ex.cpp`: a 150x150 RGB chip -> conv7 s2 (32)
-> affine -> relu -> max pool 3 s2 -> 14 residual blocks (`BLOCKS`) -> global average pool -> fc
256 -> 128 without bias. Shapes 150 -> 72 -> 35 -> 35 -> 17 -> 8 -> 4 -> 2.

Three dlib rules that differ from torch/Flax habits:
- padding: a layer with stride != 1 pads nothing, a stride-1 layer pads k // 2 (convs and pools);
- "affine" is a frozen batch norm, y = scale * x + bias per channel;
- adding two tensors of different shapes zero-pads the smaller one at the END of every axis
  (high channels, bottom rows, right columns): in the down blocks the pooled shortcut (32 -> 64
  channels; 4x4 vs the conv path's 3x3 at 8 -> 4, 2x2 vs 1x1 at 4 -> 2) meets the conv path so.

Inputs are chips in dlib's pixel units ([0, 255] floats, RGB); the input layer's per-channel
mean lives in the `input` collection (variable `mean`) because the file stores it, and the
network normalises as dlib's input layer does: (pixel - mean) / 256. The output is dlib's
descriptor: 128-D, NOT unit norm. Parameter names: `kernel` (HWIO = dlib filters (O, I, kh, kw)
transposed (2, 3, 1, 0)), `bias`, `scale`; the fc kernel is dlib's (256, 128) as stored.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import affine_params, conv2d

__all__ = ["DlibFaceResNet", "BLOCKS", "STEM", "EMBED_DIM", "INPUT_SIZE", "DLIB_MEAN_RGB",
           "dlib_padding", "zero_padded_add"]

Dtype = Any

INPUT_SIZE = 150
EMBED_DIM = 128
# input_rgb_image_sized's defaults; the .dat file stores the same values.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
# (filters, kernel, stride) of the stem conv; a max pool 3 s2 follows it.
STEM = (32, 7, 2)
# (filters, down) of each residual block, input to output (levels 4, 3, 2, 1, 0).
BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),))


def dlib_padding(kernel: int, stride: int) -> int:
    """dlib's default padding of a conv or pool: none when strided, else kernel // 2."""
    return 0 if stride != 1 else kernel // 2


def zero_padded_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add of (B, H, W, C) tensors of different shapes: each is zero-padded at the end
    of every axis to the larger size, then they are added."""
    shape = tuple(max(m, n) for m, n in zip(a.shape, b.shape))

    def pad(x):
        return jnp.pad(x, [(0, s - n) for s, n in zip(shape, x.shape)])

    return pad(a) + pad(b)


class _Affine(nn.Module):
    """dlib's affine_ layer (a frozen batch norm): scale * x + bias per channel."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = affine_params(self, c)
        return x * scale.astype(x.dtype) + bias.astype(x.dtype)


class _Block(nn.Module):
    """ares / ares_down: relu(shortcut + [conv3 (s2 if down), affine, relu, conv3, affine](x)).

    The shortcut is x, or for a down block x through a 2x2 average pool with stride 2, added
    with dlib's zero padding (more channels, and sizes that differ by one at 8 -> 4 and 4 -> 2).
    """
    features: int
    down: bool
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stride = 2 if self.down else 1
        h = conv2d(self.features, 3, stride, dlib_padding(3, stride), bias=True,
                   dtype=self.dtype, name="conv_a")(x)
        h = nn.relu(_Affine(name="affine_a")(h))
        h = conv2d(self.features, 3, 1, dlib_padding(3, 1), bias=True, dtype=self.dtype,
                   name="conv_b")(h)
        h = _Affine(name="affine_b")(h)
        shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2)) if self.down else x
        return nn.relu(zero_padded_add(h, shortcut))


class DlibFaceResNet(nn.Module):
    """(B, 150, 150, 3) RGB chips in [0, 255] -> (B, 128) dlib face descriptors (not unit norm).

    `dtype` is the compute dtype (parameters stay float32; the descriptor is float32).
    """
    dtype: Dtype = None

    @nn.compact
    def __call__(self, chips: jax.Array) -> jax.Array:
        if chips.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"dlib's network takes (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) chips, "
                             f"got {chips.shape}")
        mean = self.variable("input", "mean",
                             lambda: jnp.asarray(DLIB_MEAN_RGB, jnp.float32)).value
        h = (chips.astype(jnp.float32) - mean) / 256.0
        if self.dtype is not None:
            h = h.astype(self.dtype)
        filters, kernel, stride = STEM
        h = conv2d(filters, kernel, stride, dlib_padding(kernel, stride), bias=True,
                   dtype=self.dtype, name="stem_conv")(h)
        h = nn.relu(_Affine(name="stem_affine")(h))
        pad = dlib_padding(3, 2)
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((pad, pad), (pad, pad)))
        for i, (features, down) in enumerate(BLOCKS):
            h = _Block(features, down, dtype=self.dtype, name=f"block_{i}")(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(EMBED_DIM, use_bias=False, name="fc")(pooled)
