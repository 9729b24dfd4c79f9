"""3x3 stride-1 convolutions by Winograd's minimal filtering F(m x m, 3 x 3) (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016), NHWC / HWIO.

An m x m output tile is AT [(G g GT) * (BT d B)] A over its (m + 2)^2 input tile d: the kernel
is transformed once (`winograd_kernel`), the input's tiles by adds of shifted views (fused by
XLA), and the (m + 2)^2 products (C x O) are 2-D matrix products, one per tile position.
Multiply-adds per output:

    tile 2: 16/36 of the direct conv's, error ~1e-6 of the output's scale (float32 rounding)
    tile 4: 36/144, error ~1e-5 (the larger transform coefficients amplify rounding)

On XLA:CPU (2-core EPYC, float32), a 256-channel conv at 64 px, batch 4, on a padded input and
a transformed kernel: tile 4 40 ms (with its n*n products batched into one dot: 64 ms).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TILES", "winograd_kernel", "winograd_fits", "winograd_tile", "conv3x3_winograd",
           "bfloat16_bits"]

# tile m -> (BT (m+2, m+2), G (m+2, 3), AT (m, m+2)); the points 0, +-1 (m = 2) and
# 0, +-1, +-2 (m = 4), the usual choice for float32.
_MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}
TILES = tuple(_MATRICES)


def _combine(views: list, matrix: np.ndarray) -> list:
    """matrix (R, len(views)) applied to a list of equally shaped arrays: R arrays, each a sum
    over the nonzero coefficients (+-1 as adds and subtractions)."""
    out = []
    for row in matrix:
        acc = None
        for c, v in zip(row, views):
            if c == 0:
                continue
            term = v if c == 1 else -v if c == -1 else v * np.float32(c)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def winograd_kernel(kernel: jax.Array, tile: int = 2) -> jax.Array:
    """A 3x3 kernel (3, 3, C, O) HWIO -> its Winograd form ((tile + 2)^2, C, O) float32 for
    `conv3x3_winograd` (G g GT per channel pair; computed once where the kernel is fixed)."""
    if tile not in _MATRICES:
        raise ValueError(f"winograd_kernel: tile must be one of {TILES}, got {tile}")
    g = _MATRICES[tile][1]
    k = kernel.astype(jnp.float32)
    # as sums of the taps (fused by XLA), not an einsum: XLA:CPU's tiny-matrix products took
    # 9 ms for a 256 x 256 kernel, and a frozen network's kernels are transformed every step
    rows = _combine([k[i] for i in range(3)], g)                        # n x (3, C, O)
    u = [t for r in rows for t in _combine([r[j] for j in range(3)], g)]
    return jnp.stack(u)


def winograd_tile(u) -> int:
    """The output tile of a Winograd-form kernel (16 -> 2, 36 -> 4 positions): an array
    (n*n, C, O) or a sequence of its n*n (C, O) matrices."""
    return int(round(np.sqrt(len(u)))) - 2


def bfloat16_bits(x: jax.Array) -> jax.Array:
    """float32 x -> the uint16 bit patterns of bfloat16(x), rounded to nearest even (finite x):
    integer adds and shifts, which XLA:CPU vectorises; its float32 -> bfloat16 convert fused
    into the Winograd input transform did not (256 channels at 64 px, batch 4: 36 -> 33 ms)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    b = b + jnp.uint32(0x7FFF) + ((b >> 16) & jnp.uint32(1))
    return (b >> 16).astype(jnp.uint16)


def _product_operand(tile: jax.Array, dtype) -> jax.Array:
    """A transformed input tile (float32) as a product operand of `dtype`."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(bfloat16_bits(tile), jnp.bfloat16)
    return tile.astype(dtype)


def winograd_fits(x_shape: tuple, tile: int = 2) -> bool:
    """Whether `conv3x3_winograd` with this tile computes an output of x_shape[1:3] (whole
    tiles: both sides multiples of the tile)."""
    return x_shape[1] % tile == 0 and x_shape[2] % tile == 0


def conv3x3_winograd(xp: jax.Array, u: jax.Array, *, transposed: bool = False) -> jax.Array:
    """A VALID 3x3 stride-1 convolution of an already padded xp (B, H + 2, W + 2, C) with
    u = winograd_kernel(kernel, tile) -> (B, H, W, O); H and W multiples of the tile. u may
    also be a sequence of its n*n (C, O) matrices (a prepared kernel: an argument sliced in
    the program is a copy per position, and XLA:CPU widens a bfloat16 copy to float32 and
    back). The products take u's dtype (bfloat16 operands accumulate in float32); the
    transforms and the output are float32. `transposed`: u is (n*n, O, C), a kernel whose in
    and out channels are to be swapped (the products contract u's last axis; no transposed
    copy is made)."""
    b, hp, wp, c = xp.shape
    h, w = hp - 2, wp - 2
    m = winograd_tile(u)
    if not winograd_fits((b, h, w, c), m):
        raise ValueError(f"conv3x3_winograd: output {h}x{w} must have sides that are "
                         f"multiples of the tile {m}")
    bt, _, at = _MATRICES[m]
    n = m + 2
    dtype = u.dtype if hasattr(u, "dtype") else u[0].dtype
    xp = xp.astype(jnp.float32)
    rows = _combine([xp[:, i:i + h:m] for i in range(n)], bt)          # n x (B, H/m, W+2, C)
    tiles = [_combine([r[:, :, j:j + w:m] for j in range(n)], bt) for r in rows]
    # One 2-D product per tile position, never stacked: XLA:CPU runs the (n*n)-batched
    # product and the stack that feeds it 1.5-2.7x slower (256 channels at 64 px, batch 2-4).
    contract = (((1,), (1,) if transposed else (0,)), ((), ()))
    prod = [[jax.lax.dot_general(_product_operand(tiles[a][q].reshape(-1, c), dtype),
                                 u[a * n + q],
                                 contract, preferred_element_type=jnp.float32
                                 ).reshape(b, h // m, w // m, -1)
             for q in range(n)] for a in range(n)]                      # [a][q] (B, H/m, W/m, O)
    half = [_combine([prod[a][q] for a in range(n)], at) for q in range(n)]    # [q][p]
    # [p][r]: (B, H/m, W/m, O)
    y = [_combine([half[q][p] for q in range(n)], at) for p in range(m)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)       # (B, H/m, m, W/m, m, O)
    return y.reshape(b, h, w, -1)
