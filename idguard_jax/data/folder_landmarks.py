"""dlib's landmarks of a folder of aligned faces, found once and kept in a cache file.

    five, sixty_eight = folder_landmarks.cached_landmarks(paths, "runs/demo/face_landmarks.npz")

Detection takes about a second per face on a CPU, so the landmarks are written to a file the
caller names (train.py: in the run's workdir, never beside the faces, whose folder may be
read-only) and read back on the next run while every file's name, size and modification time
still match; otherwise they are found again and the file is replaced (it holds nothing else).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from idguard_jax.image_files import read_rgb

__all__ = ["LANDMARKS_FILE", "find_landmarks", "cached_landmarks"]

LANDMARKS_FILE = "face_landmarks.npz"
_FORMAT = "idguard-folder-landmarks-1"


def find_landmarks(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """dlib's 5-point (N, 5, 2) and 68-point (N, 68, 2) landmarks of each file's largest face,
    float32 in unit coordinates (x/W, y/H of the file's own resolution), one detection each.

    A file where no face is found gets the mean landmarks of the others (aligned faces sit in
    the same place), with a warning naming it; no face anywhere is a ValueError."""
    from idguard_jax.faces.detection import FaceAnalyzer

    analyzer = FaceAnalyzer()
    found, missing = {}, []
    for i, p in enumerate(paths):
        img = read_rgb(p)
        boxes = analyzer.detect(img)
        if not len(boxes):
            missing.append(i)
            continue
        unit = np.array([img.shape[1], img.shape[0]], np.float32)
        found[i] = (analyzer.landmarks(img, boxes[0]) / unit,
                    analyzer.landmarks68(img, boxes[0]) / unit)
    if not found:
        raise ValueError(f"no face found in any of {len(paths)} images (e.g. {paths[0]})")
    means = tuple(np.mean([f[j] for f in found.values()], axis=0) for j in range(2))
    for i in missing:
        warnings.warn(f"{paths[i]}: no face found; using the mean landmarks", stacklevel=2)
    return tuple(np.stack([found.get(i, means)[j] for i in range(len(paths))]).astype(np.float32)
                 for j in range(2))


def _fingerprint(paths: list[str]) -> dict[str, np.ndarray]:
    """What must match for a cache to be reused: each file's name, size and mtime (ns)."""
    stats = [os.stat(p) for p in paths]
    return {"paths": np.array([os.path.abspath(p) for p in paths], dtype=str),
            "sizes": np.array([s.st_size for s in stats], np.int64),
            "mtimes": np.array([s.st_mtime_ns for s in stats], np.int64)}


def _read_cache(cache_file: str, fingerprint: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached landmarks if cache_file exists and was made from exactly these files."""
    if not os.path.isfile(cache_file):
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["format"]) != _FORMAT or any(
                    z[k].shape != v.shape or not np.array_equal(z[k], v)
                    for k, v in fingerprint.items()):
                return None
            return z["landmarks5"], z["landmarks68"]
    except (OSError, ValueError, KeyError):   # damaged or foreign: found again and replaced
        return None


def cached_landmarks(paths: list[str], cache_file: str | os.PathLike | None,
                     log=None) -> tuple[np.ndarray, np.ndarray]:
    """`find_landmarks(paths)`, read from cache_file when it matches the files, else found and
    written there (atomically; its folder is created). cache_file None: no cache.
    log: called with one line saying whether the cache was reused or written."""
    if cache_file is None:
        return find_landmarks(paths)
    cache_file = os.fspath(cache_file)
    fingerprint = _fingerprint(paths)
    cached = _read_cache(cache_file, fingerprint)
    if cached is not None:
        if log:
            log(f"landmarks of {len(paths)} faces read from {cache_file}")
        return cached
    five, sixty_eight = find_landmarks(paths)
    os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
    tmp = f"{cache_file}.{os.getpid()}.tmp.npz"   # several processes may share the workdir
    np.savez(tmp, format=np.array(_FORMAT), landmarks5=five, landmarks68=sixty_eight,
             **fingerprint)
    os.replace(tmp, cache_file)
    if log:
        log(f"landmarks of {len(paths)} faces found with dlib and cached in {cache_file}")
    return five, sixty_eight
