"""Heatmaps of a folder of faces, one .npy per image: the folder form of
`cache.write_heatmaps` (what experiments/heatmaps.py FACES_DIR OUT_DIR runs).

    outputs = heatmaps.output_paths("faces/", paths, "maps/")
    heatmaps.check_settings("maps/", {"image_size": 256, ...})
    written, had = heatmaps.write_folder_heatmaps(outputs, compute, 256, batch_size=16)

Resumable: images whose .npy exists are skipped; each file is written under a temporary name and
renamed, so an interrupted run leaves no partial file. OUT_DIR/heatmaps.json records the
settings, and another run with other settings is refused.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
from tqdm import tqdm

from idguard_jax.image_files import read_rgb

__all__ = ["SETTINGS_FILE", "output_paths", "check_settings", "write_folder_heatmaps"]

SETTINGS_FILE = "heatmaps.json"


def output_paths(faces_dir: str, paths: list[str], out_dir: str) -> dict[str, str]:
    """image -> OUT_DIR/REL/NAME.npy; ValueError for two images that would share a file
    (a.png, a.jpg)."""
    outputs, owner = {}, {}
    for path in paths:
        out = os.path.join(out_dir, os.path.splitext(os.path.relpath(path, faces_dir))[0] + ".npy")
        if out in owner:
            raise ValueError(f"{owner[out]} and {path} would both write {out}; rename one")
        owner[out] = outputs[path] = out
    return outputs


def check_settings(out_dir: str, settings: dict) -> None:
    """Write OUT_DIR/heatmaps.json, or refuse (ValueError) if it records other settings."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
            raise ValueError(f"{out_dir}: made with other settings ({', '.join(changed)}: "
                             f"{[before.get(k) for k in changed]} there, "
                             f"{[settings.get(k) for k in changed]} now); use another OUT_DIR")
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def _save_atomic(path: str, array) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_folder_heatmaps(outputs: dict[str, str], compute: Callable[[np.ndarray], np.ndarray],
                          image_size: int, batch_size: int) -> tuple[int, int]:
    """Heatmaps (S, S) float32 of every image in `outputs` (image -> .npy path) that lacks its
    file, `batch_size` at a time: (written, had). compute: uint8 (b, S, S, 3) -> (b, S, S, 1).
    An unreadable image stops the pass (ValueError naming it); what is written stays."""
    todo = [p for p in outputs if not os.path.isfile(outputs[p])]
    had = len(outputs) - len(todo)
    with tqdm(total=len(outputs), desc="heatmaps", unit="img", initial=had, disable=None) as bar:
        for start in range(0, len(todo), batch_size):
            _write_batch(todo[start:start + batch_size], outputs, compute, image_size,
                         batch_size)
            bar.update(min(batch_size, len(todo) - start))
    return len(todo), had


def _write_batch(batch: list[str], outputs: dict[str, str], compute: Callable, image_size: int,
                 batch_size: int) -> None:
    """One batch of `write_folder_heatmaps`: read, compute, save each map atomically."""
    try:
        faces = [read_rgb(p, image_size) for p in batch]
    except ValueError as e:
        raise ValueError(f"{e} (heatmaps written so far are kept; rerun to resume)") from e
    # A short last batch is filled with its own images: one compiled shape, and the same
    # batch minimum for the reference's data-dependent denorm.
    faces += [faces[i % len(faces)] for i in range(batch_size - len(faces))]
    maps = np.asarray(compute(np.stack(faces)))
    for path, heatmap in zip(batch, maps):
        _save_atomic(outputs[path], heatmap[..., 0])
