"""The ArcFace ID-Guard loads: foamliu/InsightFace-v2's SE-IR ResNet [3, 4, 23, 3], NHWC.

ID-Guard's `net/arcface.py::ResNet` (foamliu/InsightFace-v2 style SE-LResNet-IR), whose
`arcface_ir_se50.pth` is despite its name NOT TreB1eN's IR-SE50 (that one is `ports/irse.py`):

  conv1 3x3 s1 UNPADDED (112 -> 110) -> bn1 -> prelu -> max pool 2x2 (-> 55)
  -> layer1..4 of IRBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2: 55 -> 28 -> 14 -> 7)
  -> bn2 (the feature map ID-Guard's identity loss compares, (B, 7, 7, 512))
  -> dropout (eval: identity) -> flatten in NCHW order -> fc 25088 -> 512 -> bn3 (the embedding).

IRBlock: bn0 -> conv1 3x3 (in -> in) -> bn1 -> prelu -> conv2 3x3 (in -> planes, stride) -> bn2
-> SE -> + shortcut -> prelu, where the two prelu applications are ONE scalar-slope PReLU module.
SE: global mean -> Linear (with bias) -> scalar PReLU -> Linear (with bias) -> sigmoid -> scale.

The network runs in eval mode (BatchNorm running statistics), as ID-Guard runs it. Submodule
names mirror the torch keys ('layer3.22.se.fc.0.weight' -> ('layer3_22', 'se', 'fc_0', 'kernel')).
`PReLU` and `flatten_nchw` are shared by the other face-recognition ports.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import BatchNorm, PReLU, conv2d, dense, flatten_nchw, max_pool_2x2

__all__ = ["ArcFaceSEIR", "PReLU", "flatten_nchw", "STAGE_WIDTHS"]

Dtype = Any

STAGE_WIDTHS = (64, 128, 256, 512)


class _SEBlock(nn.Module):
    """foamliu SEBlock: x * sigmoid(fc_2(prelu(fc_0(mean_hw(x))))); keys fc.{0,1,2}."""
    reduction: int = 16
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = jnp.mean(x, axis=(1, 2))
        y = PReLU(name="fc_1")(dense(c // self.reduction, dtype=self.dtype, name="fc_0")(y))
        y = nn.sigmoid(dense(c, dtype=self.dtype, name="fc_2")(y))
        return x * y[:, None, None, :]


class _IRBlock(nn.Module):
    """foamliu IRBlock, (B, H, W, in) -> (B, H/stride, W/stride, planes), eval mode."""
    planes: int
    stride: int = 1
    use_se: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def bn(name):
            return lambda h: BatchNorm(dtype=self.dtype, name=name)(h, use_running_average=True)

        in_planes = x.shape[-1]
        prelu = PReLU(name="prelu")  # one module, applied twice: both uses share its slope
        out = bn("bn0")(x)
        out = conv2d(in_planes, 3, 1, 1, bias=False, dtype=self.dtype, name="conv1")(out)
        out = prelu(bn("bn1")(out))
        out = conv2d(self.planes, 3, self.stride, 1, bias=False, dtype=self.dtype,
                     name="conv2")(out)
        out = bn("bn2")(out)
        if self.use_se:
            out = _SEBlock(dtype=self.dtype, name="se")(out)
        shortcut = x
        if self.stride != 1 or in_planes != self.planes:
            shortcut = conv2d(self.planes, 1, self.stride, 0, bias=False, dtype=self.dtype,
                              name="downsample_0")(x)
            shortcut = bn("downsample_1")(shortcut)
        return prelu(out + shortcut)


class ArcFaceSEIR(nn.Module):
    """(B, 112, 112, 3) -> bn2 feature map (B, 7, 7, 512) / embedding (B, 512), eval mode.

    `layers` = IRBlocks per stage (official [3, 4, 23, 3]: 52,193,215 parameters); fewer blocks
    keep the official key pattern for tests. `dtype` is the compute dtype (parameters and norm
    statistics stay float32).
    Methods: `feature_map(x)` (ID-Guard's `features()`), `embedding(x)` (= the torch forward).
    """
    layers: tuple[int, ...] = (3, 4, 23, 3)
    use_se: bool = True
    embedding_size: int = 512
    dtype: Dtype = None

    def setup(self):
        self.conv1 = conv2d(STAGE_WIDTHS[0], 3, 1, 0, bias=False, dtype=self.dtype)
        self.bn1 = BatchNorm(dtype=self.dtype)
        self.prelu = PReLU()
        for stage, (planes, blocks) in enumerate(zip(STAGE_WIDTHS, self.layers), start=1):
            first_stride = 1 if stage == 1 else 2
            setattr(self, f"layer{stage}",
                    [_IRBlock(planes, first_stride if i == 0 else 1, self.use_se, self.dtype)
                     for i in range(blocks)])
        self.bn2 = BatchNorm(dtype=self.dtype)
        self.fc = dense(self.embedding_size, dtype=self.dtype)
        self.bn3 = BatchNorm(dtype=self.dtype)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> bn2 output (B, 7, 7, 512)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        h = self.prelu(self.bn1(self.conv1(x), use_running_average=True))
        h = max_pool_2x2(h)
        for stage in range(1, len(STAGE_WIDTHS) + 1):
            for block in getattr(self, f"layer{stage}"):
                h = block(h)
        return self.bn2(h, use_running_average=True)

    def embedding(self, x: jax.Array) -> jax.Array:
        """(B, 112, 112, 3) -> bn3(fc(flatten(bn2 map))) (B, 512), not normalised; float32."""
        h = self.fc(flatten_nchw(self.feature_map(x)))
        return self.bn3(h, use_running_average=True).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embedding(x)
