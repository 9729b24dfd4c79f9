"""PyTorch-equivalent building blocks, NHWC, shared by every port and by ID-Guard's generator.

Each block reproduces what the named torch layer computes, including the traps listed in
DEVELOPERS.md: explicit padding everywhere (Flax 'SAME' differs from torch for k3 s2 convs and for
transposed convs with output_padding), eps 1e-5 in the norms, statistics in float32, and the
unbiased running-variance update of torch's BatchNorm.

Parameter names follow Flax conventions (`kernel`, `bias`, `scale`; BatchNorm running statistics
`mean`/`var` in the `batch_stats` collection) so that `convert.torch_io` maps torch state_dicts
onto them with one generic rule.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.custom_derivatives import SymbolicZero

from ports.winograd import conv3x3_winograd, winograd_fits, winograd_kernel

Dtype = Any
Initializer = Callable[..., jax.Array]

__all__ = [
    "affine_params", "conv2d", "reflect_conv2d", "reflect_conv", "conv_transpose2d",
    "ConvTranspose2d", "conv_transpose", "conv_transpose_subpixel", "conv_transpose_phases",
    "conv_transpose_forward", "subpixel_fits", "cpu_conv", "conv_space_to_depth", "conv_by_taps",
    "conv_cells", "cell_kernel", "cell_taps", "sum_cell_taps",
    "dense",
    "reflect_pad", "reflect_conv_pairs", "space_to_depth", "depth_to_space", "Conv3x3Resampled",
    "upsample2_conv3x3",
    "conv3x3_avg_pool2",
    "InstanceNorm", "BatchNorm", "normalize", "clamp", "PReLU", "flatten_nchw", "max_pool_2x2",
]


def conv2d(features: int, kernel: int, stride: int = 1, padding: int = 0, *, bias: bool,
           name: str | None = None, dtype: Dtype = None,
           kernel_init: Initializer = nn.initializers.lecun_normal()) -> nn.Conv:
    """torch.nn.Conv2d(in, features, kernel, stride, padding, bias=bias) with zero padding.

    Kernel layout HWIO = torch weight (O, I, kh, kw) transposed (2, 3, 1, 0). On CPU it runs
    through `cpu_conv`: a strided one takes its input gradient by space-to-depth, a large
    3x3 one is computed by Winograd, one to or from few channels on 2 x 2 cells
    (`conv_cells`), a wide one takes its kernel gradient tap by tap.
    """
    fast = jax.default_backend() == "cpu"
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=bias,
                   dtype=dtype, kernel_init=kernel_init, name=name,
                   conv_general_dilated=cpu_conv if fast else None)


_NHWC = ("NHWC", "HWIO", "NHWC")
# A 3x3 stride-1 float32 conv goes Winograd on CPU from WINOGRAD_MIN_CHANNELS channels in and
# out: F(4x4, 3x3) from WINOGRAD_LARGE_PIXELS output pixels per image (2-core EPYC, forward and
# input gradient: 256 ch at 64 px, batch 2, 21.5 -> 16.9 ms; 128 ch at 64 px 10.3 -> 8.2 ms),
# F(2x2, 3x3) from WINOGRAD_MIN_PIXELS below that (2-core Xeon, batch 8: 128 ch at 28 px
# 15.0 -> 9.7 ms, tile 4 18.4; 256 ch at 14 px 15.7 -> 10.0 ms: ArcFace's stages; at 56 px and
# 64 ch tile 2 gained 10%, too little to count on).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_LARGE_PIXELS = 64 * 64
WINOGRAD_MIN_PIXELS = 14 * 14


def _winograd_tile(lhs, rhs, window_strides, padding) -> int:
    """The Winograd tile `cpu_conv` computes this conv with, 0 for none."""
    kh, kw, c, o = rhs.shape
    pixels = lhs.shape[1] * lhs.shape[2]
    if not ((kh, kw) == (3, 3) and tuple(window_strides) == (1, 1)
            and tuple(tuple(p) for p in padding) == ((1, 1), (1, 1))
            and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and min(c, o) >= WINOGRAD_MIN_CHANNELS and pixels >= WINOGRAD_MIN_PIXELS):
        return 0
    tile = 4 if pixels >= WINOGRAD_LARGE_PIXELS else 2
    return tile if winograd_fits(lhs.shape, tile) else 0


def cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None):
    """`jax.lax.conv_general_dilated` (nn.Conv's `conv_general_dilated`) in the forms XLA:CPU
    runs fast, for a plain NHWC convolution:

    - strided: the forward is XLA's own, the input gradient goes through
      `conv_space_to_depth`. XLA:CPU runs the direct input gradient of a strided conv
      (an input-dilated convolution) on its generic path: k4 s2, 64 -> 128 channels at 256 px,
      batch 4: 215 ms against 81 ms (the StarGAN family's and RelGAN's downsampling).
    - 3x3, stride 1, zero padding 1, float32, >= WINOGRAD_MIN_PIXELS and
      WINOGRAD_MIN_CHANNELS: `conv3x3_same`, forward and input gradient, with
      F(4x4, 3x3) from WINOGRAD_LARGE_PIXELS (the targets' residual blocks; error ~1e-5 of
      the output's scale), else F(2x2, 3x3) (ArcFace's stages at 28 and 14 px; ~1e-6).
    - stride 1, float32, a square kernel k >= 3, <= FEW_CHANNELS channels out and
      >= MANY_CHANNELS in: `conv_cells`, forward and both gradients (one product each);
      <= FEW_CHANNELS in and >= MANY_CHANNELS out: XLA's forward and kernel gradient, the
      input gradient (a conv to few channels) by `conv_cells`.
    - any other plain one: XLA's forward and input gradient.
    Every plain one with >= TAPS_MIN_CHANNELS channels in and out takes its kernel gradient by
    `conv_by_taps` (one 2-D product per tap). Anything else: XLA's convolution."""
    args = (lhs, rhs, window_strides, padding)
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  precision=precision)
    plain = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1
             and precision is None
             and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
             and dimension_numbers in (None, jax.lax.conv_dimension_numbers(
                 lhs.shape, rhs.shape, _NHWC)))
    if not plain:
        return jax.lax.conv_general_dilated(*args, **kwargs)
    geometry = (tuple(window_strides), tuple(tuple(p) for p in padding))
    if any(s > 1 for s in window_strides):
        fn = _strided_conv_fast_dx_dk if _taps_worth(rhs.shape) else _strided_conv_fast_dx
        return fn(lhs, rhs, geometry)
    tile = _winograd_tile(*args)
    if tile:
        return conv3x3_same(lhs, rhs, tile)
    few = _few_channels_side(lhs, rhs)
    if few == "outputs":
        return _conv_few_outputs(lhs, rhs, geometry)
    if few == "inputs":
        return _conv_few_inputs(lhs, rhs, geometry)
    if _taps_worth(rhs.shape):
        return _conv_fast_dk(lhs, rhs, geometry)
    return jax.lax.conv_general_dilated(*args, **kwargs)


def _direct_conv(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    strides, padding = geometry
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def conv_by_taps(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    """The convolution of `_direct_conv` as a sum over the kernel's taps of 2-D products
    (B*Ho*Wo, I) @ (I, O), each of a strided view of the padded input. Its forward is slow;
    it exists for its transpose in the kernel: per tap ONE product view^T @ g, contracting
    over batch and pixels (B*Ho*Wo). XLA:CPU computes the direct conv's kernel gradient as a
    convolution whose features are the batch (a contraction of 2 at batch 2): 3x3, 256
    channels at 64 px, batch 2, ~265 ms per conv on a 2-core Xeon, 12 of them in the
    generator. geometry: (strides (sh, sw), padding ((lo, hi), (lo, hi))), a negative pad a
    crop."""
    (sh, sw), padding = geometry
    kh, kw, i, o = kernel.shape
    xp = _pad_input(x, padding)
    b, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = None
    for ky in range(kh):
        for kx in range(kw):
            view = jax.lax.slice(xp, (0, ky, kx, 0),
                                 (b, ky + sh * (ho - 1) + 1, kx + sw * (wo - 1) + 1, i),
                                 (1, sh, sw, 1))
            term = jnp.dot(view.reshape(-1, i), kernel[ky, kx])
            y = term if y is None else y + term
    return y.reshape(b, ho, wo, o)


def conv_space_to_depth(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    """A strided convolution as a stride-1 one: the zero-padded input rearranged space-to-depth
    (each stride x stride cell into channels), the kernel (kh, kw, I, O) HWIO zero-filled to a
    multiple of the stride and rearranged alike. The same numbers to float32 rounding; every
    gradient of it is an ordinary convolution. geometry: (strides (sh, sw), padding
    ((lo, hi), (lo, hi)))."""
    strides, padding = geometry
    c = x.shape[3]
    kh, kw, _, o = kernel.shape
    pads, kpads = [], []
    for n, k, s, (lo, hi) in zip(x.shape[1:3], (kh, kw), strides, padding):
        out = (n + lo + hi - k) // s + 1
        kp = -(-k // s) * s                       # kernel zero-filled to a multiple of s
        rows = s * (out - 1) + kp                 # the padded input rows the output reads
        pads.append((lo, rows - n - lo, 0))       # a negative high pad crops unread rows
        kpads.append((0, kp - k))
    sh, sw = strides
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
    xs = space_to_depth(xp, (sh, sw))
    kz = jnp.pad(kernel, (*kpads, (0, 0), (0, 0)))
    uh, uw = kz.shape[0] // sh, kz.shape[1] // sw
    ks = kz.reshape(uh, sh, uw, sw, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(
        uh, uw, sh * sw * c, o)
    return jax.lax.conv_general_dilated(xs, ks, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=_NHWC)


def space_to_depth(x: jax.Array, block: tuple = (2, 2)) -> jax.Array:
    """(B, H, W, C) -> (B, H / bh, W / bw, bh * bw * C): each bh x bw cell's pixels as
    channels, ordered (row phase, column phase, c); H, W multiples of the block."""
    b, h, w, c = x.shape
    bh, bw = block
    return x.reshape(b, h // bh, bh, w // bw, bw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, h // bh, w // bw, bh * bw * c)


def depth_to_space(y: jax.Array, block: tuple = (2, 2)) -> jax.Array:
    """The inverse of `space_to_depth`: (B, h, w, bh * bw * C) -> (B, h * bh, w * bw, C)."""
    b, h, w, cc = y.shape
    bh, bw = block
    return y.reshape(b, h, w, bh, bw, cc // (bh * bw)).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, h * bh, w * bw, cc // (bh * bw))


# Convolutions on 2 x 2 cells: a stride-1 conv to (or from) few channels as 2-D products.
# XLA:CPU's own convolution runs a 7x7 conv 64 -> 3 far below its peak (256 px, batch 2, 2-core
# Xeon: forward 81 ms, forward + input gradient 94, with the kernel gradient 317); on cells
# the same conv is one product with 4C rows and n * n * 4O columns: 23, 51 and 68 ms.

def cell_kernel(kernel: jax.Array) -> jax.Array:
    """A stride-1 kernel (k, k, C, O) HWIO -> (n, n, 4C, 4O), n = k // 2 + 1: the same VALID
    convolution from the space_to_depth cells of the input to the cells of the output. Output
    pixel 2a + p reads input rows 2a + p + i (i < k), the row phase pi of cell a + t with
    i = 2t + pi - p; taps outside the kernel are zero."""
    k, _, c, o = kernel.shape
    n = k // 2 + 1
    tap = np.full((n, 2, 2), k)                       # (t, pi, p) -> kernel row, k: zero
    for t in range(n):
        for pi in range(2):
            for ph in range(2):
                if 0 <= 2 * t + pi - ph < k:
                    tap[t, pi, ph] = 2 * t + pi - ph
    kz = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    g = kz[tap[:, :, :, None, None, None], tap[None, None, None]]   # (t, pi, p, u, pj, q, C, O)
    return g.transpose(0, 3, 1, 4, 6, 2, 5, 7).reshape(n, n, 4 * c, 4 * o)


def cell_taps(kernel: jax.Array) -> jax.Array:
    """HWIO (k, k, C, O) -> (4C, n * n * 4O) for `sum_cell_taps`: columns (cell tap t, u,
    output phase, o)."""
    g = cell_kernel(kernel)
    return jnp.transpose(g, (2, 0, 1, 3)).reshape(g.shape[2], -1)


def sum_cell_taps(y: jax.Array, n: int) -> jax.Array:
    """The product of input cells with `cell_taps`, (B, h + n - 1, w + n - 1, n * n * 4O) ->
    the output cells (B, h, w, 4O): each cell tap's contribution shifted into place."""
    b, hh, ww, cols = y.shape
    y = y.reshape(b, hh, ww, n * n, cols // (n * n))
    h, w = hh - n + 1, ww - n + 1
    return sum(y[:, i:i + h, j:j + w, n * i + j] for i in range(n) for j in range(n))


def _product(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _cells_geometry(x_shape: tuple, k: int) -> tuple:
    """A VALID k x k conv of x (B, Hp, Wp, C) on cells: n, the output (Ho, Wo), its cells
    (hc, wc) (odd sides rounded up)."""
    ho, wo = x_shape[1] - k + 1, x_shape[2] - k + 1
    return k // 2 + 1, (ho, wo), (-(-ho // 2), -(-wo // 2))


def _input_cells(xp: jax.Array, k: int) -> jax.Array:
    """xp (B, Hp, Wp, C) -> the cells (B, hc + n - 1, wc + n - 1, 4C) a VALID k x k conv
    reads, zero-filled at the bottom and right where a side does not fill whole cells."""
    n, _, (hc, wc) = _cells_geometry(xp.shape, k)
    fill = ((0, 0), (0, 2 * (hc + n - 1) - xp.shape[1]), (0, 2 * (wc + n - 1) - xp.shape[2]),
            (0, 0))
    return space_to_depth(jnp.pad(xp, fill))


def conv_cells(xp: jax.Array, kernel: jax.Array) -> jax.Array:
    """A VALID stride-1 convolution of xp (B, Hp, Wp, C) with a square kernel (k, k, C, O)
    HWIO, as one product of the input's cells with `cell_taps` (4C rows, n * n * 4O columns)
    and a sum of shifted views: the same sums (zeros added), for few output channels."""
    k = kernel.shape[0]
    n, (ho, wo), _ = _cells_geometry(xp.shape, k)
    y = _product(_input_cells(xp, k), cell_taps(kernel).astype(xp.dtype), 3, 0)
    return depth_to_space(sum_cell_taps(y, n))[:, :ho, :wo].astype(xp.dtype)


def _output_gradient_cells(g: jax.Array, k: int, xp_shape: tuple) -> jax.Array:
    """conv_cells' output gradient g (B, Ho, Wo, O) -> the gradient of its product
    (B, hc + n - 1, wc + n - 1, n * n * 4O): per cell tap, g's cells shifted back."""
    n, (ho, wo), (hc, wc) = _cells_geometry(xp_shape, k)
    gc = space_to_depth(jnp.pad(g, ((0, 0), (0, 2 * hc - ho), (0, 2 * wc - wo), (0, 0))))
    return jnp.concatenate([jnp.pad(gc, ((0, 0), (i, n - 1 - i), (j, n - 1 - j), (0, 0)))
                            for i in range(n) for j in range(n)], axis=-1)


def _conv_cells_dx(xp, kernel, g):
    """conv_cells' input gradient: the product's gradient times cell_taps^T, back to pixels."""
    dy = _output_gradient_cells(g, kernel.shape[0], xp.shape)
    dxs = _product(dy, cell_taps(kernel).astype(g.dtype), 3, 1)
    return depth_to_space(dxs)[:, :xp.shape[1], :xp.shape[2]].astype(xp.dtype)


def _conv_cells_dk(xp, kernel, g):
    """conv_cells' kernel gradient: ONE product input cells^T @ product gradient (contracting
    batch and cells), mapped back through cell_taps (its transpose: a small scatter-add)."""
    k = kernel.shape[0]
    xs, dy = _input_cells(xp, k), _output_gradient_cells(g, k, xp.shape)
    rows = xs.shape[0] * xs.shape[1] * xs.shape[2]
    d_taps = _product(xs.reshape(rows, -1), dy.reshape(rows, -1), 0, 0)
    return jax.linear_transpose(cell_taps, kernel)(d_taps.astype(kernel.dtype))[0]


def _pad_input(x: jax.Array, padding: tuple) -> jax.Array:
    """Zero padding ((lo, hi), (lo, hi)) of x's spatial axes (a negative pad crops)."""
    return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*padding[0], 0),
                                                   (*padding[1], 0), (0, 0, 0)])


def _unpad_gradient(dxp: jax.Array, padding: tuple) -> jax.Array:
    """The transpose of `_pad_input`: the padded input's gradient -> the input's."""
    return _pad_input(dxp, tuple((-lo, -hi) for lo, hi in padding))


def _flipped(kernel: jax.Array) -> jax.Array:
    """The kernel of a stride-1 conv's input gradient: taps reversed, in and out swapped."""
    return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def _few_outputs_forward(x, kernel, geometry):
    return conv_cells(_pad_input(x, geometry[1]), kernel)


def _few_outputs_dx(x, kernel, geometry, g):
    return _unpad_gradient(_conv_cells_dx(_pad_input(x, geometry[1]), kernel, g), geometry[1])


def _few_outputs_dk(x, kernel, geometry, g):
    return _conv_cells_dk(_pad_input(x, geometry[1]), kernel, g)


def _few_inputs_dx(x, kernel, geometry, g):
    """A stride-1 conv's input gradient as the VALID conv of g padded by k - 1 with the
    flipped kernel (to the few input channels: `conv_cells`), the padding then undone."""
    k = kernel.shape[0]
    dxp = conv_cells(_pad_input(g, ((k - 1, k - 1), (k - 1, k - 1))), _flipped(kernel))
    return _unpad_gradient(dxp, geometry[1]).astype(x.dtype)


def _direct_conv_dk(x, kernel, geometry, g):
    return jax.linear_transpose(lambda k_: _direct_conv(x, k_, geometry), kernel)(g)[0]


# A stride-1 float32 square-kernel conv (k >= 3) with at most FEW_CHANNELS channels on one
# side and at least MANY_CHANNELS on the other: to few outputs (every target's and G's last
# conv, 64 -> 3) all on cells; from few inputs (their first conv) XLA's forward and kernel
# gradient, its input gradient (a conv to few channels) on cells (7x7 8 -> 64 at 256 px,
# batch 2, forward + input gradient: 104 -> 79 ms).
FEW_CHANNELS = 8
MANY_CHANNELS = 16


def _few_channels_side(lhs, rhs) -> str | None:
    """'outputs', 'inputs' or None: which side of this stride-1 conv has few channels."""
    kh, kw, c, o = rhs.shape
    if not (kh == kw >= 3 and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32):
        return None
    if o <= FEW_CHANNELS and c >= MANY_CHANNELS:
        return "outputs"
    if c <= FEW_CHANNELS and o >= MANY_CHANNELS:
        return "inputs"
    return None


def _with_gradients(forward: Callable, dx_fn: Callable, dk_fn: Callable) -> Callable:
    """forward(x, kernel, static), a convolution, differentiable with the gradients
    dx_fn(x, kernel, static, g) and dk_fn(x, kernel, static, g) (static: hashable, no
    gradient). Only the gradients of perturbed inputs are built: a frozen network's kernel
    gradients never enter the program (XLA would drop them, but only after compiling them)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def fn(x, kernel, static):
        return forward(x, kernel, static)

    def fn_fwd(x, kernel, static):
        # which gradients to build, as the residuals' structure: () wanted, None not
        wanted = tuple(() if a.perturbed else None for a in (x, kernel))
        return forward(x.value, kernel.value, static), (x.value, kernel.value, wanted)

    def fn_bwd(static, residuals, g):
        x, kernel, (want_dx, want_dk) = residuals
        if isinstance(g, SymbolicZero):
            return None, None
        dx = None if want_dx is None else dx_fn(x, kernel, static, g)
        dk = None if want_dk is None else dk_fn(x, kernel, static, g)
        return dx, dk

    fn.defvjp(fn_fwd, fn_bwd, symbolic_zeros=True)
    return fn


def _with_gradients_of(forward: Callable, dx_form: Callable, dk_form: Callable) -> Callable:
    """forward(x, kernel, geometry), a convolution (linear in x and in kernel), whose gradient
    w.r.t. x is dx_form's and w.r.t. kernel is dk_form's (the same function computed another
    way: the one XLA:CPU runs fast). The gradients are linear transposes: no forward reruns."""
    def dx_fn(x, kernel, geometry, g):
        return jax.linear_transpose(lambda x_: dx_form(x_, kernel, geometry), x)(g)[0]

    def dk_fn(x, kernel, geometry, g):
        return jax.linear_transpose(lambda k_: dk_form(x, k_, geometry), kernel)(g)[0]
    return _with_gradients(forward, dx_fn, dk_fn)


# A kernel gradient goes by taps where both channel counts reach this (a 7x7 conv 64 -> 3 at
# 256 px, batch 2: 49 views of the input and products of width 3, 3.5 s against XLA's 0.23 s).
TAPS_MIN_CHANNELS = 32


def _taps_worth(kernel_shape: tuple) -> bool:
    return min(kernel_shape[-2:]) >= TAPS_MIN_CHANNELS


_strided_conv_fast_dx = _with_gradients_of(_direct_conv, conv_space_to_depth, _direct_conv)
_strided_conv_fast_dx_dk = _with_gradients_of(_direct_conv, conv_space_to_depth, conv_by_taps)
_conv_fast_dk = _with_gradients_of(_direct_conv, _direct_conv, conv_by_taps)
_conv_few_outputs = _with_gradients(_few_outputs_forward, _few_outputs_dx, _few_outputs_dk)
_conv_few_inputs = _with_gradients(_direct_conv, _few_inputs_dx, _direct_conv_dk)

_SAME_3X3 = ((1, 1), ((1, 1), (1, 1)))


def _zero_pad1(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _winograd_same(x, kernel, tile):
    return conv3x3_winograd(_zero_pad1(x), winograd_kernel(kernel, tile))


def _winograd_same_dx(x, kernel, tile, g):
    # the flipped kernel's transform with in and out channels left in place: a transposed copy
    # fused into the transform's sums read the kernel column-wise (XLA:CPU: ~60 ms per
    # 256-channel conv, 0.7 of StarGAN's 1.85 s forward + input gradient at 256 px, batch 2)
    u = winograd_kernel(kernel[::-1, ::-1], tile)
    return conv3x3_winograd(_zero_pad1(g), u, transposed=True).astype(x.dtype)


def _taps_same_dk(x, kernel, tile, g):
    return jax.linear_transpose(lambda k: conv_by_taps(x, k, _SAME_3X3), kernel)(g)[0]


# torch's Conv2d(k3, s1, zero padding 1, no bias) on x (B, H, W, C) float32, kernel HWIO, by
# Winograd with tile (conv3x3_same(x, kernel, tile)): the input gradient is the same Winograd
# convolution of the output gradient with the flipped kernel (in and out channels swapped), the
# kernel gradient conv_by_taps'.
conv3x3_same = _with_gradients(_winograd_same, _winograd_same_dx, _taps_same_dk)


def reflect_conv2d(x: jax.Array, features: int, kernel: int, *, bias: bool, name: str,
                   dtype: Dtype = None,
                   kernel_init: Initializer = nn.initializers.lecun_normal()) -> jax.Array:
    """nn.ReflectionPad2d(kernel // 2) then torch.nn.Conv2d(in, features, kernel) on x (NHWC),
    with `conv2d`'s parameters. Call inside a compact module (the conv is its child `name`).
    `reflect_conv` is the same on a given kernel."""
    p = kernel // 2
    zero = _cpu_zero_padding(p)
    y = conv2d(features, kernel, padding=zero, bias=bias, name=name, dtype=dtype,
               kernel_init=kernel_init)(reflect_pad(x, p))
    return _crop(y, zero)


def reflect_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """nn.ReflectionPad2d(k // 2) then a k x k convolution (no bias) of x (B, H, W, C) with
    kernel (k, k, C, O) HWIO, computed as `reflect_conv2d` computes it."""
    p = kernel.shape[0] // 2
    zero = _cpu_zero_padding(p)
    y = jax.lax.conv_general_dilated(reflect_pad(x, p), kernel, (1, 1), ((zero, zero),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _crop(y, zero)


def reflect_conv_pairs(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`reflect_conv` for few input channels: the padded input's horizontally adjacent pixel
    pairs as channels (a free reshape), convolved with the kernel rearranged for both output
    pixels of a pair ((k, (k + 1) // 2, 2C, 2O), zeros where a tap falls outside), the output
    pairs reshaped back. The same sums (zeros added); x (B, H, W, C) with W even, k odd.

    XLA:CPU runs a 7x7 conv on 3 channels far below its peak: 3 -> 64 at 256 px, batch 4,
    82 ms against 56 ms this way (2-core Xeon)."""
    b, h, w, c = x.shape
    k, _, _, o = kernel.shape
    if w % 2 or k % 2 == 0:
        raise ValueError(f"reflect_conv_pairs: needs an even width and an odd kernel, "
                         f"got width {w}, kernel {k}")
    pad = k // 2
    taps = (k + 1) // 2                           # pair columns an output pair reads
    # output pixel 2a + r reads padded columns 2a + r + j (j < k): pair a + (r + j) // 2
    by_phase = [jnp.pad(kernel, ((0, 0), (r, 2 * taps - k - r), (0, 0), (0, 0)))
                for r in (0, 1)]                  # (k, 2 * taps, C, O) each
    kz = jnp.stack(by_phase, axis=3).reshape(k, taps, 2 * c, 2 * o)
    xp = reflect_pad(x, pad)
    xs = xp.reshape(b, h + 2 * pad, (w + 2 * pad) // 2, 2 * c)
    zero = _cpu_zero_padding(pad)
    y = jax.lax.conv_general_dilated(xs, kz, (1, 1), ((zero, zero),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _crop(y, zero).reshape(b, h, w, o)


def _cpu_zero_padding(p: int) -> int:
    """Zero padding around a reflect-padded input (cropped after the conv): on CPU p, else 0.

    XLA's CPU convolution is ~3x slower without padding than with 'SAME'-like padding (3x3
    256-channel at 64 px: 220 vs 80 ms; 7x7 64->3 at 256 px: 500 vs 42 ms, on a 2-core EPYC),
    so there the padded input is convolved with zero padding p and the border cropped: the same
    numbers, for ~5% more multiply-adds."""
    return p if jax.default_backend() == "cpu" else 0


def _crop(y: jax.Array, p: int) -> jax.Array:
    return y[:, p:-p, p:-p, :] if p else y


def conv_transpose2d(features: int, kernel: int, stride: int, padding: int,
                     output_padding: int = 0, *, bias: bool, name: str | None = None,
                     dtype: Dtype = None,
                     kernel_init: Initializer = nn.initializers.lecun_normal()) -> "ConvTranspose2d":
    """torch.nn.ConvTranspose2d(in, features, kernel, stride, padding, output_padding, bias=bias).

    Output size = (H - 1) * stride - 2 * padding + kernel + output_padding, as in torch.
    Kernel layout = torch weight (I, O, kh, kw) transposed (2, 3, 1, 0), as flax's
    ConvTranspose(transpose_kernel=True) holds it (the kernel is flipped and its in/out axes
    swapped, as torch does).
    """
    return ConvTranspose2d(features, kernel, stride, padding, output_padding, use_bias=bias,
                           dtype=dtype, kernel_init=kernel_init, name=name)


class ConvTranspose2d(nn.Module):
    """flax.linen.ConvTranspose(transpose_kernel=True) with torch's padding (same parameters:
    'kernel' (k, k, features, in), 'bias'); see `conv_transpose2d`.

    On CPU, where the geometry allows (`subpixel_fits`), the forward goes by phases
    (`conv_transpose_phases`: one stride-1 conv per output phase over its real taps) and the
    kernel gradient by the sub-pixel form (`conv_transpose_subpixel`); the input gradient is
    XLA's own (a strided conv). XLA:CPU runs the direct forward as an input-dilated
    convolution, 1.5-2.6x slower (k4 s2, 128 -> 64 channels at 128 px, batch 4: 202 against
    78 ms, 2-core EPYC), and the direct kernel gradient as a generic one, 10-20x slower (at
    256 px two of them were a quarter of the train step).
    """
    features: int
    kernel_size: int
    stride: int
    padding: int
    output_padding: int = 0
    use_bias: bool = True
    dtype: Dtype = None
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, self.features, x.shape[-1]),
                            jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        geometry = (self.stride, self.padding, self.output_padding)
        if jax.default_backend() == "cpu":
            y = _conv_transpose_cpu(x, kernel, geometry)
        else:
            y = conv_transpose(x, kernel, geometry)
        return y if bias is None else y + bias


def conv_transpose(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    """torch's ConvTranspose2d (no bias) of x (B, H, W, I) as flax computes it: kernel
    (k, k, O, I) as `ConvTranspose2d` holds it, geometry (stride, padding, output_padding)."""
    stride, padding, output_padding = geometry
    lo = kernel.shape[0] - 1 - padding
    pads = ((lo, lo + output_padding),) * 2
    return jax.lax.conv_transpose(x, kernel, (stride, stride), pads, transpose_kernel=True)


def _subpixel_taps(kernel_size: int, stride: int, padding: int) -> tuple[int, np.ndarray]:
    """(u_min, taps): output o = stride*m + a of torch's ConvTranspose2d is
    sum_u x[m + u] * W[taps[u - u_min, a]], from out[stride*i + t - padding] += x[i] W[t];
    taps == kernel_size marks a missing tap (a zero)."""
    us = {}
    for a in range(stride):
        for t in range(kernel_size):
            if (t - a - padding) % stride == 0:
                us[(a, (a + padding - t) // stride)] = t
    u_min = min(u for _, u in us)
    u_max = max(u for _, u in us)
    taps = np.full((u_max - u_min + 1, stride), kernel_size)
    for (a, u), t in us.items():
        taps[u - u_min, a] = t
    return u_min, taps


def _subpixel_geometry(x_shape: tuple, kernel_shape: tuple, geometry: tuple):
    """(output sizes, stride-1 conv pads, u_min, taps) of `conv_transpose_subpixel`, or None
    where it cannot compute the geometry (an output not a multiple of the stride, cropping)."""
    stride, padding, output_padding = geometry
    k = kernel_shape[0]
    u_min, taps = _subpixel_taps(k, stride, padding)
    outs, pads = [], []
    for n in x_shape[1:3]:
        out = (n - 1) * stride - 2 * padding + k + output_padding
        pair = (-u_min, out // stride + u_min + taps.shape[0] - 1 - n)
        if out % stride or min(pair) < 0:
            return None
        outs.append(out)
        pads.append(pair)
    return outs, pads, u_min, taps


def subpixel_fits(x_shape: tuple, kernel_shape: tuple, geometry: tuple) -> bool:
    """Whether `conv_transpose_subpixel` computes this geometry."""
    return _subpixel_geometry(x_shape, kernel_shape, geometry) is not None


def conv_transpose_subpixel(x: jax.Array, kernel: jax.Array, geometry: tuple, *,
                            by_taps: bool = False) -> jax.Array:
    """`conv_transpose` as ONE stride-1 convolution to stride^2 * O channels followed by
    depth-to-space (the sub-pixel form): the same numbers to float32 rounding, and on XLA:CPU
    every gradient of it is an ordinary convolution. x (B, H, W, I); kernel (k, k, O, I) as
    `ConvTranspose2d` holds it; the output size must be a multiple of the stride and need no
    cropping (`subpixel_fits`). `by_taps`: the stride-1 conv as `conv_by_taps` (for its
    kernel gradient)."""
    stride = geometry[0]
    k, _, o, i = kernel.shape
    b = x.shape[0]
    fit = _subpixel_geometry(x.shape, kernel.shape, geometry)
    if fit is None:
        raise ValueError(f"conv_transpose_subpixel: geometry {geometry} on input {x.shape[1:3]} "
                         "gives an output not a multiple of the stride or needs cropping; use "
                         "the direct form")
    (out_h, out_w), pads, _, taps = fit
    ku = taps.shape[0]
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))     # index k: the zero tap
    sub = padded[taps[:, None, :, None], taps[None, :, None, :]]    # (ku, ku, s, s, O, I)
    sub = jnp.transpose(sub, (0, 1, 5, 2, 3, 4)).reshape(ku, ku, i, stride * stride * o)
    m_h, m_w = out_h // stride, out_w // stride
    if by_taps:
        y = conv_by_taps(x, sub, ((1, 1), tuple(pads)))
    else:
        y = jax.lax.conv_general_dilated(x, sub, (1, 1), pads, dimension_numbers=_NHWC)
    y = y.reshape(b, m_h, m_w, stride, stride, o)
    return jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(b, out_h, out_w, o)


def _phase_ranges(kernel_size: int, stride: int, padding: int) -> list[tuple[int, np.ndarray]]:
    """For each output phase a (outputs stride*m + a): (u0, taps) with output m reading inputs
    m + u0 ... m + u0 + len(taps) - 1 through torch taps `taps` (from out[stride*i + t -
    padding] += x[i] W[t]); every tap is a real one."""
    u_min, table = _subpixel_taps(kernel_size, stride, padding)
    out = []
    for a in range(stride):
        real = [u for u in range(table.shape[0]) if table[u, a] != kernel_size]
        lo, hi = min(real), max(real)
        out.append((u_min + lo, table[lo:hi + 1, a]))
    return out


def _padded_conv(x: jax.Array, kernel: jax.Array, pads: tuple) -> jax.Array:
    """A stride-1 conv with padding pads ((lo, hi), (lo, hi)), any of them negative (a crop):
    the padding goes to the convolution where none is (XLA:CPU's unpadded convolutions are the
    slow ones), else to an explicit pad."""
    if min(min(p) for p in pads) >= 0:
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                                                 (0, 0, 0)])
    return jax.lax.conv_general_dilated(xp, kernel, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=_NHWC)


def conv_transpose_phases(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    """`conv_transpose` as stride^2 stride-1 convolutions, one per output phase over only its
    real taps (k4 s2: four 2x2 convs), interleaved: the direct form's multiply-adds in
    ordinary convolutions, which XLA:CPU runs several times faster than its input-dilated
    one. x (B, H, W, I); kernel (k, k, O, I) as `ConvTranspose2d` holds it, k >= stride (every
    phase has a tap); the output size a multiple of the stride (`subpixel_fits`)."""
    stride, padding, _ = geometry
    k, _, o, _ = kernel.shape
    b, h, w, _ = x.shape
    if k < stride:
        raise ValueError(f"conv_transpose_phases: kernel {k} < stride {stride} leaves a phase "
                         "without taps; use the direct form")
    fit = _subpixel_geometry(x.shape, kernel.shape, geometry)
    if fit is None:
        raise ValueError(f"conv_transpose_phases: geometry {geometry} on input {x.shape[1:3]} "
                         "gives an output not a multiple of the stride or needs cropping")
    (out_h, out_w), _, _, _ = fit
    m_h, m_w = out_h // stride, out_w // stride
    phases = _phase_ranges(k, stride, padding)
    rows = []
    for u0, taps_h in phases:
        cols = []
        for v0, taps_w in phases:
            sub = kernel[taps_h[:, None], taps_w[None, :]]                 # (kh', kw', O, I)
            sub = jnp.transpose(sub, (0, 1, 3, 2))
            pads = ((-u0, m_h + u0 + len(taps_h) - 1 - h),
                    (-v0, m_w + v0 + len(taps_w) - 1 - w))
            cols.append(_padded_conv(x, sub, pads))
        rows.append(jnp.stack(cols, axis=3))                        # (B, m_h, m_w, s, O)
    y = jnp.stack(rows, axis=2)                                     # (B, m_h, s, m_w, s, O)
    return y.reshape(b, out_h, out_w, o)


def _conv_transpose_kernel_grad_form(x: jax.Array, kernel: jax.Array,
                                    geometry: tuple) -> jax.Array:
    """`conv_transpose` in the form whose kernel gradient XLA:CPU runs fast: the sub-pixel one
    where the geometry allows (the direct one's is a generic input-dilated convolution, 10-20x
    slower), else the direct one."""
    if subpixel_fits(x.shape, kernel.shape, geometry):
        return conv_transpose_subpixel(x, kernel, geometry, by_taps=_taps_worth(kernel.shape))
    return conv_transpose(x, kernel, geometry)


def conv_transpose_forward(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    """`conv_transpose`'s forward in the form the backend runs fastest: on CPU by phases
    (`conv_transpose_phases`) where the geometry allows, else the direct one."""
    if (jax.default_backend() == "cpu" and kernel.shape[0] >= geometry[0]
            and subpixel_fits(x.shape, kernel.shape, geometry)):
        return conv_transpose_phases(x, kernel, geometry)
    return conv_transpose(x, kernel, geometry)


# The input gradient stays the direct form's (a strided conv, which XLA:CPU runs well): the
# phases' one was no faster overall (k4 s2 at batch 4: 256 -> 128 at 64 px 58 against 78 ms,
# 128 -> 64 at 128 px 117 against 78 ms).
_conv_transpose_cpu = _with_gradients_of(conv_transpose_forward, conv_transpose,
                                         _conv_transpose_kernel_grad_form)


def _row_phases(kernel: jax.Array, axis: int) -> list[tuple[jax.Array, tuple[int, int]]]:
    """A 3-tap kernel axis after a nearest x2 upsample, per output phase a (outputs 2i + a):
    (its 2 taps on the input's rows i - 1 + a, i + a; that conv's padding). Output 2i reads the
    upsampled rows 2i - 1, 2i, 2i + 1, i.e. input rows i - 1, i, i; output 2i + 1 reads i, i,
    i + 1."""
    k0, k1, k2 = (jnp.take(kernel, t, axis=axis) for t in range(3))
    return [(jnp.stack([k0, k1 + k2], axis), (1, 0)), (jnp.stack([k0 + k1, k2], axis), (0, 1))]


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3(nearest_upsample_x2(x)), zero padding 1, without the upsample: x (B, H, W, I),
    kernel (3, 3, I, O) HWIO -> (B, 2H, 2W, O). Each of the four output phases is a 2x2 conv
    of x with the taps that read the same input pixel summed; the phases are interleaved.
    4 x 4 multiply-adds per input pixel instead of 4 x 9, and no upsample (XLA:CPU runs the
    upsample's gradient, a 2x2 sum, fused into the conv's, ~2x slower: HiSD's decoder, 128 ->
    64 channels to 256 px, batch 2, forward and input gradient 238 -> 114 ms)."""
    b, h, w, _ = x.shape
    rows = []
    for k_row, pad_row in _row_phases(kernel, 0):
        cols = [jax.lax.conv_general_dilated(x, k, (1, 1), (pad_row, pad_col),
                                             dimension_numbers=_NHWC)
                for k, pad_col in _row_phases(k_row, 1)]
        rows.append(jnp.stack(cols, axis=3))                        # (B, H, W, 2, O)
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def conv3x3_avg_pool2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """avg_pool2x2(conv3x3(x)), zero padding 1, as ONE 4x4 stride-2 conv (the 3x3 kernel summed
    at the pool's four offsets, over 4): x (B, H, W, I), H and W even, kernel (3, 3, I, O) ->
    (B, H/2, W/2, O). 16 multiply-adds per output pixel and channel instead of 36, and no pool
    (its gradient fuses into the conv's badly on XLA:CPU: HiSD's encoder, 64 channels at 256 px,
    batch 2, forward and input gradient 100 -> 51 ms). On CPU the input gradient goes by
    space-to-depth (`cpu_conv`)."""
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"conv3x3_avg_pool2: height and width must be even, got {x.shape[1:3]}")
    k4 = jnp.zeros((4, 4) + kernel.shape[2:], kernel.dtype)
    for i in (0, 1):
        for j in (0, 1):
            k4 = k4.at[i:i + 3, j:j + 3].add(kernel)
    k4 = k4 / 4
    conv = cpu_conv if jax.default_backend() == "cpu" else jax.lax.conv_general_dilated
    return conv(x, k4, (2, 2), ((1, 1), (1, 1)),
                dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, k4.shape, _NHWC))


class Conv3x3Resampled(nn.Module):
    """torch's conv3x3 (padding 1) after a nearest x2 upsample (`resample='up'`,
    `upsample2_conv3x3`) or before a 2x2 average pool (`'down'`, `conv3x3_avg_pool2`), in one
    step. Parameters as `conv2d(features, 3, 1, 1)`'s: kernel (3, 3, I, O), bias (O,)."""
    features: int
    resample: str
    bias: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.resample not in ("up", "down"):
            raise ValueError(f"Conv3x3Resampled: resample must be 'up' or 'down', "
                             f"got {self.resample!r}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = (upsample2_conv3x3 if self.resample == "up" else conv3x3_avg_pool2)(x, kernel)
        return y if bias is None else y + bias


def dense(features: int, *, bias: bool = True, name: str | None = None,
          dtype: Dtype = None) -> nn.Dense:
    """torch.nn.Linear; kernel = torch weight transposed. Flatten NCHW before it (see ports)."""
    return nn.Dense(features, use_bias=bias, dtype=dtype, name=name)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    """torch.nn.ReflectionPad2d(pad) on an NHWC batch."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def clamp(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """torch.clamp, including its gradient: 1 inside [lo, hi] (ends included), 0 outside.

    `jnp.clip` halves the gradient where x equals a bound; a prior perturbation that PGD left
    exactly at +-eps would then learn at half speed.
    """
    return jnp.where((x >= lo) & (x <= hi), x, jnp.clip(x, lo, hi))


def affine_params(module: nn.Module, channels: int,
                  scale_init: Callable = nn.initializers.ones) -> tuple[jax.Array, jax.Array]:
    """A norm layer's per-channel float32 'scale' and 'bias' (torch's weight and bias), declared
    on `module` inside its compact call."""
    scale = module.param("scale", scale_init, (channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return scale, bias


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance in float32, two-pass (no E[x^2] - E[x]^2 cancellation)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[int, ...],
              epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, mean, var): x float32 normalised with its biased statistics over `axes`, then
    y = (x - mean) * rsqrt(var + epsilon) * scale + bias; mean and var keep x's rank.

    The gradient is the closed form, not autodiff's through the two-pass moments (XLA:CPU ran
    that 2.5-3x slower: BatchNorm 64 ch at 256 px, batch 2, 55 against 18 ms, 2-core EPYC).
    It is written as dx = a * g + c * (x - mean) + b with per-group a, b, c (two reductions,
    one elementwise pass), not through x-hat: XLA:CPU's library fusions ("ynn_fusion") pull
    that pass into the next convolution and materialise every full-size broadcast fed to them,
    which made a StarGAN whose weights are jit constants 1.7x slower in the x-hat form (3.5
    against 2.0 s forward + dx, batch 4) and leaves it within noise in this one (2.08 s).
    The forward is the same operations as before, so the same numbers to the bit."""
    return _normalize_fwd(x, scale, bias, axes, epsilon)[0]


def _normalize_fwd(x, scale, bias, axes, epsilon):
    mean, var = _moments(x, axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    centred = x - mean
    y = centred * rstd * scale + bias
    return (y, mean, var), (centred, rstd, scale)


def _normalize_bwd(axes, epsilon, residuals, cotangents):
    # dx = a * gy + c * centred + b with per-group coefficients, so that the only full-size
    # work is two plain reductions and one elementwise pass (XLA:CPU's library fusions
    # materialise every full-size broadcast they are fed).
    centred, rstd, scale = residuals
    gy, gmean, gvar = cotangents
    n = float(np.prod([centred.shape[a] for a in axes]))
    if isinstance(gy, SymbolicZero):                  # only the statistics are used
        sum_g = sum_gc = jnp.zeros_like(rstd)
        dx = jnp.zeros_like(centred)
    else:
        sum_g = jnp.sum(gy, axis=axes, keepdims=True)
        sum_gc = jnp.sum(gy * centred, axis=axes, keepdims=True)
        a = rstd * scale
        b = -a * sum_g / n
        c = -a * rstd * rstd * sum_gc / n
        dx = gy * a + centred * c + b
    # the statistics' own uses (rare): d mean = 1/n, d var = 2 (x - mean) / n
    if not isinstance(gmean, SymbolicZero):
        dx = dx + gmean / n
    if not isinstance(gvar, SymbolicZero):
        dx = dx + centred * (gvar * (2.0 / n))
    group_axes = tuple(range(centred.ndim - 1))
    dscale = jnp.sum(sum_gc * rstd, axis=group_axes).reshape(scale.shape)
    dbias = jnp.sum(sum_g, axis=group_axes).reshape(scale.shape)
    return dx, dscale, dbias


def _normalize_fwd_symbolic(x, scale, bias, axes, epsilon):
    return _normalize_fwd(x.value, scale.value, bias.value, axes, epsilon)


normalize.defvjp(_normalize_fwd_symbolic, _normalize_bwd, symbolic_zeros=True)


class InstanceNorm(nn.Module):
    """torch.nn.InstanceNorm2d(C, affine=True) normalising with per-image statistics.

    This is what the StarGAN family runs: their norms carry running buffers
    (track_running_stats=True) but the reference never calls eval(), so per-image statistics are
    used and the buffers are ignored.
    """
    epsilon: float = 1e-5
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = affine_params(self, c)
        y, _, _ = normalize(x.astype(jnp.float32), scale, bias, (1, 2), self.epsilon)
        return y.astype(self.dtype or x.dtype)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d(C) (momentum 0.1, eps 1e-5), NHWC.

    Training normalises with the batch's biased variance and updates the running variance with
    the UNBIASED one, as torch does (flax.linen.BatchNorm uses the biased one). Under jit with a
    batch sharded over devices the statistics are those of the global batch.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = None
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        c = x.shape[-1]
        scale, bias = affine_params(self, c, self.scale_init)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
            return y.astype(self.dtype or x.dtype)
        y, m, v = normalize(x.astype(jnp.float32), scale, bias, (0, 1, 2), self.epsilon)
        if not self.is_initializing():
            mean, var = m.reshape(c), v.reshape(c)
            n = x.size // c
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y.astype(self.dtype or x.dtype)


class PReLU(nn.Module):
    """torch.nn.PReLU(num_parameters): x where x > 0, else slope * x.

    `weight` has shape (num_parameters,) as in torch: 1 (one slope for every channel) or C
    (one per channel, on the last axis). torch's initial slope is 0.25.
    """
    num_parameters: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("weight", nn.initializers.constant(0.25), (self.num_parameters,),
                           jnp.float32)
        # where(x > 0) rather than max/min: torch's gradient at exactly 0 is the slope's.
        return jnp.where(x > 0, x, slope.astype(x.dtype) * x)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """torch's max_pool2d(x, 2, 2) of x (B, H, W, C), H and W even -> (B, H/2, W/2, C).

    The gradient goes to the first maximum of each window in row-major order, torch's choice
    and nn.max_pool's (XLA's select-and-scatter), but as one elementwise pass: XLA:CPU runs
    nn.max_pool's gradient as a variadic reduce-window over five index iotas of the input's
    size (ArcFace's 110 px pool at batch 8: ~25 ms per call, ~0.45 s of a 64 px step)."""
    return _pool_windows(x).max(axis=(2, 4))


def _pool_windows(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2: height and width must be even, got {x.shape[1:3]}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_2x2_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
    x, y = residuals
    windows = _pool_windows(x)
    hit = [[windows[:, :, i, :, j] == y for j in (0, 1)] for i in (0, 1)]
    taken = jnp.zeros_like(y, dtype=bool)
    first = [[None, None], [None, None]]
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):      # row-major: the first maximum wins
        first[i][j] = hit[i][j] & ~taken
        taken = taken | hit[i][j]
    mask = jnp.stack([jnp.stack(row, axis=3) for row in first], axis=2)
    return (jnp.where(mask, g[:, :, None, :, None], 0).astype(x.dtype).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def flatten_nchw(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C*H*W) in torch's NCHW flatten order, for the Linear that follows."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
