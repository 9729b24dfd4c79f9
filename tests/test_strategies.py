"""The task-weighting rules of the strategies (kpi, prior, hmm, dtp) by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax.training import strategies


def test_strategy_rules():
    K = jnp.array([0.5, 1e-20, 2.0])
    alpha = jnp.array([1.0, 10.0, 100.0])
    st = strategies.initial_strategy_state(3)
    w, _ = strategies.weights_from_values("kpi", K, alpha, st)
    np.testing.assert_allclose(w, [-(0.5) * np.log(0.5), -10 * (1 - 1e-13) * np.log(1e-13), 0],
                               rtol=1e-5)
    w, _ = strategies.weights_from_values("prior", K, alpha, st)
    np.testing.assert_array_equal(w, alpha)
    w, _ = strategies.weights_from_values("hmm", K, alpha, st)
    np.testing.assert_array_equal(w, [0, 1, 0])
    w1, st1 = strategies.weights_from_values("dtp", jnp.array([0.5, 0.5, 0.5]), alpha, st)
    np.testing.assert_allclose(st1["kpi_ema"], 0.5)
    w2, st2 = strategies.weights_from_values("dtp", jnp.array([0.1, 0.5, 0.9]), alpha, st1)
    np.testing.assert_allclose(st2["kpi_ema"], [0.46, 0.5, 0.54], rtol=1e-6)
    assert w2[0] > w2[1] > w2[2] > 0          # harder (lower KPI) tasks weigh more
    with pytest.raises(ValueError, match="mgda"):
        strategies.weights_from_values("mgda", K, alpha, st)


def test_kpi_without_prior_weights_is_the_bare_focal_weight():
    """prior_weights='none': every alpha_k is 1, so KPI's lambda_k is -(1 - K'_k) log K'_k
    with K' = clip(K, 1e-13, 1), the focal weight of K alone."""
    from idguard_jax import config
    from idguard_jax.training.step import create_setup

    five = ("stargan", "aggan", "fpgan", "relgan", "hisd")
    setup = create_setup(config.tiny(targets=five, strategy="kpi", prior_weights="none"))
    np.testing.assert_array_equal(setup.alpha, np.ones(5))
    K = np.array([0.5, 0.1, 1e-20, 0.9, 3.0], np.float32)
    w, _ = strategies.weights_from_values("kpi", jnp.asarray(K), setup.alpha,
                                          strategies.initial_strategy_state(5))
    k = np.clip(K.astype(np.float64), 1e-13, 1.0)
    np.testing.assert_allclose(w, -(1.0 - k) * np.log(k), rtol=1e-5)
    with_prior = create_setup(config.tiny(targets=five, strategy="kpi")).alpha
    assert not np.array_equal(with_prior, setup.alpha)   # the reference's alphas differ
    with pytest.raises(ValueError, match="none"):
        config.tiny(prior_weights="nothing")
