"""ports.layers' CPU fast paths: ConvTranspose2d (flax's ConvTranspose numbers, forward and
gradients, through the phases and sub-pixel forms), strided conv2d (nn.Conv's numbers, its
input gradient through space-to-depth), Winograd 3x3 convs, convs to or from few channels on
2 x 2 cells, kernel gradients by taps, the closed-form norm gradients, max_pool_2x2 and
Conv3x3Resampled; the forms themselves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ports.layers import (Conv3x3Resampled, conv2d, conv_space_to_depth, conv_transpose, conv_transpose2d,
                          conv_transpose_phases, conv_transpose_subpixel, max_pool_2x2,
                          depth_to_space, normalize, reflect_conv, reflect_conv_pairs,
                          space_to_depth)
from ports import winograd
from ports.winograd import conv3x3_winograd, winograd_kernel

# (kernel, padding, output_padding): the generator's, StarGAN/RelGAN's, and two odd ones.
GEOMETRIES = [(3, 1, 1), (4, 1, 0), (4, 2, 0), (5, 2, 1)]


def _flax_reference(features, k, p, op):
    return nn.ConvTranspose(features, (k, k), strides=(2, 2),
                            padding=((k - 1 - p, k - 1 - p + op),) * 2, transpose_kernel=True)


def _assert_same_gradients(ours, ref, variables, x):
    """Gradients of sum(sin(module(x))) w.r.t. the variables and x agree to 1e-5 of scale."""
    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))


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
def test_phases_form_equals_the_direct_one(k, p, op):
    """One stride-1 conv per output phase over its real taps, interleaved, forward and input
    gradient; a geometry it cannot take is refused."""
    rng = np.random.default_rng(k + 3 * p)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 4, 3)), jnp.float32)
    want, vjp_want = jax.vjp(lambda x: conv_transpose(x, kernel, (2, p, op)), x)
    got, vjp_got = jax.vjp(lambda x: conv_transpose_phases(x, kernel, (2, p, op)), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    dx = vjp_want(g)[0]
    np.testing.assert_allclose(vjp_got(g)[0], dx, atol=1e-5 * float(jnp.max(jnp.abs(dx))))
    with pytest.raises(ValueError, match="not a multiple of the stride"):
        conv_transpose_phases(x, kernel, (2, p, op + 1))
    with pytest.raises(ValueError, match="without taps"):
        conv_transpose_phases(x, kernel[:1, :1], (2, 0, 1))


@pytest.mark.parametrize("k,p,op", GEOMETRIES)
@pytest.mark.parametrize("channels", [(5, 7), (32, 32)])          # (32, 32): dk by taps
def test_conv_transpose_matches_flax_forward_and_gradients(k, p, op, channels):
    rng = np.random.default_rng(k * 10 + op)
    c_in, c_out = channels
    x = jnp.asarray(rng.standard_normal((2, 6, 6, c_in)), jnp.float32)
    ours = conv_transpose2d(c_out, k, 2, p, op, bias=True)
    ref = _flax_reference(c_out, k, p, op)
    variables = ours.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.1, variables)     # a nonzero bias too
    assert (jax.tree.map(jnp.shape, variables)
            == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x)))
    want = ref.apply(variables, x)
    np.testing.assert_allclose(ours.apply(variables, x), want,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))

    _assert_same_gradients(ours, ref, variables, x)


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


# (kernel, stride, padding, input size): StarGAN/RelGAN's k4 s2, ArcFace's k3 s2 and 1x1 s2,
# odd sizes (rows the direct conv never reads), a stride 3.
STRIDED = [(4, 2, 1, 8), (3, 2, 1, 8), (1, 2, 0, 7), (3, 2, 1, 7), (4, 2, 1, 9), (5, 3, 2, 10)]


def _direct(x, kernel, s, p):
    return jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k,s,p,n", STRIDED)
def test_space_to_depth_form_equals_the_direct_conv(k, s, p, n):
    rng = np.random.default_rng(k * 7 + n)
    x = jnp.asarray(rng.standard_normal((2, n, n + 1, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 3, 4)), jnp.float32)
    want = _direct(x, kernel, s, p)
    got = conv_space_to_depth(x, kernel, ((s, s), ((p, p), (p, p))))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_space_to_depth_cells_and_their_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    cells = space_to_depth(x)
    assert cells.shape == (2, 2, 3, 12)
    # cell (1, 2), row phase 1, column phase 0, channel 2 is pixel (3, 4), channel 2
    np.testing.assert_array_equal(cells[1, 1, 2, (2 * 1 + 0) * 3 + 2], x[1, 3, 4, 2])
    np.testing.assert_array_equal(depth_to_space(cells), x)
    np.testing.assert_array_equal(depth_to_space(space_to_depth(x, (2, 3)), (2, 3)), x)


@pytest.mark.parametrize("k,c", [(7, 3), (3, 5), (1, 2)])
def test_reflect_conv_on_pixel_pairs_equals_reflect_conv(k, c):
    rng = np.random.default_rng(k * 7 + c)
    x = jnp.asarray(rng.standard_normal((2, 9, 12, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, 4)), jnp.float32)
    want = reflect_conv(x, kernel)
    np.testing.assert_allclose(reflect_conv_pairs(x, kernel), want,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="even width"):
        reflect_conv_pairs(x[:, :, :11], kernel)


@pytest.mark.parametrize("k,s,p,n", STRIDED)
def test_strided_conv2d_matches_flax_conv_forward_and_gradients(k, s, p, n):
    rng = np.random.default_rng(k * 11 + n)
    x = jnp.asarray(rng.standard_normal((2, n, n, 5)), jnp.float32)
    ours = conv2d(6, k, s, p, bias=True)
    ref = nn.Conv(6, (k, k), strides=(s, s), padding=((p, p), (p, p)))
    variables = jax.tree.map(lambda a: a + 0.1, ours.init(jax.random.key(0), x))
    assert (jax.tree.map(jnp.shape, variables)
            == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x)))
    np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))

    _assert_same_gradients(ours, ref, variables, x)


def test_strided_conv2d_gradient_under_vmap():
    """The step maps a target's forward over its conditions; MGDA maps vjps over tasks."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4)), jnp.float32)
    m = conv2d(5, 4, 2, 1, bias=False)
    v = m.init(jax.random.key(0), x[0])

    def loss(x):
        return jnp.sum(jnp.sin(m.apply(v, x)))
    mapped = jax.vmap(jax.grad(loss))(x)
    for i in range(3):
        np.testing.assert_allclose(mapped[i], jax.grad(loss)(x[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fast paths")
def test_no_input_dilated_convolution_left_in_the_gradients():
    """XLA:CPU's slow path: no forward or gradient may dilate an input (the fast forms would
    otherwise fall back silently and only the speed would show it)."""
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    for m in (conv2d(6, 4, 2, 1, bias=False), conv_transpose2d(6, 4, 2, 1, bias=False),
              conv_transpose2d(6, 3, 2, 1, 1, bias=False)):
        v = m.init(jax.random.key(0), x)
        grads = jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1))
        text = str(jax.make_jaxpr(grads)(v, x))
        assert text.count("conv_general_dilated") >= 3           # forward, dx, dk
        assert "lhs_dilation=(2, 2)" not in text, text


@pytest.mark.parametrize("tile, tol", [(2, 1e-6), (4, 3e-5)])
@pytest.mark.parametrize("shape", [(2, 8, 12, 5, 7), (1, 4, 4, 16, 3)])
def test_winograd_conv_equals_the_direct_conv(shape, tile, tol):
    """conv3x3_winograd on a padded input = the VALID 3x3 conv: F(2x2, 3x3) to float32 rounding,
    F(4x4, 3x3) to ~1e-5 of the output's scale; bfloat16 products to bfloat16's rounding;
    sides that are not multiples of the tile are refused."""
    b, h, w, c, o = shape
    kx, kk = jax.random.split(jax.random.key(0))
    xp = jax.random.normal(kx, (b, h + 2, w + 2, c))
    kernel = jax.random.normal(kk, (3, 3, c, o))
    direct = jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          precision=jax.lax.Precision.HIGHEST)
    scale = float(jnp.abs(direct).max())
    u = winograd_kernel(kernel, tile)
    assert u.shape == ((tile + 2) ** 2, c, o)
    fast = conv3x3_winograd(xp, u)
    assert fast.shape == direct.shape and fast.dtype == jnp.float32
    np.testing.assert_allclose(fast, direct, atol=tol * scale)
    if tile == 2:
        bf16 = conv3x3_winograd(xp, u.astype(jnp.bfloat16))
        err = float(jnp.abs(bf16 - direct).max()) / scale
        assert bf16.dtype == jnp.float32 and 1e-5 < err < 2e-2     # rounded, not wrong
        # a prepared kernel, one matrix per tile position: the same numbers
        positions = tuple(u.astype(jnp.bfloat16)[i] for i in range(u.shape[0]))
        np.testing.assert_array_equal(conv3x3_winograd(xp, positions), bf16)
    np.testing.assert_array_equal(conv3x3_winograd(xp, tuple(u[i] for i in range(len(u)))),
                                  fast)
    with pytest.raises(ValueError, match="multiples of the tile"):
        conv3x3_winograd(xp[:, 1:], u)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_kernel(kernel, 3)


def test_winograd_bfloat16_operands_are_rounded_to_nearest_even():
    """The integer rounding of the Winograd tiles = XLA's float32 -> bfloat16 convert, ties
    (to even), carries into the exponent and signs included."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(
        -30, 30, 4096), np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 - 2 ** -25,
                                   3.3895e38, 0.0, -0.0, 1e-40], np.float32)])
    want = jax.lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.bfloat16), jnp.uint16)
    np.testing.assert_array_equal(winograd.bfloat16_bits(jnp.asarray(x)), want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fast paths")
def test_large_3x3_conv_by_winograd_with_its_gradients():
    """conv2d(k3, s1, p1) from WINOGRAD_MIN_PIXELS and WINOGRAD_MIN_CHANNELS runs Winograd on
    CPU (tile 2, tile 4 from WINOGRAD_LARGE_PIXELS; no convolution left in its forward or
    input gradient): output and input gradient
    within 3e-5 of their scale of the direct conv's, the kernel gradient (by taps) within
    1e-5; a smaller one stays the direct conv, to the bit."""
    from ports import layers

    def direct(v, x):
        return jax.lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    side = int(np.sqrt(layers.WINOGRAD_MIN_PIXELS))
    ch = layers.WINOGRAD_MIN_CHANNELS
    kx, kg = jax.random.split(jax.random.key(1))
    m = conv2d(ch, 3, 1, 1, bias=False)
    large = int(np.sqrt(layers.WINOGRAD_LARGE_PIXELS))                # tile 4 from there
    for shape, winograd in (((1, side, side, ch), True), ((1, large, large, ch), True),
                            ((2, side // 2, side // 2, ch), False)):
        x = jax.random.normal(kx, shape)
        g = jax.random.normal(kg, shape[:3] + (ch,))
        v = m.init(jax.random.key(0), x)
        y, vjp = jax.vjp(m.apply, v, x)
        y_ref, vjp_ref = jax.vjp(direct, v, x)
        (dv, dx), (dv_ref, dx_ref) = vjp(g), vjp_ref(g)
        # compiled, so the unused kernel gradient is left out as in a frozen network's step
        fwd_dx = jax.jit(lambda v, x, g: jax.vjp(lambda x: m.apply(v, x), x)[1](g)).lower(
            v, x, g).compile().as_text()
        if winograd:
            assert "convolution(" not in fwd_dx
            for a, b in ((y, y_ref), (dx, dx_ref)):
                scale = float(jnp.abs(b).max())
                err = float(jnp.abs(a - b).max()) / scale
                assert 0 < err < 3e-5, err
            dk, dk_ref = dv["params"]["kernel"], dv_ref["params"]["kernel"]
            np.testing.assert_allclose(dk, dk_ref, atol=1e-5 * float(jnp.abs(dk_ref).max()))
        else:
            assert "convolution(" in fwd_dx
            np.testing.assert_array_equal(y, y_ref)


def _normalize_by_autodiff(x, scale, bias, axes, epsilon):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean, var


@pytest.mark.parametrize("axes", [(1, 2), (0, 1, 2)])     # InstanceNorm's, BatchNorm's
@pytest.mark.parametrize("uses", ["output", "all", "statistics"])
def test_normalize_closed_form_gradient_equals_autodiff(axes, uses):
    kx, ks, kb, kg = jax.random.split(jax.random.key(3), 4)
    x = 3.0 * jax.random.normal(kx, (2, 5, 6, 4)) + 1.5
    scale = 1.0 + 0.3 * jax.random.normal(ks, (4,))
    bias = 0.2 * jax.random.normal(kb, (4,))
    weights = jax.random.normal(kg, x.shape)

    def loss(norm):
        def f(x, scale, bias):
            y, mean, var = norm(x, scale, bias, axes, 1e-5)
            terms = {"output": [jnp.sum(jnp.sin(y) * weights)],
                     "statistics": [jnp.sum(jnp.cos(mean)), jnp.sum(jnp.sqrt(var))]}
            terms["all"] = terms["output"] + terms["statistics"]
            return sum(terms[uses])
        return f

    np.testing.assert_array_equal(normalize(x, scale, bias, axes, 1e-5)[0],
                                  _normalize_by_autodiff(x, scale, bias, axes, 1e-5)[0])
    got = jax.grad(loss(normalize), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(_normalize_by_autodiff), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()) + 1e-7)


def test_max_pool_2x2_is_nn_max_pool_with_its_gradient_on_ties():
    """Forward and gradient to the bit, where windows tie (ReLU zeros, a flat region): the
    first maximum in row-major order takes the gradient, as torch's and XLA's pool do."""
    kx, kg = jax.random.split(jax.random.key(4))
    x = jax.nn.relu(jax.random.normal(kx, (2, 6, 8, 3)))
    x = x.at[:, :2, :4].set(0.5)                                 # every window tied
    g = jax.random.normal(kg, (2, 3, 4, 3))

    def reference(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    got = jax.vjp(max_pool_2x2, x)[1](g)[0]
    np.testing.assert_array_equal(got, jax.vjp(reference, x)[1](g)[0])
    assert int(jnp.count_nonzero(got[:, :2, :4])) == 2 * 2 * 3   # one position per window
    batched = jax.vmap(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0])(x[:, None], g[:, None])
    np.testing.assert_array_equal(batched[:, 0], got)
    with pytest.raises(ValueError, match="even"):
        max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


class _Conv3x3ThenResample(nn.Module):
    """What Conv3x3Resampled replaces: nearest x2 upsample then conv3x3, or conv3x3 then a 2x2
    average pool; the same parameter paths."""
    features: int
    resample: str

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv")
        if self.resample == "up":
            return conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        y = conv(x)
        return y.reshape(y.shape[0], y.shape[1] // 2, 2, y.shape[2] // 2, 2, -1).mean((2, 4))


@pytest.mark.parametrize("resample", ["up", "down"])
def test_resampled_conv3x3_equals_the_conv_and_resample_it_replaces(resample):
    """Forward and gradients (x, kernel, bias) of the fused forms against the two-step ones,
    on a non-square image with a bias away from zero; params under the same names."""
    x = jax.random.normal(jax.random.key(5), (2, 6, 10, 3))
    ours = Conv3x3Resampled(4, resample)
    ref = _Conv3x3ThenResample(4, resample)
    params = jax.tree.map(lambda v: v + 0.3, ref.init(jax.random.key(6), x)["params"]["conv"])
    assert (jax.tree.structure(ours.init(jax.random.key(6), x)["params"])
            == jax.tree.structure(params))
    want = ref.apply({"params": {"conv": params}}, x)
    np.testing.assert_allclose(ours.apply({"params": params}, x), want,
                               atol=1e-5 * float(jnp.abs(want).max()))

    got = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply({"params": p}, x))), (0, 1))(
        params, x)
    exp = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply({"params": {"conv": p}}, x))),
                   (0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(exp)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))


def test_resampled_conv3x3_refusals():
    x = jnp.zeros((1, 5, 4, 2))
    with pytest.raises(ValueError, match="even"):
        Conv3x3Resampled(3, "down").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'up' or 'down'"):
        Conv3x3Resampled(3, "sideways").init(jax.random.key(0), x)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [8, 32])
def test_conv2d_kernel_gradient_by_taps(stride, channels):
    """From TAPS_MIN_CHANNELS in and out, conv2d's kernel gradient on CPU is one 2-D product
    per tap (no convolution left in it), below that XLA's; either way nn.Conv's gradients to
    1e-5 of their scale."""
    from ports import layers

    x = jax.random.normal(jax.random.key(7), (2, 10, 12, channels))
    ours = conv2d(channels, 3, stride, 1, bias=True)
    ref = nn.Conv(channels, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
    variables = jax.tree.map(lambda v: v + 0.1, ref.init(jax.random.key(8), x))
    _assert_same_gradients(ours, ref, variables, x)

    def kernel_grad(v, x):
        return jax.grad(lambda v: jnp.sum(jnp.sin(ours.apply(v, x))))(v)["params"]["kernel"]

    hlo = jax.jit(kernel_grad).lower(variables, x).compile().as_text()
    # the forward's convolution, and XLA's kernel gradient unless it goes by taps
    want = 1 if channels >= layers.TAPS_MIN_CHANNELS else 2
    assert hlo.count(" convolution(") == want, hlo


@pytest.mark.parametrize("k,shape", [(7, (2, 15, 18, 16, 3)), (3, (1, 9, 8, 20, 1)),
                                     (4, (2, 11, 10, 16, 2)), (5, (1, 7, 7, 17, 8))])
def test_conv_on_cells_equals_the_direct_conv(k, shape):
    """conv_cells (the product of 2 x 2 input cells with cell_taps, shifted sums) = the VALID
    conv, odd and even kernels and sides, to float32 rounding of the output's scale."""
    from ports.layers import conv_cells

    b, h, w, c, o = shape
    x = jax.random.normal(jax.random.key(k), (b, h, w, c))
    kernel = jax.random.normal(jax.random.key(k + 1), (k, k, c, o))
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = conv_cells(x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fast paths")
@pytest.mark.parametrize("k,p,c,o", [(7, 3, 16, 3), (3, 1, 20, 1), (7, 3, 3, 16), (4, 1, 8, 24),
                                     (3, 0, 5, 16)])
def test_few_channel_conv2d_on_cells_with_its_gradients(k, p, c, o):
    """A stride-1 conv2d with <= FEW_CHANNELS outputs (>= MANY_CHANNELS inputs) computes its
    forward and both gradients on cells (no convolution left); with few inputs only its input
    gradient (XLA's forward and kernel gradient stay); either way nn.Conv's numbers to 1e-5 of
    their scale."""
    from ports import layers

    x = jax.random.normal(jax.random.key(k + c), (2, 13, 14, c))
    ours = conv2d(o, k, 1, p, bias=True)
    ref = nn.Conv(o, (k, k), padding=((p, p), (p, p)))
    variables = jax.tree.map(lambda v: v + 0.1, ref.init(jax.random.key(3), x))
    want = ref.apply(variables, x)
    np.testing.assert_allclose(ours.apply(variables, x), want,
                               atol=1e-5 * float(jnp.abs(want).max()))
    _assert_same_gradients(ours, ref, variables, x)

    def loss(v, x):
        return jnp.sum(jnp.sin(ours.apply(v, x)))
    few_outputs = o <= layers.FEW_CHANNELS
    for argnums, want_convs in ((1, 0 if few_outputs else 1),          # forward + dx
                                ((0, 1), 0 if few_outputs else 2)):    # + dk
        hlo = jax.jit(jax.grad(loss, argnums=argnums)).lower(variables, x).compile().as_text()
        assert hlo.count(" convolution(") == want_convs, hlo


@pytest.mark.parametrize("c,o", [(16, 3), (3, 16)])
def test_few_channel_conv2d_gradients_under_vmap(c, o):
    """The step maps a target's forward over its conditions: the cells forms' custom
    gradients (input and kernel) under vmap equal the per-example ones."""
    x = jax.random.normal(jax.random.key(c), (3, 2, 10, 12, c))
    m = conv2d(o, 7, 1, 3, bias=False)
    v = m.init(jax.random.key(0), x[0])

    def loss(v, x):
        return jnp.sum(jnp.sin(m.apply(v, x)))
    grad = jax.grad(loss, argnums=(0, 1))
    mapped = jax.vmap(grad, in_axes=(None, 0))(v, x)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(grad(v, x[i])),
                        jax.tree.leaves(jax.tree.map(lambda t: t[i], mapped))):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
