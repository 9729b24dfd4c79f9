"""dlib's extract_image_chip in numpy (uint8 arithmetic, as dlib): the reference the tests hold
the JAX chip cutter and dlib itself against."""
from __future__ import annotations

import numpy as np

from idguard_jax.networks.dlib_chips import (_PYRAMID_MIN_SIZE, _PYRAMID_TAPS, CHIP_PADDING,
                                             CHIP_SIZE, ChipDetails, _sampling_plan, chip_details)

__all__ = ["extract_chip", "get_face_chip"]


def _pyramid_down_u8(img: np.ndarray) -> np.ndarray:
    """pyramid_down<2> of a uint8 (h, w, 3) image, in dlib's integer arithmetic."""
    h, w = img.shape[:2]
    if min(h, w) < _PYRAMID_MIN_SIZE:
        return np.zeros((0, 0, 3), np.uint8)
    ho, wo = (h - 3) // 2, (w - 3) // 2
    x = img.astype(np.int64)
    rows = sum(k * x[:, a:a + 2 * wo:2] for a, k in enumerate(_PYRAMID_TAPS))
    out = sum(k * rows[a:a + 2 * ho:2] for a, k in enumerate(_PYRAMID_TAPS)) // 256
    return out.astype(np.uint8)


def extract_chip(image: np.ndarray, details: ChipDetails) -> np.ndarray:
    """dlib's extract_image_chip (bilinear) of a uint8 RGB (H, W, 3) image, in numpy: the same
    crop, pyramid and samples, black outside, values truncated to uint8 as dlib does.
    (dlib copies pixels instead when the chip is unrotated and unscaled; a face chip never is.)
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB (H, W, 3) image, got {image.dtype} {image.shape}")
    plan = _sampling_plan(details, image.shape[:2])
    l, t, r, b = plan.bbox
    src = image[t:b + 1, l:r + 1]
    for _ in range(plan.level + 1):
        src = _pyramid_down_u8(src)
    if src.size == 0:  # an empty pyramid level: dlib's chip is all background
        return np.zeros((details.rows, details.cols, 3), np.uint8)
    cols, rows = np.meshgrid(np.arange(details.cols, dtype=np.float64),
                             np.arange(details.rows, dtype=np.float64))
    a = plan.affine
    x = a[0, 0] * cols + a[0, 1] * rows + a[0, 2]
    y = a[1, 0] * cols + a[1, 1] * rows + a[1, 2]
    left, top = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    valid = (left >= 0) & (top >= 0) & (left + 1 < src.shape[1]) & (top + 1 < src.shape[0])
    left, top = np.where(valid, left, 0), np.where(valid, top, 0)
    fx, fy = (x - left)[..., None], (y - top)[..., None]
    px = src.astype(np.float64)
    value = ((1 - fy) * ((1 - fx) * px[top, left] + fx * px[top, left + 1])
             + fy * ((1 - fx) * px[top + 1, left] + fx * px[top + 1, left + 1]))
    return np.where(valid[..., None], value, 0.0).astype(np.uint8)  # truncates, as dlib


def get_face_chip(image: np.ndarray, shape5: np.ndarray, size: int = CHIP_SIZE,
                  padding: float = CHIP_PADDING) -> np.ndarray:
    """dlib.get_face_chip(image, shape5, size, padding) in numpy: (size, size, 3) uint8."""
    return extract_chip(image, chip_details(shape5, size, padding))


