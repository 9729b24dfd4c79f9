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
