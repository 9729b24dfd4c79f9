"""Photos as users own them: format, pixel mode, EXIF orientation and metadata kept.

`read_photo` decodes a photo with what is needed to write it back the same way; `encode_photo`
writes protected pixels back in the photo's own format (or another), with its metadata.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

from idguard_jax.image_files import has_alpha, to_rgb

__all__ = ["Photo", "read_photo", "encode_photo", "decode_stored", "orient", "unorient",
           "PHOTO_FORMATS"]
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
                kept = to_rgb(im) if not has_alpha(im) else im.convert("RGBA")
                # an ICC profile describes the old mode's values (e.g. CMYK): no longer valid
                meta.pop("icc_profile", None)
            stored = np.asarray(kept, np.uint8)
            stored = stored[..., None] if stored.ndim == 2 else stored.copy()
            upright = orient(np.asarray(to_rgb(kept), np.uint8), orientation)
            return Photo(path, fmt, kept.mode, stored, upright, orientation, meta, converted)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


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

