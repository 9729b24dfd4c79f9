"""CelebAMask-HQ in its official layout, read the way the reference reads it (the
reference's `data/dataset.py`).

    ROOT/CelebA-HQ-img/{i}.jpg                                  1024 px faces
    ROOT/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png  512 px binary part masks
    ROOT/CelebAMask-HQ-attribute-anno.txt                       count, 40 names, then rows

Split: the first 1000 attribute rows are the test set, the rest train (the reference's rule).
Labels: the 5 StarGAN attributes as 0/1 floats. Masks, the union of the facial-component parts,
by one of MASK_PIPELINES:

- 'exact': 512 -> 256 by 2x2 area averaging, then >= 0.5: uint8 {0, 1}, exactly binary;
- 'reference': the reference's pipeline (its `data/process_dataset.py` writes the union as a
  greyscale JPEG with cv2.imwrite; its `data/dataset.py` reads it back as RGB and resizes it with
  `T.Resize`): soft uint8 0..255 with blurred edges and faint JPEG halos (`reference_mask`).
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

from idguard_jax.image_files import read_rgb
from idguard_jax.networks.targets import STARGAN_ATTRIBUTES

__all__ = ["COMPONENT_PARTS", "TEST_ROWS", "MASK_PIPELINES", "Record", "read_attributes",
           "component_union", "reference_mask", "component_mask", "check_layout", "load_record"]

IMAGES = "CelebA-HQ-img"
MASKS = "CelebAMask-HQ-mask-anno"
ATTRIBUTES = "CelebAMask-HQ-attribute-anno.txt"
COMPONENT_PARTS = ("l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
TEST_ROWS = 1000
MASK_FOLDER_SIZE = 2000
MASK_PIPELINES = ("exact", "reference")   # stored as uint8 {0, 1} and 0..255
REFERENCE_JPEG_QUALITY = 95               # cv2.imwrite's default IMWRITE_JPEG_QUALITY


@dataclasses.dataclass(frozen=True)
class Record:
    """One annotated image: its file name, index (= the number in the name) and 5 labels."""
    name: str
    index: int
    labels: tuple[float, ...]


def check_layout(root: str) -> None:
    """FileNotFoundError naming every missing piece of the official layout."""
    missing = [p for p in (IMAGES, MASKS, ATTRIBUTES) if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"{root}: not a CelebAMask-HQ folder, missing {', '.join(missing)}")


def read_attributes(root: str, split: str = "train") -> list[Record]:
    """The records of `split` ('train', 'test' or 'all') from the attribute file."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r}: 'train', 'test' or 'all'")
    path = os.path.join(root, ATTRIBUTES)
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line")
    names = lines[1].split()
    try:
        cols = [names.index(a) for a in STARGAN_ATTRIBUTES]
    except ValueError as e:
        raise ValueError(f"{path}: header lacks one of {STARGAN_ATTRIBUTES}") from e
    records = []
    for row, line in enumerate(lines[2:]):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}: line {row + 3} has {len(parts) - 1} values, "
                             f"expected {len(names)}")
        if split == "test" and row >= TEST_ROWS or split == "train" and row < TEST_ROWS:
            continue
        labels = tuple(1.0 if parts[1 + c] == "1" else 0.0 for c in cols)
        records.append(Record(parts[0], int(os.path.splitext(parts[0])[0]), labels))
    return records


def component_union(root: str, index: int, threshold: int = 127) -> np.ndarray | None:
    """(H, W) bool at the annotation's resolution: the union of the component parts whose grey
    level is > threshold (None: no part file; a missing file means the part is absent)."""
    folder = os.path.join(root, MASKS, str(index // MASK_FOLDER_SIZE))
    union = None
    for part in COMPONENT_PARTS:
        path = os.path.join(folder, f"{index:05d}_{part}.png")
        if not os.path.exists(path):
            continue
        with Image.open(path) as im:
            m = np.asarray(im.convert("L")) > threshold
        union = m if union is None else union | m
    return union


def _exact_mask(union: np.ndarray, size: int, where: str) -> np.ndarray:
    """(size, size, 1) uint8 {0,1}: `union` area-averaged to size, then >= 0.5."""
    h, w = union.shape
    if h % size or w % size:
        raise ValueError(f"{where}: {h}x{w} masks do not shrink to {size} by area averaging")
    fy, fx = h // size, w // size
    area = union.reshape(size, fy, size, fx).mean(axis=(1, 3))
    return (area >= 0.5).astype(np.uint8)[..., None]


def reference_mask(union: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 1) uint8 0..255: the reference's mask of a (H, W) bool union.

    The union as {0, 255} is JPEG-encoded as one greyscale component at quality 95 (cv2.imwrite's
    defaults: baseline, standard Huffman tables, no optimisation, integer DCT; its 4:2:0 chroma
    setting does not apply to one component). Here Pillow's libjpeg-turbo encodes it; OpenCV
    bundles its own libjpeg(-turbo), whose version may differ (OpenCV 5.0's gave the same entropy
    data and the same masks on 12 landmark masks of 512 px). Then it is decoded, converted to RGB as
    the reference's `Image.open(...).convert('RGB')` does, and resized to size x size with PIL's
    BILINEAR filter (what `T.Resize` does to a PIL image: antialiased, not align_corners). The
    three channels are equal; one is kept. /255 gives the reference's (ToTensor, Normalize,
    (x+1)/2) mask up to float rounding.
    """
    buf = io.BytesIO()
    Image.fromarray(union.astype(np.uint8) * 255).save(
        buf, "JPEG", quality=REFERENCE_JPEG_QUALITY, optimize=False, progressive=False)
    buf.seek(0)
    with Image.open(buf) as im:
        rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)[..., :1].copy()


def component_mask(root: str, index: int, size: int = 256, pipeline: str = "exact") -> np.ndarray:
    """(size, size, 1) uint8 mask of the component parts by `pipeline` (MASK_PIPELINES):
    'exact' {0,1} (parts > 127, area-averaged, >= 0.5), 'reference' 0..255 (parts > 0 as the
    reference's `process_dataset.py` thresholds them, then `reference_mask`)."""
    if pipeline not in MASK_PIPELINES:
        raise ValueError(f"mask pipeline {pipeline!r}: choose one of {', '.join(MASK_PIPELINES)}")
    union = component_union(root, index, threshold=127 if pipeline == "exact" else 0)
    if union is None:   # the reference writes an all-zero image: it stays zero either way
        return np.zeros((size, size, 1), np.uint8)
    if pipeline == "reference":
        return reference_mask(union, size)
    return _exact_mask(union, size, os.path.join(root, MASKS, str(index // MASK_FOLDER_SIZE)))


def load_record(root: str, record: Record, size: int = 256,
                pipeline: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """(image (size,size,3) uint8, mask (size,size,1) uint8 by `pipeline`) of one record."""
    image = read_rgb(os.path.join(root, IMAGES, record.name), size)
    return image, component_mask(root, record.index, size, pipeline)
