"""The differentiable channels against the real operations (Pillow / robustness.py), their
gradients, the train option's spec, and the per-image sampling (64 px crops of shared faces)."""
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idguard_jax import channels
from idguard_jax.evaluation import robustness
from idguard_jax.image_files import list_images, read_rgb


@pytest.fixture(scope="module")
def crops(shared_faces_dir):
    """uint8 (3, 64, 64, 3): the middle of three full-resolution faces (eyes, nose: detail)."""
    return np.stack([read_rgb(p)[96:160, 96:160] for p in list_images(shared_faces_dir)[:3]])


# jitted: one compilation each instead of one per primitive in eager mode
_jpeg = jax.jit(channels.jpeg, static_argnames=("subsampling", "rounding"))
_resize = jax.jit(channels.resize_round_trip)
_blur = jax.jit(channels.gaussian_blur, static_argnames=("max_sigma",))


def _unit(images):
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _levels(x):
    return (np.asarray(x, np.float64) + 1.0) * 127.5


def _pillow_jpeg(images, quality, subsampling):
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return np.stack(out).astype(np.float64)


def test_quantisation_tables_are_pillows():
    for q in (10, 50, 75, 95, 100):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as im:
            luma, chroma = (np.reshape(im.quantization[i], (8, 8)) for i in (0, 1))
        mine = channels.quantisation_tables(jnp.asarray([q]))
        np.testing.assert_array_equal(mine[0][0], luma)
        np.testing.assert_array_equal(mine[1][0], chroma)


@pytest.mark.parametrize("subsampling,pil_code,bound", [("4:4:4", 0, 1.0), ("4:2:0", 2, 1.5)])
def test_jpeg_matches_pillows_decode(crops, subsampling, pil_code, bound):
    """With hard rounding, mean |diff| to Pillow's decode within the bound, far below JPEG's own
    change to the image; one call with a quality per image."""
    qualities = (50, 75, 95)
    n = len(crops)
    for q in qualities:
        ref = _pillow_jpeg(crops, q, pil_code)
        got = _levels(_jpeg(_unit(crops), jnp.full((n,), q), subsampling=subsampling,
                            rounding="hard"))
        err, own = np.abs(got - ref).mean(), np.abs(ref - crops).mean()
        assert err <= bound and err < 0.5 * own, (q, err, own)
    per_image = _levels(_jpeg(_unit(crops), jnp.asarray(qualities), subsampling=subsampling,
                              rounding="hard"))
    for i, q in enumerate(qualities):
        ref = _pillow_jpeg(crops[i:i + 1], q, pil_code)
        assert np.abs(per_image[i:i + 1] - ref).mean() <= bound


def test_straight_through_rounding_is_hard_rounding_forward(crops):
    x, q = _unit(crops), jnp.full((len(crops),), 75)
    hard = _jpeg(x, q, rounding="hard")
    np.testing.assert_array_equal(_jpeg(x, q, rounding="ste"), hard)
    assert 0 < float(jnp.abs(_jpeg(x, q, rounding="smooth") - hard).mean()) < 2 / 255


def test_resize_matches_pillows_bicubic(crops):
    factors = (0.5, 0.75, 0.3)
    together = _levels(_resize(_unit(crops), jnp.asarray(factors)))
    for i, f in enumerate(factors):
        ref = robustness.resize_round_trip(crops[i:i + 1], f).astype(np.float64)
        err, own = np.abs(together[i:i + 1] - ref).mean(), np.abs(ref - crops[i:i + 1]).mean()
        assert err <= 1.0 and err < 0.5 * own, (f, err, own)
    np.testing.assert_allclose(_levels(_resize(_unit(crops), jnp.ones((len(crops),)))), crops,
                               atol=1e-3)


def test_blur_equals_robustness_before_its_rounding(crops):
    sigmas = (0.5, 1.0, 1.7)
    got = _blur(_unit(crops), jnp.asarray(sigmas), max_sigma=2.0)
    for i, s in enumerate(sigmas):
        ref = robustness.gaussian_blur_levels(crops[i:i + 1], s) / 127.5 - 1.0
        np.testing.assert_allclose(got[i:i + 1], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_blur(_unit(crops), jnp.zeros((len(crops),)), max_sigma=2.0),
                               _unit(crops), atol=1e-6)


@pytest.mark.parametrize("name", ["jpeg-ste", "jpeg-smooth", "jpeg444-ste", "resize", "blur"])
def test_gradients_are_finite_and_nonzero(crops, name):
    ops = {"jpeg-ste": lambda x: channels.jpeg(x, jnp.asarray([60.0, 90.0])),
           "jpeg-smooth": lambda x: channels.jpeg(x, 75, rounding="smooth"),
           "jpeg444-ste": lambda x: channels.jpeg(x, 75, subsampling="4:4:4"),
           "resize": lambda x: channels.resize_round_trip(x, jnp.asarray([0.5, 0.8])),
           "blur": lambda x: channels.gaussian_blur(x, jnp.asarray([0.7, 1.0]), max_sigma=1.0)}
    x = _unit(crops[:2])
    w = jax.random.normal(jax.random.key(0), x.shape)
    g = jax.jit(jax.grad(lambda v: jnp.sum(w * ops[name](v))))(x)
    assert np.all(np.isfinite(g))
    for i in range(2):     # every image gets gradient, spread over the image
        assert float(jnp.mean(g[i] != 0)) > 0.5


def test_spec_parsing_and_its_errors():
    spec = channels.parse_spec("jpeg:70-95,resize:0.5-1,blur:0-1,none,resize:0.75+jpeg:80")
    assert spec[0] == (channels.Op("jpeg", 70, 95),)
    assert spec[3] == (channels.Op("none"),)
    assert spec[4] == (channels.Op("resize", 0.75, 0.75), channels.Op("jpeg", 80, 80))
    for bad, why in (("jpeg:0-90", "1..100"), ("jpeg:70.5", "integers"), ("resize:0-1", r"\(0, 1\]"),
                     ("blur:-1", "bad range"), ("blur:2-1", "backwards"), ("sharpen:2", "not one of"),
                     ("jpeg:75,,blur:1", "empty"), ("resize:a", "bad range")):
        with pytest.raises(ValueError, match=f"robust=.*{why}"):
            channels.parse_spec(bad)


def test_each_image_gets_its_sampled_channel_without_retracing(crops):
    spec = channels.parse_spec("jpeg:60-90,resize:0.5-0.9,blur:0.3-1.2,none")
    x = _unit(np.concatenate([crops] * 3))     # 9 images: the draw covers several channels

    @chex.assert_max_traces(n=1)
    def run(step):
        params = channels.sample(spec, channels.step_key(0, step), x.shape[0])
        return channels.apply(spec, params, x), params

    run_jit = jax.jit(run)
    draws = [run_jit(jnp.asarray(step)) for step in range(3)]
    chosen = [np.asarray(p["channel"]) for _, p in draws]
    assert len({c.tobytes() for c in chosen}) > 1            # new draws each step
    np.testing.assert_array_equal(run_jit(jnp.asarray(1))[1]["channel"], chosen[1])  # same step
    out, params = draws[-1]
    assert len(set(chosen[-1])) > 1
    for i, c in enumerate(chosen[-1]):                         # the last draw, image by image
        v = params["values"][c][0][i]
        assert spec[c][0].low <= float(v) <= spec[c][0].high
        alone = jax.jit(channels.apply, static_argnums=0)(
            (spec[c],), {"channel": jnp.zeros((1,), jnp.int32), "values": ((v[None],),)},
            x[i:i + 1])
        # (JPEG's roundings may flip by one level between differently fused programs)
        diff = np.abs(_levels(out[i:i + 1]) - _levels(alone))
        assert diff.max() <= 1.001 and diff.mean() < 0.1, (spec[c], diff.max(), diff.mean())
