"""Array image maths, the one place for it: uint8 <-> [-1, 1], the L-inf budget in grey levels,
and the align_corners resize.

Images inside the library are NHWC float arrays in [-1, 1] (torchvision ToTensor + Normalize(0.5,
0.5)); files and user-facing arrays are uint8 RGB. One grey level is 1/127.5 in [-1, 1] units,
so a budget eps there allows floor(eps * 127.5) whole levels in a uint8 image (6 at eps 0.05).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["resize_align_corners", "to_float", "to_uint8", "as_float_images", "eps_grey_levels",
           "clip_to_budget", "quantise_within"]


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=True."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    # Source positions in float32 arithmetic, as torch computes them for float32 images.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1)
    pos = scale * np.arange(n_out, dtype=np.float32)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    frac = (pos - lo.astype(np.float32)).astype(np.float32)
    hi = np.minimum(lo + 1, n_in - 1)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def resize_align_corners(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """torch F.interpolate(mode='bilinear', align_corners=True) of an NHWC batch.

    `jax.image.resize` uses half-pixel centres and anti-aliases when shrinking, so it differs from
    what ID-Guard does for every resize (identity-net input, masks, heatmaps). Implemented as two
    small matrix products (exact, differentiable, cheap on accelerators). A no-op at equal size.
    """
    h_out, w_out = (size, size) if isinstance(size, int) else tuple(size)
    h_in, w_in = x.shape[1], x.shape[2]
    if (h_in, w_in) == (h_out, w_out):
        return x
    mh = jnp.asarray(_align_corners_matrix(h_in, h_out), dtype=x.dtype)
    mw = jnp.asarray(_align_corners_matrix(w_in, w_out), dtype=x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, y, precision=hi)


def to_float(images_u8) -> jax.Array | np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], i.e. ToTensor then Normalize(0.5, 0.5)."""
    xp = jnp if isinstance(images_u8, jax.Array) else np
    return images_u8.astype(xp.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], rounded to nearest (the reference's denorm then *255)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)



def as_float_images(images) -> jax.Array | np.ndarray:
    """uint8 [0, 255] (`to_float`) or float [-1, 1] images -> float32 [-1, 1], any shape.

    A jax array stays one; anything else becomes a numpy array."""
    if not isinstance(images, jax.Array):
        images = np.asarray(images)
    if images.dtype == np.uint8:
        return to_float(images)
    return images.astype(jnp.float32 if isinstance(images, jax.Array) else np.float32)


def eps_grey_levels(eps: float) -> int:
    """The L-inf budget eps ([-1, 1] units) in whole grey levels of a uint8 image:
    floor(eps * 127.5), e.g. 6 at eps 0.05."""
    return int(np.floor(float(eps) * 127.5))


def clip_to_budget(levels, original_u8, eps: float) -> np.ndarray:
    """Grey levels (any float or int array) pulled back to within `eps_grey_levels(eps)` of the
    uint8 `original_u8` (same shape) and into [0, 255]; returns uint8."""
    orig = np.asarray(original_u8).astype(np.int32)
    n = eps_grey_levels(eps)
    lo, hi = np.maximum(orig - n, 0), np.minimum(orig + n, 255)
    return np.clip(np.asarray(levels), lo, hi).astype(np.uint8)


def quantise_within(original_u8, protected, eps: float) -> np.ndarray:
    """Protected float images [-1, 1] as the uint8 image a user would save: rounded to the
    nearest level (`to_uint8`), except where that would leave the budget eps around the
    original (`clip_to_budget`)."""
    return clip_to_budget(to_uint8(protected), original_u8, eps)
