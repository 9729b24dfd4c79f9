"""Datasets as arrays: FaceData, a folder of aligned faces with stand-in annotations, and
`open_dataset` (a cache from experiments/prepare.py or such a folder)."""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from idguard_jax.data.folder_landmarks import cached_landmarks, find_landmarks
from idguard_jax.image_files import IMAGE_SUFFIXES, list_images, read_rgb

__all__ = ["load_folder", "central_face_mask", "FaceData", "folder_dataset", "face_landmarks",
           "landmark_masks", "open_dataset", "FOLDER_MASKS"]

# The masks of a folder of aligned faces without annotations (folder_dataset).
FOLDER_MASKS = ("box", "landmarks")


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

    images (N,S,S,3) uint8; masks (N,S,S,1) uint8 facial-component masks, {0,1} when
    mask_pipeline is 'exact' (binary), 0..255 when 'reference' (soft: data.celebamask);
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
    mask_pipeline: str = "exact"     # how `masks` were made and scaled (data.celebamask)

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)


def face_landmarks(paths: list[str]) -> np.ndarray:
    """(N, 5, 2) dlib 5-point landmarks in unit coordinates, found at each file's own resolution
    (`folder_landmarks.find_landmarks`: the mean landmarks where no face is found)."""
    return find_landmarks(paths)[0]


def landmark_masks(landmarks68: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 1) uint8 {0,1} masks of the brows, eyes, nose and mouth from (N, 68, 2)
    unit landmarks of aligned faces (`align.component_mask_from_landmarks`, as prepare.py's
    photos: CelebAMask-HQ's components)."""
    from idguard_jax.faces.align import component_mask_from_landmarks

    return np.stack([component_mask_from_landmarks(pts * size, size) for pts in landmarks68])


def folder_dataset(folder, size: int, seed: int = 0, limit: int | None = None,
                   landmarks: bool = False, masks: str = "box",
                   landmark_cache: str | os.PathLike | None = None, log=None) -> FaceData:
    """A folder of aligned faces with STAND-IN annotations: uniform heatmaps, random attribute
    labels (seeded) and central-box masks. Enough to exercise training; not the paper's data.

    landmarks: dlib's 5 landmarks of each face (for the dlib identity network).
    masks: 'box' (the stand-in central box) or 'landmarks' (the components' hulls of dlib's 68
      landmarks, `landmark_masks`).
    landmark_cache: a file keeping the landmarks found, read back while the folder's files are
      unchanged (`folder_landmarks.cached_landmarks`, which says so through `log`); None:
      found every time.
    """
    if masks not in FOLDER_MASKS:
        raise ValueError(f"masks={masks!r}: choose one of {', '.join(FOLDER_MASKS)}")
    images, paths = load_folder(folder, size, limit)
    n = len(images)
    five = sixty_eight = None
    if masks == "landmarks" or landmarks:
        five, sixty_eight = cached_landmarks(paths, landmark_cache, log=log)
    if masks == "landmarks":
        mask_array = landmark_masks(sixty_eight, size)
        mask_note = "masks: filled, dilated hulls of dlib's 68 landmarks (brows, eyes, nose, mouth)"
    else:
        mask_array = np.broadcast_to(central_face_mask(size).astype(np.uint8),
                                     (n, size, size, 1)).copy()
        mask_note = "stand-in masks: central face box"
    labels = np.random.default_rng(seed).integers(0, 2, (n, 5)).astype(np.float32)
    return FaceData(images=images, masks=mask_array, heatmaps=None, labels=labels,
                    names=[os.path.basename(p) for p in paths],
                    landmarks=five if landmarks else None,
                    notes=(mask_note, "stand-in heatmaps: uniform", "stand-in labels: random"))


def open_dataset(path: str | os.PathLike, image_size: int, *, seed: int = 0,
                 landmarks: bool = False, folder_masks: str = "box",
                 landmark_cache: str | os.PathLike | None = None, log=None) -> FaceData:
    """A cache (a folder with meta.json, data.cache) memory-mapped, or else a folder of aligned
    faces (`folder_dataset`: stand-in masks and labels drawn from `seed`), at image_size px.
    landmarks: the faces' dlib landmarks are needed (a chip-based identity network): a folder
    computes them, a cache must hold them. folder_masks, landmark_cache, log: a folder's masks
    and where its landmarks are kept (`folder_dataset`); a cache has its own masks and landmarks.
    Raises FileNotFoundError / ValueError naming path."""
    from idguard_jax.data.cache import open_cache   # cache builds on FaceData

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder")
    if not os.path.exists(os.path.join(path, "meta.json")):
        return folder_dataset(path, image_size, seed=seed, landmarks=landmarks,
                              masks=folder_masks, landmark_cache=landmark_cache, log=log)
    faces = open_cache(path)
    if faces.images.shape[1] != image_size:
        raise ValueError(f"{path}: cached at {faces.images.shape[1]} px, the config trains at "
                         f"{image_size} px")
    if landmarks and faces.landmarks is None:
        raise ValueError(f"{path}: the cache holds no landmarks, which the identity network "
                         "needs; rebuild the cache with experiments/prepare.py --landmarks")
    return faces
