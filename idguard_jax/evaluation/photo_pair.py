"""One photo and its protected copy, side by side: what `idguard verify` measures.

    original, protected = photo_pair.read_pair("photo.jpg", "protected/photo.jpg")
    pair = photo_pair.align_pair(original, protected, 256)
    m = measure.measure(models, pair.clean, pair.protected, judge,
                        input_face_masks=pair.face_masks)
    rows = photo_pair.manipulation_rows(m)

The faces are found on the ORIGINAL and both photos are cut with the same transform, so the two
crops differ only by the protection.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from idguard_jax.faces import align
from idguard_jax.images import as_float_images
from idguard_jax.protection.photo_io import read_photo

__all__ = ["AlignedPair", "read_pair", "align_pair", "manipulation_rows", "grid_columns"]


class AlignedPair(NamedTuple):
    clean: np.ndarray         # uint8 (F, S, S, 3): the original's aligned faces
    protected: np.ndarray     # uint8 (F, S, S, 3): the same crops of the protected photo
    face_masks: np.ndarray    # uint8 (F, S, S, 1): whole-face masks found on the original


def read_pair(original_path: str, protected_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Both photos upright (uint8 (H, W, 3)); ValueError when unreadable or of other sizes."""
    original, protected = read_photo(original_path), read_photo(protected_path)
    if original.upright.shape != protected.upright.shape:
        raise ValueError(f"{protected_path}: {protected.upright.shape[1]}x"
                         f"{protected.upright.shape[0]} px, but {original_path} is "
                         f"{original.upright.shape[1]}x{original.upright.shape[0]}: not the same "
                         "photo")
    return original.upright, protected.upright


def align_pair(original: np.ndarray, protected: np.ndarray, size: int, *,
               all_faces: bool = False, analyzer=None) -> AlignedPair | None:
    """The largest face (every face with `all_faces`) of `original`, aligned at `size` px, and
    the same crops of `protected`; None when the original has no face. `analyzer`: a
    `faces.detection.FaceAnalyzer` (default: a new one)."""
    if analyzer is None:
        from idguard_jax.faces.detection import FaceAnalyzer
        analyzer = FaceAnalyzer()
    faces = align.analyse_image(original, analyzer, size, min_face=1)
    if not faces:
        return None
    faces = faces if all_faces else faces[:1]
    return AlignedPair(np.stack([f.image for f in faces]),
                       np.stack([align.cut_aligned(protected, f.transform, size) for f in faces]),
                       np.stack([f.face_mask for f in faces]))


def _identity(m: dict, r: dict) -> np.ndarray:
    """The judge's number per manipulation: cosine similarity, or dlib's descriptor distance."""
    return r["id_sim"] if m["criterion"] == "cosine" else r["id_distance"]


def manipulation_rows(m: dict) -> list[dict]:
    """One row per target, condition and face of `measure.measure`'s result: target, condition,
    face, l2_face, identity (the judge's number) and success."""
    rows = []
    for name, r in m["targets"].items():
        ident = _identity(m, r)
        for k in range(r["l2_face"].shape[0]):
            for i in range(r["l2_face"].shape[1]):
                rows.append({"target": name, "condition": k, "face": i,
                             "l2_face": float(r["l2_face"][k, i]), "identity": float(ident[k, i]),
                             "success": bool(r["dsr"][k, i])})
    return rows


def grid_columns(m: dict, pair: AlignedPair) -> list[np.ndarray]:
    """The grid's four columns (float [-1, 1], one row per manipulation, in `manipulation_rows`'
    order): original, manipulated original, protected, manipulated protected."""
    columns = [[], [], [], []]
    for r in m["targets"].values():
        for k in range(r["l2_face"].shape[0]):
            for i in range(r["l2_face"].shape[1]):
                for col, img in zip(columns, (pair.clean[i], r["manipulated_clean"][k, i],
                                              pair.protected[i],
                                              r["manipulated_protected"][k, i])):
                    col.append(as_float_images(img))
    return [np.stack(c) for c in columns]
