"""Photos as users own them: format, pixel mode, frames, EXIF orientation and metadata kept.

`read_photo` decodes a photo with what is needed to write it back the same way; `encode_photo`
writes protected pixels back in the photo's own format (or another), with its metadata.
`output_format` / `output_name` say what a photo is written as (a GIF becomes a PNG).
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image, ImageSequence, features

from idguard_jax.image_files import HEIF_READABLE, IMAGE_SUFFIXES, has_alpha, to_rgb

__all__ = ["Photo", "read_photo", "encode_photo", "decode_stored", "decode_frames", "orient",
           "unorient", "writes_upright", "output_format", "output_name", "PHOTO_FORMATS",
           "PHOTO_SUFFIXES", "LOSSLESS_FORMATS"]
# Formats a photo can be read in and written back in (PIL names; pillow-heif names HEIC 'HEIF').
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "HEIF", "AVIF", "GIF")
# Written losslessly: HEIF through libheif's lossless mode with RGB (identity) matrix
# coefficients and 4:4:4 (decoded pixels equal the written ones). AVIF is not: Pillow always
# converts to YCbCr (quality 100 4:4:4 still moves values by up to 2), and GIF's palette.
LOSSLESS_FORMATS = ("PNG", "WEBP", "BMP", "TIFF", "HEIF")
# Suffixes of the files a folder is searched for (case-insensitive).
PHOTO_SUFFIXES = IMAGE_SUFFIXES + (".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "BMP": (".bmp",),
             "TIFF": (".tif", ".tiff"), "HEIF": (".heic", ".heif"), "AVIF": (".avif",),
             "GIF": (".gif",)}
_SINGLE_FRAME = ("JPEG", "BMP")
# Pixel modes written back as they are; other modes (palette, CMYK, 16-bit, 1-bit) are written
# as RGB(A): quantising to a palette or a bit depth would erase the perturbation.
_KEPT_MODES = ("RGB", "RGBA", "L", "LA")
# TIFF tags describing the pixel layout: the writer sets them for the new pixels
_TIFF_LAYOUT_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325,
                     338, 339, 34675)
_TIFF_LOSSLESS = ("raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "lzma",
                  "zstd")
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
    these); `frames` the further frames of an animation or pages of a TIFF, each like `stored`;
    `upright` (H', W', 3) uint8 RGB of the first frame as a viewer shows it (EXIF orientation
    applied, transparency on white) for face detection; `format` PIL's name; `metadata` what is
    written back (exif, icc_profile, xmp, dpi, PNG text, JPEG comment, TIFF compression,
    animation duration and loop)."""
    path: str
    format: str
    mode: str
    stored: np.ndarray
    upright: np.ndarray
    orientation: int
    metadata: dict
    converted_from: str | None = None
    frames: list = dataclasses.field(default_factory=list)

    def layers(self) -> list[np.ndarray]:
        """Every frame's stored pixels, the first one first."""
        return [self.stored, *self.frames]

    def upright_frames(self) -> list[np.ndarray]:
        """Every frame as `upright` is for the first: what faces are searched in."""
        return [self.upright] + [_upright(f, self.mode, self.orientation) for f in self.frames]


def output_format(source_format: str, requested: str | None = None, keep_gif: bool = False
                  ) -> str:
    """The format a photo in `source_format` is written in: `requested`, else its own, except
    that a GIF becomes a PNG (an APNG when animated) unless `keep_gif`: a 256-colour palette
    cannot carry a change of a few grey levels."""
    if requested:
        return requested
    return "PNG" if source_format == "GIF" and not keep_gif else source_format


def output_name(path: str, requested: str | None = None, keep_gif: bool = False) -> str:
    """`path` with the suffix of the format it is written in (see `output_format`; the format
    is guessed from the suffix, e.g. '.gif' -> '.png'); a suffix already right is kept."""
    stem, suffix = os.path.splitext(path)
    source = next((f for f, s in _SUFFIXES.items() if suffix.lower() in s), None)
    fmt = output_format(source, requested, keep_gif) if source else requested
    if fmt is None or suffix.lower() in _SUFFIXES[fmt]:
        return path
    return stem + _SUFFIXES[fmt][0]


def writes_upright(photo: Photo, fmt: str, strip_metadata: bool) -> bool:
    """Whether `encode_photo` stores the pixels upright (orientation 1) rather than as read:
    with `strip_metadata`, and in HEIF, whose writer turns an EXIF orientation into a rotation
    that its reader applies (so its decoded pixels would not be in the stored layout)."""
    return photo.orientation != 1 and (strip_metadata or fmt == "HEIF")


def _upright(stored: np.ndarray, mode: str, orientation: int) -> np.ndarray:
    im = Image.fromarray(stored[..., 0] if stored.shape[-1] == 1 else stored, mode)
    return orient(np.asarray(to_rgb(im), np.uint8), orientation)


def _as_array(im: Image.Image) -> np.ndarray:
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a.copy()


def _metadata(im: Image.Image, fmt: str) -> dict:
    """What `encode_photo` writes back: EXIF, ICC, XMP, dpi, comment; PNG text; TIFF's own tags
    (its EXIF, XMP included) less those describing the pixel layout, and its compression."""
    meta = {k: im.info[k] for k in ("exif", "icc_profile", "xmp", "dpi", "comment")
            if im.info.get(k)}
    if fmt == "PNG" and getattr(im, "text", None):
        meta["text"] = dict(im.text)
    if fmt == "TIFF":
        exif = im.getexif()
        for tag in _TIFF_LAYOUT_TAGS:
            if tag in exif:
                del exif[tag]
        meta["exif"] = exif.tobytes()
        meta["compression"] = im.info.get("compression", "raw")
    return meta


def _frame_images(im: Image.Image, fmt: str) -> tuple[list[Image.Image], list]:
    """Every frame (an MPO's first picture only: the others are previews or the second eye)
    and each frame's duration (ms)."""
    if fmt == "JPEG" or getattr(im, "n_frames", 1) == 1:
        return [im], [im.info.get("duration")]
    frames, durations = [], []
    for frame in ImageSequence.Iterator(im):
        frames.append(frame.copy())
        durations.append(frame.info.get("duration"))
    if any(f.size != frames[0].size for f in frames):
        raise ValueError(f"{im.filename}: its {len(frames)} frames are not all the same size "
                         f"(not supported)")
    return frames, durations


def _common_mode(frames: list[Image.Image]) -> tuple[str, str | None]:
    """The mode every frame is kept in, and the file's mode when it is converted."""
    modes = {f.mode for f in frames}
    if len(modes) == 1 and frames[0].mode in _KEPT_MODES:
        return frames[0].mode, None
    return ("RGBA" if any(has_alpha(f) for f in frames) else "RGB"), frames[0].mode


def _unreadable_hint(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".heic", ".heif") and not HEIF_READABLE:
        return "; HEIC/HEIF needs pillow-heif: pip install pillow-heif"
    if suffix == ".avif" and not features.check("avif"):
        return "; this Pillow has no AVIF support"
    return ""


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
                raise ValueError(f"{path}: unsupported image format {fmt} (supported: "
                                 f"{', '.join(PHOTO_FORMATS)})")
            # read after load: TIFF and HEIF readers apply the orientation to the pixels
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            meta = _metadata(im, fmt)
            frames, durations = _frame_images(im, fmt)
            if len(frames) > 1:
                meta.update(duration=durations, loop=im.info.get("loop", 0))
            mode, converted = _common_mode(frames)
            if converted:
                frames = [to_rgb(f) if mode == "RGB" else f.convert("RGBA") for f in frames]
                # an ICC profile describes the old mode's values (e.g. CMYK): no longer valid
                meta.pop("icc_profile", None)
            layers = [_as_array(f) for f in frames]
            return Photo(path, fmt, mode, layers[0], _upright(layers[0], mode, orientation),
                         orientation, meta, converted, layers[1:])
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e}){_unreadable_hint(path)}") from e


def _metadata_to_write(photo: Photo, strip_metadata: bool, upright: bool) -> dict:
    meta = dict(photo.metadata)
    if strip_metadata:
        meta = {k: v for k, v in meta.items() if k in ("icc_profile", "dpi", "compression",
                                                       "duration", "loop")}
    elif upright and "exif" in meta:   # the pixels are turned: the orientation tag says 1
        exif = Image.Exif()
        exif.load(meta["exif"])
        exif[0x0112] = 1
        meta["exif"] = exif.tobytes()
    return meta


def _format_options(fmt: str, meta: dict, quality: int) -> tuple[dict, dict]:
    """PIL save options for `fmt` carrying `meta`, and what is done:
    {'format', 'lossless', and for JPEG/AVIF 'quality', 'subsampling'}."""
    kwargs = {k: meta[k] for k in ("exif", "icc_profile", "dpi") if k in meta}
    done = {"format": fmt, "lossless": fmt in LOSSLESS_FORMATS}
    if "xmp" in meta and fmt in ("JPEG", "WEBP", "PNG", "HEIF", "AVIF"):
        kwargs["xmp"] = meta["xmp"]
    if fmt in ("JPEG", "AVIF"):
        # 4:4:4: subsampling halves the colour resolution and erases much of a colour change
        kwargs.update(quality=int(quality), subsampling=0 if fmt == "JPEG" else "4:4:4")
        done.update(quality=int(quality), subsampling="4:4:4")
        if fmt == "JPEG":
            kwargs.update(optimize=True, **({"comment": meta["comment"]} if "comment" in meta
                                            else {}))
    elif fmt == "WEBP":    # lossless: WebP's lossy mode always subsamples chroma
        kwargs.update(lossless=True, quality=100, method=4)
    elif fmt == "HEIF":    # lossless (see LOSSLESS_FORMATS)
        kwargs.update(quality=-1, chroma=444, matrix_coefficients=0)
    elif fmt == "TIFF":
        kept = meta.get("compression") in _TIFF_LOSSLESS
        kwargs["compression"] = meta["compression"] if kept else "tiff_adobe_deflate"
    elif fmt == "PNG" and "text" in meta:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for k, v in meta["text"].items():
            info.add_text(k, v)
        kwargs["pnginfo"] = info
    elif fmt in ("BMP", "GIF"):
        kwargs = {k: v for k, v in kwargs.items() if k == "dpi"}
    return kwargs, done


def _animation_options(fmt: str, meta: dict, frames: list) -> dict:
    kwargs = {"save_all": True, "append_images": frames[1:]}
    durations = meta.get("duration") or []
    if fmt in ("PNG", "WEBP", "GIF", "AVIF") and all(d is not None for d in durations):
        kwargs.update(duration=list(durations), loop=meta.get("loop", 0))
    return kwargs


def encode_photo(photo: Photo, stored: np.ndarray, *, frames: list | tuple = (),
                 format: str | None = None, quality: int = 95, strip_metadata: bool = False
                 ) -> tuple[bytes, dict]:
    """Encode pixels `stored` (the layout and mode of `photo.stored`; `frames` the further
    frames, like `photo.frames`) in `format` (default the photo's own), with the photo's
    metadata: (file bytes, what was done).

    JPEG and AVIF are written at `quality` with 4:4:4 chroma; PNG (APNG when animated), WebP
    (lossless), BMP, TIFF (its own compression when lossless, else deflate) and HEIF (lossless)
    keep every value. With `strip_metadata`, EXIF, XMP, comments and text are dropped (the ICC
    colour profile and dpi are kept: they change how the picture looks) and the orientation is
    applied to the pixels, so it still shows upright (HEIF always stores them upright).
    What was done: {'format', 'lossless', 'quality' and 'subsampling' for JPEG/AVIF, 'frames'
    for more than one, 'converted' ('GIF -> PNG') for another format than the photo's}."""
    fmt = format or photo.format
    upright = writes_upright(photo, fmt, strip_metadata)
    layers = [orient(a, photo.orientation) if upright else a for a in (stored, *frames)]
    images = [Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a,
                                                   np.uint8), photo.mode) for a in layers]
    if fmt in ("JPEG", "BMP") and photo.mode in ("RGBA", "LA"):
        raise ValueError(f"{photo.path}: {fmt} cannot hold transparency; write PNG or WebP")
    if fmt in _SINGLE_FRAME and len(images) > 1:
        raise ValueError(f"{photo.path}: {fmt} cannot hold its {len(images)} frames; "
                         f"write PNG (APNG) or keep its format")
    meta = _metadata_to_write(photo, strip_metadata, upright)
    kwargs, done = _format_options(fmt, meta, quality)
    if len(images) > 1:
        kwargs.update(_animation_options(fmt, meta, images))
        done["frames"] = len(images)
    if fmt != photo.format:
        done["converted"] = (f"{photo.format} -> "
                             f"{'APNG' if fmt == 'PNG' and len(images) > 1 else fmt}")
    buffer = io.BytesIO()
    images[0].save(buffer, fmt, **kwargs)
    return buffer.getvalue(), done


def decode_frames(data: bytes, mode: str) -> list[np.ndarray]:
    """Encoded image bytes -> every frame's (H, W, C) uint8 pixels in the file's stored layout
    (no EXIF orientation applied) and the given mode: what `Photo.layers()` holds for it."""
    with Image.open(io.BytesIO(data)) as im:
        return [_as_array(f.convert(mode)) for f in ImageSequence.Iterator(im)]


def decode_stored(data: bytes, mode: str) -> np.ndarray:
    """The first frame of `decode_frames`: what `Photo.stored` holds for that file."""
    with Image.open(io.BytesIO(data)) as im:
        return _as_array(im.convert(mode))
