"""Datasets as arrays: FaceData, a folder of aligned faces with stand-in annotations, and
`open_dataset` (a cache from experiments/prepare.py or such a folder)."""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from idguard_jax.image_files import IMAGE_SUFFIXES, list_images, read_rgb

__all__ = ["load_folder", "central_face_mask", "FaceData", "folder_dataset", "face_landmarks",
           "open_dataset"]


def load_folder(folder: str | os.PathLike, size: int,
                limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All images of a folder as uint8 (N, size, size, 3), with their paths.

    Unreadable files are skipped with a warning naming them; an empty result is an error.
    """
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
        raise FileNotFoundError(f"{folder}: no readable images "
                                f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return np.stack(images), kept


def central_face_mask(size: int) -> np.ndarray:
    """STAND-IN binary mask (size, size, 1): a central box where an aligned face's eyes, nose and
    mouth lie (rows 35-85 %, columns 25-75 %), for a folder without CelebAMask-HQ component masks
    or landmarks; results with it are not the paper's."""
    m = np.zeros((size, size, 1), np.float32)
    m[int(0.35 * size):int(0.85 * size), int(0.25 * size):int(0.75 * size)] = 1.0
    return m


@dataclasses.dataclass
class FaceData:
    """A training set held as arrays (in memory, or memory-mapped from a cache: `data.cache`).

    images (N,S,S,3) uint8; masks (N,S,S,1) uint8 in {0,1} (the binary facial-component mask);
    heatmaps (N,S,S,1) float32 in [0,1] or None (= uniform); labels (N,5) float32 (the StarGAN
    attributes). `notes` says what is a stand-in, and travels into logs and checkpoints.
    """
    images: np.ndarray
    masks: np.ndarray
    heatmaps: np.ndarray | None
    labels: np.ndarray
    names: list[str]
    notes: tuple[str, ...] = ()
    rows: np.ndarray | None = None   # the usable rows of the arrays (a cache's done rows); None = all
    # (N, 5, 2) dlib 5-point landmarks of the clean faces in unit coordinates (x/W, y/H), or None;
    # needed by chip-based identity networks (dlib), which cut their face chip with them.
    landmarks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)


def face_landmarks(paths: list[str]) -> np.ndarray:
    """(N, 5, 2) dlib 5-point landmarks in unit coordinates, found at each file's own resolution.

    An image where no face is found gets the mean landmarks of the others (aligned faces sit
    in the same place), with a warning naming it; no face anywhere is an error."""
    from idguard_jax.faces.detection import FaceAnalyzer

    analyzer = FaceAnalyzer()
    found, missing = {}, []
    for i, p in enumerate(paths):
        img = read_rgb(p)
        pts = analyzer.largest_face(img)
        if pts is None:
            missing.append(i)
        else:
            found[i] = pts / np.array([img.shape[1], img.shape[0]], np.float32)
    if not found:
        raise ValueError(f"no face found in any of {len(paths)} images (e.g. {paths[0]})")
    mean = np.mean(list(found.values()), axis=0)
    for i in missing:
        warnings.warn(f"{paths[i]}: no face found; using the mean landmarks", stacklevel=2)
    return np.stack([found.get(i, mean) for i in range(len(paths))]).astype(np.float32)


def folder_dataset(folder, size: int, seed: int = 0, limit: int | None = None,
                   landmarks: bool = False) -> FaceData:
    """A folder of aligned faces with STAND-IN annotations: central-box masks, uniform heatmaps
    and random attribute labels (seeded). Enough to exercise training; not the paper's data.
    With `landmarks`, dlib's 5 landmarks of each face (for the dlib identity network)."""
    images, paths = load_folder(folder, size, limit)
    n = len(images)
    masks = np.broadcast_to(central_face_mask(size).astype(np.uint8), (n, size, size, 1)).copy()
    labels = np.random.default_rng(seed).integers(0, 2, (n, 5)).astype(np.float32)
    return FaceData(images=images, masks=masks, heatmaps=None, labels=labels,
                    names=[os.path.basename(p) for p in paths],
                    landmarks=face_landmarks(paths) if landmarks else None,
                    notes=("stand-in masks: central face box", "stand-in heatmaps: uniform",
                           "stand-in labels: random"))


def open_dataset(path: str | os.PathLike, image_size: int, *, seed: int = 0,
                 landmarks: bool = False) -> FaceData:
    """A cache (a folder with meta.json, data.cache) memory-mapped, or else a folder of aligned
    faces (`folder_dataset`: stand-in masks and labels drawn from `seed`), at image_size px.
    landmarks: the faces' dlib landmarks are needed (a chip-based identity network): a folder
    computes them, a cache must hold them. Raises FileNotFoundError / ValueError naming path."""
    from idguard_jax.data.cache import open_cache   # cache builds on FaceData

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder")
    if not os.path.exists(os.path.join(path, "meta.json")):
        return folder_dataset(path, image_size, seed=seed, landmarks=landmarks)
    faces = open_cache(path)
    if faces.images.shape[1] != image_size:
        raise ValueError(f"{path}: cached at {faces.images.shape[1]} px, the config trains at "
                         f"{image_size} px")
    if landmarks and faces.landmarks is None:
        raise ValueError(f"{path}: the cache holds no landmarks, which the identity network "
                         "needs; rebuild the cache with experiments/prepare.py --landmarks")
    return faces
