"""Reference-style train steps: what each of our step's optimisations saves.

The library's step (idguard_jax.training.step) avoids work the reference's PyTorch step
(`solver.py::train_batch`) does. Each WASTE below puts one such piece of work back while
computing the same losses and gradients (tests/test_bench.py checks that at the tiny size). A
variant is the library's step composed from its own pieces (`clean_pass`, `target_gradients`,
`weigh_tasks`, `apply_gradients`) with ONE piece replaced per waste, so the difference in step
time, measured by experiments/bench.py --ablations, is what avoiding that waste saves:

  features_twice        the mid features from a second target call, as the reference's
                        get_feature runs the first half of the target again: on the clean image
                        and on both adversarial branches (XLA drops the unused second half);
                        replaces the target forward
  clean_identity_twice  the identity network on the clean output once per branch, inside the
                        differentiated loss (the reference computes ID(o) for x_adv and again for
                        x_pri) instead of once per step as a constant; replaces the clean
                        identity features of the condition loss (the clean pass's are then
                        unused: XLA drops them)
  separate_branches     x_adv and x_pri through each target and the identity network as two
                        forwards instead of one batched forward of [x_adv; x_pri]; replaces
                        `batched_branches`
  gradcam               the heatmap from Grad-CAM++ through VGGFace every step (the reference's
                        solver.heatmap) instead of reading it from the data cache; replaces the
                        batch's heatmap
  mgda_final_backward   (MGDA only) the update's gradient from a second backward of
                        sum_k lambda_k L_k through every target and G (the reference's
                        G_loss.backward() after its per-target autograd.grad calls) instead of
                        the weighted sum of the per-target gradients already computed; replaces
                        the weighting's gradient
  no_donation           the state's buffers not donated to the step (a copy of the state each step)

XLA merges identical computations (CSE): a plain second call on the same input would cost
nothing. Every repeated computation here reads its input as x + 0 * x.flat[k] (`_again`), which
XLA cannot prove equal to x, so it stays a separate computation, as the reference's separate
calls are; the values are unchanged.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from idguard_jax.networks import gradcam
from idguard_jax.training import step as step_lib
from idguard_jax.training.frozen import Frozen

__all__ = ["WASTES", "REFERENCE", "FrozenWithVGG", "applicable", "condition_loss_with",
           "compute_gradients", "make_step"]

WASTES = ("features_twice", "clean_identity_twice", "separate_branches", "gradcam",
          "mgda_final_backward", "no_donation")
REFERENCE = frozenset(WASTES)   # every waste at once: the reference's way of stepping


@struct.dataclass
class FrozenWithVGG(Frozen):
    """The frozen weights and VGGFace's, whose Grad-CAM++ the gradcam waste recomputes."""
    vggface: Any = None


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


def _forward_features_twice(target, tvars, x, cond):
    """features_twice: the output from one target call, the mid features from a second (only
    its first half survives XLA's dead-code elimination)."""
    out, _ = target.forward(tvars, x, cond)
    _, feat = target.forward(tvars, _again(x, 1), cond)
    return out, feat


def _separate_branches(setup, frozen, inputs, target, cond, x_adv, x_pri, forward):
    """separate_branches: step_lib.batched_branches as two forwards, x_adv's and x_pri's."""
    tvars = frozen.targets[target.name]
    branches = []
    for x in (x_adv, x_pri):
        out, feat = forward(target, tvars, x, cond)
        branches.append((out, feat,
                         setup.identity.features(frozen.identity, out, inputs.chip_warp)))
    return tuple(branches)


def _clean_identity_per_branch(setup, frozen, inputs, clean) -> tuple:
    """clean_identity_twice: ID(o) again for each branch (a constant: no gradient flows in)."""
    return tuple(jax.lax.stop_gradient(setup.identity.features(
        frozen.identity, _again(clean.output, tag), inputs.chip_warp)) for tag in (2, 3))


def _forward(wastes: frozenset) -> step_lib.Forward:
    return _forward_features_twice if "features_twice" in wastes else step_lib.target_forward


def condition_loss_with(wastes: frozenset) -> step_lib.ConditionLoss:
    """step_lib.condition_loss with the wastes that live inside it put back."""
    forward = _forward(wastes)
    branches = (_separate_branches if "separate_branches" in wastes
                else step_lib.batched_branches)

    def loss(setup, frozen, inputs, target, clean, x_adv, x_pri):
        adv, pri = branches(setup, frozen, inputs, target, clean.conditions, x_adv, x_pri,
                            forward)
        ids = (_clean_identity_per_branch(setup, frozen, inputs, clean)
               if "clean_identity_twice" in wastes else None)
        return step_lib.pair_losses(setup, inputs, clean, adv, pri, ids)
    return loss


def _second_backward(setup, state, frozen, inputs, clean, gen, w, loss) -> dict:
    """mgda_final_backward: grad of sum_k lambda_k L_k through every target and G again."""
    def objective(params, delta_p):
        (x_adv, x_pri), _ = gen.fn(params, delta_p)
        total = 0.0
        for k, (t, ct) in enumerate(zip(setup.targets, clean)):
            total += w[k] * step_lib.target_loss(setup, frozen, inputs, t, ct, x_adv, x_pri,
                                                 loss)[0]
        return total
    grad_params, grad_delta = jax.grad(objective, argnums=(0, 1))(state.params, state.delta_p)
    return {"params": grad_params, "delta_p": grad_delta}


def compute_gradients(setup: step_lib.Setup, state: step_lib.TrainState, batch: dict,
                      frozen: Frozen, wastes: frozenset = frozenset(),
                      vgg=None) -> step_lib.Gradients:
    """step_lib.compute_gradients with `wastes` put back; the same values.

    vgg: the VGGFace module of the `gradcam` waste, its weights in frozen.vggface
    (FrozenWithVGG)."""
    unknown = set(wastes) - set(WASTES)
    if unknown:
        raise ValueError(f"unknown wastes {sorted(unknown)}; known: {', '.join(WASTES)}")
    inputs = step_lib.read_batch(batch)
    if "gradcam" in wastes:
        if vgg is None or getattr(frozen, "vggface", None) is None:
            raise ValueError("the gradcam waste needs vgg= and FrozenWithVGG weights")
        inputs = inputs._replace(heatmap=gradcam.heatmaps(vgg, frozen.vggface, inputs.x))
    loss = condition_loss_with(wastes)
    clean = step_lib.clean_pass(setup, frozen, inputs, state.step, _forward(wastes))
    gen = step_lib.generator_pass(setup, state, inputs.x)
    per_target = step_lib.target_gradients(setup, frozen, inputs, clean, *gen.images, loss=loss)
    w, grads, strategy_state = step_lib.weigh_tasks(setup, state, gen.vjp, per_target.g_adv,
                                                    per_target.g_pri, per_target.kpi)
    if "mgda_final_backward" in wastes and "mgda_final_backward" in applicable(
            setup.cfg.strategy, setup.cfg.mgda_gradients):
        # the weighted sum of the per-target gradients is then unused: XLA drops it
        grads = _second_backward(setup, state, frozen, inputs, clean, gen, w, loss)
    return step_lib.Gradients(grads, gen.batch_stats, strategy_state, w,
                              step_lib.task_metrics(setup, w, per_target.losses, per_target.auxes))


def make_step(setup: step_lib.Setup, wastes: frozenset = frozenset(), vgg=None):
    """step_lib.make_train_step with `wastes` put back."""
    wastes = frozenset(wastes)
    return step_lib.make_train_step(
        setup, donate="no_donation" not in wastes,
        gradients=functools.partial(compute_gradients, wastes=wastes, vgg=vgg))
