"""The training-data cache: fixed-size uint8 arrays on disk that a run memory-maps.

    CACHE/meta.json     dataset, root, image size, count, names, notes, mask_pipeline
    CACHE/images.u8     (N, S, S, 3) uint8 faces
    CACHE/masks.u8      (N, S, S, 1) uint8 component masks: {0, 1} (mask_pipeline 'exact', and
                        a meta.json without the key) or 0..255 soft ('reference', the
                        reference's JPEG + bilinear pipeline: data.celebamask.reference_mask)
    CACHE/labels.f32    (N, 5) float32 StarGAN attributes
    CACHE/landmarks.f32 (N, 5, 2) dlib 5-point landmarks in unit coordinates (with --landmarks)
    CACHE/status.u8     (N,) 0 = to do, 1 = done, 2 = failed (reasons in failed.json)
    CACHE/heatmaps.f32  (N, S, S, 1) float32 Grad-CAM++ heatmaps, with heatmaps_done.u8 (N,)
                        (experiments/heatmaps.py CACHE; float32 keeps them exact: 7.9 GB for
                        30k faces at 256 px)

`build_cache` fills it in one resumable pass (re-running skips what is done); `open_cache` gives a
FaceData over the done rows without reading the arrays into memory.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from idguard_jax.data.celebamask import MASK_PIPELINES
from idguard_jax.data.datasets import FaceData

__all__ = ["build_cache", "open_cache", "write_heatmaps", "FACE_MASKS_FILE",
           "mask_pipeline_of", "check_mask_pipeline"]

TODO, DONE, FAILED = 0, 1, 2
# (N, S, S, 1) uint8 whole-face masks for L2_face: written by experiments/prepare.py (photos),
# read by experiments/evaluate.py
FACE_MASKS_FILE = "facemasks.u8.npy"


def mask_pipeline_of(meta: dict) -> str:
    """The mask pipeline a cache's meta records; caches from before the key hold 'exact'."""
    return meta.get("mask_pipeline", "exact")


def check_mask_pipeline(source: str, holds: str, wanted: str) -> None:
    """ValueError naming `source` and both pipelines when its masks are not `wanted`'s."""
    if wanted not in MASK_PIPELINES:
        raise ValueError(f"mask_pipeline={wanted!r}: choose one of {', '.join(MASK_PIPELINES)}")
    if holds != wanted:
        raise ValueError(
            f"{source}: holds masks of the {holds!r} pipeline, but the {wanted!r} pipeline is "
            f"asked for (rebuild it with experiments/prepare.py celebamask-hq --masks {wanted}, "
            f"or train with --set mask_pipeline={holds})")


def _arrays(cache: str, n: int, size: int, mode: str) -> dict[str, np.memmap]:
    shapes = {"images.u8": ((n, size, size, 3), np.uint8), "masks.u8": ((n, size, size, 1), np.uint8),
              "labels.f32": ((n, 5), np.float32), "landmarks.f32": ((n, 5, 2), np.float32),
              "status.u8": ((n,), np.uint8)}
    return {name: np.lib.format.open_memmap(os.path.join(cache, name + ".npy"), mode=mode,
                                            dtype=dt, shape=shape if mode == "w+" else None)
            for name, (shape, dt) in shapes.items()}


def build_cache(cache: str, names: Sequence[str], load: Callable[[int], tuple], size: int,
                meta: dict, progress: bool = True, log=print) -> dict:
    """Fill CACHE with `load(i) -> (image, mask, labels, landmarks or None)` for every name not
    done yet.

    A failing item (`load` raises) is recorded by name with its reason and the pass goes on.
    Refuses a cache that was built for another dataset/size/list. Returns the counts.
    """
    os.makedirs(cache, exist_ok=True)
    meta_path = os.path.join(cache, "meta.json")
    meta = {**meta, "size": size, "count": len(names), "names": list(names),
            "mask_pipeline": mask_pipeline_of(meta)}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if mask_pipeline_of(old) != meta["mask_pipeline"]:
            raise FileExistsError(f"{cache}: holds masks of the {mask_pipeline_of(old)!r} "
                                  f"pipeline, not {meta['mask_pipeline']!r}; choose another "
                                  "CACHE_DIR")
        keys = ("dataset", "size", "count", "names", "landmarks")
        if any(old.get(k) != meta.get(k) for k in keys):
            raise FileExistsError(f"{cache}: holds a cache of another dataset, size or image "
                                  "list; choose another CACHE_DIR")
        arrays = _arrays(cache, len(names), size, "r+")
    else:
        arrays = _arrays(cache, len(names), size, "w+")
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    failed_path = os.path.join(cache, "failed.json")
    failed = {}
    if os.path.exists(failed_path):
        with open(failed_path) as f:
            failed = json.load(f)
    status = arrays["status.u8"]
    todo = np.flatnonzero(status != DONE)
    bar = (tqdm(total=len(names), desc="prepare", unit="img", initial=len(names) - len(todo),
                disable=None) if progress else None)   # None: silent unless stderr is a tty
    for k, i in enumerate(todo):
        try:
            image, mask, labels, landmarks = load(int(i))
            arrays["images.u8"][i] = image
            arrays["masks.u8"][i] = mask
            arrays["labels.f32"][i] = labels
            arrays["landmarks.f32"][i] = np.nan if landmarks is None else landmarks
            status[i] = DONE
            failed.pop(names[i], None)
        except (OSError, ValueError) as e:
            status[i] = FAILED
            failed[names[i]] = str(e)
        if bar:
            bar.update()
        if k % 256 == 255:
            status.flush()
    for a in arrays.values():
        a.flush()
    with open(failed_path, "w") as f:
        json.dump(failed, f, indent=1)
    if bar:
        bar.close()
    counts = {"done": int(np.sum(status == DONE)), "failed": len(failed),
              "skipped_already_done": int(len(names) - len(todo))}
    for name, reason in sorted(failed.items()):
        log(f"failed: {name}: {reason}")
    return counts


def open_cache(cache: str, mask_pipeline: str | None = None) -> FaceData:
    """The done rows of a cache as FaceData over memory-mapped arrays (nothing read yet).

    mask_pipeline: refuse (ValueError naming the cache and both) a cache whose masks were made
    by another pipeline (data.celebamask.MASK_PIPELINES); None accepts either."""
    meta_path = os.path.join(cache, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{cache}: no cache here (build it with experiments/prepare.py)")
    with open(meta_path) as f:
        meta = json.load(f)
    if mask_pipeline is not None:
        check_mask_pipeline(cache, mask_pipeline_of(meta), mask_pipeline)
    arrays = {name: np.load(os.path.join(cache, name + ".npy"), mmap_mode="r")
              for name in ("images.u8", "masks.u8", "labels.f32", "landmarks.f32", "status.u8")}
    rows = np.flatnonzero(np.asarray(arrays["status.u8"]) == DONE)
    if not len(rows):
        raise ValueError(f"{cache}: no finished images in the cache")
    heatmaps = None
    hm_path, hm_done = (os.path.join(cache, n + ".npy") for n in ("heatmaps.f32", "heatmaps_done.u8"))
    if os.path.exists(hm_done) and np.load(hm_done)[rows].all():
        heatmaps = np.load(hm_path, mmap_mode="r")
    landmarks = None
    if meta.get("landmarks"):
        # faces where none was detected (NaN) get the mean of the others, as folder_dataset does
        landmarks = np.array(arrays["landmarks.f32"])
        found = np.isfinite(landmarks).all(axis=(1, 2))
        landmarks[~found] = landmarks[found & np.isin(np.arange(len(found)), rows)].mean(axis=0)
    return FaceData(images=arrays["images.u8"], masks=arrays["masks.u8"], heatmaps=heatmaps,
                    labels=arrays["labels.f32"], names=[meta["names"][i] for i in rows],
                    notes=tuple(meta.get("notes", ())) + (() if heatmaps is not None else (
                        "heatmaps: uniform (compute them with experiments/heatmaps.py CACHE)",)),
                    rows=rows, landmarks=landmarks, mask_pipeline=mask_pipeline_of(meta))


def write_heatmaps(cache: str, compute: Callable[[np.ndarray], np.ndarray], batch_size: int,
                   progress: bool = True) -> tuple[int, int]:
    """Heatmaps of every finished cache image that lacks one, `batch_size` at a time.

    compute: uint8 (b, S, S, 3) -> (b, S, S, 1) in [0, 1]. A short last batch is filled with its
    own images (one compiled shape; the same batch statistics for data-dependent inputs).
    Resumable: done rows are marked in heatmaps_done.u8 after each batch. Returns (written, had).
    """
    status = np.load(os.path.join(cache, "status.u8.npy"))
    images = np.load(os.path.join(cache, "images.u8.npy"), mmap_mode="r")
    n, s = len(status), images.shape[1]
    paths = [os.path.join(cache, name + ".npy") for name in ("heatmaps.f32", "heatmaps_done.u8")]
    mode = "r+" if all(os.path.exists(p) for p in paths) else "w+"
    maps = np.lib.format.open_memmap(paths[0], mode=mode, dtype=np.float32,
                                     shape=(n, s, s, 1) if mode == "w+" else None)
    done = np.lib.format.open_memmap(paths[1], mode=mode, dtype=np.uint8,
                                     shape=(n,) if mode == "w+" else None)
    todo = np.flatnonzero((status == DONE) & (done == 0))
    had = int(np.sum((status == DONE) & (done == 1)))
    bar = (tqdm(total=had + len(todo), desc="heatmaps", unit="img", initial=had, disable=None)
           if progress else None)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        full = np.concatenate([idx, idx[np.arange(batch_size - len(idx)) % len(idx)]])
        maps[idx] = np.asarray(compute(np.asarray(images[full])))[:len(idx)]
        maps.flush()
        done[idx] = 1
        done.flush()
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return len(todo), had
