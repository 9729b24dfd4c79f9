"""The gradient prior from a folder of faces: what `experiments/prior.py compute` runs.

    images, used = prior_faces.read_random_faces(paths, 2000, 256, seed=0)
    delta_p, summary = prior_faces.compute_prior(model.apply, variables, images, seed=0)
    prior_faces.write_preview(os.path.join(out, "delta_p.png"), delta_p, eps=0.05)

`summary` says how much the averaged (universal) prior disrupts the surrogate, against uniform
noise of the same bound on the same images (mean per-image MSE(M_s(x + d), M_s(x)), [-1, 1]).
"""
from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.image_files import read_rgb
from idguard_jax.training.prior import pgd_prior, reconstruction_disruption

__all__ = ["read_random_faces", "compute_prior", "write_preview"]


def read_random_faces(paths: list[str], n: int, size: int, seed: int) -> tuple:
    """n randomly chosen readable images (uint8 (n, size, size, 3), None if none could be read)
    and their paths; each unreadable one is a warning naming it."""
    order = np.random.default_rng(seed).permutation(len(paths))
    images, kept = [], []
    for i in order:
        if len(kept) == n:
            break
        try:
            images.append(read_rgb(paths[i], size))
            kept.append(paths[i])
        except ValueError as e:
            warnings.warn(str(e), stacklevel=2)
    return (np.stack(images) if images else None), kept


def _mean_disruption(apply_fn, variables, images, delta, batch_size: int) -> float:
    total = 0.0
    for s in range(0, len(images), batch_size):
        b = images[s:s + batch_size]
        total += float(jnp.sum(reconstruction_disruption(apply_fn, variables, b, delta)))
    return total / len(images)


def compute_prior(apply_fn: Callable, variables, images: np.ndarray, *, seed: int,
                  eps: float = 0.05, steps: int = 10, step_size: float = 0.01,
                  batch_size: int = 32, log_every: int = 10,
                  callback: Callable[[dict], None] | None = None) -> tuple[jax.Array, dict]:
    """delta_p (S, S, 3): the average of PGD perturbations against the surrogate over `images`
    (`prior.pgd_prior`, keys from `seed`), and its summary: pgd_disruption (the last progress
    record's), prior_disruption, noise_disruption, prior_linf, prior_mean_abs."""
    key = jax.random.key(seed)
    last = {}

    def progress(m):
        last.update(m)
        if callback is not None:
            callback(m)

    delta_p = pgd_prior(apply_fn, variables, images, key=key, eps=eps, steps=steps,
                        step_size=step_size, batch_size=batch_size, callback=progress,
                        log_every=log_every)
    noise = jax.random.uniform(jax.random.split(key)[1], delta_p.shape, jnp.float32, -eps, eps)
    return delta_p, {
        "pgd_disruption": last.get("disruption"),
        "prior_disruption": _mean_disruption(apply_fn, variables, images, delta_p, batch_size),
        "noise_disruption": _mean_disruption(apply_fn, variables, images, noise, batch_size),
        "prior_linf": float(jnp.max(jnp.abs(delta_p))),
        "prior_mean_abs": float(jnp.mean(jnp.abs(delta_p))),
    }


def write_preview(path: str, delta_p, eps: float) -> None:
    """delta_p as a PNG for looking at: [-eps, eps] scaled to [0, 255]."""
    from PIL import Image

    vis = np.clip(np.rint((np.asarray(delta_p) / eps + 1.0) * 127.5), 0, 255)
    Image.fromarray(vis.astype(np.uint8)).save(path)
