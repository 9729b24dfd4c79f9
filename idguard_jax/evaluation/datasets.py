"""The images an evaluation protects: a cache from experiments/prepare.py or a folder of faces.

    data = datasets.load_dataset("cache/test", 256, limit=100)
    for start in range(0, len(data.images), 8):
        rows, real = datasets.batch_rows(start, len(data.images), 8)
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from idguard_jax.data.cache import FACE_MASKS_FILE, open_cache
from idguard_jax.data.datasets import load_folder

__all__ = ["EvalSet", "load_dataset", "batch_rows"]


class EvalSet(NamedTuple):
    """One evaluation dataset, held in memory."""
    name: str                        # the folder's name: the tables' dataset column
    images: np.ndarray               # uint8 (N, S, S, 3)
    labels: np.ndarray               # float32 (N, 5): StarGAN's attributes (a folder: zeros)
    face_masks: np.ndarray | None    # uint8 (N, S, S, 1) whole-face masks; None: found by dlib
    notes: list[str]                 # what the tables must say about this dataset


def load_dataset(path: str, size: int, limit: int | None = None) -> EvalSet:
    """The first `limit` images (default all) of a cache (its rows, labels and whole-face masks
    when it has them) or of a folder of aligned faces (labels all zero), at `size` px."""
    name = os.path.basename(os.path.normpath(path))
    if not os.path.exists(os.path.join(path, "meta.json")):
        images, _ = load_folder(path, size, limit)
        return EvalSet(name, images, np.zeros((len(images), 5), np.float32), None,
                       [f"{name}: a folder: StarGAN labels all zero (none given)"])
    data = open_cache(path)
    rows = data.rows if data.rows is not None else np.arange(len(data.images))
    rows = rows[:limit] if limit else rows
    if data.images.shape[1] != size:
        raise ValueError(f"--dataset {path}: cached at {data.images.shape[1]} px, the "
                         f"evaluation runs at {size} px")
    masks_path = os.path.join(path, FACE_MASKS_FILE)
    masks = (np.asarray(np.load(masks_path, mmap_mode="r")[rows])
             if os.path.exists(masks_path) else None)
    notes = [] if masks is not None else [
        f"{name}: no whole-face masks in the cache; found by dlib on the inputs"]
    return EvalSet(name, np.asarray(data.images[rows]), np.asarray(data.labels[rows]), masks,
                   notes)


def batch_rows(start: int, n: int, batch: int) -> tuple[np.ndarray, int]:
    """(row indices (batch,), real rows m) of the batch from `start` of n images: a short last
    batch is padded with copies of its first row (one shape for every jitted protector call)."""
    m = min(batch, n - start)
    idx = np.full(batch, start)
    idx[:m] = np.arange(start, start + m)
    return idx, m
