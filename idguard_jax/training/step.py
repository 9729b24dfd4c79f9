"""ID-Guard's training: the train state and ONE jitted train step, in named pieces.

    setup = create_setup(cfg)                       # static: networks, optimiser, strategy
    state = init_state(setup, key, delta_p)         # generator, delta_p, Adam, strategy state
    frozen = frozen_lib.load_frozen(cfg, weights)   # weights of the targets + identity network
    step_fn = make_train_step(setup)                # jitted once, state donated
    state, metrics = step_fn(state, batch, frozen)

One step (paper eq. 12, the reference's `solver.py::train_batch`) composes these pieces:
  1. `clean_pass`: every target's clean outputs and mid features, and the identity network ONCE
     over all of them; constants of the losses (no gradient).
  2. `generator_pass`: x_adv, x_pri from the generator (BatchNorm on batch statistics), with the
     vjp that maps image-space cotangents back to (G's parameters, delta_p).
  3. `target_gradients`: per target k, its loss L_k (`target_loss`: the conditions' mean of
     `condition_loss`, by default ONE batched forward of [x_adv; x_pri]) and the gradient of L_k
     with respect to both images (one backward through target k only); the targets run one
     after another.
  4. `weigh_tasks`: the weights lambda_k from the strategy (constants) and the gradient of
     sum_k lambda_k L_k through G: for MGDA a vmap of G's vjp over the N cotangents gives the
     per-target parameter gradients for the min-norm solver; every other strategy needs a
     single vjp with the weighted cotangent.
  5. `apply_gradients`: Adam (lr 1e-4, betas 0.5/0.999) on {G's parameters, delta_p},
     maximising sum_k lambda_k L_k.
`compute_gradients` is 1-4; `train_step` is 1-5. A variant of the step (experiments/ablations.py)
passes its own forward, condition loss or gradient function into these pieces. With cfg.robust
(off by default) a lossy channel sampled per image (`step_channel`) stands between G and the
targets (`through_channel`) and is applied to x for the clean pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from idguard_jax import channels
from idguard_jax.config import TrainConfig
from idguard_jax.generator import ResnetGenerator, init_generator, perturb
from idguard_jax.images import as_float_images
from idguard_jax.networks import identity as identity_lib
from idguard_jax.networks import targets as targets_lib
from idguard_jax.training import mgda
from idguard_jax.training.frozen import Frozen
from idguard_jax.training.losses import branch_losses
from idguard_jax.training.strategies import initial_strategy_state, weights_from_values

__all__ = ["TrainState", "Setup", "create_setup", "init_state", "compute_dtype",
           "Inputs", "read_batch", "Clean", "clean_pass", "Forward", "target_forward",
           "step_conditions",
           "twice", "GeneratorPass", "generator_pass", "batched_branches", "pair_losses",
           "condition_loss", "ConditionLoss", "target_objective", "target_loss", "TargetGradients",
           "target_gradients", "weigh_tasks", "task_metrics", "Gradients", "compute_gradients",
           "apply_gradients", "train_step", "make_train_step", "step_channel", "through_channel"]


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
    """The run's networks, every one computing in cfg.dtype, and its optimiser."""
    dtype = compute_dtype(cfg.dtype)
    return Setup(
        cfg=cfg,
        generator=cfg.generator.module(dtype),
        targets=tuple(targets_lib.build(n, targets_lib.size_config(n, cfg.target_size),
                                        dtype=dtype) for n in cfg.targets),
        identity=identity_lib.build(cfg.identity, dict(cfg.identity_config), dtype=dtype,
                                    normalisation=cfg.identity_normalisation),
        optimizer=optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2),
    )


def init_state(setup: Setup, key: jax.Array, delta_p: jax.Array | None = None) -> TrainState:
    """A fresh state; delta_p defaults to zeros (pass the gradient prior from experiments/prior.py).

    A given delta_p is clamped to +-cfg.eps, as the reference's `advGen.py` clamps the prior it
    loads: values beyond it would otherwise sit where the step's clamp passes no gradient."""
    cfg = setup.cfg
    _, variables = init_generator(cfg.generator, key)
    if delta_p is None:
        delta_p = jnp.zeros((cfg.image_size, cfg.image_size, 3), jnp.float32)
    delta_p = jnp.clip(jnp.asarray(delta_p, jnp.float32), -cfg.eps, cfg.eps)
    trainable = {"params": variables["params"], "delta_p": delta_p}
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], delta_p=trainable["delta_p"],
                      opt_state=setup.optimizer.init(trainable),
                      strategy_state=initial_strategy_state(len(setup.targets)))


class Inputs(NamedTuple):
    """A batch as the step reads it."""
    x: jax.Array              # (B, S, S, 3) float32 in [-1, 1]
    mask: jax.Array           # (B, S, S, 1) float32 in [0, 1]
    heatmap: jax.Array        # (B, S, S, 1) float32 in [0, 1]
    labels: jax.Array         # (B, 5) attributes
    chip_warp: Any            # the clean faces' chip transforms (dlib identity) or None


def read_batch(batch: dict) -> Inputs:
    """batch: 'image' (B,S,S,3) uint8 or float in [-1,1], 'mask' and 'heatmap' (B,S,S,1) in
    [0,1], 'labels' (B,5), and 'chip_warp' for a chip-based identity network (dlib;
    data.loader.batch_at)."""
    return Inputs(x=as_float_images(batch["image"]), mask=batch["mask"].astype(jnp.float32),
                  heatmap=batch["heatmap"].astype(jnp.float32), labels=batch["labels"],
                  chip_warp=batch.get("chip_warp"))


# A target's forward: (target, its variables, x (B,S,S,3), condition) -> (output, mid features).
Forward = Callable[[targets_lib.Target, Any, jax.Array, Any], tuple[jax.Array, jax.Array]]


def target_forward(target: targets_lib.Target, tvars, x: jax.Array, cond):
    return target.forward(tvars, x, cond)


def step_conditions(target: targets_lib.Target, labels: jax.Array, step: jax.Array,
                    every: bool):
    """The conditions of this step, leading axis C (C = 1: number step mod count)."""
    table = target.conditions(labels)
    if every:
        return table
    idx = step % target.num_conditions
    return jax.tree.map(lambda a: a[None], target.select(table, idx))


def twice(tree):
    """Every leaf's batch axis repeated: the inputs of a batched [x_adv; x_pri] forward."""
    return jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), tree)


class Clean(NamedTuple):
    """One target's clean pass, leading axis C over this step's conditions (a condition loss
    sees one condition: the same fields without C)."""
    conditions: Any           # (C, ...) pytree
    output: jax.Array         # (C, B, S, S, 3)
    features: jax.Array       # (C, B, ...) mid features
    identity: jax.Array       # (C, B, ...) the identity network's features of the output


def clean_pass(setup: Setup, frozen: Frozen, inputs: Inputs, step: jax.Array,
               forward: Forward = target_forward) -> tuple[Clean, ...]:
    """Step 1, per target (setup's order), as constants of the losses."""
    n = inputs.x.shape[0]
    conds, outputs = [], []
    for t in setup.targets:
        c = step_conditions(t, inputs.labels, step, setup.cfg.all_conditions)
        tv = frozen.targets[t.name]
        outputs.append(jax.vmap(lambda ci: forward(t, tv, inputs.x, ci))(c))   # (C_t, B, ...)
        conds.append(c)
    # The identity network once over every target's clean outputs: each call site is another
    # inlined copy of the network in the compiled program (ArcFace's dominate compile time).
    warp = inputs.chip_warp
    rows = [o.shape[0] * n for o, _ in outputs]
    flat = jnp.concatenate([o.reshape((-1,) + o.shape[2:]) for o, _ in outputs])
    warps = None if warp is None else jax.tree.map(
        lambda a: jnp.concatenate([a] * (flat.shape[0] // n)), warp)
    idf_all = setup.identity.features(frozen.identity, flat, warps)
    idf_split = jnp.split(idf_all, np.cumsum(rows)[:-1])
    return tuple(Clean(c, *jax.lax.stop_gradient((o, f, idf.reshape(o.shape[:2] + idf.shape[1:]))))
                 for c, (o, f), idf in zip(conds, outputs, idf_split))


class GeneratorPass(NamedTuple):
    fn: Callable              # (params, delta_p) -> ((x_adv, x_pri), batch_stats)
    images: tuple             # (x_adv, x_pri), each (B, S, S, 3) in [-1, 1]
    vjp: Callable             # image-space cotangents -> (params, delta_p) cotangents
    batch_stats: Any          # the new BatchNorm statistics


def generator_pass(setup: Setup, state: TrainState, x: jax.Array) -> GeneratorPass:
    """Step 2: G in train mode on x (B, S, S, 3) in [-1, 1] and its vjp (`fn` is the function
    differentiated)."""
    def gen_fn(params, delta_p):
        x_adv, x_pri, stats = perturb(setup.generator, {"params": params,
                                      "batch_stats": state.batch_stats}, delta_p, x,
                                      setup.cfg.eps, train=True)
        return (x_adv, x_pri), stats

    images, gen_vjp, new_stats = jax.vjp(gen_fn, state.params, state.delta_p, has_aux=True)
    return GeneratorPass(gen_fn, images, gen_vjp, new_stats)


def batched_branches(setup: Setup, frozen: Frozen, inputs: Inputs, target, cond,
                     x_adv: jax.Array, x_pri: jax.Array, forward: Forward = target_forward):
    """x_adv and x_pri through the target and the identity network as ONE batched forward of
    [x_adv; x_pri]: ((output, features, identity features) of x_adv, the same of x_pri)."""
    n = x_adv.shape[0]
    out, feat = forward(target, frozen.targets[target.name], jnp.concatenate([x_adv, x_pri]),
                        twice(cond))
    ids = setup.identity.features(frozen.identity, out, twice(inputs.chip_warp))
    return (out[:n], feat[:n], ids[:n]), (out[n:], feat[n:], ids[n:])


def pair_losses(setup: Setup, inputs: Inputs, clean: Clean, adv: tuple, pri: tuple,
                clean_identity: tuple | None = None) -> tuple[dict, dict]:
    """Both branches' loss terms (losses.branch_losses) for one condition; adv, pri: (output,
    features, identity features) of x_adv and x_pri. clean_identity: the clean output's
    identity features for each branch (default clean.identity for both)."""
    id_adv, id_pri = clean_identity or (clean.identity, clean.identity)
    lcfg, o, f = setup.cfg.loss, clean.output, clean.features
    return (branch_losses(lcfg, o, f, id_adv, *adv, inputs.mask, inputs.heatmap),
            branch_losses(lcfg, o, f, id_pri, *pri, inputs.mask, inputs.heatmap))


def condition_loss(setup: Setup, frozen: Frozen, inputs: Inputs, target, clean: Clean,
                   x_adv: jax.Array, x_pri: jax.Array) -> tuple[dict, dict]:
    """One condition's branch losses (adv, pri): the library's batched forward."""
    adv, pri = batched_branches(setup, frozen, inputs, target, clean.conditions, x_adv, x_pri)
    return pair_losses(setup, inputs, clean, adv, pri)


# condition_loss's signature: how a variant of the step computes one condition's losses.
ConditionLoss = Callable[..., tuple[dict, dict]]


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


def target_loss(setup: Setup, frozen: Frozen, inputs: Inputs, target, clean: Clean,
                x_adv: jax.Array, x_pri: jax.Array,
                loss: ConditionLoss = condition_loss) -> tuple[jax.Array, dict]:
    """L_k of one target and its terms (target_objective) over this step's conditions."""
    def one_condition(clean_c):
        return loss(setup, frozen, inputs, target, clean_c, x_adv, x_pri)
    return target_objective(*jax.vmap(one_condition)(clean))


class TargetGradients(NamedTuple):
    losses: jax.Array         # (N,) L_k
    auxes: list               # per target, target_objective's terms
    g_adv: jax.Array          # (N, B, S, S, 3) dL_k / dx_adv
    g_pri: jax.Array          # (N, B, S, S, 3) dL_k / dx_pri
    kpi: jax.Array            # (N,) K_k, the strategies' KPI


def target_gradients(setup: Setup, frozen: Frozen, inputs: Inputs, clean: tuple[Clean, ...],
                     x_adv: jax.Array, x_pri: jax.Array,
                     loss: ConditionLoss = condition_loss) -> TargetGradients:
    """Step 3: each target's loss and its gradient w.r.t. both images, target after target."""
    losses, auxes, g_adv, g_pri = [], [], [], []
    xa, xp = x_adv, x_pri
    for t, ct in zip(setup.targets, clean):
        grad_fn = jax.value_and_grad(functools.partial(target_loss, setup, frozen, inputs, t, ct,
                                                       loss=loss), argnums=(0, 1), has_aux=True)
        (value, aux), (ga, gp) = grad_fn(xa, xp)
        losses.append(value)
        auxes.append(aux)
        g_adv.append(ga)
        g_pri.append(gp)
        # The next target's inputs depend on this one's gradient through an exact zero, so XLA
        # runs the targets one after another and frees each one's activations first: peak
        # memory at 256 px falls from ~2.9 to ~1.2 GiB per image (bench.py --memory-batches).
        zero = jax.lax.stop_gradient(ga.reshape(-1)[0] * 0)
        xa, xp = x_adv + zero, x_pri + zero
    return TargetGradients(jnp.stack(losses), auxes, jnp.stack(g_adv), jnp.stack(g_pri),
                           jnp.stack([a["kpi"] for a in auxes]))


def _weighted_sum(w: jax.Array, stacked):
    return jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), stacked)


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


class Gradients(NamedTuple):
    """What compute_gradients gives the update."""
    grads: dict               # the ASCENT direction sum_k lambda_k grad L_k: {'params', 'delta_p'}
    batch_stats: Any          # the generator's new BatchNorm statistics
    strategy_state: Any       # the strategy's new state
    weights: jax.Array        # (N,) lambda_k
    metrics: dict             # task_metrics


def compute_gradients(setup: Setup, state: TrainState, batch: dict, frozen: Frozen) -> Gradients:
    """Steps 1-4 on a batch (read_batch says what it holds). With cfg.robust (expectation over
    transformations) the targets see x, x_adv and x_pri through this step's sampled channel
    (the clean outputs from the channel applied to x, as the evaluation passes both images
    through the operation); G still sees x itself."""
    inputs = read_batch(batch)
    channel = step_channel(setup, state.step, inputs.x.shape[0]) if setup.cfg.robust else None
    seen = inputs if channel is None else inputs._replace(x=channel(inputs.x))
    clean = clean_pass(setup, frozen, seen, state.step)
    gen = generator_pass(setup, state, inputs.x)
    if channel is not None:
        gen = through_channel(gen, channel)
    per_target = target_gradients(setup, frozen, seen, clean, *gen.images)
    w, grads, strategy_state = weigh_tasks(setup, state, gen.vjp, per_target.g_adv,
                                           per_target.g_pri, per_target.kpi)
    return Gradients(grads, gen.batch_stats, strategy_state, w,
                     task_metrics(setup, w, per_target.losses, per_target.auxes))


def step_channel(setup: Setup, step: jax.Array, n: int) -> Callable[[jax.Array], jax.Array]:
    """cfg.robust's channel of this step for n images (channels.step_channel: parameters drawn
    per image from (cfg.seed, step), arguments of the program, never constants)."""
    return channels.step_channel(setup.cfg.robust, setup.cfg.seed, step, n)


def through_channel(gen: GeneratorPass, channel: Callable) -> GeneratorPass:
    """The generator pass followed by `channel` on x_adv and x_pri: images, fn and vjp compose,
    so image-space cotangents flow back through the channel into G and delta_p."""
    images, channel_vjp = jax.vjp(lambda a, p: (channel(a), channel(p)), *gen.images)

    def fn(params, delta_p):
        (x_adv, x_pri), stats = gen.fn(params, delta_p)
        return (channel(x_adv), channel(x_pri)), stats
    return gen._replace(fn=fn, images=images, vjp=lambda ct: gen.vjp(channel_vjp(ct)))


def apply_gradients(setup: Setup, state: TrainState, gradients: Gradients) -> TrainState:
    """Step 5: maximise sum_k lambda_k L_k (Adam descends on its negative)."""
    descent = jax.tree.map(jnp.negative, gradients.grads)
    trainable = {"params": state.params, "delta_p": state.delta_p}
    updates, opt_state = setup.optimizer.update(descent, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return state.replace(step=state.step + 1, params=trainable["params"],
                         batch_stats=gradients.batch_stats, delta_p=trainable["delta_p"],
                         opt_state=opt_state, strategy_state=gradients.strategy_state)


def train_step(setup: Setup, state: TrainState, batch: dict, frozen: Frozen,
               gradients: Callable[..., Gradients] = compute_gradients):
    """One optimisation step: (new state, metrics). `gradients(setup, state, batch, frozen)`
    is steps 1-4 (a variant of the step passes its own)."""
    g = gradients(setup, state, batch, frozen)
    return apply_gradients(setup, state, g), g.metrics


def make_train_step(setup: Setup, donate: bool = True,
                    gradients: Callable[..., Gradients] = compute_gradients):
    """The jitted step (state buffers donated). Frozen weights are arguments, never constants."""
    fn = functools.partial(train_step, setup, gradients=gradients)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
