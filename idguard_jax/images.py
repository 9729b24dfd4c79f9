"""The one place for image conversions and resizing.

Images inside the library are NHWC float arrays in [-1, 1] (torchvision ToTensor + Normalize(0.5,
0.5)); files and user-facing arrays are uint8 RGB.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

__all__ = [
    "resize_align_corners", "to_float", "to_uint8", "read_rgb", "list_images", "IMAGE_SUFFIXES",
]


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


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Transparency (RGBA, LA, PA, palette or grey with a transparent
    colour) is composited on white, as viewers show it; 16/32-bit integer grey ('I;16*', 'I':
    16-bit PNG/TIFF data, 0..65535) is scaled by 255/65535, not clipped as PIL's convert does;
    float ('F') is taken as 0..1; CMYK and the rest go through PIL's convert."""
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        grey = np.clip(np.rint(np.asarray(im, np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_rgb(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), EXIF orientation applied; grey, palette, CMYK,
    16-bit and transparent images are converted as `_to_rgb` says.

    With `size`, resized to size x size with PIL bilinear (what torchvision's Resize([s, s]) does
    to a PIL image in the reference's data pipeline). Raises ValueError naming the file if it
    cannot be decoded (also a truncated file).
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not later
            im = _to_rgb(ImageOps.exif_transpose(im))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises these for bad, truncated or absurdly large files
        raise ValueError(f"{path}: cannot read image ({e})") from e


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Sorted paths of the image files in `folder` (by suffix, case-insensitive)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    out = []
    if recursive:
        for root, _, files in os.walk(folder):
            out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    else:
        out = [os.path.join(folder, f) for f in os.listdir(folder)
               if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)
