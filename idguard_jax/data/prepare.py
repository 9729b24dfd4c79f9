"""Fill a training-data cache (`data.cache.build_cache`) from a dataset: what
experiments/prepare.py runs.

    counts = prepare.prepare_celebamask("CelebAMask-HQ/", "cache/train", split="train")
    counts = prepare.prepare_celebamask("CelebAMask-HQ/", "cache/ref", masks="reference")
    counts = prepare.prepare_aligned("faces/", "cache/faces", landmarks=True)
    summary = prepare.prepare_photos("photos/", "cache/photos", labels=[0, 1, 0, 0, 1])

- celebamask-hq: the official layout (`data.celebamask`): the reference's split, its 5 labels
  and the component masks, exactly binary (masks='exact') or the reference's soft JPEG +
  bilinear masks (masks='reference'), recorded as the cache's mask_pipeline;
- aligned: any folder of aligned faces, with STAND-IN annotations (central-box masks, all-zero
  labels), said so in the cache's notes;
- photos: ordinary photos; every face dlib finds is one row `relpath#k` (k = 0 for the
  largest), aligned to a CelebA-HQ-like crop (`faces.align`), with masks from its 68 landmarks,
  its 5 landmarks and its whole-face mask in `FACE_MASKS_FILE` (N, S, S, 1).

Each is one resumable pass: re-running skips finished rows; an unreadable image is reported
(one line to `log`) and counted, and never stops the pass.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np

from idguard_jax.data import celebamask
from idguard_jax.data.cache import FACE_MASKS_FILE, build_cache
from idguard_jax.data.datasets import central_face_mask
from idguard_jax.image_files import IMAGE_SUFFIXES, list_images, read_rgb

__all__ = ["prepare_celebamask", "prepare_aligned", "prepare_photos"]

Log = Callable[[str], None]


def _landmark_finder(enabled: bool) -> Callable[[str], np.ndarray | None]:
    """path -> dlib's 5 landmarks of its largest face in unit coordinates of the file's own
    resolution (None: no face, or not `enabled`)."""
    if not enabled:
        return lambda path: None
    from idguard_jax.faces.detection import FaceAnalyzer

    analyzer = FaceAnalyzer()

    def landmarks_of(path):
        img = read_rgb(path)
        pts = analyzer.largest_face(img)
        return None if pts is None else pts / [img.shape[1], img.shape[0]]
    return landmarks_of


def _build(root: str, cache: str, names: Sequence[str], load, size: int, meta: dict,
           log: Log) -> dict:
    if not names:
        raise FileNotFoundError(f"{root}: no images found")
    return build_cache(cache, names, load, size, meta, log=log)


def prepare_celebamask(root: str, cache: str, *, split: str = "train", size: int = 256,
                       landmarks: bool = False, masks: str = "exact", log: Log = print) -> dict:
    """CelebAMask-HQ's `split` ('train', 'test', 'all') into `cache`, its masks by the pipeline
    `masks` (data.celebamask.MASK_PIPELINES): build_cache's counts."""
    if masks not in celebamask.MASK_PIPELINES:
        raise ValueError(f"masks={masks!r}: choose one of {', '.join(celebamask.MASK_PIPELINES)}")
    celebamask.check_layout(root)
    landmarks_of = _landmark_finder(landmarks)
    records = celebamask.read_attributes(root, split)

    def load(i):
        image, mask = celebamask.load_record(root, records[i], size, masks)
        path = os.path.join(root, celebamask.IMAGES, records[i].name)
        return image, mask, records[i].labels, landmarks_of(path)
    meta = {"dataset": "celebamask-hq", "root": os.path.abspath(root), "split": split,
            "notes": [] if masks == "exact" else [
                "masks: the reference's (JPEG at quality 95, PIL bilinear resize), soft"],
            "landmarks": landmarks, "mask_pipeline": masks}
    return _build(root, cache, [r.name for r in records], load, size, meta, log)


def prepare_aligned(root: str, cache: str, *, size: int = 256, landmarks: bool = False,
                    log: Log = print) -> dict:
    """A folder of aligned faces into `cache`, with stand-in masks and labels: the counts."""
    landmarks_of = _landmark_finder(landmarks)
    paths = list_images(root)
    box = central_face_mask(size).astype("uint8")

    def load(i):
        return read_rgb(paths[i], size), box, [0.0] * 5, landmarks_of(paths[i])
    meta = {"dataset": "aligned", "root": os.path.abspath(root),
            "notes": ["stand-in masks: central face box", "labels: all zero (none given)"],
            "landmarks": landmarks}
    return _build(root, cache, [os.path.relpath(q, root) for q in paths], load, size, meta, log)


def _photo_files(root: str, recursive: bool) -> list[str]:
    """Every file under `root` (sub-folders with `recursive`), relative to it, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, sub, fs in os.walk(root) if recursive or d == root for f in fs)


def _detect(files: Sequence[str], analyse, log: Log) -> tuple[list, list, dict, list]:
    """The detection pass: (row names, not images, unreadable {file: reason}, no face). The row
    names must be known before the cache is laid out; detection is deterministic, so a resumed
    run finds the same rows."""
    not_images, unreadable, no_face, names = [], {}, [], []
    for rel in files:
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            not_images.append(rel)
            continue
        try:
            faces = analyse(rel)
        except ValueError as e:
            unreadable[rel] = str(e)
            continue
        if not faces:
            no_face.append(rel)
        names += [f"{rel}#{k}" for k in range(len(faces))]
    for rel in not_images:
        log(f"skipped (not an image suffix): {rel}")
    for rel, reason in unreadable.items():
        log(f"unreadable: {reason}")
    for rel in no_face:
        log(f"no face: {rel}")
    return names, not_images, unreadable, no_face


class _PhotoRows:
    """build_cache's `load` for photo rows; also writes each row's whole-face mask into
    FACE_MASKS_FILE, opened once build_cache has accepted the cache folder."""

    def __init__(self, cache: str, names: Sequence[str], analyse, size: int, min_face: int,
                 labels: Sequence[float]):
        self.cache, self.names, self.analyse = cache, names, analyse
        self.size, self.min_face, self.labels = size, min_face, labels
        self.face_masks = None

    def __call__(self, i: int):
        from idguard_jax.faces.align import OK

        rel, k = self.names[i].rsplit("#", 1)
        face = self.analyse(rel)[int(k)]
        if face.status != OK:
            raise ValueError(f"{self.names[i]}: face {face.status} (box {face.box.tolist()}, "
                             f"--min-face {self.min_face})")
        if self.face_masks is None:
            path = os.path.join(self.cache, FACE_MASKS_FILE)
            exists = os.path.exists(path)
            self.face_masks = np.lib.format.open_memmap(
                path, mode="r+" if exists else "w+", dtype=np.uint8,
                shape=None if exists else (len(self.names), self.size, self.size, 1))
        self.face_masks[i] = face.face_mask
        return face.image, face.component_mask, self.labels, face.landmarks5

    def flush(self) -> None:
        if self.face_masks is not None:
            self.face_masks.flush()


def prepare_photos(root: str, cache: str, *, size: int = 256, min_face: int = 64,
                   labels: Sequence[float] | None = None, recursive: bool = False,
                   log: Log = print) -> dict:
    """Every face in the photos under `root` into `cache` (one detection pass over every file
    first). Faces narrower than `min_face` px fail as too small; `labels` (5 values, default all
    zero) are every face's. The summary: files, photos, faces, build_cache's counts and the
    unreadable, faceless and non-image files by name."""
    from idguard_jax.faces.align import analyse_photo
    from idguard_jax.faces.detection import FaceAnalyzer

    given = labels is not None
    labels = list(labels) if given else [0.0] * 5
    if len(labels) != 5:
        raise ValueError(f"labels: expected 5 values, got {labels}")
    files = _photo_files(root, recursive)
    analyzer = FaceAnalyzer()

    @functools.lru_cache(maxsize=1)  # rows of one photo are loaded one after another
    def analyse(rel):
        return analyse_photo(os.path.join(root, rel), analyzer, size, min_face)

    names, not_images, unreadable, no_face = _detect(files, analyse, log)
    meta = {"dataset": "photos", "root": os.path.abspath(root), "landmarks": True,
            "min_face": min_face,
            "notes": ["masks: filled, dilated hulls of dlib's 68 landmarks (brows, eyes, nose, "
                      "mouth), not CelebAMask-HQ annotations",
                      f"labels: {labels if given else 'all zero (none given)'} for every face"]}
    counts = {"done": 0, "failed": 0, "skipped_already_done": 0}
    rows = _PhotoRows(cache, names, analyse, size, min_face, labels)
    try:
        if names:
            counts = build_cache(cache, names, rows, size, meta, log=log)
    finally:
        rows.flush()
    return {"cache": os.path.abspath(cache), "files": len(files),
            "photos": len(files) - len(not_images), "faces": len(names), **counts,
            "unreadable": sorted(unreadable), "no_face": no_face, "not_images": not_images}
