"""The training-data cache: fixed-size uint8 arrays on disk that a run memory-maps.

    CACHE/meta.json     dataset, root, image size, count, names, notes
    CACHE/images.u8     (N, S, S, 3) uint8 faces
    CACHE/masks.u8      (N, S, S, 1) uint8 binary component masks
    CACHE/labels.f32    (N, 5) float32 StarGAN attributes
    CACHE/status.u8     (N,) 0 = to do, 1 = done, 2 = failed (reasons in failed.json)

`build_cache` fills it in one resumable pass (re-running skips what is done); `open_cache` gives a
FaceData over the done rows without reading the arrays into memory.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from idguard_jax.data import BatchSampler, FaceData, batch_at
from idguard_jax.progress import Progress

__all__ = ["build_cache", "open_cache", "prefetch"]

TODO, DONE, FAILED = 0, 1, 2


def _arrays(cache: str, n: int, size: int, mode: str) -> dict[str, np.memmap]:
    shapes = {"images.u8": ((n, size, size, 3), np.uint8), "masks.u8": ((n, size, size, 1), np.uint8),
              "labels.f32": ((n, 5), np.float32), "status.u8": ((n,), np.uint8)}
    return {name: np.lib.format.open_memmap(os.path.join(cache, name + ".npy"), mode=mode,
                                            dtype=dt, shape=shape if mode == "w+" else None)
            for name, (shape, dt) in shapes.items()}


def build_cache(cache: str, names: Sequence[str], load: Callable[[int], tuple], size: int,
                meta: dict, progress: bool = True, log=print) -> dict:
    """Fill CACHE with `load(i) -> (image, mask, labels)` for every name not done yet.

    A failing item (`load` raises) is recorded by name with its reason and the pass goes on.
    Refuses a cache that was built for another dataset/size/list. Returns the counts.
    """
    os.makedirs(cache, exist_ok=True)
    meta_path = os.path.join(cache, "meta.json")
    meta = {**meta, "size": size, "count": len(names), "names": list(names)}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        keys = ("dataset", "size", "count", "names")
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
    bar = Progress(len(names), "prepare", unit="img", start=len(names) - len(todo)) if progress else None
    for k, i in enumerate(todo):
        try:
            image, mask, labels = load(int(i))
            arrays["images.u8"][i] = image
            arrays["masks.u8"][i] = mask
            arrays["labels.f32"][i] = labels
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


def open_cache(cache: str) -> FaceData:
    """The done rows of a cache as FaceData over memory-mapped arrays (nothing read yet)."""
    meta_path = os.path.join(cache, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{cache}: no cache here (build it with experiments/prepare.py)")
    with open(meta_path) as f:
        meta = json.load(f)
    arrays = {name: np.load(os.path.join(cache, name + ".npy"), mmap_mode="r")
              for name in ("images.u8", "masks.u8", "labels.f32", "status.u8")}
    rows = np.flatnonzero(np.asarray(arrays["status.u8"]) == DONE)
    if not len(rows):
        raise ValueError(f"{cache}: no finished images in the cache")
    return FaceData(images=arrays["images.u8"], masks=arrays["masks.u8"], heatmaps=None,
                    labels=arrays["labels.f32"], names=[meta["names"][i] for i in rows],
                    notes=tuple(meta.get("notes", ())), rows=rows)


def prefetch(data: FaceData, sampler: BatchSampler, start: int, stop: int,
             put: Callable[[dict], dict] = lambda b: b, depth: int = 3) -> Iterator[dict]:
    """Batches for steps start..stop-1, gathered (and `put` on the devices) by a background
    thread `depth` steps ahead, so the accelerator does not wait on disk or host copies."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def work():
        try:
            for step in range(start, stop):
                q.put(put(batch_at(data, sampler.indices(step))))
            q.put(end)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
