"""The one place for image conversions and resizing.

Images inside the library are NHWC float arrays in [-1, 1] (torchvision ToTensor + Normalize(0.5,
0.5)); files and user-facing arrays are uint8 RGB.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

__all__ = [
    "resize_align_corners", "to_float", "to_uint8", "read_rgb", "list_images", "IMAGE_SUFFIXES",
    "Photo", "read_photo", "encode_photo", "decode_stored", "orient", "unorient", "PHOTO_FORMATS",
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
    if _has_alpha(im):
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


# ------------------------------------------------------------------------------------------
# Photos as users own them: format, pixel mode, EXIF orientation and metadata kept.

# Formats a protected photo can be written back in (PIL names).
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Pixel modes written back as they are; other modes (palette, CMYK, 16-bit, 1-bit) are written
# as RGB(A): quantising to a palette or a bit depth would erase the perturbation.
_KEPT_MODES = ("RGB", "RGBA", "L", "LA")
# numpy versions of the EXIF orientations (stored -> upright), as PIL's exif_transpose does them
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                           # mirror left-right
    3: lambda a: a[::-1, ::-1],                        # rotate 180
    4: lambda a: a[::-1],                              # mirror top-bottom
    5: lambda a: a.swapaxes(0, 1),                     # transpose
    6: lambda a: np.rot90(a, -1),                      # stored rotated; turn 90 clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),         # transverse
    8: lambda a: np.rot90(a, 1),                       # turn 90 counter-clockwise
}
_UNORIENT = {**_ORIENT, 6: _ORIENT[8], 8: _ORIENT[6]}  # the others are their own inverse


def orient(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels (H, W, ...) as stored -> as displayed, for an EXIF orientation 1..8."""
    return np.ascontiguousarray(_ORIENT.get(orientation, _ORIENT[1])(stored))


def unorient(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The inverse of `orient`: displayed pixels -> the file's stored layout."""
    return np.ascontiguousarray(_UNORIENT.get(orientation, _UNORIENT[1])(upright))


@dataclasses.dataclass
class Photo:
    """A decoded photo. `stored` (H, W, C) uint8 in the file's own pixel layout and `mode`
    ('RGB', 'RGBA', 'L' or 'LA'; `converted_from` names the file's mode when it was not one of
    these); `upright` (H', W', 3) uint8 RGB as a viewer shows it (EXIF orientation applied,
    transparency on white) for face detection; `format` PIL's name; `metadata` what is written
    back (exif, icc_profile, xmp, dpi, PNG text, JPEG comment)."""
    path: str
    format: str
    mode: str
    stored: np.ndarray
    upright: np.ndarray
    orientation: int
    metadata: dict
    converted_from: str | None = None


def read_photo(path: str | os.PathLike) -> Photo:
    """Decode a photo for protection, keeping what is needed to write it back the same way.
    Raises ValueError naming the file if it cannot be read or its format is not supported."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            # phones' multi-picture JPEGs (MPO): the first picture, written back as JPEG
            fmt = "JPEG" if im.format == "MPO" else im.format
            if fmt not in PHOTO_FORMATS:
                raise ValueError(f"{path}: unsupported image format {fmt} "
                                 f"(JPEG, PNG, WebP and BMP are supported)")
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            meta = {k: im.info[k] for k in ("exif", "icc_profile", "xmp", "dpi", "comment")
                    if im.info.get(k)}
            if fmt == "PNG" and getattr(im, "text", None):
                meta["text"] = dict(im.text)
            converted = None
            if im.mode in _KEPT_MODES:
                kept = im
            else:
                converted = im.mode
                kept = _to_rgb(im) if not _has_alpha(im) else im.convert("RGBA")
                # an ICC profile describes the old mode's values (e.g. CMYK): no longer valid
                meta.pop("icc_profile", None)
            stored = np.asarray(kept, np.uint8)
            stored = stored[..., None] if stored.ndim == 2 else stored.copy()
            upright = orient(np.asarray(_to_rgb(kept), np.uint8), orientation)
            return Photo(path, fmt, kept.mode, stored, upright, orientation, meta, converted)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def encode_photo(photo: Photo, stored: np.ndarray, *, format: str | None = None,
                 jpeg_quality: int = 95, strip_metadata: bool = False) -> tuple[bytes, dict]:
    """Encode pixels `stored` (the layout and mode of `photo.stored`) in `format` (default the
    photo's own), with the photo's metadata: (file bytes, what was done).

    JPEG is written at `jpeg_quality` with 4:4:4 chroma (4:2:0 subsampling halves the colour
    resolution and erases much of a colour perturbation); WebP is written lossless (its lossy
    mode always subsamples chroma); PNG and BMP are lossless. With `strip_metadata`, EXIF, XMP,
    comments and text are dropped (the ICC colour profile and dpi are kept: they change how the
    picture looks) and the orientation is applied to the pixels, so it still shows upright.
    What was done: {'format', 'lossless', and for JPEG 'quality', 'subsampling'}."""
    fmt = format or photo.format
    pixels = stored
    meta = dict(photo.metadata)
    if strip_metadata:
        pixels = orient(stored, photo.orientation)
        meta = {k: v for k, v in meta.items() if k in ("icc_profile", "dpi")}
    arr = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    im = Image.fromarray(np.ascontiguousarray(arr, np.uint8), photo.mode)
    if fmt in ("JPEG", "BMP") and im.mode in ("RGBA", "LA"):
        raise ValueError(f"{photo.path}: {fmt} cannot hold transparency; write PNG or WebP")
    kwargs = {k: meta[k] for k in ("exif", "icc_profile", "dpi") if k in meta}
    done = {"format": fmt, "lossless": fmt in ("PNG", "WEBP", "BMP")}
    if fmt == "JPEG":
        kwargs.update(quality=int(jpeg_quality), subsampling=0, optimize=True)
        done.update(quality=int(jpeg_quality), subsampling="4:4:4")
        if "comment" in meta:
            kwargs["comment"] = meta["comment"]
    elif fmt == "WEBP":
        kwargs.update(lossless=True, quality=100, method=4)
    elif fmt == "PNG":
        from PIL import PngImagePlugin

        if "text" in meta:
            info = PngImagePlugin.PngInfo()
            for k, v in meta["text"].items():
                info.add_text(k, v)
            kwargs["pnginfo"] = info
    elif fmt == "BMP":
        kwargs = {k: v for k, v in kwargs.items() if k == "dpi"}
    if "xmp" in meta and fmt in ("JPEG", "WEBP", "PNG"):
        kwargs["xmp"] = meta["xmp"]
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kwargs)
    return buffer.getvalue(), done


def decode_stored(data: bytes, mode: str) -> np.ndarray:
    """Encoded image bytes -> (H, W, C) uint8 pixels in the file's stored layout (no EXIF
    orientation applied) and the given mode: what `Photo.stored` holds for that file."""
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert(mode), np.uint8)
    return a[..., None] if a.ndim == 2 else a.copy()
