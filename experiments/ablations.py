"""Reference-style train steps: what each of our step's optimisations saves.

The library's step (idguard_jax.training.step) avoids work the reference's PyTorch step does
(targets.md 0.5). Each WASTE below puts one such piece of work back while computing the same
losses and gradients (tests/test_bench.py checks that at the tiny size), so the difference in
step time, measured by experiments/bench.py --ablations, is what avoiding it saves:

  features_twice        the mid features from a second target call, as the reference's
                        get_feature runs the first half of the target again: on the clean image
                        and on both adversarial branches (XLA drops the unused second half)
  clean_identity_twice  the identity network on the clean output once per branch, inside the
                        differentiated loss (the reference computes ID(o) for x_adv and again for
                        x_pri) instead of once per step as a constant
  separate_branches     x_adv and x_pri through each target and the identity network as two
                        forwards instead of one batched forward of [x_adv; x_pri]
  gradcam               the heatmap from Grad-CAM++ through VGGFace every step (the reference's
                        solver.heatmap) instead of reading it from the data cache
  mgda_final_backward   (MGDA only) the update's gradient from a second backward of
                        sum_k lambda_k L_k through every target and G (the reference's
                        G_loss.backward() after its per-target autograd.grad calls) instead of
                        the weighted sum of the per-target gradients already computed
  no_donation           the state's buffers not donated to the step (a copy of the state each step)

XLA merges identical computations (CSE): a plain second call on the same input would cost
nothing. Every repeated computation here reads its input as x + 0 * x.flat[k] (`_again`), which
XLA cannot prove equal to x, so it stays a separate computation, as the reference's separate
calls are; the values are unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from idguard_jax.networks import gradcam
from idguard_jax.training.losses import branch_losses
from idguard_jax.training.step import (Setup, TrainState, _conditions, _twice, generator_pass,
                                       target_objective, task_metrics, weigh_tasks)

__all__ = ["WASTES", "REFERENCE", "applicable", "compute_gradients", "make_step"]

WASTES = ("features_twice", "clean_identity_twice", "separate_branches", "gradcam",
          "mgda_final_backward", "no_donation")
REFERENCE = frozenset(WASTES)   # every waste at once: the reference's way of stepping


def applicable(strategy: str, mgda_gradients: str = "params") -> tuple[str, ...]:
    """The wastes that change anything for this strategy."""
    mgda_params = strategy == "mgda" and mgda_gradients == "params"
    return tuple(w for w in WASTES if w != "mgda_final_backward" or mgda_params)


def _again(x: jax.Array, tag: int) -> jax.Array:
    """x again, as a value XLA cannot identify with x, so work on it is not merged (CSE) with
    the same work on x: x + 0 * x.flat[tag]. XLA may not fold a float times zero (inf and NaN),
    and distinct tags keep two repeats apart. (jax.lax.optimization_barrier does not do this:
    XLA:CPU removes barriers before its CSE.)"""
    zero = jax.lax.stop_gradient(jnp.reshape(x, (-1,))[tag] * 0)
    return x + zero


def _forward(target, tvars, x, cond, features_twice: bool):
    """(output, mid features) of one target; with features_twice the features come from a
    second call (only its first half survives XLA's dead-code elimination)."""
    out, feat = target.forward(tvars, x, cond)
    if features_twice:
        _, feat = target.forward(tvars, _again(x, 1), cond)
    return out, feat


def compute_gradients(setup: Setup, state: TrainState, batch: dict, frozen: dict,
                      wastes: frozenset = frozenset(), vgg=None):
    """idguard_jax.training.step.compute_gradients with `wastes` put back; the same return values.

    vgg: the VGGFace module of the `gradcam` waste, its weights in frozen['vggface'].
    """
    unknown = set(wastes) - set(WASTES)
    if unknown:
        raise ValueError(f"unknown wastes {sorted(unknown)}; known: {', '.join(WASTES)}")
    twice = "features_twice" in wastes
    id_twice = "clean_identity_twice" in wastes
    separate = "separate_branches" in wastes
    cfg, lcfg = setup.cfg, setup.cfg.loss
    x = batch["image"]
    x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    if "gradcam" in wastes:
        if vgg is None or "vggface" not in frozen:
            raise ValueError("the gradcam waste needs vgg= and frozen['vggface']")
        heat = gradcam.heatmaps(vgg, frozen["vggface"], x)
    else:
        heat = batch["heatmap"].astype(jnp.float32)
    n = x.shape[0]
    id_net, id_vars = setup.identity, frozen["identity"]
    warp = batch.get("chip_warp")
    warp2 = None if warp is None else _twice(warp)

    def identity(img, w):
        return id_net.features(id_vars, img, w)

    conds, clean = [], []
    for t in setup.targets:
        c = _conditions(t, batch["labels"], state.step, cfg.all_conditions)
        tv = frozen["targets"][t.name]
        o, f = jax.vmap(lambda ci: _forward(t, tv, x, ci, twice))(c)
        idf = None if id_twice else jax.vmap(lambda oi: identity(oi, warp))(o)
        conds.append(c)
        clean.append(jax.lax.stop_gradient((o, f, idf)))

    gen_fn, (x_adv, x_pri), gen_vjp, new_stats = generator_pass(setup, state, x)

    def target_loss(t, tv, c, o, f, idf, xa, xp):
        def one_condition(ci, oi, fi, idfi):
            if separate:
                oa, fa = _forward(t, tv, xa, ci, twice)
                op, fp = _forward(t, tv, xp, ci, twice)
                ida, idp = identity(oa, warp), identity(op, warp)
            else:
                out, feat = _forward(t, tv, jnp.concatenate([xa, xp]), _twice(ci), twice)
                ids = identity(out, warp2)
                oa, op, fa, fp, ida, idp = out[:n], out[n:], feat[:n], feat[n:], ids[:n], ids[n:]
            if id_twice:   # ID(o) again for each branch (a constant: no gradient flows into it)
                ido_a = jax.lax.stop_gradient(identity(_again(oi, 2), warp))
                ido_p = jax.lax.stop_gradient(identity(_again(oi, 3), warp))
            else:
                ido_a = ido_p = idfi
            adv = branch_losses(lcfg, oi, fi, ido_a, oa, fa, ida, mask, heat)
            pri = branch_losses(lcfg, oi, fi, ido_p, op, fp, idp, mask, heat)
            return adv, pri
        return target_objective(*jax.vmap(one_condition)(c, o, f, idf))

    losses, auxes, g_adv, g_pri = [], [], [], []
    for t, c, (o, f, idf) in zip(setup.targets, conds, clean):
        grad_fn = jax.value_and_grad(functools.partial(target_loss, t, frozen["targets"][t.name],
                                                       c, o, f, idf), argnums=(0, 1), has_aux=True)
        (loss, aux), (ga, gp) = grad_fn(x_adv, x_pri)
        losses.append(loss)
        auxes.append(aux)
        g_adv.append(ga)
        g_pri.append(gp)
    L = jnp.stack(losses)
    K = jnp.stack([a["kpi"] for a in auxes])
    g_adv, g_pri = jnp.stack(g_adv), jnp.stack(g_pri)

    w, grads, strategy_state = weigh_tasks(setup, state, gen_vjp, g_adv, g_pri, K)
    if "mgda_final_backward" in wastes and cfg.strategy == "mgda" \
            and cfg.mgda_gradients == "params":
        def objective(params, delta_p):
            (xa, xp), _ = gen_fn(params, delta_p)
            total = 0.0
            for k, (t, c, (o, f, idf)) in enumerate(zip(setup.targets, conds, clean)):
                total += w[k] * target_loss(t, frozen["targets"][t.name], c, o, f, idf,
                                            xa, xp)[0]
            return total
        # the update from a second backward (the per-task weighted sum is then unused: XLA
        # drops it)
        grad_params, grad_delta = jax.grad(objective, argnums=(0, 1))(state.params,
                                                                      state.delta_p)
        grads = {"params": grad_params, "delta_p": grad_delta}
    return grads, new_stats, strategy_state, w, task_metrics(setup, w, L, auxes)


def make_step(setup: Setup, wastes: frozenset = frozenset(), vgg=None):
    """The jitted step of idguard_jax.training.step.make_train_step with `wastes` put back."""
    wastes = frozenset(wastes)

    def step(state, batch, frozen):
        ascent, new_stats, strategy_state, _, metrics = compute_gradients(
            setup, state, batch, frozen, wastes, vgg)
        grads = jax.tree.map(jnp.negative, ascent)
        trainable = {"params": state.params, "delta_p": state.delta_p}
        updates, opt_state = setup.optimizer.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return state.replace(step=state.step + 1, params=trainable["params"],
                             batch_stats=new_stats, delta_p=trainable["delta_p"],
                             opt_state=opt_state, strategy_state=strategy_state), metrics

    return jax.jit(step, donate_argnums=() if "no_donation" in wastes else (0,))
