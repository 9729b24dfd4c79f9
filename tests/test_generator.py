"""The perturbation generator: size, initialisation, the perturbation rule, bundles."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax.generator import (GeneratorConfig, abstract_generator, fit_delta_p, init_generator,
                                   load_generator,
                                   perturb, save_generator)
from ports.layers import clamp


def test_official_size_parameter_count():
    v = abstract_generator(GeneratorConfig())
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"])) == 7850819
    out = jax.eval_shape(lambda v, x: GeneratorConfig().module().apply(v, x, train=False), v,
                         jax.ShapeDtypeStruct((2, 256, 256, 6), jnp.float32))
    assert out.shape == (2, 256, 256, 3)


def test_initialisation_is_the_references():
    _, v = init_generator(GeneratorConfig(ngf=16, n_blocks=2, image_size=32), jax.random.key(0))
    k = np.asarray(v["params"]["model0_4"]["kernel"])
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    s = np.asarray(v["params"]["model0_2"]["scale"])
    assert abs(s.mean() - 1) < 0.01 and 0.01 < s.std() < 0.03
    np.testing.assert_array_equal(v["params"]["model0_2"]["bias"], 0)


def test_perturbation_rule():
    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=16)
    _, v = init_generator(cfg, jax.random.key(0))
    last = max(v["params"], key=lambda k: int(k.split("_")[1]))
    v["params"][last]["kernel"] = v["params"][last]["kernel"] * 1e3   # saturate: hits +-eps
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1).at[0, 0].set(1.0)
    dp = 0.2 * jax.random.normal(jax.random.key(2), (16, 16, 3))
    x_adv, x_pri, stats = perturb(cfg.module(), v, dp, x, 0.05, train=True)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.05 + 1e-6
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.049
    assert float(jnp.max(x_adv)) <= 1.0
    np.testing.assert_allclose(x_pri, jnp.clip(x + jnp.clip(dp, -0.05, 0.05), -1, 1), atol=1e-7)
    assert not np.allclose(stats["model0_2"]["mean"], v["batch_stats"]["model0_2"]["mean"])
    _, _, same = perturb(cfg.module(), v, dp, x, 0.05, train=False)
    assert same is v["batch_stats"]


def test_clamp_gradient_is_torchs():
    g = jax.grad(lambda x: jnp.sum(clamp(x, -1.0, 1.0)))(jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0]))
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 0])


def test_fit_delta_p_layouts_and_resize():
    t = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(fit_delta_p(t, 8), t[0].transpose(1, 2, 0))
    with pytest.warns(UserWarning, match="resizing it to 16x16"):
        d = fit_delta_p(t, 16, source="pri_pert.pt")
    assert d.shape == (16, 16, 3)
    np.testing.assert_allclose(d[0, 0], t[0, :, 0, 0], atol=1e-6)    # corners kept (align_corners)
    np.testing.assert_allclose(d[-1, -1], t[0, :, -1, -1], atol=1e-6)
    with pytest.raises(ValueError, match="x.pt"):
        fit_delta_p(np.zeros((4, 5)), 8, source="x.pt")


def test_bundle_round_trip_and_no_overwrite(tmp_path):
    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=16)
    _, v = init_generator(cfg, jax.random.key(0))
    dp = jnp.full((16, 16, 3), 0.01)
    save_generator(tmp_path / "g", v, dp, cfg)
    cfg2, v2, dp2 = load_generator(tmp_path / "g")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dp, dp2)
    with pytest.raises(FileExistsError):
        save_generator(tmp_path / "g", v, dp, cfg)
