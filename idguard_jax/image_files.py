"""Image files as the library reads them: uint8 RGB (H, W, 3), and the image files of a folder.

(Photos a user owns, written back in their own format and metadata, are
`protection.photo_io`'s job.)
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["read_rgb", "list_images", "list_other_files", "IMAGE_SUFFIXES", "HEIF_READABLE",
           "to_rgb", "has_alpha"]

# what the training data and the other folder readers take (`list_images`' default)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _register_heif_opener() -> bool:
    """Let PIL open HEIC/HEIF (iPhone photos) through pillow-heif, once, for every reader here
    and in `protection.photo_io`. AVIF needs nothing: Pillow >= 11.2 reads it."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF_READABLE = _register_heif_opener()


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
    """Read an image file (any format PIL opens: also TIFF, AVIF, and HEIC with pillow-heif) as
    uint8 RGB (H, W, 3), EXIF orientation applied; grey, palette, CMYK, 16-bit and transparent
    images are converted as `to_rgb` says.

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


def _files(folder: str | os.PathLike, recursive: bool) -> list[str]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    if recursive:
        return [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files]
    return [os.path.join(folder, f) for f in os.listdir(folder)]


def list_images(folder: str | os.PathLike, recursive: bool = False,
                suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Sorted paths of the image files in `folder` (by suffix, case-insensitive)."""
    return sorted(p for p in _files(folder, recursive) if p.lower().endswith(suffixes))


def list_other_files(folder: str | os.PathLike, recursive: bool = False,
                     suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Sorted paths of the files (not sub-folders) in `folder` that `list_images` leaves out."""
    return sorted(p for p in _files(folder, recursive)
                  if not p.lower().endswith(suffixes) and os.path.isfile(p))


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info

