"""Identity networks behind one interface: `features(x)` for the identity loss, `embed(x)` for
evaluation. Inputs are NHWC in [-1, 1] at any size; each network resizes them its own way.

Until the real networks land (ArcFace, VGGFace, dlib: issue 4) the only registered network is
`standin`, a small randomly initialised CNN. It exercises the code path; it recognises nobody.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from idguard_jax.images import resize_align_corners
from ports.layers import conv2d

__all__ = ["IdentityNet", "StandInIdentityCNN", "build", "init_random", "IDENTITY_NETS"]


class StandInIdentityCNN(nn.Module):
    """STAND-IN identity network: 3 strided 3x3 convs -> (B, S/8, S/8, 4*width) feature map, and
    a 128-D embedding from its global average. Random weights; for tests and demos only."""
    width: int = 16
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x):
        h = x
        for i, mult in enumerate((1, 2, 4)):
            h = nn.relu(conv2d(self.width * mult, 3, 2, 1, bias=True, name=f"conv{i + 1}")(h))
        emb = nn.Dense(self.embed_dim, name="fc")(jnp.mean(h, axis=(1, 2)))
        return h, emb


@dataclasses.dataclass(frozen=True)
class IdentityNet:
    """A face-identity network (static; weights travel separately)."""
    name: str
    module: nn.Module
    input_size: int

    def _run(self, variables, x):
        x = resize_align_corners(x.astype(jnp.float32), self.input_size)
        fmap, emb = self.module.apply(variables, x)
        return fmap.astype(jnp.float32), emb.astype(jnp.float32)

    def features(self, variables: dict, x: jax.Array) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> the feature map the identity loss compares, (B,h,w,C)."""
        return self._run(variables, x)[0]

    def embed(self, variables: dict, x: jax.Array) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> unit-norm embeddings (B,D)."""
        e = self._run(variables, x)[1]
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


IDENTITY_NETS = {
    "standin": (lambda width=16: StandInIdentityCNN(width=width), 56),
}


def build(name: str, **config: Any) -> IdentityNet:
    if name not in IDENTITY_NETS:
        raise ValueError(f"unknown identity network {name!r}; known: {', '.join(IDENTITY_NETS)}")
    make, size = IDENTITY_NETS[name]
    return IdentityNet(name=name, module=make(**config), input_size=size)


def init_random(name: str, key: jax.Array, **config: Any) -> tuple[IdentityNet, dict]:
    net = build(name, **config)
    x = jnp.zeros((1, net.input_size, net.input_size, 3), jnp.float32)
    return net, dict(net.module.init(key, x))
