"""Baselines on tiny random targets: inside the budget, and each raises its own attack loss
above what random noise of the same budget does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax import baselines, evaluation, prior
from idguard_jax.data import load_folder
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
    model = prior.SurrogateAutoencoder(width=4, depth=2)
    svars = prior.init_surrogate(0, model, 32)
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
