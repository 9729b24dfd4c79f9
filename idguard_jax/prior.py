"""ID-Guard's gradient prior perturbation delta_p (paper III-D and IV-A5).

delta_p is one image-sized (H, W, 3) perturbation that is fed to the generator next to every
image and trained jointly with it. It starts as an average of PGD perturbations:

1. train a surrogate face-reconstruction model M_s (`SurrogateAutoencoder`, `train_surrogate`);
2. on N face images x_i (the paper: 2,000 random CelebAMask-HQ faces at 256 px) run the
   reference's `LinfPGDAttack` against M_s (`pgd_perturbations`): maximise
   MSE(M_s(x + d), M_s(x)) with eps 0.05, 10 steps of 0.01, a uniform random start in
   [-eps, eps], a sign step, and clamps of d to +-eps and of x + d to [-1, 1];
3. average the N perturbations d_i (`pgd_prior`).

Units: images and perturbations are in the library's [-1, 1] pixel scale (eps 0.05 there is
0.025 of the [0, 1] range, about 6.4/255). Arrays are NHWC.

The paper does not describe M_s beyond "a surrogate model with face reconstruction capabilities"
and the official release ships only the resulting `pri_pert.pt`; the small conv autoencoder here
is this project's choice.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from idguard_jax.data import BatchSampler
from idguard_jax.images import to_float
from ports.layers import clamp, conv2d, conv_transpose2d

__all__ = [
    "SurrogateAutoencoder", "init_surrogate", "train_surrogate", "reconstruction_loss",
    "reconstruction_disruption", "pgd_perturbations", "pgd_prior", "save_prior", "load_prior",
    "save_surrogate", "load_surrogate", "image_keys", "PRIOR_KIND", "SURROGATE_KIND",
]

PRIOR_KIND = "idguard-prior"
SURROGATE_KIND = "idguard-surrogate"

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Dtype = Any


# --------------------------------------------------------------------------------------------
# Surrogate model
# --------------------------------------------------------------------------------------------

class SurrogateAutoencoder(nn.Module):
    """M_s: (B, H, W, 3) images in [-1, 1] -> (B, H, W, 3) reconstructions in (-1, 1) (tanh).

    Encoder: `enc_in` conv3 (width) + ReLU, then `depth` x [conv4 stride 2 + ReLU] named
    `enc_1..enc_depth`, level i having width * 2**min(i, 3) channels. Decoder: the mirror with
    transposed convs k4 s2 p1 (`dec_depth..dec_1`, each exactly doubling H and W) and a final
    conv3 to 3 channels (`dec_out`) + tanh. No normalisation layers, so every image is processed
    independently of the others in its batch (PGD results do not depend on the batching).
    H and W must be multiples of 2**depth. Fully convolutional: it runs at any such size.
    """
    width: int = 32
    depth: int = 4
    dtype: Dtype = None

    def channels(self, level: int) -> int:
        return self.width * 2 ** min(level, 3)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = 2 ** self.depth
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"SurrogateAutoencoder(depth={self.depth}) needs H and W multiples "
                             f"of {f}, got {x.shape[1]}x{x.shape[2]}")
        dt = self.dtype
        h = x.astype(dt) if dt is not None else x
        h = nn.relu(conv2d(self.width, 3, 1, 1, bias=True, dtype=dt, name="enc_in")(h))
        for i in range(1, self.depth + 1):
            h = nn.relu(conv2d(self.channels(i), 4, 2, 1, bias=True, dtype=dt, name=f"enc_{i}")(h))
        for i in range(self.depth, 0, -1):
            h = nn.relu(conv_transpose2d(self.channels(i - 1), 4, 2, 1, bias=True, dtype=dt,
                                         name=f"dec_{i}")(h))
        h = conv2d(3, 3, 1, 1, bias=True, dtype=dt, name="dec_out")(h)
        return jnp.tanh(h.astype(jnp.float32))


def init_surrogate(seed: int, model: SurrogateAutoencoder, image_size: int) -> dict:
    """Fresh variables {'params'} of `model` for (image_size x image_size) inputs.

    Kernels ~ N(0, 1/fan_in) (LeCun normal, fan_in = kh * kw * kernel.shape[-2] as Flax counts
    it), biases 0, drawn on the host with numpy's PCG64(seed): the same on every backend, and no
    compilation (Flax's own init compiles one threefry sampler per layer, several seconds on a
    2-core CPU).
    """
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-2])) * leaf.shape[-2]
            w = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
            return jnp.asarray(w, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return dict(jax.tree_util.tree_map_with_path(draw, shapes))


def reconstruction_loss(apply_fn: ApplyFn, variables, images, batch_size: int = 32) -> float:
    """Mean squared reconstruction error MSE(M_s(x), x) over all images (uint8 or [-1, 1])."""
    total, n = 0.0, len(images)
    for start in range(0, n, batch_size):
        x = jnp.asarray(_as_float(images[start:start + batch_size]))
        total += float(_recon_sum_jit(apply_fn, variables, x))
    return total / n


@functools.partial(jax.jit, static_argnums=0)
def _recon_sum_jit(apply_fn: ApplyFn, variables, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.mean(jnp.square(apply_fn(variables, x) - x), axis=(1, 2, 3)))


def _as_float(x) -> np.ndarray | jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float input is passed through as float32."""
    if x.dtype == np.uint8:
        return to_float(x)
    return x.astype(np.float32) if isinstance(x, np.ndarray) else x.astype(jnp.float32)


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


# --------------------------------------------------------------------------------------------
# PGD against the surrogate
# --------------------------------------------------------------------------------------------

def _pgd(apply_fn: ApplyFn, variables, x: jax.Array, keys: jax.Array, eps: float, steps: int,
         step_size: float) -> jax.Array:
    """The reference LinfPGDAttack (disrupting-deepfakes `attacks.py`) on a batch; returns d.

    X = x + U(-eps, eps) (not clamped to [-1, 1], as in the reference); then `steps` times:
    X <- clamp(x + clamp(X + step_size * sign(grad) - x, +-eps), -1, 1), grad of
    sum_i MSE_i(M(X_i), M(x_i)) (a sum of per-image means, so image i's gradient is that of its
    own MSE and does not depend on the batch). Returns X - x.
    """
    y_clean = jax.lax.stop_gradient(apply_fn(variables, x))
    noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32, -eps, eps))(keys)

    def loss(xa):
        return jnp.sum(jnp.mean(jnp.square(apply_fn(variables, xa) - y_clean), axis=(1, 2, 3)))

    def body(_, xa):
        xa = xa + step_size * jnp.sign(jax.grad(loss)(xa))
        eta = clamp(xa - x, -eps, eps)
        return clamp(x + eta, -1.0, 1.0)

    x_adv = jax.lax.fori_loop(0, steps, body, x + noise)
    return x_adv - x


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
    x = jnp.asarray(_as_float(images))
    return _pgd_jit(apply_fn, variables, x, keys, eps=float(eps), steps=int(steps),
                    step_size=float(step_size))


def reconstruction_disruption(apply_fn: ApplyFn, variables, images, delta) -> jax.Array:
    """(B,) per-image MSE(M(clamp(x + delta, -1, 1)), M(x)); delta (H, W, 3) or (B, H, W, 3)."""
    x = jnp.asarray(_as_float(images))
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
        chunk = np.asarray(_as_float(np.asarray(images[start:start + batch_size])))
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


def load_prior(path, image_size: int | None = None) -> jax.Array:
    """delta_p of a prior bundle as float32 (image_size, image_size, 3).

    A prior of another size is resized (bilinear, align_corners=True) with a warning, by
    `generator.fit_delta_p`. image_size None keeps the stored size. The bundle's meta is
    `checkpoint.read_meta(path)`.
    """
    from idguard_jax.checkpoint import load_bundle, read_meta
    from idguard_jax.generator import fit_delta_p

    meta = read_meta(path)
    if meta.get("kind") != PRIOR_KIND:
        raise ValueError(f"{path}: not a prior bundle (kind={meta.get('kind')!r}); make one with "
                         "`python experiments/prior.py compute ...`")
    tree, _ = load_bundle(path)
    d = jnp.asarray(tree["delta_p"], jnp.float32)
    if image_size is None:
        return d
    return fit_delta_p(d, image_size, source=f"{path}")


def save_surrogate(path, model: SurrogateAutoencoder, variables: dict, meta: dict | None = None,
                   overwrite: bool = False) -> str:
    """Write a surrogate bundle (kind 'idguard-surrogate'): {'params'} + the model's fields."""
    from idguard_jax.checkpoint import save_bundle

    config = {"width": model.width, "depth": model.depth}
    full = {**(meta or {}), "kind": SURROGATE_KIND, "config": config}
    return save_bundle(path, {"params": variables["params"]}, full, overwrite=overwrite)


def load_surrogate(path) -> tuple[SurrogateAutoencoder, dict, dict]:
    """Read a surrogate bundle: (model, variables {'params'}, meta)."""
    from idguard_jax.checkpoint import load_bundle, read_meta

    meta = read_meta(path)
    if meta.get("kind") != SURROGATE_KIND:
        raise ValueError(f"{path}: not a surrogate bundle (kind={meta.get('kind')!r}); train one "
                         "with `python experiments/prior.py train-surrogate ...`")
    model = SurrogateAutoencoder(**meta["config"])
    size = 2 ** model.depth
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    tree, _ = load_bundle(path)
    variables = {"params": tree["params"]}
    got = jax.tree.map(lambda a: tuple(a.shape), variables)
    want = jax.tree.map(lambda a: tuple(a.shape), abstract)
    if got != want:
        raise ValueError(f"{path}: surrogate weights do not match its config {meta['config']}")
    return model, jax.tree.map(jnp.asarray, variables), meta
