"""Batch protection: aligned faces in, protected faces out, through ONE jitted function.

    gen = protect.load("runs/demo/generator")     # or a converted official AdvG.pth
    protected = protect.protect(gen, images)      # (B,S,S,3) uint8 -> uint8, float -> float

Any batch size runs without recompiling per size: batches are padded up to a power of two
(at most `max_bucket`) and larger ones are processed in chunks, so at most log2(max_bucket) + 1
programs are ever compiled for one image size. The generator runs with its BatchNorm running
statistics (eval mode), so each image's protection does not depend on the rest of the batch.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.generator import GeneratorConfig, load_generator, perturb

__all__ = ["Generator", "load", "protect", "protect_float", "bucket_size"]


@dataclasses.dataclass(frozen=True)
class Generator:
    """A trained generator: variables {'params','batch_stats'}, delta_p (S,S,3), its config."""
    variables: dict
    delta_p: jax.Array
    config: GeneratorConfig


def load(path: str | os.PathLike) -> Generator:
    variables, delta_p, cfg = load_generator(path)
    variables = jax.tree.map(jnp.asarray, variables)
    return Generator(variables, jnp.asarray(delta_p), cfg)


@functools.partial(jax.jit, static_argnames=("config", "eps"))
def protect_float(variables: dict, delta_p: jax.Array, x: jax.Array, *, config: GeneratorConfig,
                  eps: float) -> jax.Array:
    """x (B,S,S,3) float in [-1,1] -> x_adv, |x_adv - x| <= eps. Weights are arguments."""
    x_adv, _, _ = perturb(config.module(), variables, delta_p, x.astype(jnp.float32), eps,
                          train=False)
    return x_adv


def bucket_size(n: int, max_bucket: int) -> int:
    """The padded batch size for n images: the next power of two, capped at max_bucket."""
    b = 1
    while b < n and b < max_bucket:
        b *= 2
    return b


def protect(gen: Generator, images, *, eps: float | None = None, max_bucket: int = 32):
    """Protect aligned faces (B,S,S,3), S = the generator's image size.

    uint8 input gives uint8 output (rounded; the change stays within eps*127.5 grey levels);
    float input (in [-1,1]) gives float32. `eps` defaults to the generator's training budget and
    may only be lowered or raised by the caller deliberately (it is the L-inf bound in [-1,1] units).
    """
    images = np.asarray(images)
    s = gen.config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"images must be (B, {s}, {s}, 3) aligned faces, got {images.shape}")
    eps = gen.config.eps if eps is None else float(eps)
    is_u8 = images.dtype == np.uint8
    x = images.astype(np.float32) / 127.5 - 1.0 if is_u8 else images.astype(np.float32)
    out = np.empty_like(x)
    i = 0
    while i < len(x):
        chunk = x[i:i + max_bucket]
        b = bucket_size(len(chunk), max_bucket)
        padded = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.float32)])
        y = protect_float(gen.variables, gen.delta_p, padded, config=gen.config, eps=eps)
        out[i:i + len(chunk)] = np.asarray(y)[:len(chunk)]
        i += len(chunk)
    if is_u8:
        # Round towards the original where rounding would exceed the budget in grey levels.
        levels = np.clip(np.rint((out + 1.0) * 127.5), 0, 255)
        lim = eps * 127.5
        orig = images.astype(np.float32)
        levels = np.clip(levels, np.ceil(orig - lim), np.floor(orig + lim))
        return levels.astype(np.uint8)
    return out
