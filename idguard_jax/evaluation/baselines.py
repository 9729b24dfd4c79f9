"""The paper's baselines in this framework: same targets, same [-1, 1] images, same metrics.

- `disrupting`: Disrupting Deepfakes (Ruiz et al. 2020): per-image L-inf PGD (`idguard_jax.pgd`) on
  StarGAN, eps 0.05, 10 steps of 0.01, uniform random start, maximising MSE(G(x', c), G(x, c)).
  `per_condition=True` makes one perturbation per condition (attribute), as its test loop does:
  (C, B, S, S, 3); by default one image for all of the target's conditions (the sum of their
  MSEs), which is what a cross-model table needs (one protected photo per person).
- `cmua_fit` / `cmua_apply`: CMUA-Watermark (Huang et al. 2022): ONE universal
  perturbation learned over batches and models, eps 0.05, k 10, a 0.01, momentum 0.5, batch 64;
  per model call: random start (HiSD: x + the current perturbation, unclamped, or x itself
  before there is one), k sign steps on
  MSE(G(X), G(x)) (HiSD's target + 0.002), the batch mean of the clamped steps folded into the
  perturbation with momentum. Model order as given, every condition of each.
- `pg_train`: PG (Huang et al., "Initiative defense against facial manipulation", AAAI 2021) as
  the paper uses it: a perturbation generator trained to maximise the unconstrained MSE against
  a SURROGATE, not the targets (gray box). Here the generator is ID-Guard's ResnetGenerator
  (without a prior) and the surrogate is the face-reconstruction autoencoder of
  `idguard_jax.training.prior` (any `apply_fn(variables, x)` works); PG's own networks and its jointly
  trained imitation of the target are not reproduced (no code used).
- `pgd_all`: per-image PGD against every target and condition at once (the sum of their MSEs,
  equal weights), an upper reference for what a per-image attack with the same budget does.
- `uniform_noise`: uniform random noise within the same eps, the floor a protection must beat.
- IAP (Zhu et al.) has no public code and is left out.

Every attack is jitted (targets and step counts static, weights as arguments), takes images in
[-1, 1] and returns images in [-1, 1] within eps (L-inf) of the input.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idguard_jax.generator import GeneratorConfig, init_generator, perturb, protect_eval
from idguard_jax.networks import targets as targets_lib
from idguard_jax.pgd import EPS, STEP_SIZE, STEPS, linf_pgd, random_start
from ports.layers import clamp

__all__ = ["EPS", "STEPS", "STEP_SIZE", "CMUA_MOMENTUM", "CMUA_BATCH", "HISD_TARGET_OFFSET",
           "linf_pgd", "attack_loss", "disrupting", "pgd_all", "cmua_fit", "cmua_apply",
           "cmua_call", "pg_train", "pg_protect", "uniform_noise", "METHODS"]

CMUA_MOMENTUM, CMUA_BATCH = 0.5, 64
HISD_TARGET_OFFSET = 0.002       # CMUA's HiSD target: the clean translation + 0.002
METHODS = ("idguard", "disrupting", "cmua", "pg", "pgd", "noise")


def _per_image_mse(a, b):
    return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


def attack_loss(targets: Sequence[targets_lib.Target], variables: dict, x_adv, clean_outputs,
                tables) -> jax.Array:
    """sum over targets, conditions and images of MSE(G(x_adv, c), G(x, c)) (per-image means)."""
    total = 0.0
    for t, y, table in zip(targets, clean_outputs, tables):
        out = jax.vmap(lambda c: t.forward(variables[t.name], x_adv, c)[0])(table)
        total = total + jnp.sum(jax.vmap(_per_image_mse)(out, y))
    return total


def _clean_outputs(targets, variables, x, tables):
    return [jax.lax.stop_gradient(jax.vmap(lambda c: t.forward(variables[t.name], x, c)[0])(tab))
            for t, tab in zip(targets, tables)]


@functools.partial(jax.jit, static_argnames=("targets", "eps", "steps", "step_size"))
def pgd_all(targets: tuple, variables: dict, x: jax.Array, labels: jax.Array, key: jax.Array, *,
            eps: float = EPS, steps: int = STEPS, step_size: float = STEP_SIZE) -> jax.Array:
    """Per-image PGD against every target and condition (equal weights): (B, S, S, 3)."""
    x = x.astype(jnp.float32)
    tables = [t.conditions(labels) for t in targets]
    ys = _clean_outputs(targets, variables, x, tables)
    return linf_pgd(lambda xa: attack_loss(targets, variables, xa, ys, tables), x, key, eps=eps,
                    steps=steps, step_size=step_size)


@functools.partial(jax.jit, static_argnames=("target", "per_condition", "eps", "steps",
                                             "step_size"))
def disrupting(target: targets_lib.Target, variables: dict, x: jax.Array, labels: jax.Array,
               key: jax.Array, *, per_condition: bool = False, eps: float = EPS,
               steps: int = STEPS, step_size: float = STEP_SIZE) -> jax.Array:
    """Disrupting Deepfakes against one target (StarGAN in the paper); `variables` are that
    target's. (B, S, S, 3), or (C, B, S, S, 3) with per_condition (one attack per condition,
    each with its own random start)."""
    x = x.astype(jnp.float32)
    table = target.conditions(labels)
    vs = {target.name: variables}
    (y,) = _clean_outputs((target,), vs, x, [table])
    if not per_condition:
        return linf_pgd(lambda xa: attack_loss((target,), vs, xa, [y], [table]), x, key,
                        eps=eps, steps=steps, step_size=step_size)

    def one(c, yc, k):
        def loss(xa):
            return jnp.sum(_per_image_mse(target.forward(variables, xa, c)[0], yc))
        return linf_pgd(loss, x, k, eps=eps, steps=steps, step_size=step_size)

    keys = jax.random.split(key, target.num_conditions)
    return jax.vmap(one)(table, y, keys)


@functools.partial(jax.jit, static_argnames=("eps",))
def uniform_noise(x: jax.Array, key: jax.Array, *, eps: float = EPS) -> jax.Array:
    """clamp(x + U(-eps, eps), -1, 1), (B, S, S, 3): PGD's random start (`pgd.random_start`)
    without its steps."""
    return clamp(random_start(key, x.astype(jnp.float32), eps), -1.0, 1.0)


# ------------------------------------------------------------------------------------------
# CMUA-Watermark
# ------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("target", "eps", "steps", "step_size", "momentum"))
def cmua_call(target: targets_lib.Target, variables: dict, x: jax.Array, condition: Any,
              up: jax.Array, has_up: jax.Array, key: jax.Array, *, eps: float = EPS,
              steps: int = STEPS, step_size: float = STEP_SIZE,
              momentum: float = CMUA_MOMENTUM) -> tuple[jax.Array, jax.Array]:
    """One CMUA model call on a batch x (B, S, S, 3) for one condition: the updated universal
    perturbation up (S, S, 3) and the mean attack MSE before the call's last step.

    has_up False: up is not yet defined and the first step sets it (CMUA's `up is None`)."""
    x = x.astype(jnp.float32)
    y = jax.lax.stop_gradient(target.forward(variables, x, condition)[0])
    if target.name == "hisd":
        # CMUA's HiSD branch: X = X_nat + up once up exists (unclamped), else X_nat itself (no
        # random start); `key` is unused here
        y = y + HISD_TARGET_OFFSET
        start = jnp.where(has_up, x + up, x)
    else:
        start = x + jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)

    def loss(xa):
        return jnp.mean(jnp.square(target.forward(variables, xa, condition)[0] - y))

    def body(_, carry):
        xa, up, has, _ = carry
        value, g = jax.value_and_grad(loss)(xa)
        x_step = xa + step_size * jnp.sign(g)
        eta = jnp.mean(clamp(x_step - x, -eps, eps), axis=0)
        up = jnp.where(has, momentum * up + (1.0 - momentum) * eta, eta)
        return clamp(x + up, -1.0, 1.0), up, jnp.asarray(True), value

    _, up, _, value = jax.lax.fori_loop(0, steps, body, (start, up, has_up, jnp.float32(0)))
    return up, value


def cmua_fit(targets: Sequence[targets_lib.Target], variables: dict, images: np.ndarray,
             labels: np.ndarray | None, key: jax.Array, *, batch_size: int = CMUA_BATCH,
             epochs: int = 1, eps: float = EPS, steps: int = STEPS,
             step_size: float = STEP_SIZE, momentum: float = CMUA_MOMENTUM,
             log: Callable[[dict], None] | None = None) -> jax.Array:
    """Learn CMUA's universal perturbation (S, S, 3) over `images` (N, S, S, 3) in [-1, 1]:
    per batch (the last partial one dropped, unless it is the only one), for each target in
    order and each of its conditions, one `cmua_call`."""
    images = np.asarray(images, np.float32)
    n, s = images.shape[0], images.shape[1]
    labels = np.zeros((n, 5), np.float32) if labels is None else np.asarray(labels, np.float32)
    bs = min(batch_size, n)
    up, has_up, call = jnp.zeros((s, s, 3), jnp.float32), jnp.asarray(False), 0
    for epoch in range(epochs):
        for start in range(0, n - bs + 1, bs):
            x = jnp.asarray(images[start:start + bs])
            for t in targets:
                table = t.conditions(jnp.asarray(labels[start:start + bs]))
                for k in range(t.num_conditions):
                    up, value = cmua_call(t, variables[t.name], x, t.select(table, k), up,
                                          has_up, jax.random.fold_in(key, call), eps=eps,
                                          steps=steps, step_size=step_size, momentum=momentum)
                    has_up, call = jnp.asarray(True), call + 1
                    if log is not None:
                        log({"epoch": epoch, "batch": start // bs, "target": t.name,
                             "condition": k, "mse": float(value)})
    return up


@functools.partial(jax.jit, static_argnames=("eps",))
def cmua_apply(up: jax.Array, x: jax.Array, eps: float = EPS) -> jax.Array:
    """clamp(x + clamp(up, +-eps), -1, 1) for a batch x (B, S, S, 3)."""
    return clamp(x.astype(jnp.float32) + clamp(up, -eps, eps), -1.0, 1.0)


# ------------------------------------------------------------------------------------------
# PG: a perturbation generator against a surrogate
# ------------------------------------------------------------------------------------------

def pg_train(apply_fn: Callable, surrogate_variables, images: np.ndarray, key: jax.Array, *,
             config: GeneratorConfig, steps: int, batch_size: int = 32,
             learning_rate: float = 1e-4, log: Callable[[dict], None] | None = None) -> dict:
    """Train a ResnetGenerator (no prior: delta_p = 0) to maximise the surrogate's
    MSE(S(x'), S(x)) over `images` (N, S, S, 3) in [-1, 1]; Adam (lr 1e-4, betas 0.5/0.999,
    ID-Guard's settings). Returns the generator variables {'params', 'batch_stats'} (use
    `pg_protect`). `apply_fn(variables, x)` is the surrogate's forward (static under jit)."""
    images = np.asarray(images, np.float32)
    n = len(images)
    bs = min(batch_size, n)
    module = config.module()
    _, variables = init_generator(config, key)
    zero = jnp.zeros((config.image_size,) * 2 + (3,), jnp.float32)
    tx = optax.adam(learning_rate, b1=0.5, b2=0.999)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt_state, x):
        def loss_fn(p):
            x_adv, _, new_stats = perturb(module, {"params": p, "batch_stats": stats}, zero, x,
                                          config.eps, train=True)
            y = jax.lax.stop_gradient(apply_fn(surrogate_variables, x))
            return -jnp.mean(jnp.square(apply_fn(surrogate_variables, x_adv) - y)), new_stats
        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, -loss

    params, stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    for i in range(steps):
        idx = rng.choice(n, bs, replace=False)
        params, stats, opt_state, value = step(params, stats, opt_state, jnp.asarray(images[idx]))
        if log is not None:
            log({"step": i + 1, "surrogate_mse": float(value)})
    return {"params": params, "batch_stats": stats}


def pg_protect(variables: dict, x: jax.Array, *, config: GeneratorConfig) -> jax.Array:
    """PG's protected images (B, S, S, 3): the generator in eval mode (`generator.protect_eval`,
    no prior), perturbation clamped to config.eps."""
    zero = jnp.zeros((config.image_size,) * 2 + (3,), jnp.float32)
    return protect_eval(variables, zero, x, config=config, eps=config.eps)
