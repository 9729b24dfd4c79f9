"""Image files as the library reads them: uint8 RGB (H, W, 3), and the image files of a folder.

(Photos a user owns, written back in their own format and metadata, are
`protection.photo_io`'s job.)
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["read_rgb", "list_images", "IMAGE_SUFFIXES", "to_rgb", "has_alpha"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_rgb(im: Image.Image) -> Image.Image:
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
    if has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_rgb(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), EXIF orientation applied; grey, palette, CMYK,
    16-bit and transparent images are converted as `to_rgb` says.

    With `size`, resized to size x size with PIL bilinear (what torchvision's Resize([s, s]) does
    to a PIL image in the reference's data pipeline). Raises ValueError naming the file if it
    cannot be decoded (also a truncated file).
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not later
            im = to_rgb(ImageOps.exif_transpose(im))
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


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info

