"""dlib's face chips, differentiably: where dlib cuts its 150x150 chip, and a JAX cutter.

`chip_warps` computes on the host, from the CLEAN image's 5 landmarks, the per-image data
(`ChipWarp`) that `cut_chips` needs to cut dlib's chip from any image of that size, clean or
perturbed, at the same place (dlib's `get_face_chip_details` and `extract_image_chip`,
dlib/image_transforms/interpolation.h).

The JAX cutter follows dlib's extraction step by step (same sub-window, same pyramid levels with
dlib's 5-tap filter, same sample positions, same black background where a bilinear footprint
leaves the sampled image). It differs in one way: dlib truncates to uint8 after each pyramid
level and after the bilinear sample (a mean loss of about half a grey level each time); the
cutter stays in float and subtracts that mean instead, so it is smooth and unbiased.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ports.dlib_resnet import INPUT_SIZE

__all__ = ["CHIP_SIZE", "CHIP_PADDING", "ChipDetails", "chip_details", "ChipWarp", "chip_warps",
           "cut_chips"]

CHIP_SIZE = INPUT_SIZE
CHIP_PADDING = 0.25  # what dlib's compute_face_descriptor and get_face_chip use


# ------------------------------------------------------------------------------------------
# dlib's chip geometry (numpy, float64 like dlib)
# ------------------------------------------------------------------------------------------


# get_face_chip_details' template for the 5-point model, in unit chip coordinates: the outer and
# inner corner of the image-right eye, of the image-left eye, and the point below the nose.
_FIVE_POINT_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475]])

# pyramid_down<2>: the separable 5-tap filter (its 2-D sum is 256) and where a level's point
# maps: p_down = p / 2 - offset (dlib's constants, x and y differ).
_PYRAMID_TAPS = (1, 4, 6, 4, 1)
_PYRAMID_OFFSET = np.array([1.25, 0.75])
_PYRAMID_MIN_SIZE = 9  # dlib leaves a level empty below this many rows or columns
# mean loss from dlib's truncation to uint8 (bilinear value, pyramid sum / 256)
_TRUNCATION_BIAS = 0.5


class ChipDetails(NamedTuple):
    """dlib's chip_details: `rect` (left, top, right, bottom) in image pixels (float; right =
    left + width - 1), rotated by `angle` (radians) about its centre; chip `rows` x `cols`."""
    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def _similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) mapping src points to dst points: (2x2 m, t)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sigma_s = np.mean(np.sum((src - mu_s) ** 2, axis=1))
    cov = (dst - mu_d).T @ (src - mu_s) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.ones(2)
    if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0
                                  and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[1] = -1.0  # d is sorted: flip the smaller singular direction, as dlib does
    r = u @ np.diag(s) @ vt
    c = np.sum(d * s) / sigma_s if sigma_s != 0 else 1.0
    return c * r, mu_d - c * r @ mu_s


def chip_details(shape5: np.ndarray, size: int = CHIP_SIZE,
                 padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's get_face_chip_details for 5 landmarks ((5, 2) x, y in image pixels)."""
    pts = np.asarray(shape5, np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected dlib's 5 landmarks as a (5, 2) array, got {pts.shape}")
    chip_pts = (padding + _FIVE_POINT_TEMPLATE) / (2 * padding + 1) * size
    m, t = _similarity_transform(chip_pts, pts)
    angle = math.atan2(m[1, 0], m[0, 0])
    scale = math.hypot(m[0, 0], m[1, 0])
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    half = (size * scale - 1) / 2  # dlib's centred rect spans width - 1 between its edges
    return ChipDetails((cx - half, cy - half, cx + half, cy + half), angle, size, size)


def _rect_down(rect: np.ndarray) -> np.ndarray:
    """pyramid_down<2>'s rect_down of (l, t, r, b)."""
    return np.concatenate([rect[:2] / 2 - _PYRAMID_OFFSET, rect[2:] / 2 - _PYRAMID_OFFSET])


def _area(rect: np.ndarray) -> float:
    l, t, r, b = rect
    return 0.0 if (l > r or t > b) else (r - l + 1) * (b - t + 1)


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: halves away from zero."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _rotated_corners(rect: np.ndarray, angle: float) -> np.ndarray:
    """tl, tr, bl, br of `rect` rotated by `angle` about its centre, (4, 2) x, y."""
    l, t, r, b = rect
    centre = np.array([(l + r) / 2, (t + b) / 2])
    corners = np.array([[l, t], [r, t], [l, b], [r, b]])
    c, s = math.cos(angle), math.sin(angle)
    return (corners - centre) @ np.array([[c, s], [-s, c]]) + centre


class _SamplingPlan(NamedTuple):
    """How extract_image_chip samples one chip: the sub-window `bbox` (l, t, r, b, inclusive
    integer image pixels) it crops, the pyramid `level` of that crop (-1: the crop itself) and
    `affine` (2, 3): chip pixel (x, y, 1) -> (x, y) in that level."""
    bbox: np.ndarray
    level: int
    affine: np.ndarray


def _sampling_plan(details: ChipDetails, image_hw: tuple[int, int]) -> _SamplingPlan:
    """dlib's extract_image_chips for one chip: pyramid depth, crop, and chip-to-level map."""
    rect = np.asarray(details.rect, np.float64)
    size = details.rows * details.cols
    # Shrink by pyramid levels while a level would still hold more pixels than the chip.
    level, grow, down = -1, 2.0, _rect_down(rect)
    while _area(down) > size:
        level, grow, down = level + 1, grow * 2 + 2, _rect_down(down)
    # The crop: the rotated rect's bounding box, grown by the filters' reach, inside the image.
    corners = _rotated_corners(rect, details.angle)
    h, w = image_hw
    lo = np.maximum(corners.min(0) - grow, 0.0)
    hi = np.minimum(corners.max(0) + grow, np.array([w - 1.0, h - 1.0]))
    bbox = _lround(np.concatenate([lo, hi]))
    if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise ValueError(f"the face chip {details.rect} lies outside the {w}x{h} image")
    local = rect - np.tile(bbox[:2], 2).astype(np.float64)
    for _ in range(level + 1):
        local = _rect_down(local)
    tl, tr, bl, _ = _rotated_corners(local, details.angle)
    affine = np.stack([(tr - tl) / (details.cols - 1), (bl - tl) / (details.rows - 1), tl], 1)
    return _SamplingPlan(bbox, level, affine)



# ------------------------------------------------------------------------------------------
# The differentiable chip cutter (JAX)
# ------------------------------------------------------------------------------------------


class ChipWarp(NamedTuple):
    """Per-image data (a pytree of arrays, leading batch axis) that `cut_chips` needs to cut
    dlib's chip; computed on the host by `chip_warps` from the clean image's landmarks, then it
    travels with the batch.

    origin (B, 2) int32: x, y of dlib's crop in the image (its pyramid grid starts there).
    affine (B, 2, 3) float32: chip pixel (x, y, 1) -> x, y in the crop's atlas (the crop and its
      pyramid levels side by side, see `_atlas_layout`).
    box (B, 4) float32: x0, y0, x1, y1, the sampled level's pixels in the atlas (inclusive): a
      sample whose 2x2 footprint leaves it is black, as in dlib.
    """
    origin: jax.Array
    affine: jax.Array
    box: jax.Array


def _level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """(h, w) of pyramid levels 0, 1, ... of an h x w image, as long as dlib makes them."""
    sizes = []
    while min(h, w) >= _PYRAMID_MIN_SIZE:
        h, w = (h - 3) // 2, (w - 3) // 2
        sizes.append((h, w))
    return sizes


def _atlas_layout(h: int, w: int) -> list[tuple[int, int]]:
    """Atlas (x, y) of each image of an h x w crop: the crop at (0, 0), level 0 to its right at
    (w, 0), each further level below the previous one."""
    places, y = [(0, 0)], 0
    for lh, _ in _level_sizes(h, w):
        places.append((w, y))
        y += lh
    return places


def chip_warps(shapes5: np.ndarray, image_hw: tuple[int, int],
               padding: float = CHIP_PADDING) -> ChipWarp:
    """ChipWarp (numpy, batch B) for landmarks (B, 5, 2) found on the CLEAN images of size
    image_hw = (H, W): `cut_chips` then cuts dlib's chip from any image of that size (the clean
    one, or a perturbed one, at the same place)."""
    shapes5 = np.asarray(shapes5)
    if shapes5.ndim != 3 or shapes5.shape[1:] != (5, 2):
        raise ValueError(f"expected landmarks (B, 5, 2), got {shapes5.shape}")
    h, w = image_hw
    places = _atlas_layout(h, w)
    origin, affine, box = [], [], []
    for pts in shapes5:
        plan = _sampling_plan(chip_details(pts, CHIP_SIZE, padding), (h, w))
        bh, bw = plan.bbox[3] - plan.bbox[1] + 1, plan.bbox[2] - plan.bbox[0] + 1
        sizes = [(bh, bw)] + _level_sizes(bh, bw)
        if plan.level + 1 >= min(len(sizes), len(places)):
            # dlib would cut an all-black chip from an empty pyramid level
            raise ValueError(f"cannot cut a chip from a {w}x{h} image: the face is mostly "
                             f"outside it (pyramid level {plan.level} of a {bw}x{bh} crop)")
        level_hw = sizes[plan.level + 1]
        px, py = places[plan.level + 1]
        origin.append(plan.bbox[:2])
        affine.append(plan.affine + np.array([[0, 0, px], [0, 0, py]]))
        box.append([px, py, px + level_hw[1] - 1, py + level_hw[0] - 1])
    return ChipWarp(np.asarray(origin, np.int32), np.asarray(affine, np.float32),
                    np.asarray(box, np.float32))


def _pyramid_down(img: jax.Array) -> jax.Array:
    """pyramid_down<2> of (h, w, 3) floats, minus dlib's mean truncation loss."""
    h, w = img.shape[:2]
    ho, wo = (h - 3) // 2, (w - 3) // 2
    rows = sum(k * img[:, a:a + 2 * wo:2] for a, k in enumerate(_PYRAMID_TAPS))
    out = sum(k * rows[a:a + 2 * ho:2] for a, k in enumerate(_PYRAMID_TAPS))
    return out / 256.0 - _TRUNCATION_BIAS


def _atlas(crop: jax.Array) -> jax.Array:
    """The crop (h, w, 3) and its pyramid levels in one (h, w + w0, 3) array (`_atlas_layout`)."""
    h, w = crop.shape[:2]
    levels, level = [], crop
    for _ in _level_sizes(h, w):
        level = _pyramid_down(level)
        levels.append(level)
    if not levels:
        return crop
    w0 = levels[0].shape[1]
    column = jnp.concatenate([jnp.pad(v, ((0, 0), (0, w0 - v.shape[1]), (0, 0)))
                              for v in levels], axis=0)
    column = jnp.pad(column, ((0, h - column.shape[0]), (0, 0), (0, 0)))
    return jnp.concatenate([crop, column], axis=1)


def _cut_one(image: jax.Array, origin: jax.Array, affine: jax.Array,
             box: jax.Array) -> jax.Array:
    """One chip (150, 150, 3) from one (H, W, 3) image in [0, 255] (see `cut_chips`)."""
    h, w = image.shape[:2]
    # dlib's pyramid grid starts at its crop's corner: shift the image there (zeros beyond).
    padded = jnp.pad(image, ((0, h), (0, w), (0, 0)))
    crop = jax.lax.dynamic_slice(padded, (origin[1], origin[0], 0), (h, w, 3))
    atlas = _atlas(crop)
    grid = jnp.arange(CHIP_SIZE, dtype=jnp.float32)
    x = affine[0, 0] * grid[None, :] + affine[0, 1] * grid[:, None] + affine[0, 2]
    y = affine[1, 0] * grid[None, :] + affine[1, 1] * grid[:, None] + affine[1, 2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    valid = (x0 >= box[0]) & (y0 >= box[1]) & (x0 + 1 <= box[2]) & (y0 + 1 <= box[3])
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    ix = jnp.clip(x0, 0, atlas.shape[1] - 2).astype(jnp.int32)
    iy = jnp.clip(y0, 0, atlas.shape[0] - 2).astype(jnp.int32)
    value = ((1 - fy) * ((1 - fx) * atlas[iy, ix] + fx * atlas[iy, ix + 1])
             + fy * ((1 - fx) * atlas[iy + 1, ix] + fx * atlas[iy + 1, ix + 1]))
    return jnp.where(valid[..., None], value - _TRUNCATION_BIAS, 0.0)


def cut_chips(images: jax.Array, warp: ChipWarp,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Cut dlib's 150x150 face chips from (B, H, W, 3) RGB images, differentiably.

    `images` span `value_range` ((-1, 1): the library's convention; (0, 255): dlib's pixels);
    `warp` = chip_warps(landmarks of the clean images, (H, W)). Returns (B, 150, 150, 3) float32
    chips in dlib's pixel units [0, 255] with black (0) where dlib's chip is black: the input of
    `descriptor`. Gradients flow to `images` (not to `warp`, which is data).
    """
    lo, hi = value_range
    pixels = (jnp.asarray(images, jnp.float32) - lo) * (255.0 / (hi - lo))
    return jax.vmap(_cut_one)(pixels, jnp.asarray(warp.origin), jnp.asarray(warp.affine),
                              jnp.asarray(warp.box))

