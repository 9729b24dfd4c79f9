"""Batches for the train step: a step-addressable sampler (exact resume), the batch dict, and a
background thread that gathers batches ahead of the accelerator."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

from idguard_jax.data.datasets import FaceData

__all__ = ["BatchSampler", "masks_in_unit_range", "batch_at", "prefetch"]


class BatchSampler:
    """Fixed-size batches, shuffled per epoch by seed, addressable by step (so resuming at step s
    gives exactly the batches an uninterrupted run would have seen). Drops the last partial batch
    (one shape for the jitted step); the reference's DataLoader keeps it: an epoch of 29,000
    images at batch 3 is 9,666 steps here, 9,667 there."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} images are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return np.sort(perm[i * self.batch_size:(i + 1) * self.batch_size])


def masks_in_unit_range(masks: np.ndarray, pipeline: str) -> np.ndarray:
    """Masks the train step reads as [0, 1] (`training.step.read_batch` casts to float32):
    'exact' uint8 {0,1} as they are (1 byte a pixel to the device), 'reference' uint8 0..255
    as float32 / 255 (the reference's ToTensor, Normalize, (x+1)/2 up to float rounding)."""
    if pipeline == "reference":
        return masks.astype(np.float32) / np.float32(255)
    return masks


def batch_at(data: FaceData, idx: np.ndarray) -> dict:
    """The batch dict the train step takes (host numpy arrays); idx are positions < len(data)."""
    if data.rows is not None:
        idx = data.rows[idx]
    if data.heatmaps is None:
        heat = np.ones((len(idx),) + data.masks.shape[1:], np.float32)
    else:
        heat = data.heatmaps[idx]
    batch = {"image": data.images[idx],
             "mask": masks_in_unit_range(data.masks[idx], data.mask_pipeline), "heatmap": heat,
             "labels": data.labels[idx]}
    if data.landmarks is not None:
        from idguard_jax.networks.dlib_chips import chip_warps

        size = data.images.shape[1:3]
        pts = data.landmarks[idx] * np.array([size[1], size[0]], np.float32)
        batch["chip_warp"] = chip_warps(pts, size)   # a NamedTuple: a pytree, as it is
    return batch


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
