"""ports.layers.ConvTranspose2d: flax's ConvTranspose numbers, forward and gradients, with the
sub-pixel kernel gradient XLA:CPU runs fast; the sub-pixel form itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ports.layers import conv_transpose, conv_transpose2d, conv_transpose_subpixel

# (kernel, padding, output_padding): the generator's, StarGAN/RelGAN's, and two odd ones.
GEOMETRIES = [(3, 1, 1), (4, 1, 0), (4, 2, 0), (5, 2, 1)]


def _flax_reference(features, k, p, op):
    return nn.ConvTranspose(features, (k, k), strides=(2, 2),
                            padding=((k - 1 - p, k - 1 - p + op),) * 2, transpose_kernel=True)


@pytest.mark.parametrize("k,p,op", GEOMETRIES)
def test_subpixel_form_equals_the_direct_one(k, p, op):
    rng = np.random.default_rng(k + p)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 4, 3)), jnp.float32)
    want = conv_transpose(x, kernel, (2, p, op))
    got = conv_transpose_subpixel(x, kernel, (2, p, op))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("k,p,op", GEOMETRIES)
def test_conv_transpose_matches_flax_forward_and_gradients(k, p, op):
    rng = np.random.default_rng(k * 10 + op)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 5)), jnp.float32)
    ours, ref = conv_transpose2d(7, k, 2, p, op, bias=True), _flax_reference(7, k, p, op)
    variables = ours.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.1, variables)     # a nonzero bias too
    assert (jax.tree.map(jnp.shape, variables)
            == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x)))
    np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_conv_transpose_gradient_under_vmap():
    """MGDA maps the generator's vjp over the tasks' cotangents."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 3)), jnp.float32)
    m = conv_transpose2d(2, 3, 2, 1, 1, bias=False)
    v = m.init(jax.random.key(0), x)
    _, vjp = jax.vjp(lambda v: m.apply(v, x), v)
    cts = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1, 8, 8, 2)), jnp.float32)
    mapped = jax.vmap(vjp)(cts)[0]["params"]["kernel"]
    for i in range(3):
        np.testing.assert_allclose(mapped[i], vjp(cts[i])[0]["params"]["kernel"], rtol=1e-6)
