"""The one NumPy random init: weights drawn on the host from the variables' shapes, for the
networks trained or used at random here (the generator's fresh start, the surrogate, demo and
test targets, stand-in identity networks).

Flax's own init compiles every initializer separately, several seconds per network on a CPU;
these draws take milliseconds and give the same scales: kernels LeCun-normal (std 1/sqrt(fan_in)),
norm scales 1, biases and other leaves 0, running variances 1.
"""
from __future__ import annotations

import math

import jax
import numpy as np

__all__ = ["random_variables"]


def random_variables(shapes, key: jax.Array | int, kernel_std: float | None = None,
                     scale_std: float = 0.0) -> dict:
    """A pytree of arrays with the structure, shapes and dtypes of `shapes` (from eval_shape).

    key: a typed jax key (a NumPy seed is drawn from it) or the NumPy seed itself (PCG64).
    kernel_std: fixed std of every kernel (None: LeCun, 1/sqrt(fan_in), fan_in = the product of
    all but the kernel's last axis); scale_std: norm scales are drawn N(1, scale_std).
    """
    seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1]) or 1
            std = kernel_std if kernel_std is not None else 1.0 / math.sqrt(fan_in)
            value = rng.normal(0.0, std, leaf.shape)
        elif name == "scale":
            value = 1.0 + scale_std * rng.normal(size=leaf.shape)
        elif name == "var":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jax.numpy.asarray(value, leaf.dtype)

    return dict(jax.tree_util.tree_map_with_path(draw, shapes))
