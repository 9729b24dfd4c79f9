"""The one L-inf PGD: the reference LinfPGDAttack (Ruiz et al.'s disrupting-deepfakes
`attacks.py::LinfPGDAttack.perturb`), parameterised by the loss it ascends.

Used by the baselines (`evaluation.baselines`: Disrupting Deepfakes, PGD on every target) and by
the gradient prior (`training.prior`: PGD against the surrogate). Images are in [-1, 1]; eps and
step_size are in those units.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ports.layers import clamp

__all__ = ["linf_pgd", "random_start", "EPS", "STEPS", "STEP_SIZE"]

# The reference LinfPGDAttack's defaults (epsilon 0.05, k 10, a 0.01), ID-Guard's budget too.
EPS, STEPS, STEP_SIZE = 0.05, 10, 0.01


def random_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """x + U(-eps, eps), NOT clamped to [-1, 1] (as the reference).

    key: one typed key (one draw of x's shape), or (B,) keys, one per image of x (B, ...): then
    each image's start depends only on its own key, not on its batch."""
    if key.shape == ():
        return x + jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)
    noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32, -eps, eps))(key)
    return x + noise


def linf_pgd(loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array, *,
             eps: float = EPS, steps: int = STEPS, step_size: float = STEP_SIZE) -> jax.Array:
    """X = `random_start(key, x, eps)`; `steps` times
    X <- clamp(x + clamp(X + step_size * sign(grad loss_fn(X)) - x, +-eps), -1, 1). Returns X.

    As in the reference, the first gradient is taken at the UNCLAMPED random start (it may leave
    [-1, 1] by up to eps). With steps 0 the start is clamped to [-1, 1] (the reference would
    return it raw; a protected image must stay in range). loss_fn should be a sum of per-image
    terms, so that each image's attack ignores the rest of its batch. Jittable (steps static).
    """
    start = random_start(key, x, eps)
    if steps == 0:
        return clamp(start, -1.0, 1.0)

    def body(_, xa):
        xa = xa + step_size * jnp.sign(jax.grad(loss_fn)(xa))
        return clamp(x + clamp(xa - x, -eps, eps), -1.0, 1.0)

    return jax.lax.fori_loop(0, steps, body, start)
