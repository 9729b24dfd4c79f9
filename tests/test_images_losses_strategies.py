"""Small pieces: align_corners resize (against torch's definition), losses, weights, summary."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idguard_jax import images
from idguard_jax.training import losses
from idguard_jax.training import strategies


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((256, 256), (112, 112)),
                                     ((64, 48), (16, 20)), ((1, 5), (3, 5))])
def test_resize_matches_torch_align_corners(src, dst):
    x = np.random.default_rng(0).normal(size=(2, 3) + src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=True).numpy()
    out = images.resize_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5)


def test_uint8_float_round_trip():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    f = images.to_float(u)
    assert f.min() == -1 and f.max() == 1
    np.testing.assert_array_equal(images.to_uint8(f), u)


def test_read_rgb_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        images.read_rgb(bad)


def test_mask_loss_modes_by_hand():
    o = jnp.ones((1, 2, 2, 3))
    oa = jnp.zeros((1, 2, 2, 3))
    m = jnp.array([1.0, 0, 0, 0]).reshape(1, 2, 2, 1)
    h = jnp.full((1, 2, 2, 1), 0.5)
    # squared differences averaged over all 12 elements
    assert float(losses.mask_loss(o, oa, m, h, "multi")) == pytest.approx(3 * 0.25 / 12)
    assert float(losses.mask_loss(o, oa, m, h, "bin")) == pytest.approx(3 / 12)
    assert float(losses.mask_loss(o, oa, m, h, "hmp")) == pytest.approx(0.25)
    assert float(losses.mask_loss(o, oa, m, h, "add")) == pytest.approx(3 / 12 + 0.25)
    with pytest.raises(ValueError, match="mask_mode"):
        losses.LossConfig(mask_mode="both")


def test_identity_and_feature_losses():
    a = np.random.default_rng(0).normal(size=(2, 3, 3, 8)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
    ref = F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).mean().item()
    assert float(losses.identity_loss(a, b)) == pytest.approx(-ref, rel=1e-5)
    assert float(losses.identity_loss(a, a)) == pytest.approx(-1.0, rel=1e-6)
    mask = jnp.zeros((2, 8, 8, 1)).at[:, :4].set(1.0)
    f = jnp.ones((2, 3, 3, 4))
    m3 = images.resize_align_corners(mask, (3, 3))
    assert float(losses.feature_loss(f, 0 * f, mask)) == pytest.approx(float(jnp.mean(m3 ** 2)))


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


def test_summary_counts():
    out = subprocess.run([sys.executable, "-m", "idguard_jax.networks.summary"], capture_output=True,
                         text=True, check=True, timeout=300).stdout.split("\n")
    counts = dict(line.split() for line in out if line)
    assert counts["generator"] == "7850819"
    assert counts["stargan"] == "8430528"
    assert counts["aggan"] == "8433664"
    assert counts["fpgan"] == "8430528"
    assert {k: counts[k] for k in ("relgan", "hisd", "arcface", "irse50", "iresnet50",
                                   "iresnet100", "vggface", "dlib")} == {
        "relgan": "8434345", "hisd": "19043939", "arcface": "52193215", "irse50": "43797696",
        "iresnet50": "43590848", "iresnet100": "65156160", "vggface": "145002878",
        "dlib": "5614592"}
