"""Baselines on tiny random targets: inside the budget, and each raises its own attack loss
above what random noise of the same budget does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idguard_jax.evaluation import baselines
from idguard_jax.evaluation import measure as evaluation

from idguard_jax.training import surrogate
from idguard_jax.networks import targets
from idguard_jax.data.datasets import load_folder
from idguard_jax.generator import GeneratorConfig
from idguard_jax.images import to_float

EPS = baselines.EPS


@pytest.fixture(scope="module")
def setup(shared_faces_dir):
    models = evaluation.load_models(["stargan", "hisd"], image_size=32, size="tiny", seed=3)
    x = jnp.asarray(to_float(load_folder(shared_faces_dir, 32, limit=4)[0]))
    labels = jnp.zeros((4, 5))
    return models, x, labels


def _loss(models, x, x_adv, labels, names=None):
    ts = tuple(t for t in models.targets if names is None or t.name in names)
    tables = [t.conditions(labels) for t in ts]
    ys = baselines._clean_outputs(ts, models.variables, x, tables)
    return float(baselines.attack_loss(ts, models.variables, x_adv, ys, tables))


def _noise(x, seed):
    return jnp.clip(x + EPS * jnp.sign(jax.random.normal(jax.random.key(seed), x.shape)), -1, 1)


def _in_budget(x, x_adv):
    assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
    assert float(jnp.min(x_adv)) >= -1 and float(jnp.max(x_adv)) <= 1


def test_disrupting_attacks_stargan_within_eps(setup):
    models, x, labels = setup
    st = models.targets[0]
    adv = baselines.disrupting(st, models.variables["stargan"], x, labels, jax.random.key(0))
    _in_budget(x, adv)
    assert _loss(models, x, adv, labels, ("stargan",)) > 1.5 * _loss(models, x, _noise(x, 1),
                                                                      labels, ("stargan",))
    per = baselines.disrupting(st, models.variables["stargan"], x, labels, jax.random.key(0),
                               per_condition=True)
    assert per.shape == (5,) + x.shape
    _in_budget(x[None], per)


def test_pgd_on_all_targets_within_eps(setup):
    models, x, labels = setup
    adv = baselines.pgd_all(models.targets, models.variables, x, labels, jax.random.key(0))
    _in_budget(x, adv)
    assert _loss(models, x, adv, labels) > 1.5 * _loss(models, x, _noise(x, 2), labels)


def test_cmua_universal_perturbation_within_eps(setup):
    models, x, labels = setup
    up = baselines.cmua_fit(models.targets, models.variables, np.asarray(x), None,
                            jax.random.key(0), batch_size=2, steps=5)
    assert up.shape == x.shape[1:]
    assert float(jnp.max(jnp.abs(up))) <= EPS + 1e-6
    adv = baselines.cmua_apply(up, x)
    _in_budget(x, adv)
    # one perturbation for every image beats per-image random noise of the same budget
    assert _loss(models, x, adv, labels) > _loss(models, x, _noise(x, 3), labels)


def test_pg_generator_raises_the_surrogate_error(setup):
    _, x, _ = setup
    model = surrogate.SurrogateAutoencoder(width=4, depth=2)
    svars = surrogate.init_surrogate(0, model, 32)
    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=32)

    def surrogate_mse(gvars):
        adv = baselines.pg_protect(gvars, x, config=cfg)
        _in_budget(x, adv)
        return float(jnp.mean((model.apply(svars, adv) - model.apply(svars, x)) ** 2))

    before = surrogate_mse(baselines.pg_train(model.apply, svars, np.asarray(x),
                                              jax.random.key(0), config=cfg, steps=0))
    after = surrogate_mse(baselines.pg_train(model.apply, svars, np.asarray(x),
                                             jax.random.key(0), config=cfg, steps=30,
                                             batch_size=4, learning_rate=1e-2))
    assert after > 10 * before


def test_linf_pgd_takes_its_first_gradient_at_the_unclamped_start():
    # Ruiz's perturb: X = x + U; grad at X (NOT clamped to [-1, 1]); X = clamp(x + clamp(X +
    # a sign(grad) - x, +-eps), -1, 1). Near 1 the clamped and unclamped starts give opposite
    # gradient signs for loss (X - 1.02)^2 where x + U lies in (1, 1.02).
    x = jnp.full((1, 4, 4, 3), 0.99, jnp.float32)
    key = jax.random.key(7)
    start = np.asarray(x + jax.random.uniform(key, x.shape, jnp.float32, -EPS, EPS))
    assert ((start > 1.0) & (start < 1.02)).any()
    step = start + baselines.STEP_SIZE * np.sign(2 * (start - 1.02))
    want = np.clip(0.99 + np.clip(step - 0.99, -EPS, EPS), -1, 1)
    got = baselines.linf_pgd(lambda xa: jnp.sum((xa - 1.02) ** 2), x, key, steps=1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    zero = baselines.linf_pgd(lambda xa: jnp.sum(xa), x, key, steps=0)
    np.testing.assert_allclose(zero, np.clip(start, -1, 1), atol=1e-6)


class _PassThrough(nn.Module):
    def __call__(self, x, condition):
        return x, x


def _single(labels):
    return labels[None]


def test_cmua_hisd_call_starts_at_x_plus_up_unclamped_or_at_x():
    hisd = targets.Target(name="hisd", module=_PassThrough(), num_conditions=1,
                          make_conditions=_single)
    cond = jnp.zeros((2, 5))

    def call(x, up, has_up):
        out, _ = baselines.cmua_call(hisd, {}, x, cond, jnp.full(x.shape[1:], up, jnp.float32),
                                     jnp.asarray(has_up), jax.random.key(0), steps=1)
        return np.asarray(out)
    # up exists: X = 0.99 + 0.03 = 1.02 (not clamped to 1); the loss (X - x - 0.002)^2 pushes
    # up: X_adv 1.03, eta = 0.04, up = 0.5 * 0.03 + 0.5 * 0.04 (clamped first: 0.025)
    np.testing.assert_allclose(call(jnp.full((2, 4, 4, 3), 0.99), 0.03, True), 0.035, rtol=1e-4)
    # no up yet: X = x (no random start): X_adv = x - 0.01 (the target is G(x) + 0.002), up = eta
    np.testing.assert_allclose(call(jnp.zeros((2, 4, 4, 3)), 0.0, False), -0.01, rtol=1e-4)
