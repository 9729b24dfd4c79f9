"""Datasets as arrays. (Issue 5 brings CelebAMask-HQ, alignment and the memory-mapped cache.)"""
from __future__ import annotations

import os

import numpy as np

from idguard_jax.images import list_images, read_rgb

__all__ = ["load_folder", "central_face_mask"]


def load_folder(folder: str | os.PathLike, size: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All images of a folder as uint8 (N, size, size, 3), with their paths.

    Unreadable files are skipped with a warning naming them; an empty result is an error.
    """
    import warnings

    paths = list_images(folder)
    if limit is not None:
        paths = paths[:limit]
    images, kept = [], []
    for p in paths:
        try:
            images.append(read_rgb(p, size))
            kept.append(p)
        except ValueError as e:
            warnings.warn(str(e), stacklevel=2)
    if not images:
        raise FileNotFoundError(f"{folder}: no readable images ({', '.join(s for s in ('.png', '.jpg', '.jpeg', '.webp'))})")
    return np.stack(images), kept


def central_face_mask(size: int) -> np.ndarray:
    """STAND-IN binary mask (size, size, 1): a central box where an aligned face's eyes, nose and
    mouth lie (rows 35-85 %, columns 25-75 %). Used until the CelebAMask-HQ component masks
    (issue 5) are available; results with it are not the paper's."""
    m = np.zeros((size, size, 1), np.float32)
    m[int(0.35 * size):int(0.85 * size), int(0.25 * size):int(0.75 * size)] = 1.0
    return m
