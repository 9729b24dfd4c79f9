"""The generator's eval-mode forward for protection only: BatchNorm folded into the convolutions
at load time, computed in float32 (XLA's convolutions) or bfloat16 (matrix products).

    fast_gen = fast.prepare(gen, dtype="bfloat16")    # gen: generator.Generator (load_trained)
    x_adv = fast_gen(x, eps)                          # = protect_fast(layers, delta_p, x, ...)

On CPU the float32 path computes the residual blocks' 3x3 convolutions by Winograd's F(4x4,
3x3) (`ports.winograd`: 1/4 of the multiply-adds, 2.2x faster there; error ~1e-5 of a conv's
scale, far below a grey level); elsewhere by the backend's convolution. The bfloat16 path's
blocks use F(2x2, 3x3) with bfloat16 products.

`fold_batchnorm` rewrites each conv (transposed too) + eval BatchNorm pair of
`generator.ResnetGenerator` (the reference's `net/advGen.py::ResnetGenerator`) as one conv with
a bias: kernel * s and bias - mean * s, s = scale / sqrt(var + 1e-5) per output channel. The
float32 forward then runs the module's convolutions (same padding, same CPU layout trick as
`ports.layers.reflect_conv2d`) outside the blocks, so it agrees with `generator.protect_eval`
to float32 rounding there and to Winograd's ~1e-5 in the blocks. In both paths the input 7x7
conv of cat(x, prior) is float32, split in two: the prior's half is the same for every image
and computed once (`_input_conv`).

The bfloat16 forward exists because XLA:CPU computes a bfloat16 convolution in float32 (it
converts both operands and calls its float32 convolution), while a plain 2-D dot of bfloat16
operands with float32 accumulation runs in bfloat16 (YNNPACK; AVX512-BF16 or AMX). So each
other convolution becomes patches (slices and concatenation, moved as uint16 bit patterns:
XLA:CPU widens every bfloat16 copy to float32 and back) and a 2-D product: the output 7x7 conv
(3 channels) every tap as an output summed after, the stride-2 convs their nine strided taps;
a transposed k3 s2 conv becomes its four output phases, each a product over the 1, 2 or 4
input pixels it depends on, interleaved after; the residual blocks are bfloat16 Winograd.
Activations are rounded to bfloat16 only where they enter a product; bias, activations, the
residual sum and the output stay float32. A stride-2 conv on fewer than MIN_DOWN_CHANNELS
input channels stays a float32 convolution.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idguard_jax.generator import Generator, GeneratorConfig, generator_input, within_budget
from ports.layers import conv_transpose_forward, reflect_conv, reflect_conv_pairs, reflect_pad
from ports.winograd import conv3x3_winograd, winograd_fits, winograd_kernel

__all__ = ["FastGenerator", "fold_batchnorm", "matrix_layers", "winograd_layers", "prepare",
           "protect_fast", "layer_names",
           "generator_output",
           "DTYPES", "BN_EPSILON"]

DTYPES = ("float32", "bfloat16")
# A stride-2 conv with fewer input channels stays a float32 conv on the matrix path: its strided
# patches cost as much as the product saves. 64 -> 128 at 256 px, batch 4: no faster on a 2-core
# EPYC; on the 2-core Xeon (AMX) the whole bfloat16 forward 0.133 -> 0.123 s per image.
MIN_DOWN_CHANNELS = 64
BN_EPSILON = 1e-5     # ports.layers.BatchNorm's (torch's) epsilon
_DN = ("NHWC", "HWIO", "NHWC")


# ------------------------------------------------------------------------------ folding


def layer_names(cfg: GeneratorConfig) -> dict:
    """The module's submodule names (generator.ResnetGenerator): conv -> its BatchNorm."""
    i = 10 + cfg.n_blocks
    return {"in": ("model0_1", "model0_2"), "down1": ("model0_4", "model0_5"),
            "down2": ("model0_7", "model0_8"),
            "blocks": [f"model0_{10 + b}" for b in range(cfg.n_blocks)],
            "up1": (f"model0_{i}", f"model0_{i + 1}"),
            "up2": (f"model0_{i + 3}", f"model0_{i + 4}"), "out": f"model0_{i + 7}"}


def _fold(kernel, bn_params, bn_stats, out_axis: int) -> dict:
    """One conv kernel and the eval BatchNorm after it -> {'kernel', 'bias'} (float32)."""
    s = bn_params["scale"] * lax.rsqrt(bn_stats["var"] + BN_EPSILON)
    shape = [1] * kernel.ndim
    shape[out_axis] = -1
    return {"kernel": kernel * s.reshape(shape), "bias": bn_params["bias"] - bn_stats["mean"] * s}


def fold_batchnorm(variables: dict, cfg: GeneratorConfig) -> dict:
    """Generator variables {'params', 'batch_stats'} -> float32 layers with BatchNorm folded:
    {'in', 'down1', 'down2', 'up1', 'up2', 'out': {'kernel', 'bias'}, 'blocks': [{'conv1',
    'conv2'}, ...]}. Conv kernels HWIO; the transposed convs keep the module's kernel layout
    (kh, kw, out, in), used with transpose_kernel=True."""
    p, st = variables["params"], variables["batch_stats"]
    names = layer_names(cfg)
    layers = {}
    for key in ("in", "down1", "down2"):
        conv, bn = names[key]
        layers[key] = _fold(p[conv]["kernel"], p[bn], st[bn], out_axis=3)
    for key in ("up1", "up2"):
        conv, bn = names[key]
        layers[key] = _fold(p[conv]["kernel"], p[bn], st[bn], out_axis=2)
    layers["blocks"] = [
        {"conv1": _fold(p[b]["conv_block_1"]["kernel"], p[b]["conv_block_2"],
                        st[b]["conv_block_2"], out_axis=3),
         "conv2": _fold(p[b]["conv_block_5"]["kernel"], p[b]["conv_block_6"],
                        st[b]["conv_block_6"], out_axis=3)} for b in names["blocks"]]
    layers["out"] = {"kernel": p[names["out"]]["kernel"], "bias": p[names["out"]]["bias"]}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layers)


# ------------------------------------------------------------------------------ float32 convs


def _conv(x, kernel, stride: int, pad: int):
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=_DN)


# ------------------------------------------------------------------------------ bfloat16 products


def _bits(x, dtype):
    """float32 activations -> what the patches are built from: for bfloat16 its uint16 bit
    patterns (XLA:CPU widens every bfloat16 copy to float32 and back; integer copies stay
    copies), float32 unchanged (the test of the formulation)."""
    if dtype == jnp.float32:
        return x
    return lax.bitcast_convert_type(x.astype(dtype), jnp.uint16)


def _mm(patches, matrix):
    """(..., K) patches (_bits) @ (K, N) matrix -> (..., N) float32, accumulated in float32."""
    a = patches if patches.dtype == matrix.dtype else lax.bitcast_convert_type(patches,
                                                                               matrix.dtype)
    return lax.dot_general(a, matrix, (((a.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _reflect_conv_mm(x, matrix):
    """ReflectionPad2d(k // 2) + conv k x k on x (B, H, W, C) float32, matrix (kC, kO)
    (`_rows_matrix`): the k horizontal taps are concatenated (kC patches), one product gives
    every vertical tap's contribution (kO), and rows shifted by 0 .. k - 1 are summed."""
    b, h, w, c = x.shape
    k = matrix.shape[0] // c
    xp = reflect_pad(_bits(x, matrix.dtype), k // 2)
    patches = jnp.concatenate([xp[:, :, j:j + w] for j in range(k)], axis=-1)
    y = _mm(patches, matrix).reshape(b, h + k - 1, w, k, -1)
    return sum(y[:, i:i + h, :, i] for i in range(k))


def _taps_conv_mm(x, matrix, out_channels: int):
    """ReflectionPad2d(k // 2) + conv k x k to few output channels on x (B, H, W, C), matrix
    (C, k*k*O) (`_taps_matrix`): one product gives every tap's contribution at every padded
    pixel, and the k*k shifted views are summed (a product to O = 3 columns runs far below
    the dot's peak; to k*k*O = 147 it does not)."""
    b, h, w, _ = x.shape
    k = int(round(np.sqrt(matrix.shape[1] // out_channels)))
    xp = reflect_pad(_bits(x, matrix.dtype), k // 2)
    y = _mm(xp, matrix).reshape(b, h + k - 1, w + k - 1, k * k, out_channels)
    return sum(y[:, i:i + h, j:j + w, k * i + j] for i in range(k) for j in range(k))


def _down_conv_mm(x, matrix):
    """conv 3x3 stride 2 zero padding 1 on x (B, H, W, C), H and W even, matrix (9C, O): the
    nine strided taps concatenated, one product."""
    b, h, w, _ = x.shape
    xp = jnp.pad(_bits(x, matrix.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h:2, j:j + w:2] for i in range(3) for j in range(3)],
                              axis=-1)
    return _mm(patches, matrix)


def _up_conv_mm(x, matrices):
    """ConvTranspose2d(k3, s2, p1, output_padding 1) on x (B, H, W, C) -> (B, 2H, 2W, O).
    Output pixel (2a + p, 2b + q) depends only on inputs (a, b), (a, b + 1), (a + 1, b),
    (a + 1, b + 1) (zero past the border): phase (0, 0) on 1 of them, (0, 1) and (1, 0) on 2,
    (1, 1) on 4, so four products (patches of C, 2C, 2C, 4C; `_up_matrices`) give the four
    phases, interleaved after."""
    b, h, w, _ = x.shape
    dt = matrices["ee"].dtype
    xp = jnp.pad(_bits(x, dt), ((0, 0), (0, 1), (0, 1), (0, 0)))
    x00, x01, x10, x11 = (xp[:, di:di + h, dj:dj + w] for di in (0, 1) for dj in (0, 1))
    ee = _mm(x00, matrices["ee"])
    eo = _mm(jnp.concatenate([x00, x01], axis=-1), matrices["eo"])
    oe = _mm(jnp.concatenate([x00, x10], axis=-1), matrices["oe"])
    oo = _mm(jnp.concatenate([x00, x01, x10, x11], axis=-1), matrices["oo"])
    y = jnp.stack([jnp.stack([ee, eo], axis=3), jnp.stack([oe, oo], axis=3)], axis=2)
    return y.reshape(b, 2 * h, 2 * w, -1)


def _rows_matrix(kernel):
    """HWIO (k, k, C, O) -> (kC, kO): rows (horizontal tap j, c), columns (vertical tap i, o)."""
    k = kernel.shape
    return jnp.transpose(kernel, (1, 2, 0, 3)).reshape(k[1] * k[2], k[0] * k[3])


def _taps_matrix(kernel):
    """HWIO (k, k, C, O) -> (C, k*k*O): columns (tap i, tap j, o)."""
    k = kernel.shape
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(k[2], -1)


def _down_matrix(kernel):
    """HWIO (3, 3, C, O) -> (9C, O), rows (i, j, c) as _down_conv_mm's patches."""
    return kernel.reshape(-1, kernel.shape[-1])


def _up_matrices(kernel) -> dict:
    """The transposed conv's kernel (3, 3, O, C) in the module's layout (the torch weight
    (C, O, kh, kw) transposed (2, 3, 1, 0)) -> _up_conv_mm's four phase matrices. Per axis,
    torch's ConvTranspose2d(k3, s2, p1) adds input a times tap k into output 2a - 1 + k: even
    outputs 2a take tap 1 of input a, odd outputs 2a + 1 tap 2 of input a and tap 0 of a + 1."""
    t = lambda ki, kj: kernel[ki, kj].T                  # torch tap (ki, kj) as (C, O)
    return {"ee": t(1, 1), "eo": jnp.concatenate([t(1, 2), t(1, 0)]),
            "oe": jnp.concatenate([t(2, 1), t(0, 1)]),
            "oo": jnp.concatenate([t(2, 2), t(2, 0), t(0, 2), t(0, 0)])}


def matrix_layers(folded: dict, dtype: str = "bfloat16", block_side: int | None = None) -> dict:
    """Folded float32 layers -> the matrix path's: each conv's kernel rearranged for its
    product and cast to `dtype`; biases and a stride-2 kernel on fewer than MIN_DOWN_CHANNELS
    input channels stay float32. Where `block_side` (the residual blocks' side, image_size /
    4) is even, the blocks' products are F(2x2, 3x3) Winograd's
    (16/36 of the multiply-adds); F(4x4, 3x3) is not used here: its larger coefficients
    amplify bfloat16's rounding (error ~7e-2 of a conv's scale, against ~4e-3)."""
    dt = jnp.dtype(dtype)
    cast = lambda m: m.astype(dt)
    out = {"in": folded["in"],
           "out": {"taps": cast(_taps_matrix(folded["out"]["kernel"])),
                   "bias": folded["out"]["bias"]}}
    for key in ("down1", "down2"):
        kernel = folded[key]["kernel"]
        out[key] = ({"matrix": cast(_down_matrix(kernel)), "bias": folded[key]["bias"]}
                    if kernel.shape[2] >= MIN_DOWN_CHANNELS else folded[key])
    for key in ("up1", "up2"):
        out[key] = {"matrix": jax.tree.map(cast, _up_matrices(folded[key]["kernel"])),
                    "bias": folded[key]["bias"]}
    if block_side is not None and winograd_fits((1, block_side, block_side), 2):
        out["blocks"] = _winograd_blocks(folded["blocks"], 2, dt)
    else:
        out["blocks"] = [{n: {"matrix": cast(_rows_matrix(blk[n]["kernel"])),
                              "bias": blk[n]["bias"]} for n in ("conv1", "conv2")}
                         for blk in folded["blocks"]]
    return out


def _winograd_blocks(blocks: list, tile: int, dtype) -> list:
    """Each block conv's Winograd form as a tuple of its (tile + 2)^2 (C, O) matrices."""
    def form(kernel):
        u = winograd_kernel(kernel, tile).astype(dtype)
        return tuple(u[i] for i in range(u.shape[0]))
    return [{n: {"winograd": form(blk[n]["kernel"]), "bias": blk[n]["bias"]}
             for n in ("conv1", "conv2")} for blk in blocks]


def winograd_layers(folded: dict, cfg: GeneratorConfig) -> dict:
    """Folded float32 layers with each residual block's kernel in its Winograd form
    ({'winograd': (36 or 16, C, O), 'bias'}): F(4x4, 3x3) where the blocks' side
    (image_size / 4) is a multiple of 4, else F(2x2, 3x3) where it is even; every other layer
    unchanged."""
    side = (1, cfg.image_size // 4, cfg.image_size // 4)
    for tile in (4, 2):
        if winograd_fits(side, tile):
            return {**folded, "blocks": _winograd_blocks(folded["blocks"], tile, jnp.float32)}
    return folded


# ------------------------------------------------------------------------------ the forward


def _input_conv(layer: dict, x, p):
    """The input 7x7 conv (float32) of G's input cat(x, p), x (B, H, W, 3), p (H, W, 3) the
    clamped prior, the same for every image: conv(x, kernel[:, :, :3]) + conv(p, kernel[:, :,
    3:]), the prior's half computed once, each on pixel pairs on a CPU where the width is
    even (`ports.layers.reflect_conv_pairs`). 2-core Xeon, batch 4 at 256 px: the 6-channel conv
    118 ms, split 82 + 10 ms, on pairs 56 + 8 ms; its bfloat16 form as a product was 219 ms
    (6 or 3 input channels give the product too short a contraction)."""
    kernel = layer["kernel"]
    c = x.shape[-1]
    pairs = jax.default_backend() == "cpu" and x.shape[2] % 2 == 0
    conv = reflect_conv_pairs if pairs else reflect_conv
    return conv(x, kernel[:, :, :c]) + conv(p[None], kernel[:, :, c:]) + layer["bias"]


def _forward(layers: dict, x, p):
    """The folded generator on G's input cat(x, p), x (B, H, W, 3) float32 and the clamped
    prior p (H, W, 3) -> pre-tanh (B, H, W, 3): the input conv is float32 (_input_conv); a
    layer holding a 'matrix' (matrix_layers) is a bfloat16 product, one holding 'winograd'
    (residual blocks only) a Winograd convolution with products in its kernel's dtype, one
    holding a 'kernel' a float32 convolution."""
    def lin(y, layer):
        return y + layer["bias"]

    def conv(h, layer, matrix_form, kernel_form):
        if "matrix" in layer:
            return lin(matrix_form(h, layer["matrix"]), layer)
        if "winograd" in layer:
            return lin(conv3x3_winograd(reflect_pad(h, 1), layer["winograd"]), layer)
        return lin(kernel_form(h, layer["kernel"]), layer)

    h = jax.nn.selu(_input_conv(layers["in"], x, p))
    for key in ("down1", "down2"):
        h = jax.nn.selu(conv(h, layers[key], _down_conv_mm, lambda x, k: _conv(x, k, 2, 1)))
    for blk in layers["blocks"]:
        r = jax.nn.relu(conv(h, blk["conv1"], _reflect_conv_mm, reflect_conv))
        h = h + conv(r, blk["conv2"], _reflect_conv_mm, reflect_conv)
    for key in ("up1", "up2"):
        h = jax.nn.selu(conv(h, layers[key], _up_conv_mm,
                             lambda x, k: conv_transpose_forward(x, k, (2, 1, 1))))
    out = layers["out"]
    if "taps" in out:
        return lin(_taps_conv_mm(h, out["taps"], out["bias"].shape[0]), out)
    return lin(reflect_conv(h, out["kernel"]), out)


def _generator_output(layers: dict, delta_p, x, eps: float):
    """tanh(G(cat(x, clamp(delta_p, +-eps)))) (B, S, S, 3) float32, before its clamp to eps."""
    p = generator_input(delta_p, x, eps)[0]
    return jnp.tanh(_forward(layers, x, p))


@functools.partial(jax.jit, static_argnames=("config", "eps"))
def generator_output(layers: dict, delta_p: jax.Array, x: jax.Array, *, config: GeneratorConfig,
                     eps: float) -> jax.Array:
    """The perturbation before its clamp to +-eps (B, S, S, 3) float32 (what a check of how
    many values the clamp cuts needs); x (B, S, S, 3) in [-1, 1]."""
    return _generator_output(layers, delta_p, x.astype(jnp.float32), eps)


@functools.partial(jax.jit, static_argnames=("config", "eps"))
def protect_fast(layers: dict, delta_p: jax.Array, x: jax.Array, *, config: GeneratorConfig,
                 eps: float) -> jax.Array:
    """generator.protect_eval on prepared layers: x (B, S, S, 3) float in [-1, 1] -> x_adv
    (B, S, S, 3) float32, |x_adv - x| <= eps (the same clamps as generator.perturb). `layers`
    come from `prepare` (float32: fold_batchnorm's; bfloat16: matrix_layers')."""
    x = x.astype(jnp.float32)
    return within_budget(x, _generator_output(layers, delta_p, x, eps), eps)


@dataclasses.dataclass(frozen=True)
class FastGenerator:
    """A generator prepared for protection: config, layers (see protect_fast), delta_p (S, S, 3),
    dtype ('float32' or 'bfloat16')."""
    config: GeneratorConfig
    layers: Any
    delta_p: jax.Array
    dtype: str = "float32"

    def __call__(self, x, eps: float) -> jax.Array:
        return protect_fast(self.layers, self.delta_p, x, config=self.config, eps=eps)


def prepare(gen: Generator, dtype: str = "float32") -> FastGenerator:
    """A loaded generator (generator.load_trained) with its BatchNorm folded, for `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    folded = jax.jit(fold_batchnorm, static_argnums=1)(gen.variables, gen.config)
    if dtype == "bfloat16":
        layers = jax.jit(matrix_layers, static_argnums=(1, 2))(folded, dtype,
                                                               gen.config.image_size // 4)
    elif jax.default_backend() == "cpu":
        layers = jax.jit(winograd_layers, static_argnums=1)(folded, gen.config)
    else:
        layers = folded
    return FastGenerator(gen.config, layers, gen.delta_p, dtype)
