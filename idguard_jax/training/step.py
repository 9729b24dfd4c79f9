"""ID-Guard's training: the train state and ONE jitted train step.

    setup = create_setup(cfg)                       # static: networks, optimiser, strategy
    state = init_state(setup, key, delta_p)         # generator, delta_p, Adam, strategy state
    step_fn = make_train_step(setup)                # jitted once, state donated
    state, metrics = step_fn(state, batch, frozen)  # frozen = weights of targets + identity net

Inside one step (paper eq. 12, the reference's solver.py):
  1. Clean outputs, mid features and identity features of every target, computed once, without
     gradient (they are constants of the losses).
  2. x_adv, x_pri from the generator (BatchNorm on batch statistics), with the vjp that maps
     image-space cotangents back to (G's parameters, delta_p).
  3. Per target k: ONE batched forward of [x_adv; x_pri] and the gradient of its loss L_k with
     respect to both images (one backward through target k only).
  4. Weights lambda_k from the strategy (constants). For MGDA the per-target parameter gradients
     come from a vmap of the generator's vjp over the N cotangents (one batched backward through
     G), their Gram matrix feeds the min-norm solver, and the final gradient is their weighted
     sum; every other strategy needs a single vjp through G with the weighted cotangent.
  5. Adam (lr 1e-4, betas 0.5/0.999) on {G's parameters, delta_p}, maximising sum_k lambda_k L_k.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from idguard_jax.networks import identity as identity_lib
from idguard_jax.training import mgda
from idguard_jax.networks import targets as targets_lib
from idguard_jax.config import TrainConfig
from idguard_jax.generator import ResnetGenerator, init_generator, perturb
from idguard_jax.training.losses import branch_losses
from idguard_jax.training.strategies import initial_strategy_state, weights_from_values

__all__ = ["TrainState", "Setup", "create_setup", "init_state", "init_frozen_random",
           "compute_gradients", "generator_pass", "target_objective", "weigh_tasks",
           "task_metrics", "train_step", "make_train_step", "compute_dtype"]


def compute_dtype(name: str):
    return {"float32": None, "bfloat16": jnp.bfloat16}[name]


@struct.dataclass
class TrainState:
    step: jax.Array                 # int32 scalar: steps taken (selects this step's condition)
    params: Any                     # the generator's parameters (float32 master weights)
    batch_stats: Any                # its BatchNorm running statistics
    delta_p: jax.Array              # (S, S, 3) prior perturbation, trained jointly (eq. 12)
    opt_state: Any                  # Adam over {'params', 'delta_p'}
    strategy_state: Any             # e.g. DTP's moving average of the KPIs


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run: hashable descriptions, no weights."""
    cfg: TrainConfig
    generator: ResnetGenerator
    targets: tuple[targets_lib.Target, ...]
    identity: identity_lib.IdentityNet
    optimizer: Any = dataclasses.field(compare=False, hash=False)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    @property
    def alpha(self) -> jax.Array:
        """Prior weights alpha_k (all 1 under MGDA, as the reference)."""
        if self.cfg.strategy == "mgda":
            return jnp.ones((len(self.targets),), jnp.float32)
        table = targets_lib.PRIOR_WEIGHTS[self.cfg.prior_weights]
        return jnp.asarray([table[n] for n in self.target_names], jnp.float32)


def create_setup(cfg: TrainConfig) -> Setup:
    dtype = compute_dtype(cfg.dtype)
    return Setup(
        cfg=cfg,
        generator=cfg.generator.module(dtype),
        targets=tuple(targets_lib.build(n, targets_lib.size_config(n, cfg.target_size), dtype)
                      for n in cfg.targets),
        identity=identity_lib.build(cfg.identity, cfg.identity_normalisation,
                                    **dict(cfg.identity_config)),
        optimizer=optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2),
    )


def init_state(setup: Setup, key: jax.Array, delta_p: jax.Array | None = None) -> TrainState:
    """A fresh state; delta_p defaults to zeros (pass the gradient prior from experiments/prior.py)."""
    cfg = setup.cfg
    variables = init_generator(key, cfg.generator)
    if delta_p is None:
        delta_p = jnp.zeros((cfg.image_size, cfg.image_size, 3), jnp.float32)
    trainable = {"params": variables["params"], "delta_p": jnp.asarray(delta_p, jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], delta_p=trainable["delta_p"],
                      opt_state=setup.optimizer.init(trainable),
                      strategy_state=initial_strategy_state(len(setup.targets)))


def init_frozen_random(setup: Setup, key: jax.Array) -> dict:
    """Random weights for every target and the identity network (demos and tests only)."""
    keys = jax.random.split(key, len(setup.targets) + 1)
    size = setup.cfg.target_size
    tvars = {t.name: targets_lib.init_random(t.name, k, setup.cfg.image_size,
                                             targets_lib.size_config(t.name, size))[1]
             for t, k in zip(setup.targets, keys[:-1])}
    _, ivars = identity_lib.init_random(setup.cfg.identity, keys[-1], **dict(setup.cfg.identity_config))
    return {"targets": tvars, "identity": ivars}


def _conditions(target: targets_lib.Target, labels: jax.Array, step: jax.Array, every: bool):
    """The conditions of this step, leading axis C (C = 1: number step mod count)."""
    table = target.conditions(labels)
    if every:
        return table
    idx = step % target.num_conditions
    return jax.tree.map(lambda a: a[None], target.select(table, idx))


def _twice(tree):
    return jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), tree)


def _weighted_sum(w: jax.Array, stacked):
    return jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), stacked)


def compute_gradients(setup: Setup, state: TrainState, batch: dict, frozen: dict):
    """Steps 1-4: the ASCENT direction sum_k lambda_k grad L_k for {'params', 'delta_p'}.

    batch: 'image' (B,S,S,3) uint8 or float in [-1,1], 'mask' and 'heatmap' (B,S,S,1) in [0,1],
    'labels' (B,5), and 'chip_warp' for a chip-based identity network (dlib; data.loader.batch_at).
    Returns (grads, new batch_stats, new strategy state, lambda (N,), metrics).
    """
    cfg, lcfg = setup.cfg, setup.cfg.loss
    x = batch["image"]
    x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    heat = batch["heatmap"].astype(jnp.float32)
    n = x.shape[0]
    id_net, id_vars = setup.identity, frozen["identity"]
    warp = batch.get("chip_warp")          # dlib: chip transforms of the clean faces
    warp2 = None if warp is None else _twice(warp)

    # 1. Everything about the clean image, once, as constants.
    conds, outputs = [], []
    for t in setup.targets:
        c = _conditions(t, batch["labels"], state.step, cfg.all_conditions)
        tv = frozen["targets"][t.name]
        outputs.append(jax.vmap(lambda ci: t.forward(tv, x, ci))(c))   # (C_t, B, ...) each
        conds.append(c)
    # The identity network once over every target's clean outputs: each call site is another
    # inlined copy of the network in the compiled program (ArcFace's dominate compile time).
    rows = [o.shape[0] * n for o, _ in outputs]
    flat = jnp.concatenate([o.reshape((-1,) + o.shape[2:]) for o, _ in outputs])
    idf_all = id_net.features(id_vars, flat, None if warp is None else jax.tree.map(
        lambda a: jnp.concatenate([a] * (flat.shape[0] // n)), warp))
    idf_split = jnp.split(idf_all, np.cumsum(rows)[:-1])
    clean = [jax.lax.stop_gradient((o, f, idf.reshape(o.shape[:2] + idf.shape[1:])))
             for (o, f), idf in zip(outputs, idf_split)]

    # 2. The generator and its vjp.
    gen_fn, (x_adv, x_pri), gen_vjp, new_stats = generator_pass(setup, state, x)

    # 3. Per target: loss of both branches and its image-space gradient.
    def target_loss(t, tv, c, o, f, idf, xa, xp):
        def one_condition(ci, oi, fi, idfi):
            out, feat = t.forward(tv, jnp.concatenate([xa, xp]), _twice(ci))
            ida = id_net.features(id_vars, out, warp2)
            adv = branch_losses(lcfg, oi, fi, idfi, out[:n], feat[:n], ida[:n], mask, heat)
            pri = branch_losses(lcfg, oi, fi, idfi, out[n:], feat[n:], ida[n:], mask, heat)
            return adv, pri
        return target_objective(*jax.vmap(one_condition)(c, o, f, idf))

    losses, auxes, g_adv, g_pri = [], [], [], []
    xa, xp = x_adv, x_pri
    for t, c, (o, f, idf) in zip(setup.targets, conds, clean):
        grad_fn = jax.value_and_grad(functools.partial(target_loss, t, frozen["targets"][t.name],
                                                       c, o, f, idf), argnums=(0, 1), has_aux=True)
        (loss, aux), (ga, gp) = grad_fn(xa, xp)
        losses.append(loss)
        auxes.append(aux)
        g_adv.append(ga)
        g_pri.append(gp)
        # The next target's inputs depend on this one's gradient through an exact zero, so XLA
        # runs the targets one after another and frees each one's activations first: peak
        # memory at 256 px falls from ~2.9 to ~1.2 GiB per image (bench.py --memory-batches).
        zero = jax.lax.stop_gradient(ga.reshape(-1)[0] * 0)
        xa, xp = x_adv + zero, x_pri + zero
    L = jnp.stack(losses)
    K = jnp.stack([a["kpi"] for a in auxes])
    g_adv, g_pri = jnp.stack(g_adv), jnp.stack(g_pri)   # (N, B, S, S, 3)

    # 4. Task weights (constants) and the gradient of sum_k lambda_k L_k.
    w, grads, strategy_state = weigh_tasks(setup, state, gen_vjp, g_adv, g_pri, K)
    return grads, new_stats, strategy_state, w, task_metrics(setup, w, L, auxes)


def target_objective(adv: dict, pri: dict) -> tuple[jax.Array, dict]:
    """A target's L_k from its branch losses per condition ((C,) arrays, losses.branch_losses):
    the conditions' mean of both branches' totals; aux: 'loss', 'kpi' (K_k = both branches'
    mask losses) and every term of each branch, named TERM_adv / TERM_pri."""
    adv = jax.tree.map(jnp.mean, adv)
    pri = jax.tree.map(jnp.mean, pri)
    loss = adv["total"] + pri["total"]
    aux = {"loss": loss, "kpi": adv["mask"] + pri["mask"],
           **{f"{k}_adv": v for k, v in adv.items() if k != "total"},
           **{f"{k}_pri": v for k, v in pri.items() if k != "total"}}
    return loss, aux


def generator_pass(setup: Setup, state: TrainState, x: jax.Array):
    """Step 2: G in train mode on x (B, S, S, 3) in [-1, 1] and its vjp.

    Returns (gen_fn, (x_adv, x_pri), gen_vjp, new batch_stats); gen_fn(params, delta_p) ->
    ((x_adv, x_pri), batch_stats) is the function differentiated."""
    def gen_fn(params, delta_p):
        x_adv, x_pri, stats = perturb(setup.generator, {"params": params,
                                      "batch_stats": state.batch_stats}, delta_p, x,
                                      setup.cfg.eps, train=True)
        return (x_adv, x_pri), stats

    images, gen_vjp, new_stats = jax.vjp(gen_fn, state.params, state.delta_p, has_aux=True)
    return gen_fn, images, gen_vjp, new_stats


def weigh_tasks(setup: Setup, state: TrainState, gen_vjp, g_adv: jax.Array, g_pri: jax.Array,
                kpi: jax.Array):
    """Step 4: the task weights lambda (N,) (constants: no gradient flows through them) and the
    ascent direction sum_k lambda_k grad L_k for {'params', 'delta_p'}.

    gen_vjp: the generator's vjp; g_adv, g_pri (N, B, S, S, 3): each target's loss gradient
    w.r.t. x_adv and x_pri; kpi (N,). Returns (lambda, grads, new strategy state)."""
    cfg = setup.cfg
    strategy_state = state.strategy_state
    if cfg.strategy == "mgda" and cfg.mgda_gradients == "params":
        per_task_params, per_task_delta = jax.vmap(gen_vjp)((g_adv, g_pri))
        w = mgda.min_norm(mgda.gram_matrix(per_task_params), cfg.mgda_solver)
        w = jax.lax.stop_gradient(w)
        grad_params = _weighted_sum(w, per_task_params)
        grad_delta = _weighted_sum(w, per_task_delta)
    else:
        if cfg.strategy == "mgda":   # MGDA-UB: gradients w.r.t. the generated images
            w = mgda.min_norm(mgda.gram_matrix(g_adv), cfg.mgda_solver)
        else:
            w, strategy_state = weights_from_values(cfg.strategy, kpi, setup.alpha,
                                                    strategy_state)
        w = jax.lax.stop_gradient(w)
        grad_params, grad_delta = gen_vjp((_weighted_sum(w, g_adv), _weighted_sum(w, g_pri)))
    return w, {"params": grad_params, "delta_p": grad_delta}, strategy_state


def task_metrics(setup: Setup, w: jax.Array, losses: jax.Array, auxes: list[dict]) -> dict:
    """The step's metrics: the objective sum_k lambda_k L_k and, per target, lambda and its
    loss terms (named 'TARGET/TERM')."""
    metrics = {"objective": jnp.sum(w * losses)}
    for i, name in enumerate(setup.target_names):
        metrics[f"{name}/lambda"] = w[i]
        for k, v in auxes[i].items():
            metrics[f"{name}/{k}"] = v
    return metrics


def train_step(setup: Setup, state: TrainState, batch: dict, frozen: dict):
    """One optimisation step (see compute_gradients for `batch`): (new state, metrics)."""
    ascent, new_stats, strategy_state, _, metrics = compute_gradients(setup, state, batch, frozen)
    # 5. Maximise sum_k lambda_k L_k: Adam descends on its negative.
    grads = jax.tree.map(jnp.negative, ascent)
    trainable = {"params": state.params, "delta_p": state.delta_p}
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=trainable["params"],
                              batch_stats=new_stats, delta_p=trainable["delta_p"],
                              opt_state=opt_state, strategy_state=strategy_state)
    return new_state, metrics


def make_train_step(setup: Setup, donate: bool = True):
    """The jitted step (state buffers donated). Frozen weights are arguments, never constants."""
    fn = functools.partial(train_step, setup)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
