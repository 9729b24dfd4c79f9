"""deepinsight/insightface `recognition/arcface_torch` IResNet (iresnet50 / iresnet100), NHWC.

`IResNet(IBasicBlock, layers)` (deepinsight/insightface
`recognition/arcface_torch/backbones/iresnet.py`), r50 [3, 4, 14, 3], r100 [3, 13, 30, 3]:

  conv1 3x3 p1 -> bn1 -> prelu (PReLU(64))                              112
  layer1..4: IBasicBlocks of 64, 128, 256, 512 channels, EVERY stage starting with stride 2
      and a downsample (1x1 conv stride 2 + BN)                         -> 56 -> 28 -> 14 -> 7
  bn2 -> flatten NCHW -> dropout (p=0) -> fc 25088 -> 512 -> features (BN1d) = the embedding.

IBasicBlock: bn1 -> conv1 3x3 (in -> planes) -> bn2 -> prelu (per channel) -> conv2 3x3 (stride)
-> bn3 -> + shortcut, no activation after the add. Eval mode; keys mirror torch ('features.weight'
is the BN1d whose scale upstream fixes at 1 but still stores).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.arcface import STAGE_WIDTHS
from ports.layers import BatchNorm, PReLU, conv2d, dense, flatten_nchw

__all__ = ["IResNet", "IRESNET_LAYERS"]

Dtype = Any

IRESNET_LAYERS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


class _IBasicBlock(nn.Module):
    """IBasicBlock, (B, H, W, in) -> (B, H/stride, W/stride, planes), eval mode."""
    planes: int
    stride: int = 1
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def bn(name):
            return lambda h: BatchNorm(dtype=self.dtype, name=name)(h, use_running_average=True)

        out = bn("bn1")(x)
        out = conv2d(self.planes, 3, 1, 1, bias=False, dtype=self.dtype, name="conv1")(out)
        out = PReLU(self.planes, name="prelu")(bn("bn2")(out))
        out = conv2d(self.planes, 3, self.stride, 1, bias=False, dtype=self.dtype,
                     name="conv2")(out)
        out = bn("bn3")(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = conv2d(self.planes, 1, self.stride, bias=False, dtype=self.dtype,
                              name="downsample_0")(x)
            shortcut = bn("downsample_1")(shortcut)
        return out + shortcut


class IResNet(nn.Module):
    """(B, 112, 112, 3) in [-1, 1] -> bn2 feature map (B, 7, 7, 512) / embedding (B, 512).

    `layers` per stage (iresnet50 43,590,848 parameters, iresnet100 65,156,160); `dtype` is the
    compute dtype. Methods: `feature_map(x)` = bn2 output; `embedding(x)` = the torch forward
    (the `features` BN1d output, not normalised).
    """
    layers: tuple[int, ...] = IRESNET_LAYERS["iresnet50"]
    num_features: int = 512
    dtype: Dtype = None

    def setup(self):
        self.conv1 = conv2d(STAGE_WIDTHS[0], 3, 1, 1, bias=False, dtype=self.dtype)
        self.bn1 = BatchNorm(dtype=self.dtype)
        self.prelu = PReLU(STAGE_WIDTHS[0])
        for stage, (planes, blocks) in enumerate(zip(STAGE_WIDTHS, self.layers), start=1):
            setattr(self, f"layer{stage}",
                    [_IBasicBlock(planes, 2 if i == 0 else 1, self.dtype) for i in range(blocks)])
        self.bn2 = BatchNorm(dtype=self.dtype)
        self.fc = dense(self.num_features, dtype=self.dtype)
        self.features = BatchNorm(dtype=self.dtype)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> (B, 7, 7, 512)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        h = self.prelu(self.bn1(self.conv1(x), use_running_average=True))
        for stage in range(1, len(STAGE_WIDTHS) + 1):
            for block in getattr(self, f"layer{stage}"):
                h = block(h)
        return self.bn2(h, use_running_average=True)

    def embedding(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> (B, 512) float32."""
        h = self.fc(flatten_nchw(self.feature_map(x)))
        return self.features(h, use_running_average=True).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embedding(x)
