"""Batch protection: bounded, per-image, any batch size without a compile per size."""
import numpy as np
import pytest

from conftest import save_bounded_generator
from idguard_jax.protection import faces as protect
from idguard_jax.generator import load_generator, perturb, protect_eval


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return protect.load(save_bounded_generator(tmp_path_factory.mktemp("gen") / "generator", 32))


def _faces(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_uint8_and_float_outputs_are_bounded(generator):
    x = _faces(5)
    y = protect.protect(generator, x)
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert np.abs(y.astype(int) - x.astype(int)).max() <= int(0.05 * 127.5)
    xf = x.astype(np.float32) / 127.5 - 1
    yf = protect.protect(generator, xf)
    assert yf.dtype == np.float32
    assert np.abs(yf - xf).max() <= 0.05 + 1e-6
    assert yf.min() >= -1 and yf.max() <= 1
    assert np.abs(yf - xf).max() > 0.01      # it does perturb
    # uint8 output is the float result rounded, except where rounding would leave the budget
    assert np.abs(y.astype(np.float32) / 127.5 - 1 - yf).max() <= 1 / 127.5 + 1e-6


def test_each_image_is_protected_independently_of_its_batch(generator):
    x = _faces(7).astype(np.float32) / 127.5 - 1
    alone = protect.protect(generator, x[:1])
    together = protect.protect(generator, x)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-6)
    ref, _, _ = perturb(generator.config.module(), generator.variables, generator.delta_p,
                        x, 0.05, train=False)
    np.testing.assert_allclose(together, np.asarray(ref), atol=1e-6)


def test_any_batch_size_compiles_per_bucket_only(generator):
    protect_eval.clear_cache()
    for n in (1, 2, 3, 5, 6, 7, 8, 13, 40):
        out = protect.protect(generator, _faces(n), max_bucket=8)
        assert out.shape[0] == n
    # buckets 1, 2, 4, 8 (13 and 40 run as chunks of 8 plus a padded remainder)
    assert protect_eval._cache_size() == 4


def test_rejects_wrong_image_size(generator):
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        protect.protect(generator, np.zeros((2, 64, 64, 3), np.uint8))


def test_load_refuses_other_bundles(tmp_path):
    from idguard_jax.checkpoint import save_bundle
    save_bundle(tmp_path / "x", {"a": np.zeros(3)}, {"kind": "target"})
    with pytest.raises(ValueError, match="not a generator"):
        load_generator(tmp_path / "x")
