"""The identity destruction losses, by hand and against torch's cosine similarity."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idguard_jax import images
from idguard_jax.training import losses


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
