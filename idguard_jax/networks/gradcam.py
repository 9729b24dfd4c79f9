"""Grad-CAM++ heatmaps of VGGFace, as ID-Guard makes the heatmap of its mask loss.

ID-Guard's `solver.heatmap` runs pytorch-grad-cam 1.4.8's GradCAMPlusPlus
on VGGFace's `conv5` (the block's output, after its max pool):

  1. input = align-corners resize to 224 of denorm(x) (the data-dependent [-1, 1] -> [0, 1]);
  2. A = conv5 map (B, 7, 7, C); class c_b = argmax of image b's logits;
     g = d(sum_b logit[b, c_b]) / dA (each image's gradient involves only its own logit);
  3. alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6), 0 where g = 0; w_k = sum_ij relu(g) alpha;
  4. cam = relu(sum_k w_k A_k); per image cam -= min, cam /= max + 1e-7; cv2.resize to 224
     (INTER_LINEAR: half-pixel centres, edge samples clamped); again relu, -= min, /= max + 1e-7;
  5. align-corners resize to the image size (the training size, 256).

`heatmaps` does all of it in one jitted function; the output is (B, S, S, 1) float32 in [0, 1],
the `heatmap` a training batch carries.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.networks.identity import reference_denorm
from idguard_jax.images import resize_align_corners
from ports.vggface import VGGFace

__all__ = ["heatmaps", "gradcam_plusplus", "cam_weights", "resize_half_pixel", "CAM_SIZE"]

CAM_SIZE = 224  # VGGFace's input; Grad-CAM resizes its map to the input's size
_ALPHA_EPS = 1e-6
_NORM_EPS = 1e-7


def _half_pixel_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of cv2.resize INTER_LINEAR along one axis: source position
    (i + 0.5) * n_in / n_out - 0.5, clamped to the first / last sample at the edges."""
    m = np.zeros((n_out, n_in), np.float32)
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    frac[lo < 0] = 0.0
    frac[lo >= n_in - 1] = 0.0
    lo = np.clip(lo, 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def resize_half_pixel(x: jax.Array, size: int) -> jax.Array:
    """cv2.resize(..., INTER_LINEAR) of a (B, H, W) batch to (B, size, size).

    The same as jax.image.resize(method='linear') when enlarging (its antialiasing only acts
    when shrinking); written as two exact matrix products like the align-corners resize.
    """
    mh = jnp.asarray(_half_pixel_matrix(x.shape[1], size))
    mw = jnp.asarray(_half_pixel_matrix(x.shape[2], size))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhw->bow", mh, x, precision=hi)
    return jnp.einsum("pw,bow->bop", mw, y, precision=hi)


def cam_weights(activations: jax.Array, grads: jax.Array) -> jax.Array:
    """Grad-CAM++ channel weights w (B, C) from A and g, both (B, h, w, C) (eq. 19 of
    arXiv 1710.11063 as pytorch-grad-cam 1.4.8 computes it)."""
    g2 = jnp.square(grads)
    g3 = g2 * grads
    sum_a = jnp.sum(activations, axis=(1, 2), keepdims=True)
    alpha = g2 / (2.0 * g2 + sum_a * g3 + _ALPHA_EPS)
    alpha = jnp.where(grads != 0, alpha, 0.0)
    return jnp.sum(jax.nn.relu(grads) * alpha, axis=(1, 2))


def _min_max(cam: jax.Array) -> jax.Array:
    """Per image (B, H, W): subtract the min, then divide by (max + 1e-7), as scale_cam_image."""
    cam = cam - jnp.min(cam, axis=(1, 2), keepdims=True)
    return cam / (_NORM_EPS + jnp.max(cam, axis=(1, 2), keepdims=True))


def gradcam_plusplus(module: VGGFace, variables: dict,
                     x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Grad-CAM++ of `module`'s conv5 for each image's top class.

    x: the network input (B, H, W, 3), as the reference feeds it ([0, 1], no mean subtracted).
    Returns (cam (B, H, W) float32 in [0, 1], classes (B,) int32).
    """
    activations = module.apply(variables, x, method="feature_map").astype(jnp.float32)
    logits, vjp = jax.vjp(lambda a: module.apply(variables, a, method="classify"), activations)
    classes = jnp.argmax(logits, axis=-1)
    # The cotangent of sum_b logit[b, c_b]: one-hot rows.
    (grads,) = vjp(jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype))
    weights = cam_weights(activations, grads)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", activations, weights,
                                 precision=jax.lax.Precision.HIGHEST))
    cam = resize_half_pixel(_min_max(cam), x.shape[1])
    # pytorch-grad-cam's aggregation over target layers (one here): relu, then min-max again.
    return _min_max(jax.nn.relu(cam)), classes.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def heatmaps(module: VGGFace, variables: dict, images: jax.Array) -> jax.Array:
    """ID-Guard's heatmap of a batch: (B, S, S, 3) in [-1, 1] -> (B, S, S, 1) in [0, 1].

    The [-1, 1] -> [0, 1] mapping is the reference's `denorm`, decided over the WHOLE batch
    (min < 0), so a batch of real photos is always mapped; a batch whose every pixel is at least
    mid-grey would be fed as is, as in the reference.
    """
    size = images.shape[1]
    x = resize_align_corners(reference_denorm(images.astype(jnp.float32)), CAM_SIZE)
    cam, _ = gradcam_plusplus(module, variables, x)
    return resize_align_corners(cam[..., None], size)
