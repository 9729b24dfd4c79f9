"""TreB1eN/InsightFace_Pytorch IR-SE50 (`model_ir_se50.pth`, also pSp's/e4e's ID loss), NHWC.

`Backbone(num_layers=50, mode='ir_se')` at 112 px (TreB1eN/InsightFace_Pytorch
`model.py::Backbone`):

  input_layer: conv 3x3 p1 -> BN -> PReLU(64)          112
  body.0..23: bottleneck_IR_SE units, [3, 4, 14, 3] per stage of 64, 128, 256, 512 channels;
      the first unit of EVERY stage has stride 2        -> 56 -> 28 -> 14 -> 7
  output_layer: BN2d (.0) -> dropout -> flatten NCHW -> Linear 25088 -> 512 (.3) -> BN1d (.4)
  forward returns the L2-normalised embedding.

Unit: res_layer = BN(in) -> conv3x3 (in -> depth) -> PReLU(depth) -> conv3x3 (stride) -> BN
-> SE (global mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid, both convs without bias); the
shortcut is MaxPool2d(1, stride) (plain subsampling) when in == depth, else 1x1 conv + BN;
output res + shortcut with no activation after the add. Eval mode; keys mirror torch
('body.3.res_layer.5.fc1.weight' -> ('body_3', 'res_layer_5', 'fc1', 'kernel')).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.arcface import STAGE_WIDTHS
from ports.layers import BatchNorm, PReLU, conv2d, dense, flatten_nchw

__all__ = ["IRSEBackbone"]

Dtype = Any


class _SEModule(nn.Module):
    """TreB1eN SEModule: x * sigmoid(fc2(relu(fc1(mean_hw(x))))), 1x1 convs without bias."""
    reduction: int = 16
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = jnp.mean(x, axis=(1, 2), keepdims=True)
        y = nn.relu(conv2d(c // self.reduction, 1, bias=False, dtype=self.dtype, name="fc1")(y))
        y = nn.sigmoid(conv2d(c, 1, bias=False, dtype=self.dtype, name="fc2")(y))
        return x * y


class _BottleneckIRSE(nn.Module):
    """bottleneck_IR_SE(in, depth, stride), eval mode; keys shortcut_layer.*, res_layer.{0-5}."""
    depth: int
    stride: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def bn(name):
            return lambda h: BatchNorm(dtype=self.dtype, name=name)(h, use_running_average=True)

        if x.shape[-1] == self.depth:
            shortcut = x[:, ::self.stride, ::self.stride, :]  # MaxPool2d(kernel 1, stride)
        else:
            shortcut = conv2d(self.depth, 1, self.stride, bias=False, dtype=self.dtype,
                              name="shortcut_layer_0")(x)
            shortcut = bn("shortcut_layer_1")(shortcut)
        r = bn("res_layer_0")(x)
        r = conv2d(self.depth, 3, 1, 1, bias=False, dtype=self.dtype, name="res_layer_1")(r)
        r = PReLU(self.depth, name="res_layer_2")(r)
        r = conv2d(self.depth, 3, self.stride, 1, bias=False, dtype=self.dtype,
                   name="res_layer_3")(r)
        r = _SEModule(dtype=self.dtype, name="res_layer_5")(bn("res_layer_4")(r))
        return r + shortcut


class IRSEBackbone(nn.Module):
    """(B, 112, 112, 3) in [-1, 1] -> feature map (B, 7, 7, 512) / embedding (B, 512), eval mode.

    `units` per stage (official IR-SE50 [3, 4, 14, 3]: 43,797,696 parameters); fewer keep the
    official key pattern for tests. `dtype` is the compute dtype.
    Methods: `feature_map(x)` = output_layer.0 (BN2d) output, the analogue of the SE-IR ResNet's
    bn2 map; `embedding(x)` = output_layer.4 (BN1d) output, not normalised; `__call__` = the
    torch forward (L2-normalised embedding).
    """
    units: tuple[int, ...] = (3, 4, 14, 3)
    embedding_size: int = 512
    dtype: Dtype = None

    def setup(self):
        self.input_layer_0 = conv2d(STAGE_WIDTHS[0], 3, 1, 1, bias=False, dtype=self.dtype)
        self.input_layer_1 = BatchNorm(dtype=self.dtype)
        self.input_layer_2 = PReLU(STAGE_WIDTHS[0])
        self.body = [_BottleneckIRSE(depth, 2 if i == 0 else 1, self.dtype)
                     for depth, n in zip(STAGE_WIDTHS, self.units) for i in range(n)]
        self.output_layer_0 = BatchNorm(dtype=self.dtype)
        self.output_layer_3 = dense(self.embedding_size, dtype=self.dtype)
        self.output_layer_4 = BatchNorm(dtype=self.dtype)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> (B, 7, 7, 512)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        h = self.input_layer_1(self.input_layer_0(x), use_running_average=True)
        h = self.input_layer_2(h)
        for unit in self.body:
            h = unit(h)
        return self.output_layer_0(h, use_running_average=True)

    def embedding(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> (B, 512) float32, before the L2 normalisation."""
        h = self.output_layer_3(flatten_nchw(self.feature_map(x)))
        return self.output_layer_4(h, use_running_average=True).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        e = self.embedding(x)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)
