"""ID-Guard's gradient prior perturbation delta_p (paper III-D and IV-A5).

delta_p is one image-sized (H, W, 3) perturbation that is fed to the generator next to every
image and trained jointly with it. It starts as an average of PGD perturbations:

1. train a surrogate face-reconstruction model M_s (`SurrogateAutoencoder`, `train_surrogate`);
2. on N face images x_i (the paper: 2,000 random CelebAMask-HQ faces at 256 px) run the
   reference's `LinfPGDAttack` (`idguard_jax.pgd`) against M_s (`pgd_perturbations`): maximise
   MSE(M_s(x + d), M_s(x)) with eps 0.05, 10 steps of 0.01, a uniform random start in
   [-eps, eps], a sign step, and clamps of d to +-eps and of x + d to [-1, 1];
3. average the N perturbations d_i (`pgd_prior`).

Units: images and perturbations are in the library's [-1, 1] pixel scale (eps 0.05 there is
0.025 of the [0, 1] range, about 6.4/255). Arrays are NHWC.

The surrogate M_s is `training.surrogate`'s.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.images import as_float_images
from idguard_jax.pgd import linf_pgd
from ports.layers import clamp

__all__ = ["reconstruction_disruption", "pgd_perturbations", "pgd_prior", "save_prior",
           "load_prior", "prior_from_array", "image_keys", "PRIOR_KIND"]

PRIOR_KIND = "idguard-prior"

ApplyFn = Callable[[Any, jax.Array], jax.Array]


# --------------------------------------------------------------------------------------------
# PGD against the surrogate
# --------------------------------------------------------------------------------------------

def _pgd(apply_fn: ApplyFn, variables, x: jax.Array, keys: jax.Array, eps: float, steps: int,
         step_size: float) -> jax.Array:
    """`pgd.linf_pgd` against M on a batch, one random start per image (`keys` (B,)); returns
    d = X - x. The loss is sum_i MSE_i(M(X_i), M(x_i)), a sum of per-image means, so image i's
    gradient is that of its own MSE and does not depend on the batch."""
    y_clean = jax.lax.stop_gradient(apply_fn(variables, x))

    def loss(xa):
        return jnp.sum(jnp.mean(jnp.square(apply_fn(variables, xa) - y_clean), axis=(1, 2, 3)))

    return linf_pgd(loss, x, keys, eps=eps, steps=steps, step_size=step_size) - x


def _disruption(apply_fn: ApplyFn, variables, x: jax.Array, d: jax.Array) -> jax.Array:
    """(B,) MSE(M(clamp(x + d, -1, 1)), M(x)) per image."""
    y = apply_fn(variables, x)
    y_adv = apply_fn(variables, clamp(x + d, -1.0, 1.0))
    return jnp.mean(jnp.square(y_adv - y), axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("apply_fn", "eps", "steps", "step_size"))
def _pgd_jit(apply_fn, variables, x, keys, *, eps, steps, step_size):
    return _pgd(apply_fn, variables, x, keys, eps, steps, step_size)


@functools.partial(jax.jit, static_argnames=("apply_fn", "eps", "steps", "step_size"))
def _pgd_sum_jit(apply_fn, variables, x, keys, valid, *, eps, steps, step_size):
    d = _pgd(apply_fn, variables, x, keys, eps, steps, step_size)
    w = valid.astype(jnp.float32)[:, None, None, None]
    return jnp.sum(d * w, axis=0), _disruption(apply_fn, variables, x, d)


_disruption_jit = jax.jit(_disruption, static_argnums=0)


def image_keys(key: jax.Array, start: int, count: int) -> jax.Array:
    """The PGD random-start keys of images start..start+count-1: fold_in(key, i)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + count))


def pgd_perturbations(apply_fn: ApplyFn, variables, images, *, keys: jax.Array,
                      eps: float = 0.05, steps: int = 10, step_size: float = 0.01) -> jax.Array:
    """Per-image PGD perturbations (B, H, W, 3) against `apply_fn` (jitted, batched).

    Args:
      apply_fn: `apply_fn(variables, x)` -> model output for (B, H, W, 3) x in [-1, 1], e.g.
        `SurrogateAutoencoder(...).apply` (static for jit: reuse the same object to reuse the
        compilation).
      images: (B, H, W, 3) float in [-1, 1] (or uint8, converted).
      keys: (B,) typed keys, one per image, for the uniform random start.
      eps, step_size: L-inf bound and step, in [-1, 1] pixel units; steps: iterations.
    Returns d with |d| <= eps (up to float rounding) and x + d in [-1, 1].
    """
    x = jnp.asarray(as_float_images(images))
    return _pgd_jit(apply_fn, variables, x, keys, eps=float(eps), steps=int(steps),
                    step_size=float(step_size))


def reconstruction_disruption(apply_fn: ApplyFn, variables, images, delta) -> jax.Array:
    """(B,) per-image MSE(M(clamp(x + delta, -1, 1)), M(x)); delta (H, W, 3) or (B, H, W, 3)."""
    x = jnp.asarray(as_float_images(images))
    d = jnp.broadcast_to(jnp.asarray(delta, jnp.float32), x.shape)
    return _disruption_jit(apply_fn, variables, x, d)


def pgd_prior(apply_fn: ApplyFn, variables, images, *, key: jax.Array, eps: float = 0.05,
              steps: int = 10, step_size: float = 0.01, batch_size: int = 32,
              callback: Callable[[dict], None] | None = None,
              log_every: int = 1) -> jax.Array:
    """delta_p: the mean of the N per-image PGD perturbations against M_s (paper IV-A5).

    Args:
      apply_fn, variables: the surrogate, as for `pgd_perturbations`.
      images: (N, H, W, 3) float in [-1, 1], or uint8 (converted one batch at a time, which
        keeps 2,000 faces at 256 px at 0.4 GB on the host instead of 1.6 GB).
      key: image i (its index in `images`) starts from `jax.random.fold_in(key, i)`, so the
        result does not depend on `batch_size`.
      batch_size: images per jitted call; the last batch is padded (one compilation).
      callback: called every `log_every` batches and after the last one with
        {'images_done', 'images_total', 'disruption' (mean per-image MSE(M(x+d), M(x)) so far),
        'elapsed_s'}; the last call's 'disruption' is the mean over all N images of the
        disruption of each image's own PGD perturbation.
    Returns:
      delta_p (H, W, 3) float32, |delta_p| <= eps: the mean of the N perturbations (accumulated
      in float64).
    """
    n = len(images)
    if n == 0:
        raise ValueError("pgd_prior: no images")
    shape = tuple(images.shape[1:])
    acc = np.zeros(shape, np.float64)
    dis_sum, t0 = 0.0, time.perf_counter()
    n_batches = math.ceil(n / batch_size)
    for b in range(n_batches):
        start = b * batch_size
        chunk = np.asarray(as_float_images(np.asarray(images[start:start + batch_size])))
        m = len(chunk)
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + shape, np.float32)])
        valid = np.arange(batch_size) < m
        d_sum, dis = _pgd_sum_jit(apply_fn, variables, jnp.asarray(chunk),
                                  image_keys(key, start, batch_size), jnp.asarray(valid),
                                  eps=float(eps), steps=int(steps), step_size=float(step_size))
        acc += np.asarray(d_sum, np.float64)
        dis_sum += float(np.sum(np.asarray(dis)[:m]))
        if callback is not None and ((b + 1) % log_every == 0 or b + 1 == n_batches):
            callback({"images_done": start + m, "images_total": n,
                      "disruption": dis_sum / (start + m),
                      "elapsed_s": time.perf_counter() - t0})
    return jnp.asarray(acc / n, jnp.float32)


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------

def save_prior(path, delta_p, meta: dict | None = None, overwrite: bool = False) -> str:
    """Write a prior bundle (kind 'idguard-prior'): tree {'delta_p': (H, W, 3) float32}.

    `meta` (JSON-serialisable: eps, steps, surrogate, images, ...) is stored with `kind` and
    `image_size` added. Refuses to replace an existing bundle unless `overwrite`.
    """
    from idguard_jax.checkpoint import save_bundle

    d = np.asarray(delta_p, np.float32)
    if d.ndim != 3 or d.shape[-1] != 3:
        raise ValueError(f"save_prior: expected delta_p of shape (H, W, 3), got {d.shape}")
    full = {**(meta or {}), "kind": PRIOR_KIND, "image_size": [int(d.shape[0]), int(d.shape[1])]}
    return save_bundle(path, {"delta_p": d}, full, overwrite=overwrite)


def _as_hwc(values: np.ndarray, source: str) -> np.ndarray:
    """(1, 3, H, W), (3, H, W) or (H, W, 3) -> (H, W, 3); ValueError naming `source` else."""
    d = values[0] if values.ndim == 4 and values.shape[0] == 1 else values
    if d.ndim == 3 and d.shape[0] == 3 and d.shape[-1] != 3:
        d = np.transpose(d, (1, 2, 0))
    if d.ndim != 3 or d.shape[-1] != 3 or min(d.shape[:2]) < 2:
        raise ValueError(f"{source}: expected an image-shaped perturbation (1, 3, H, W), "
                         f"(3, H, W) or (H, W, 3), got shape {tuple(values.shape)}")
    return d


def prior_from_array(values, *, eps: float, image_size: int | None = None,
                     source: str = "delta_p") -> tuple[jax.Array, int]:
    """A prior perturbation from elsewhere (e.g. the reference's released `pri_pert.pt`, which
    its `advGen.py` clamps to +-eps when loading it) as delta_p (S, S, 3) float32, |d| <= eps.

    values: (1, 3, H, W), (3, H, W) or (H, W, 3) in [-1, 1] pixel units. image_size None keeps
    H x W; another size is resized with a warning (`generator.fit_delta_p`), after the clamp.
    Returns (delta_p, how many of the given values lay beyond +-eps and were clamped).
    Raises ValueError naming `source` for another shape or any NaN / inf.
    """
    from idguard_jax.generator import fit_delta_p

    d = _as_hwc(np.asarray(values, np.float32), source)
    bad = int(np.sum(~np.isfinite(d)))
    if bad:
        raise ValueError(f"{source}: {bad} of its {d.size} values are NaN or infinite")
    clamped = int(np.sum(np.abs(d) > eps))
    d = np.clip(d, -eps, eps)
    if image_size is not None:
        d = fit_delta_p(d, image_size, source=source)
    return jnp.asarray(d, jnp.float32), clamped


def load_prior(path, image_size: int | None = None) -> jax.Array:
    """delta_p of a prior bundle as float32 (image_size, image_size, 3).

    A prior of another size is resized (bilinear, align_corners=True) with a warning, by
    `generator.fit_delta_p`. image_size None keeps the stored size. The bundle's meta is
    `checkpoint.read_meta(path)`.
    """
    from idguard_jax.checkpoint import load_bundle
    from idguard_jax.generator import fit_delta_p

    tree, _ = load_bundle(
        path, kind=PRIOR_KIND, what="prior",
        abstract=lambda meta: {"delta_p": jax.ShapeDtypeStruct(
            tuple(meta.get("image_size", (0, 0))) + (3,), jnp.float32)},
        hint="make one with `python experiments/prior.py compute ...`")
    d = jnp.asarray(tree["delta_p"], jnp.float32)
    if image_size is None:
        return d
    return fit_delta_p(d, image_size, source=f"{path}")
