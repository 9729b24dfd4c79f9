"""The surrogate face-reconstruction model M_s that the gradient prior attacks (paper III-D).

The paper does not describe M_s beyond "a surrogate model with face reconstruction capabilities"
and the official release ships only the resulting `pri_pert.pt`; this small conv autoencoder is
this project's choice.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from idguard_jax.data.loader import BatchSampler
from idguard_jax.images import as_float_images, to_float
from idguard_jax.networks.random_init import random_variables
from ports.layers import conv2d, conv_transpose2d

__all__ = ["SurrogateAutoencoder", "init_surrogate", "train_surrogate", "reconstruction_loss",
           "save_surrogate", "load_surrogate", "SURROGATE_KIND"]

SURROGATE_KIND = "idguard-surrogate"

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Dtype = Any


class SurrogateAutoencoder(nn.Module):
    """M_s: (B, H, W, 3) images in [-1, 1] -> (B, H, W, 3) reconstructions in (-1, 1) (tanh).

    Encoder: `enc_in` conv3 (width) + ReLU, then `depth` x [conv4 stride 2 + ReLU] named
    `enc_1..enc_depth`, level i having width * 2**min(i, 3) channels. Decoder: the mirror with
    transposed convs k4 s2 p1 (`dec_depth..dec_1`, each exactly doubling H and W) and a final
    conv3 to 3 channels (`dec_out`) + tanh. No normalisation layers, so every image is processed
    independently of the others in its batch (PGD results do not depend on the batching).
    H and W must be multiples of 2**depth. Fully convolutional: it runs at any such size.
    `return_features=True` also returns the bottleneck, (B, H / 2**depth, W / 2**depth,
    channels(depth)) (the mid features of the learned target `networks.learned.FaceAutoencoder`).
    """
    width: int = 32
    depth: int = 4
    dtype: Dtype = None

    def channels(self, level: int) -> int:
        return self.width * 2 ** min(level, 3)

    @nn.compact
    def __call__(self, x: jax.Array, return_features: bool = False):
        f = 2 ** self.depth
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"SurrogateAutoencoder(depth={self.depth}) needs H and W multiples "
                             f"of {f}, got {x.shape[1]}x{x.shape[2]}")
        dt = self.dtype
        h = x.astype(dt) if dt is not None else x
        h = nn.relu(conv2d(self.width, 3, 1, 1, bias=True, dtype=dt, name="enc_in")(h))
        for i in range(1, self.depth + 1):
            h = nn.relu(conv2d(self.channels(i), 4, 2, 1, bias=True, dtype=dt, name=f"enc_{i}")(h))
        bottleneck = h
        for i in range(self.depth, 0, -1):
            h = nn.relu(conv_transpose2d(self.channels(i - 1), 4, 2, 1, bias=True, dtype=dt,
                                         name=f"dec_{i}")(h))
        h = conv2d(3, 3, 1, 1, bias=True, dtype=dt, name="dec_out")(h)
        image = jnp.tanh(h.astype(jnp.float32))
        return (image, bottleneck) if return_features else image


def init_surrogate(seed: int, model: SurrogateAutoencoder, image_size: int) -> dict:
    """Fresh variables {'params'} of `model` for (image_size x image_size) inputs.

    Kernels ~ N(0, 1/fan_in) (LeCun normal, fan_in = kh * kw * kernel.shape[-2] as Flax counts
    it), biases 0, drawn on the host with numpy's PCG64(seed) (`random_init.random_variables`):
    the same on every backend, and no compilation (Flax's own init compiles one threefry
    sampler per layer, several seconds on a 2-core CPU).
    """
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    return random_variables(shapes, int(seed))


def reconstruction_loss(apply_fn: ApplyFn, variables, images, batch_size: int = 32) -> float:
    """Mean squared reconstruction error MSE(M_s(x), x) over all images (uint8 or [-1, 1])."""
    total, n = 0.0, len(images)
    for start in range(0, n, batch_size):
        x = jnp.asarray(as_float_images(images[start:start + batch_size]))
        total += float(_recon_sum_jit(apply_fn, variables, x))
    return total / n


@functools.partial(jax.jit, static_argnums=0)
def _recon_sum_jit(apply_fn: ApplyFn, variables, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.mean(jnp.square(apply_fn(variables, x) - x), axis=(1, 2, 3)))


def _train_step(model: SurrogateAutoencoder, tx: optax.GradientTransformation, params,
                opt_state, batch_u8: jax.Array):
    """One Adam step on the reconstruction MSE of a uint8 (B, H, W, 3) batch.

    Module level (and looked up at call time by `train_surrogate`) so that tests can wrap it in
    `chex.assert_max_traces`.
    """
    x = to_float(batch_u8)

    def loss_fn(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x) - x))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_surrogate(images_u8: np.ndarray, *, steps: int, batch_size: int = 32,
                    learning_rate: float = 1e-3, seed: int = 0, width: int = 32, depth: int = 4,
                    log_every: int = 100,
                    callback: Callable[[dict], None] | None = None) -> dict:
    """Train M_s to reconstruct faces; returns its variables {'params'}.

    Args:
      images_u8: uint8 (N, S, S, 3) RGB faces (S a multiple of 2**depth).
      steps: number of Adam steps (0 returns the initial variables of this seed).
      batch_size: images per step (drawn without replacement within an epoch; an epoch is a
        permutation of the N images drawn from `seed`).
      learning_rate: Adam step size.
      seed: seeds the initialisation (`init_surrogate`) and the batch order.
      width, depth: `SurrogateAutoencoder` fields.
      log_every: call `callback` every this many steps (and after the last step) with
        {'step', 'loss' (mean reconstruction MSE in [-1, 1] units over the interval),
        'images_per_s', 'elapsed_s'}.
    The train step is ONE jitted function, traced once for the whole run.
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.ndim != 4 or images_u8.shape[-1] != 3 or images_u8.dtype != np.uint8:
        raise ValueError(f"train_surrogate: expected uint8 (N, S, S, 3) images, got "
                         f"{images_u8.dtype} {images_u8.shape}")
    n, size = images_u8.shape[0], images_u8.shape[1]
    model = SurrogateAutoencoder(width=width, depth=depth)
    variables = init_surrogate(seed, model, size)
    if steps <= 0:
        return variables
    tx = optax.adam(learning_rate)
    params = variables["params"]
    opt_state = tx.init(params)
    step_fn = jax.jit(functools.partial(_train_step, model, tx), donate_argnums=(0, 1))
    sampler = BatchSampler(n, min(batch_size, n), seed)
    t0 = t_last = time.perf_counter()
    loss_sum, loss_count = None, 0
    for step in range(1, steps + 1):
        batch = jnp.asarray(images_u8[sampler.indices(step - 1)])
        params, opt_state, loss = step_fn(params, opt_state, batch)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        loss_count += 1
        if callback is not None and (step % log_every == 0 or step == steps):
            mean_loss = float(loss_sum) / loss_count
            now = time.perf_counter()
            callback({"step": step, "loss": mean_loss,
                      "images_per_s": loss_count * batch_size / max(now - t_last, 1e-9),
                      "elapsed_s": now - t0})
            loss_sum, loss_count, t_last = None, 0, now
    return {"params": params}


def save_surrogate(path, model: SurrogateAutoencoder, variables: dict, meta: dict | None = None,
                   overwrite: bool = False) -> str:
    """Write a surrogate bundle (kind 'idguard-surrogate'): {'params'} + the model's fields."""
    from idguard_jax.checkpoint import save_bundle

    config = {"width": model.width, "depth": model.depth}
    full = {**(meta or {}), "kind": SURROGATE_KIND, "config": config}
    return save_bundle(path, {"params": variables["params"]}, full, overwrite=overwrite)


def load_surrogate(path) -> tuple[SurrogateAutoencoder, dict, dict]:
    """Read a surrogate bundle: (model, variables {'params'}, meta)."""
    from idguard_jax.checkpoint import load_bundle

    def expected(meta):
        model = SurrogateAutoencoder(**meta["config"])
        size = 2 ** model.depth      # fully convolutional: the smallest size it takes will do
        return jax.eval_shape(
            model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))

    tree, meta = load_bundle(path, kind=SURROGATE_KIND, what="surrogate", abstract=expected,
                             hint="train one with `python experiments/prior.py train-surrogate "
                                  "...`")
    model = SurrogateAutoencoder(**meta["config"])
    return model, jax.tree.map(jnp.asarray, {"params": tree["params"]}), meta
