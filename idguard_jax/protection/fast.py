"""The generator's eval-mode forward for protection only: BatchNorm folded into the convolutions
at load time, computed in float32 (XLA's convolutions) or bfloat16 (matrix products).

    fast_gen = fast.prepare(gen, dtype="bfloat16")    # gen: generator.Generator (load_trained)
    x_adv = fast_gen(x, eps)                          # = protect_fast(layers, delta_p, x, ...)

On CPU the float32 path computes the residual blocks' 3x3 convolutions by Winograd's F(4x4,
3x3) (`ports.winograd`: 1/4 of the multiply-adds, 2.2x faster there; error ~1e-5 of a conv's
scale, far below a grey level), and the output conv (64 -> 3 channels) as a float32 product on
space_to_depth cells (`cpu_float32_layers`); elsewhere by the backend's convolution. The
bfloat16 path's blocks use F(2x2, 3x3) with bfloat16 products.

`fold_batchnorm` rewrites each conv (transposed too) + eval BatchNorm pair of
`generator.ResnetGenerator` (the reference's `net/advGen.py::ResnetGenerator`) as one conv with
a bias: kernel * s and bias - mean * s, s = scale / sqrt(var + 1e-5) per output channel. The
float32 forward then runs the module's convolutions (same padding, same CPU layout trick as
`ports.layers.reflect_conv2d`) outside the blocks, so it agrees with `generator.protect_eval`
to float32 rounding there and to Winograd's ~1e-5 in the blocks. Its input 7x7 conv of
cat(x, prior) is split in two: the prior's half is the same for every image and computed
once per batch (`_input_conv`).

The bfloat16 forward exists because XLA:CPU computes a bfloat16 convolution in float32 (it
converts both operands and calls its float32 convolution), while a plain 2-D dot of bfloat16
operands with float32 accumulation runs in bfloat16 (YNNPACK; AVX512-BF16 or AMX). So each
convolution becomes patches (slices and concatenation, moved as uint16 bit patterns: XLA:CPU
widens every bfloat16 copy to float32 and back) and a 2-D product. The full-resolution layers
work on space_to_depth cells (2 x 2 pixels as channels), so that patches are copies of whole
cells and products have long contractions and many columns: the input 7x7 conv (the prior's
half once per batch), the first stride-2 conv (its input's cells: four neighbouring cells'
channel ranges), both transposed k3 s2 convs (one product per input pixel giving its output
cell), the output 7x7 conv (each padded cell's product to all 16 cell taps, summed after);
the second stride-2 conv takes its nine strided taps, the residual blocks are bfloat16
Winograd F(2x2, 3x3). Activations are rounded to bfloat16 only where they enter a product;
bias, activations, the residual sum and the output stay float32. A second stride-2 conv on
fewer than MIN_DOWN_CHANNELS input channels stays a float32 convolution.
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
from ports.layers import (cell_kernel, cell_taps, conv_transpose_forward, depth_to_space,
                          reflect_conv, reflect_conv_pairs, reflect_pad, space_to_depth,
                          sum_cell_taps)
from ports.winograd import bfloat16_bits, conv3x3_winograd, winograd_fits, winograd_kernel

__all__ = ["FastGenerator", "fold_batchnorm", "matrix_layers", "winograd_layers",
           "cpu_float32_layers", "prepare",
           "protect_fast", "layer_names",
           "generator_output",
           "DTYPES", "BN_EPSILON"]

DTYPES = ("float32", "bfloat16")
# The second stride-2 conv with fewer input channels stays a float32 conv on the matrix path:
# strided patches of few channels cost as much as the product saves (the first, 64 -> 128 at
# 256 px, batch 4, was no faster on a 2-core EPYC before it took its input's cells).
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


def _strided_conv(x, kernel):
    """conv 3x3 stride 2 zero padding 1 (the generator's down-sampling), float32."""
    return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)


# ------------------------------------------------------------------------------ bfloat16 products


def _bits(x, dtype):
    """float32 activations -> what the patches are built from: for bfloat16 its uint16 bit
    patterns (XLA:CPU widens every bfloat16 copy to float32 and back; integer copies stay
    copies), rounded by integer ops (`ports.winograd.bfloat16_bits`: XLA:CPU's own convert
    after a SELU ran 2x slower, 20 against 12 ms on 16.7M values); float32 unchanged (the
    test of the formulation)."""
    if dtype == jnp.float32 or x.dtype == jnp.uint16:
        return x
    return bfloat16_bits(x)


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


def _down_conv_mm(x, matrix):
    """conv 3x3 stride 2 zero padding 1 on x (B, H, W, C), H and W even, matrix (9C, O): the
    nine strided taps concatenated, one product."""
    b, h, w, _ = x.shape
    xp = jnp.pad(_bits(x, matrix.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h:2, j:j + w:2] for i in range(3) for j in range(3)],
                              axis=-1)
    return _mm(patches, matrix)


# Space-to-depth (ports.layers.space_to_depth): the full-resolution layers (the input and
# output 7x7 convs, the first stride-2 conv, the transposed convs) work on 2 x 2 pixel cells
# as channels, so that every patch is a copy of whole cells (no strided pixel gathers) and
# every product has a long contraction and many columns (3 input or output channels alone
# run far below the dot's peak).

def _input_patches_s2d(x, dtype, pad: int):
    """x (B, H, W, C) float32 -> the im2col patches of the reflect-padded input's cells for
    `cell_kernel` with n = pad + 1: (B, H/2, W/2, n * n * 4C) bits."""
    n = pad + 1
    xs = space_to_depth(_bits(reflect_pad(x, pad), dtype))
    h, w = xs.shape[1] - n + 1, xs.shape[2] - n + 1
    return jnp.concatenate([xs[:, i:i + h, j:j + w] for i in range(n) for j in range(n)], -1)


def _input_conv_s2d(layer: dict, x, p):
    """The input 7x7 conv of cat(x, p) on space_to_depth cells: x (B, H, W, 3) float32, p
    (H, W, 3) the clamped prior -> (B, H/2, W/2, 4 * 64) float32 cells, bias added. The
    image's half is one product (patches of 16 cells x 12 values); the prior's half is the
    same for every image: the same product, once per batch (a convolution's output
    rearranged into cells was re-gathered per image inside the sum: 70 against 33 ms at
    256 px, batch 4; XLA:CPU's convolution of the prior's cells took 18 ms, its float32
    product 14)."""
    matrix, prior_matrix = layer["cells_matrix"], layer["prior_cells_matrix"]
    pad = int(round(np.sqrt(matrix.shape[0] // (4 * x.shape[-1])))) - 1
    prior = _mm(_input_patches_s2d(p[None], prior_matrix.dtype, pad), prior_matrix)
    return _mm(_input_patches_s2d(x, matrix.dtype, pad), matrix) + prior + layer["bias"]


def _down_conv_s2d(cells, matrix):
    """conv 3x3 stride 2 zero padding 1 of an image given as its space_to_depth cells (B, h, w,
    4C) float32 -> (B, h, w, O), matrix (9C, O) (`_down_cells_matrix`). Output pixel a reads
    input rows 2a - 1, 2a, 2a + 1: row phase 1 of cell a - 1 and both phases of cell a; so the
    patches are whole channel ranges of four neighbouring cells (9C values, no gathers)."""
    b, h, w, c4 = cells.shape
    c = c4 // 4
    cp = jnp.pad(_bits(cells, matrix.dtype), ((0, 0), (1, 0), (1, 0), (0, 0)))
    cell = lambda di, dj: cp[:, di:di + h, dj:dj + w]
    up_left, up, left, here = cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1)
    phase = lambda a, pi, pj: a[..., (2 * pi + pj) * c:(2 * pi + pj + 1) * c]
    patches = jnp.concatenate([phase(up_left, 1, 1), up[..., 2 * c:], phase(left, 0, 1),
                               phase(left, 1, 1), here], axis=-1)
    return _mm(patches, matrix)


def _down_cells_matrix(kernel):
    """HWIO (3, 3, C, O) -> (9C, O), rows in `_down_conv_s2d`'s patch order."""
    order = ((0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (1, 1), (1, 2), (2, 1), (2, 2))
    return jnp.concatenate([kernel[i, j] for i, j in order], axis=0)


def _up_conv_s2d(x, matrix):
    """ConvTranspose2d(k3, s2, p1, output_padding 1) on x (B, H, W, C) -> its output's
    space_to_depth cells (B, H, W, 4O): output cell (a, b) depends only on inputs (a, b),
    (a, b + 1), (a + 1, b), (a + 1, b + 1) (zero past the border), so one product of their
    4C values with `_up_cells_matrix` (zeros where a phase does not read an input; 16/9 of
    the multiply-adds, but one product with 4O columns and no interleaving)."""
    b, h, w, _ = x.shape
    xp = jnp.pad(_bits(x, matrix.dtype), ((0, 0), (0, 1), (0, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, di:di + h, dj:dj + w] for di in (0, 1) for dj in (0, 1)],
                              axis=-1)
    return _mm(patches, matrix)


def _up_cells_matrix(kernel):
    """The transposed conv's kernel (3, 3, O, C) in the module's layout (the torch weight
    (C, O, kh, kw) transposed (2, 3, 1, 0)) -> (4C, 4O): rows (input offset (di, dj), c),
    columns (output phase (p, q), o). Per axis, torch's ConvTranspose2d(k3, s2, p1) adds input
    a times tap k into output 2a - 1 + k: phase 0 (output 2a) takes tap 1 of input a, phase 1
    (2a + 1) tap 2 of input a and tap 0 of input a + 1."""
    tap = {(0, 0): 1, (1, 0): 2, (1, 1): 0}            # (phase, input offset) -> torch tap
    o, c = kernel.shape[2], kernel.shape[3]
    zero = jnp.zeros((c, o), kernel.dtype)
    rows = [jnp.concatenate([kernel[tap[p, di], tap[q, dj]].T
                             if (p, di) in tap and (q, dj) in tap else zero
                             for p in (0, 1) for q in (0, 1)], axis=1)
            for di in (0, 1) for dj in (0, 1)]
    return jnp.concatenate(rows, axis=0)


def _output_conv_s2d(x, taps, out_channels: int):
    """ReflectionPad2d(k // 2) + conv k x k (k odd) to few output channels of x (B, H, W, C)
    -> (B, H, W, O), taps (4C, n * n * 4O), n = k // 2 + 1 (`cell_taps`): one
    product of each padded input cell gives every cell tap's contribution, and the n * n
    shifted views are summed in cells (4O = 12 values wide, against 3 per pixel)."""
    n = int(round(np.sqrt(taps.shape[1] // (4 * out_channels))))
    k = 2 * n - 1
    xs = space_to_depth(_bits(reflect_pad(x, k // 2), taps.dtype))
    return depth_to_space(sum_cell_taps(_mm(xs, taps), n))


def _selu(x):
    """SELU as scale * (max(x, 0) + alpha * (exp(min(x, 0)) - 1)): ~2x faster than
    jax.nn.selu (expm1 and selects) on XLA:CPU (16.7M values: 14 against 26 ms), within ~1e-7
    of it (exp - 1 against expm1 near 0: float32 rounding of the activations' scale); the
    float32 forward 201 -> 194 ms per image at 256 px, batch 4 (2-core Xeon)."""
    alpha, scale = 1.6732632423543772, 1.0507009873554805
    return scale * (jnp.maximum(x, 0) + alpha * (jnp.exp(jnp.minimum(x, 0)) - 1))


def _rows_matrix(kernel):
    """HWIO (k, k, C, O) -> (kC, kO): rows (horizontal tap j, c), columns (vertical tap i, o)."""
    k = kernel.shape
    return jnp.transpose(kernel, (1, 2, 0, 3)).reshape(k[1] * k[2], k[0] * k[3])


def _down_matrix(kernel):
    """HWIO (3, 3, C, O) -> (9C, O), rows (i, j, c) as _down_conv_mm's patches."""
    return kernel.reshape(-1, kernel.shape[-1])


def matrix_layers(folded: dict, dtype: str = "bfloat16", block_side: int | None = None) -> dict:
    """Folded float32 layers -> the matrix path's: each conv's kernel rearranged for its
    product and cast to `dtype`, biases float32. The full-resolution layers work on
    space_to_depth cells: 'in' {'cells_matrix', 'prior_cells_matrix' (the prior's half),
    'bias'}, 'down1' and the transposed convs {'cells_matrix', 'bias'} (the bias of
    a layer with cell outputs tiled over the 4 phases), 'out' {'cells_taps', 'bias'}; 'down2'
    {'matrix'} (its strided taps), or its float32 'kernel' on fewer than MIN_DOWN_CHANNELS
    input channels. Where `block_side` (the residual blocks' side, image_size / 4) is even,
    the blocks' products are F(2x2, 3x3) Winograd's (16/36 of the multiply-adds; F(4x4, 3x3)
    was slower here: its 36 products per tile are smaller, and its larger coefficients
    amplify bfloat16's rounding, ~7e-2 of a conv's scale against ~4e-3)."""
    dt = jnp.dtype(dtype)
    cast = lambda m: m.astype(dt)
    kin = folded["in"]["kernel"]
    c = kin.shape[2] // 2                              # image channels; the prior's follow
    cells = cell_kernel(kin[:, :, :c])
    out = {"in": {"cells_matrix": cast(cells.reshape(-1, cells.shape[-1])),
                  "prior_cells_matrix": cast(cell_kernel(kin[:, :, c:]).reshape(-1,
                                                                                 cells.shape[-1])),
                  "bias": jnp.tile(folded["in"]["bias"], 4)},
           "down1": {"cells_matrix": cast(_down_cells_matrix(folded["down1"]["kernel"])),
                     "bias": folded["down1"]["bias"]},
           "out": {"cells_taps": cast(cell_taps(folded["out"]["kernel"])),
                   "bias": folded["out"]["bias"]}}
    kernel = folded["down2"]["kernel"]
    out["down2"] = ({"matrix": cast(_down_matrix(kernel)), "bias": folded["down2"]["bias"]}
                    if kernel.shape[2] >= MIN_DOWN_CHANNELS else folded["down2"])
    for key in ("up1", "up2"):
        out[key] = {"cells_matrix": cast(_up_cells_matrix(folded[key]["kernel"])),
                    "bias": jnp.tile(folded[key]["bias"], 4)}
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


def cpu_float32_layers(folded: dict, cfg: GeneratorConfig) -> dict:
    """The float32 path's layers on CPU: `winograd_layers`, and the output conv (64 -> 3
    channels) as its float32 cell taps ({'cells_taps', 'bias'}, `_output_conv_s2d`): a
    product, which XLA:CPU keeps on YNNPACK where convolutions go to its own kernels
    (`idguard_jax.xla_cpu`, every command line): there this conv took 190 ms at 256 px, batch
    4 (2-core Xeon), the product 50 (on XLA's default routing: YNNPACK's conv 48, the product
    54)."""
    out = folded["out"]
    return {**winograd_layers(folded, cfg),
            "out": {"cells_taps": cell_taps(out["kernel"]), "bias": out["bias"]}}


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


def _conv(h, layer, matrix_form, kernel_form):
    """One conv + bias by the form its layer holds: 'matrix' (a product, matrix_layers),
    'winograd' (a residual block's 3x3: Winograd with products in its kernel's dtype) or
    'kernel' (a float32 convolution)."""
    if "matrix" in layer:
        y = matrix_form(h, layer["matrix"])
    elif "winograd" in layer:
        y = conv3x3_winograd(reflect_pad(h, 1), layer["winograd"])
    else:
        y = kernel_form(h, layer["kernel"])
    return y + layer["bias"]


def _blocks(blocks: list, h):
    """The residual blocks: h + conv2(relu(conv1(h))), each conv reflect-padded 3x3."""
    for blk in blocks:
        r = jax.nn.relu(_conv(h, blk["conv1"], _reflect_conv_mm, reflect_conv))
        h = h + _conv(r, blk["conv2"], _reflect_conv_mm, reflect_conv)
    return h


def _float32_forward(layers: dict, x, p):
    """fold_batchnorm's (or cpu_float32_layers') layers: XLA's float32 convolutions, the
    blocks by Winograd and the output conv by its cell taps where they hold them."""
    h = _selu(_input_conv(layers["in"], x, p))
    for key in ("down1", "down2"):
        h = _selu(layers[key]["bias"] + _strided_conv(h, layers[key]["kernel"]))
    h = _blocks(layers["blocks"], h)
    for key in ("up1", "up2"):
        h = _selu(conv_transpose_forward(h, layers[key]["kernel"], (2, 1, 1))
                  + layers[key]["bias"])
    return _output_conv(layers["out"], h)


def _output_conv(layer: dict, h):
    """The output 7x7 conv + bias by the form its layer holds: 'cells_taps' (a product on
    space_to_depth cells) or 'kernel' (a convolution)."""
    if "cells_taps" in layer:
        y = _output_conv_s2d(h, layer["cells_taps"], layer["bias"].shape[0])
    else:
        y = reflect_conv(h, layer["kernel"])
    return y + layer["bias"]


def _matrix_forward(layers: dict, x, p):
    """matrix_layers' layers: the input conv, down1, the transposed convs and the output conv
    on space_to_depth cells, down2 by its strided taps, the blocks by Winograd (or row
    products); every product's operands in the matrices' dtype, everything between float32."""
    dt = layers["down1"]["cells_matrix"].dtype
    h = _bits(_selu(_input_conv_s2d(layers["in"], x, p)), dt)           # cells
    h = _selu(_down_conv_s2d(h, layers["down1"]["cells_matrix"]) + layers["down1"]["bias"])
    h = _selu(_conv(h, layers["down2"], _down_conv_mm, _strided_conv))
    h = _blocks(layers["blocks"], h)
    for key in ("up1", "up2"):
        # the output's bits in cells (an elementwise pass), then rearranged as 2-byte values
        cells = _up_conv_s2d(h, layers[key]["cells_matrix"]) + layers[key]["bias"]
        h = depth_to_space(_bits(_selu(cells), dt))
    return _output_conv(layers["out"], h)


def _forward(layers: dict, x, p):
    """The folded generator on G's input cat(x, p), x (B, H, W, 3) float32 and the clamped
    prior p (H, W, 3) -> pre-tanh (B, H, W, 3), by the path its layers were prepared for."""
    if "cells_matrix" in layers["in"]:
        return _matrix_forward(layers, x, p)
    return _float32_forward(layers, x, p)


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
        layers = jax.jit(cpu_float32_layers, static_argnums=1)(folded, gen.config)
    else:
        layers = folded
    return FastGenerator(gen.config, layers, gen.delta_p, dtype)
