"""VGGFace (VGG-16, 2622 identities) in claudio-unipv/vggface-pytorch's layout, NHWC.

The network ID-Guard loads from `vggface-9d491dd7c30312.pth` (claudio-unipv/vggface-pytorch's
layout, ID-Guard's `net/vggface.py`):

  conv1..conv5: blocks of 2, 2, 3, 3, 3 convs 3x3 p1 with bias, each followed by ReLU, the block
      ending in max_pool2d(2, 2, ceil_mode=True)         224 -> 112 -> 56 -> 28 -> 14 -> 7
  flatten NCHW -> fc1 25088 -> 4096 -> ReLU -> dropout -> fc2 -> ReLU -> dropout -> fc3 -> 2622.

Dropout is the identity (eval mode, as ID-Guard's Grad-CAM runs it; the identity loss uses the
conv5 map only). Input conventions (ID-Guard's denorm, upstream's mean) live in
idguard_jax.networks.identity; this module takes the image as the first conv sees it. Keys
mirror torch ('conv3.convs.2.weight' -> ('conv3', 'convs_2', 'kernel')).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import conv2d, dense, flatten_nchw

__all__ = ["VGGFace", "max_pool_ceil", "CONVS_PER_BLOCK"]

Dtype = Any

CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def max_pool_ceil(x: jax.Array, window: int = 2, stride: int = 2) -> jax.Array:
    """torch max_pool2d(x, window, stride, 0, ceil_mode=True) on NHWC.

    ceil_mode keeps a last, partial window (padded with -inf) as long as it starts inside the
    input: 25 -> 13 where the floor mode gives 12. No difference at even sizes.
    """
    def high_pad(n: int) -> int:
        out = -(-(n - window) // stride) + 1
        if (out - 1) * stride >= n:  # torch drops a window that would start past the end
            out -= 1
        return (out - 1) * stride + window - n

    pads = ((0, high_pad(x.shape[1])), (0, high_pad(x.shape[2])))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class _ConvBlock(nn.Module):
    """`_ConvBlock(*units)`: [conv3x3 + ReLU] x len(units), then ceil-mode max pool 2x2."""
    features: tuple[int, ...]
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, features in enumerate(self.features):
            x = nn.relu(conv2d(features, 3, 1, 1, bias=True, dtype=self.dtype,
                               name=f"convs_{i}")(x))
        return max_pool_ceil(x)


class VGGFace(nn.Module):
    """(B, 224, 224, 3) -> conv5 map (B, 7, 7, 512), fc2 descriptor (B, 4096), logits (B, 2622).

    `widths` (the 5 blocks' channels), `fc_width` and `num_classes` shrink the network for tests
    (official 64/128/256/512/512, 4096, 2622: 145,002,878 parameters). `dtype` is the compute
    dtype; the descriptor and logits are float32.
    Methods: `feature_map(x)` (ID-Guard's `features()`, also Grad-CAM's activation),
    `embedding(x)` (the 4096-D face descriptor: ReLU(fc2), the classifier's input),
    `classify(conv5)` (logits from a conv5 map, for Grad-CAM), `__call__(x)` (logits).
    """
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    fc_width: int = 4096
    num_classes: int = 2622
    dtype: Dtype = None

    def setup(self):
        blocks = [_ConvBlock((w,) * n, self.dtype) for w, n in zip(self.widths, CONVS_PER_BLOCK)]
        self.conv1, self.conv2, self.conv3, self.conv4, self.conv5 = blocks
        self.fc1 = dense(self.fc_width, dtype=self.dtype)
        self.fc2 = dense(self.fc_width, dtype=self.dtype)
        self.fc3 = dense(self.num_classes, dtype=self.dtype)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> conv5 output after its pool, (B, ceil(H/32), ceil(W/32), 512)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for block in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = block(x)
        return x

    def _descriptor(self, conv5: jax.Array) -> jax.Array:
        h = nn.relu(self.fc1(flatten_nchw(conv5)))
        return nn.relu(self.fc2(h))

    def embedding(self, x: jax.Array) -> jax.Array:
        """(B, 224, 224, 3) -> ReLU(fc2) (B, 4096) float32, not normalised."""
        return self._descriptor(self.feature_map(x)).astype(jnp.float32)

    def classify(self, conv5: jax.Array) -> jax.Array:
        """conv5 map (B, 7, 7, 512) -> identity logits (B, num_classes) float32."""
        return self.fc3(self._descriptor(conv5)).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classify(self.feature_map(x))
