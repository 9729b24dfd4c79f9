"""CelebAMask-HQ in its official layout, read the way the reference reads it (the
reference's `data/dataset.py`).

    ROOT/CelebA-HQ-img/{i}.jpg                                  1024 px faces
    ROOT/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png  512 px binary part masks
    ROOT/CelebAMask-HQ-attribute-anno.txt                       count, 40 names, then rows

Split: the first 1000 attribute rows are the test set, the rest train (the reference's rule).
Labels: the 5 StarGAN attributes as 0/1 floats. Binary mask: the union of the facial-component
parts, 512 -> 256 by 2x2 area averaging, then >= 0.5 (kept exactly binary; the reference saves it
as a JPEG and reads back a slightly blurred mask).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from idguard_jax.image_files import read_rgb
from idguard_jax.networks.targets import STARGAN_ATTRIBUTES

__all__ = ["COMPONENT_PARTS", "TEST_ROWS", "Record", "read_attributes", "component_mask",
           "check_layout", "load_record"]

IMAGES = "CelebA-HQ-img"
MASKS = "CelebAMask-HQ-mask-anno"
ATTRIBUTES = "CelebAMask-HQ-attribute-anno.txt"
COMPONENT_PARTS = ("l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
TEST_ROWS = 1000
MASK_FOLDER_SIZE = 2000


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


def component_mask(root: str, index: int, size: int = 256) -> np.ndarray:
    """(size, size, 1) uint8 {0,1}: union of the component parts, area-averaged, >= 0.5.

    A missing part file means that part is absent (the dataset's convention)."""
    folder = os.path.join(root, MASKS, str(index // MASK_FOLDER_SIZE))
    union = None
    for part in COMPONENT_PARTS:
        path = os.path.join(folder, f"{index:05d}_{part}.png")
        if not os.path.exists(path):
            continue
        with Image.open(path) as im:
            m = np.asarray(im.convert("L")) > 127
        union = m if union is None else union | m
    if union is None:
        return np.zeros((size, size, 1), np.uint8)
    h, w = union.shape
    if h % size or w % size:
        raise ValueError(f"{folder}: {h}x{w} masks do not shrink to {size} by area averaging")
    fy, fx = h // size, w // size
    area = union.reshape(size, fy, size, fx).mean(axis=(1, 3))
    return (area >= 0.5).astype(np.uint8)[..., None]


def load_record(root: str, record: Record, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(image (size,size,3) uint8, mask (size,size,1) uint8) of one record."""
    image = read_rgb(os.path.join(root, IMAGES, record.name), size)
    return image, component_mask(root, record.index, size)
