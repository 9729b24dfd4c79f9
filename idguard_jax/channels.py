"""Differentiable lossy channels: JPEG, a resize round trip and Gaussian blur, in JAX.

Images are float (B, H, W, 3) in [-1, 1] (the train step's units) -> the same shape. Every
parameter is an ARRAY with one value per image (quality (B,), factor (B,), sigma (B,)), so a
jitted caller samples new parameters each step without retracing:
- `jpeg`: libjpeg's pipeline as Pillow runs it (JFIF YCbCr, 2x2-averaged chroma and libjpeg's
  triangle ('fancy') upsampling for 4:2:0, 8x8 DCT, the IJG tables scaled by quality), with
  the quantiser's rounding `hard`, straight-through `ste` or `smooth` (x' = round(x) +
  (x - round(x))^3, Shin & Song 2017).
- `resize_round_trip`: down to round(f S) and back with Pillow's bicubic (antialiased when
  shrinking), written as dense (S, S) resampling matrices whose unused rows are zero: one shape
  for every factor.
- `gaussian_blur`: the kernel of `evaluation.robustness.gaussian_blur` (taps to ceil(3 sigma),
  reflected edges) as a (S, S) matrix per image; taps out to the spec's largest sigma.

`parse_spec` reads the train option `robust=jpeg:70-95,resize:0.5-1,blur:0-1` (one channel per
comma, drawn uniformly per image; a channel may chain ops with '+'; parameters uniform in each
range, JPEG qualities integers; `none` is the clean channel); `sample` draws the parameters,
`apply` runs them, `step_channel` is the train step's channel of a step (key from the seed
and the step counter: deterministic and resumable).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ROUNDINGS", "quantisation_tables", "jpeg", "resize_matrix", "resize_round_trip",
           "blur_matrix", "gaussian_blur", "Op", "parse_spec", "sample", "apply",
           "step_key", "step_channel"]

_HIGHEST = jax.lax.Precision.HIGHEST    # the channels are cheap: no TF32/bf16 matmuls on GPU

# The IJG example tables (ITU-T T.81 Annex K), natural (row-major) order, as libjpeg's
# `jcparam.c::std_luminance_quant_tbl` / `std_chrominance_quant_tbl`.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    np.float32).reshape(8, 8)
_CHROMA = np.full((8, 8), 99, np.float32)
_CHROMA[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                            [47, 66, 99, 99]], np.float32)

# JFIF's RGB <-> YCbCr (full range, chroma offset 128), as libjpeg's `jccolor.c` / `jdcolor.c`.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114],
                        [-0.168735892, -0.331264108, 0.5],
                        [0.5, -0.418687589, -0.081312411]], np.float32)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402],
                        [1.0, -0.344136286, -0.714136286],
                        [1.0, 1.772, 0.0]], np.float32)


def _dct_matrix() -> np.ndarray:
    """(8, 8) orthonormal DCT-II: C f C^T is JPEG's forward DCT of an 8x8 block f."""
    k = np.arange(8)
    c = np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    c[0] /= np.sqrt(2)
    return c.astype(np.float32)


_DCT = _dct_matrix()


def _round_hard(x):
    return jnp.round(x)


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _round_smooth(x):
    r = jax.lax.stop_gradient(jnp.round(x))
    return r + (x - r) ** 3


ROUNDINGS: dict[str, Callable] = {"hard": _round_hard, "ste": _round_ste, "smooth": _round_smooth}


def _to_levels(x):
    return (x + 1.0) * 127.5


def _from_levels(v):
    return v / 127.5 - 1.0


def _per_image(value, n: int) -> jax.Array:
    """A scalar or (B,) parameter as float32 (B,)."""
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (n,))


def quantisation_tables(quality) -> tuple[jax.Array, jax.Array]:
    """Luma and chroma tables (..., 8, 8) for quality (...) in 1..100, as libjpeg's
    `jcparam.c::jpeg_quality_scaling` + `jpeg_add_quant_table` with force_baseline (what Pillow's
    `quality=` sets): scale 5000 / q below 50 (integer division), else 200 - 2 q; entries
    floor((base scale + 50) / 100) clamped to 1..255."""
    q = jnp.clip(jnp.asarray(quality, jnp.float32), 1.0, 100.0)[..., None, None]
    scale = jnp.where(q < 50, jnp.floor(5000.0 / q), 200.0 - 2.0 * q)
    def table(base):
        return jnp.clip(jnp.floor((base * scale + 50.0) / 100.0), 1.0, 255.0)
    return table(_LUMA), table(_CHROMA)


def _pad_to(v: jax.Array, multiple: int) -> jax.Array:
    """(B, H, W) padded at the bottom and right by edge replication (libjpeg's
    `expand_right_edge` / bottom-row copies) to multiples of `multiple`."""
    h, w = v.shape[1:]
    return jnp.pad(v, ((0, 0), (0, -h % multiple), (0, -w % multiple)), mode="edge")


def _block_dct_roundtrip(v: jax.Array, table: jax.Array, rnd: Callable) -> jax.Array:
    """One component (B, H, W) in levels, H, W multiples of 8, through level shift, 8x8 DCT,
    quantisation by table (B, 8, 8), dequantisation and inverse DCT."""
    b, h, w = v.shape
    blocks = (v - 128.0).reshape(b, h // 8, 8, w // 8, 8)
    c = jnp.asarray(_DCT)
    coef = jnp.einsum("uk,bikjl,vl->biujv", c, blocks, c, precision=_HIGHEST)
    q = table[:, None, :, None, :]
    coef = rnd(coef / q) * q
    out = jnp.einsum("uk,biujv,vl->bikjl", c, coef, c, precision=_HIGHEST)
    return jnp.clip(rnd(out.reshape(b, h, w) + 128.0), 0.0, 255.0)   # decoded samples: uint8


def _fancy_upsample_matrix(n: int) -> np.ndarray:
    """(2n, n): libjpeg's `jdsample.c::h2v2_fancy_upsample` along one axis, each output sample
    3/4 of the nearer and 1/4 of the farther input sample, edges replicated."""
    m = np.zeros((2 * n, n), np.float32)
    for i in range(n):
        m[2 * i, i] += 0.75
        m[2 * i, max(i - 1, 0)] += 0.25
        m[2 * i + 1, i] += 0.75
        m[2 * i + 1, min(i + 1, n - 1)] += 0.25
    return m


def _chroma_420(v: jax.Array, table: jax.Array, rnd: Callable) -> jax.Array:
    """A chroma component (B, H, W), H, W multiples of 16: 2x2 means (`jcsample.c::
    h2v2_downsample`), the DCT round trip at half size, triangle upsampling."""
    b, h, w = v.shape
    small = v.reshape(b, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    # libjpeg's integer mean (sum + bias) >> 2, bias 1, 2, 1, 2 along a row, is
    # round(mean + bias / 4 - 3 / 8) on quarter levels
    bias = jnp.tile(jnp.asarray([1.0, 2.0]), w // 4) / 4.0 - 0.375
    small = _block_dct_roundtrip(rnd(small + bias), table, rnd)
    uh = jnp.asarray(_fancy_upsample_matrix(h // 2))
    uw = jnp.asarray(_fancy_upsample_matrix(w // 2))
    return rnd(jnp.einsum("hk,bkl,wl->bhw", uh, small, uw, precision=_HIGHEST))


def jpeg(x: jax.Array, quality, *, subsampling: str = "4:2:0",
         rounding: str = "ste") -> jax.Array:
    """JPEG encode + decode of x (B, H, W, 3) in [-1, 1] at quality (B,) or scalar in 1..100
    (Pillow's scale). subsampling '4:2:0' (Pillow's default) or '4:4:4'; rounding one of
    ROUNDINGS, used for the quantiser and wherever libjpeg stores samples as integers (after
    the colour conversion, the chroma means, the inverse DCT, the upsampling and the RGB out)."""
    if subsampling not in ("4:2:0", "4:4:4"):
        raise ValueError(f"jpeg subsampling {subsampling!r}: '4:2:0' or '4:4:4'")
    if rounding not in ROUNDINGS:
        raise ValueError(f"jpeg rounding {rounding!r}: one of {', '.join(ROUNDINGS)}")
    rnd = ROUNDINGS[rounding]
    b, h, w, _ = x.shape
    luma_t, chroma_t = quantisation_tables(_per_image(quality, b))
    ycc = jnp.einsum("bhwc,kc->bkhw", _to_levels(x), jnp.asarray(_RGB_TO_YCC), precision=_HIGHEST)
    ycc = rnd(ycc + jnp.asarray([0.0, 128.0, 128.0])[None, :, None, None])   # libjpeg's uint8
    mcu = 16 if subsampling == "4:2:0" else 8
    ycc = jax.vmap(lambda v: _pad_to(v, mcu), in_axes=1, out_axes=1)(ycc)
    y = _block_dct_roundtrip(ycc[:, 0], luma_t, rnd)
    chroma = _chroma_420 if subsampling == "4:2:0" else _block_dct_roundtrip
    cb, cr = chroma(ycc[:, 1], chroma_t, rnd), chroma(ycc[:, 2], chroma_t, rnd)
    ycc = jnp.stack([y, cb - 128.0, cr - 128.0], axis=-1)[:, :h, :w]
    rgb = jnp.einsum("bhwk,ck->bhwc", ycc, jnp.asarray(_YCC_TO_RGB), precision=_HIGHEST)
    return _from_levels(jnp.clip(rnd(rgb), 0.0, 255.0))


def _bicubic(t):
    """Pillow's bicubic kernel (`Resample.c::bicubic_filter`, a = -0.5), support 2."""
    a = -0.5
    t = jnp.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return jnp.where(t < 1.0, near, jnp.where(t < 2.0, far, 0.0))


def resize_matrix(in_size, out_size, size: int) -> jax.Array:
    """(size, size): Pillow's bicubic resampling from in_size to out_size samples (traced
    scalars <= size), as `Resample.c::precompute_coeffs` weighs them (kernel widened by the
    scale when shrinking, rows normalised); rows >= out_size and columns >= in_size are zero."""
    in_size = jnp.asarray(in_size, jnp.float32)
    out_size = jnp.asarray(out_size, jnp.float32)
    scale = in_size / out_size
    filter_scale = jnp.maximum(scale, 1.0)
    i = jnp.arange(size, dtype=jnp.float32)[:, None]
    j = jnp.arange(size, dtype=jnp.float32)[None, :]
    center = (i + 0.5) * scale
    w = _bicubic((j - center + 0.5) / filter_scale) * (j < in_size)
    w = w / jnp.where(w.sum(axis=1, keepdims=True) == 0, 1.0, w.sum(axis=1, keepdims=True))
    return w * (i < out_size)


def _separable(x: jax.Array, rows: jax.Array, cols: jax.Array, clip: bool) -> jax.Array:
    """Per image (B, H, H) along H and (B, W, W) along W of x (B, H, W, C) in levels: the W
    pass first, as Pillow (clipped to 0..255 after each pass when `clip`)."""
    y = jnp.einsum("bwv,bhvc->bhwc", cols, x, precision=_HIGHEST)
    y = jnp.clip(y, 0.0, 255.0) if clip else y
    y = jnp.einsum("bhk,bkwc->bhwc", rows, y, precision=_HIGHEST)
    return jnp.clip(y, 0.0, 255.0) if clip else y


def resize_round_trip(x: jax.Array, factor) -> jax.Array:
    """x (B, H, W, 3) in [-1, 1] down to round(factor H) x round(factor W) and back up, Pillow
    bicubic both ways (`evaluation.robustness.resize_round_trip` without its uint8 steps);
    factor (B,) or scalar in (0, 1]."""
    b, h, w, _ = x.shape
    f = _per_image(factor, b)

    def matrices(size):
        small = jnp.clip(jnp.round(f * size), 1.0, size)
        down = jax.vmap(lambda n: resize_matrix(size, n, size))(small)
        up = jax.vmap(lambda n: resize_matrix(n, size, size))(small)
        return down, up
    down_h, up_h = matrices(h)
    down_w, up_w = matrices(w)
    small = _separable(_to_levels(x), down_h, down_w, clip=True)
    return _from_levels(_separable(small, up_h, up_w, clip=True))


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """numpy's 'reflect' padding index (edge not repeated) for any offset."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i > n - 1, period - i, i)


def blur_matrix(sigma, size: int, radius: int) -> jax.Array:
    """(size, size): the Gaussian of std sigma (traced scalar, px) with taps out to
    max(1, ceil(3 sigma)) <= radius, normalised, reflected at the edges; sigma 0: identity."""
    sigma = jnp.asarray(sigma, jnp.float32)
    k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    reach = jnp.maximum(1.0, jnp.ceil(3.0 * sigma))
    s = jnp.maximum(sigma, 1e-3)
    taps = jnp.exp(-k ** 2 / (2.0 * s ** 2)) * (jnp.abs(k) <= reach)
    taps = taps / taps.sum()
    src = _reflect(np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :], size)
    onehot = np.eye(size, dtype=np.float32)[src]            # (size, 2r+1, size)
    return jnp.einsum("k,ikj->ij", taps, jnp.asarray(onehot), precision=_HIGHEST)


def gaussian_blur(x: jax.Array, sigma, max_sigma: float | None = None) -> jax.Array:
    """x (B, H, W, 3) in [-1, 1] blurred with std sigma (B,) or scalar, px (>= 0); taps out to
    ceil(3 max_sigma) (default: sigma's value, which must then be concrete)."""
    b, h, w, _ = x.shape
    if max_sigma is None:
        max_sigma = float(np.max(np.asarray(sigma)))
    radius = max(1, math.ceil(3 * max_sigma))
    s = _per_image(sigma, b)
    rows = jax.vmap(lambda v: blur_matrix(v, h, radius))(s)
    cols = rows if h == w else jax.vmap(lambda v: blur_matrix(v, w, radius))(s)
    # the blur is linear: [-1, 1] units pass through unchanged
    return _separable(x, rows, cols, clip=False)


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a channel: its name and the range its parameter is drawn from."""
    name: str                 # 'jpeg', 'jpeg444', 'resize', 'blur' or 'none'
    low: float = 0.0
    high: float = 0.0


_LIMITS = {"jpeg": (1, 100), "jpeg444": (1, 100), "resize": (0, 1), "blur": (0, math.inf)}
# (a range is LOW-HIGH, so no value can be negative)
Spec = tuple[tuple[Op, ...], ...]


def _parse_op(text: str, option: str) -> Op:
    name, _, arg = text.strip().partition(":")
    if name == "none" and not arg:
        return Op("none")
    if name not in _LIMITS or not arg:
        raise ValueError(f"{option}: {text!r} is not one of none, jpeg:Q[-Q], jpeg444:Q[-Q], "
                         "resize:F[-F], blur:S[-S]")
    lo_text, _, hi_text = arg.partition("-")
    try:
        low = float(lo_text)
        high = float(hi_text) if hi_text else low
    except ValueError as e:
        raise ValueError(f"{option}: bad range {arg!r} for {name}") from e
    lo_lim, hi_lim = _LIMITS[name]
    if not low <= high:
        raise ValueError(f"{option}: range {arg!r} of {name} runs backwards")
    if name.startswith("jpeg") and not (lo_lim <= low and high <= hi_lim
                                        and low.is_integer() and high.is_integer()):
        raise ValueError(f"{option}: {name} qualities {arg!r} must be integers in 1..100")
    if name == "resize" and not (0 < low and high <= 1):
        raise ValueError(f"{option}: resize factors {arg!r} must be in (0, 1]")
    return Op(name, low, high)


def parse_spec(spec: str, option: str = "robust") -> Spec:
    """'jpeg:70-95,resize:0.5-1,blur:0-1' -> channels (one per comma), each a chain of Ops
    ('+'). ValueError naming `option` and the part at fault."""
    channels = []
    for part in spec.split(","):
        if not part.strip():
            raise ValueError(f"{option}={spec!r}: empty channel")
        channels.append(tuple(_parse_op(t, f"{option}={spec!r}") for t in part.split("+")))
    return tuple(channels)


def sample(spec: Spec, key: jax.Array, n: int) -> dict:
    """Parameters for n images: 'channel' (n,) int32, each image's channel (uniform), and
    'values', per channel per op (n,) float32 (uniform in the op's range; JPEG qualities
    uniform over the integers)."""
    k_choice, k_values = jax.random.split(key)
    values = []
    for c, chain in enumerate(spec):
        row = []
        for o, op in enumerate(chain):
            k = jax.random.fold_in(k_values, 64 * c + o)
            if op.name.startswith("jpeg"):
                v = jax.random.randint(k, (n,), int(op.low), int(op.high) + 1).astype(jnp.float32)
            else:
                v = jax.random.uniform(k, (n,), jnp.float32, op.low, op.high)
            row.append(v)
        values.append(tuple(row))
    return {"channel": jax.random.randint(k_choice, (n,), 0, len(spec)), "values": tuple(values)}


def _run_op(op: Op, x: jax.Array, value: jax.Array, rounding: str) -> jax.Array:
    if op.name == "none":
        return x
    if op.name in ("jpeg", "jpeg444"):
        return jpeg(x, value, subsampling="4:2:0" if op.name == "jpeg" else "4:4:4",
                    rounding=rounding)
    if op.name == "resize":
        return resize_round_trip(x, value)
    return gaussian_blur(x, value, max_sigma=op.high)


def apply(spec: Spec, params: dict, x: jax.Array, rounding: str = "ste") -> jax.Array:
    """x (B, H, W, 3) in [-1, 1] through each image's sampled channel (`sample`). Every channel
    runs on the whole batch (fixed shapes) and each image keeps its own: the gradient flows
    through the chosen channel only."""
    out = x
    for c, chain in enumerate(spec):
        y = x
        for op, value in zip(chain, params["values"][c]):
            y = _run_op(op, y, value, rounding)
        chosen = (params["channel"] == c)[:, None, None, None]
        out = y if len(spec) == 1 else jnp.where(chosen, y, out)
    return out


_STREAM = 17   # the channel's random stream, apart from the run's other uses of the seed


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The channel key of train step `step` (traced int): a function of (seed, step) only, so
    a resumed run draws the same channels."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)


def step_channel(spec: str, seed: int, step: jax.Array, n: int) -> Callable[[jax.Array], jax.Array]:
    """The train step's channel for n images: images (n, H, W, 3) -> the same, parameters
    drawn from step_key(seed, step) (the same channel for x, x_adv and x_pri of an image)."""
    parsed = parse_spec(spec)
    params = sample(parsed, step_key(seed, step), n)
    return lambda images: apply(parsed, params, images)
