"""The train step with expectation over lossy channels (cfg.robust): traced once, its
gradients equal plain autodiff through the same sampled channel, and the default step unchanged.

The tiny configuration (32 px, narrow random networks, stand-in identity network), StarGAN only.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax import channels, config
from idguard_jax.data import datasets as data
from idguard_jax.data import loader
from idguard_jax.training import step as train
from idguard_jax.training.frozen import init_frozen_random
from idguard_jax.training.strategies import weights_from_values
from test_train import naive_losses

SPEC = "jpeg:60-90,resize:0.5-0.9,blur:0.3-1"


@pytest.fixture(scope="module")
def faces(shared_faces_dir):
    return data.folder_dataset(shared_faces_dir, 32, seed=0)


def _setup(**kw):
    cfg = config.tiny(targets=("stargan",), **kw)
    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0),
                             delta_p=0.03 * jax.random.normal(jax.random.key(5), (32, 32, 3)))
    return setup, state, init_frozen_random(cfg, jax.random.key(1))


def _batch(faces, idx=(0, 1)):
    return loader.batch_at(faces, np.asarray(idx))


def test_robust_step_is_traced_once(faces, fast_compile):
    """New steps draw new channels (parameters are values in the program, not constants)."""
    setup, state, frozen = _setup(robust=SPEC)

    @chex.assert_max_traces(n=1)
    def step_fn(state, batch, frozen):
        return train.train_step(setup, state, batch, frozen)

    step = jax.jit(step_fn, donate_argnums=(0,))
    for i in range(3):
        state, m = step(state, _batch(faces, (i, i + 5)), frozen)
        assert np.all(np.isfinite([float(v) for v in m.values()]))
    assert int(state.step) == 3


def test_robust_gradients_equal_plain_autodiff_through_the_channel(faces, fast_compile):
    setup, state, frozen = _setup(robust=SPEC)
    state = state.replace(step=jnp.asarray(4, jnp.int32))
    batch = _batch(faces, (2, 3))
    g = jax.jit(functools.partial(train.compute_gradients, setup))(state, batch, frozen)

    def naive(params, delta_p):
        channel = channels.step_channel(SPEC, setup.cfg.seed, state.step, 2)
        return naive_losses(setup, state, batch, frozen, params, delta_p, channel)[0]
    # kpi's lambda is a constant of the step: its value from the step's own KPI
    w, _ = weights_from_values("kpi", jnp.stack([g.metrics["stargan/kpi"]]), setup.alpha,
                               state.strategy_state)
    L, ref = jax.jit(jax.value_and_grad(lambda p, d: w[0] * naive(p, d), argnums=(0, 1)))(
        state.params, state.delta_p)
    np.testing.assert_allclose(g.metrics["objective"], L, rtol=1e-5)
    for got, want in zip(jax.tree.leaves((g.grads["params"], g.grads["delta_p"])),
                         jax.tree.leaves(ref)):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        assert float(jnp.max(jnp.abs(got - want))) <= 2e-4 * scale


def test_robust_mgda_step_runs(faces, fast_compile):
    """MGDA maps the N image-space cotangents through the channel's vjp (vmapped)."""
    setup, state, frozen = _setup(robust="jpeg:75,resize:0.5", strategy="mgda")
    state, m = train.make_train_step(setup)(state, _batch(faces), frozen)
    assert np.isfinite(float(m["objective"])) and int(state.step) == 1


def _today_compute_gradients(setup, state, batch, frozen):
    """compute_gradients as it was before the robust option (a copy of its pieces' composition)."""
    inputs = train.read_batch(batch)
    clean = train.clean_pass(setup, frozen, inputs, state.step)
    gen = train.generator_pass(setup, state, inputs.x)
    per_target = train.target_gradients(setup, frozen, inputs, clean, *gen.images)
    w, grads, strategy_state = train.weigh_tasks(setup, state, gen.vjp, per_target.g_adv,
                                                 per_target.g_pri, per_target.kpi)
    return train.Gradients(grads, gen.batch_stats, strategy_state, w,
                           train.task_metrics(setup, w, per_target.losses, per_target.auxes))


def test_default_step_is_todays_step(faces, fast_compile):
    """robust='' (the default) traces exactly today's program and gives bit-identical results."""
    setup, state, frozen = _setup()
    assert setup.cfg.robust == ""
    batch = _batch(faces)
    ours = jax.make_jaxpr(functools.partial(train.train_step, setup))(state, batch, frozen)
    today = jax.make_jaxpr(functools.partial(train.train_step, setup,
                                             gradients=_today_compute_gradients))(
        state, batch, frozen)
    assert str(ours) == str(today)
    new_state, m = train.make_train_step(setup, donate=False)(state, batch, frozen)
    old_state, m_old = jax.jit(functools.partial(train.train_step, setup,
                                                 gradients=_today_compute_gradients))(
        state, batch, frozen)
    for a, b in zip(jax.tree.leaves((new_state, m)), jax.tree.leaves((old_state, m_old))):
        np.testing.assert_array_equal(a, b)
    # and the robust step really is another program
    robust = dataclasses.replace(setup.cfg, robust=SPEC)
    assert str(jax.make_jaxpr(functools.partial(train.train_step, train.create_setup(robust)))(
        state, batch, frozen)) != str(ours)
