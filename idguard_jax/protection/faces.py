"""Batch protection: aligned faces in, protected faces out, through ONE jitted function.

    gen = protect.load("runs/demo/generator")     # or a converted official AdvG.pth
    protected = protect.protect(gen, images)      # (B,S,S,3) uint8 -> uint8, float -> float
    fast = protect.load("runs/demo/generator", dtype="bfloat16")   # BatchNorm folded (fast.py)

Any batch size runs without recompiling per size: batches are padded up to a power of two
(at most `max_bucket`) and larger ones are processed in chunks, so at most log2(max_bucket) + 1
programs are ever compiled for one image size. The generator runs with its BatchNorm running
statistics (eval mode), so each image's protection does not depend on the rest of the batch.
"""
from __future__ import annotations

import os

import numpy as np

from idguard_jax.generator import Generator, load_trained, protect_eval
from idguard_jax.images import as_float_images, quantise_within
from idguard_jax.protection.fast import FastGenerator, prepare

__all__ = ["Generator", "FastGenerator", "load", "protect", "bucket_size"]


def load(path: str | os.PathLike, dtype: str | None = None) -> Generator | FastGenerator:
    """A trained generator bundle (exported by experiments/train.py or converted), on device.

    dtype None: the generator as trained (`generator.protect_eval`); 'float32' or 'bfloat16':
    its BatchNorm folded into the convolutions, computed in that dtype (`fast.prepare`)."""
    gen = load_trained(path)
    return gen if dtype is None else prepare(gen, dtype)


def bucket_size(n: int, max_bucket: int) -> int:
    """The padded batch size for n images: the next power of two, capped at max_bucket."""
    b = 1
    while b < n and b < max_bucket:
        b *= 2
    return b


def protect(gen: Generator | FastGenerator, images, *, eps: float | None = None,
            max_bucket: int = 32):
    """Protect aligned faces (B,S,S,3), S = the generator's image size.

    uint8 input gives uint8 output (rounded, and within `images.eps_grey_levels(eps)` grey
    levels of the input: `images.quantise_within`); float input (in [-1,1]) gives float32.
    `eps` defaults to the generator's training budget and may only be lowered or raised by the
    caller deliberately (it is the L-inf bound in [-1,1] units).
    """
    images = np.asarray(images)
    s = gen.config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"images must be (B, {s}, {s}, 3) aligned faces, got {images.shape}")
    eps = gen.config.eps if eps is None else float(eps)
    x = as_float_images(images)
    out = np.empty_like(x)
    i = 0
    while i < len(x):
        chunk = x[i:i + max_bucket]
        b = bucket_size(len(chunk), max_bucket)
        padded = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.float32)])
        if isinstance(gen, FastGenerator):
            y = gen(padded, eps)
        else:
            y = protect_eval(gen.variables, gen.delta_p, padded, config=gen.config, eps=eps)
        out[i:i + len(chunk)] = np.asarray(y)[:len(chunk)]
        i += len(chunk)
    if images.dtype == np.uint8:
        return quantise_within(images, out, eps)
    return out
