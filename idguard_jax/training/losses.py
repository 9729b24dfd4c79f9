"""The identity destruction module's losses (paper III-B; assembled as the
reference's `solver.py::train_batch` does).

For one target and one adversarial branch, with the clean output o and features f (constants),
the adversarial output o_a and features f_a:
  mask loss     multi: MSE(o*m*h, o_a*m*h) (default) | add: MSE(o*m, o_a*m) + MSE(o*h, o_a*h)
                | bin: MSE(o*m, o_a*m) | hmp: MSE(o*h, o_a*h)
  identity loss -mean over positions of the channel-wise cosine of the identity network's feature
                maps of o and o_a (the code's sign: the total is MAXIMISED, so this term lowers
                identity similarity; the paper's eq. 6 writes +cos)
  feature loss  MSE(f*m', f_a*m'), m' = the binary mask resized (align_corners) to f's size
  branch total  w_mask*mask + w_id*id + w_feat*feat (1.0 / 0.1 / 0.01)
All MSEs are means over every element (torch's default reduction). Masks are (B,H,W,1) and
broadcast over channels, which gives the same means as the reference's 3 equal channels.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from idguard_jax.images import resize_align_corners

__all__ = ["LossConfig", "mse", "mask_loss", "channel_cosine", "identity_loss", "feature_loss",
           "branch_losses", "MASK_MODES"]

MASK_MODES = ("multi", "add", "bin", "hmp")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The branch loss's terms and weights (the reference's defaults)."""
    mask_mode: str = "multi"   # how mask m and heatmap h weight the output MSE: MASK_MODES
    w_mask: float = 1.0        # weight of the mask loss
    w_id: float = 0.1          # weight of the identity loss (cosine of identity features)
    w_feat: float = 0.01       # weight of the mid-feature loss

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self.mask_mode!r}: choose one of {', '.join(MASK_MODES)}")


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def mask_loss(o, o_adv, mask, heatmap, mode: str = "multi") -> jax.Array:
    """o, o_adv (B,H,W,3); mask (B,H,W,1) binary; heatmap (B,H,W,1) in [0,1]."""
    if mode == "multi":
        w = mask * heatmap
        return mse(o * w, o_adv * w)
    if mode == "add":
        return mse(o * mask, o_adv * mask) + mse(o * heatmap, o_adv * heatmap)
    if mode == "bin":
        return mse(o * mask, o_adv * mask)
    if mode == "hmp":
        return mse(o * heatmap, o_adv * heatmap)
    raise ValueError(f"mask mode {mode!r}: choose one of {', '.join(MASK_MODES)}")


def channel_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """torch F.cosine_similarity(a, b, dim=channels) on NHWC (or (B, C)) arrays: (B, ...)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def identity_loss(id_clean: jax.Array, id_adv: jax.Array) -> jax.Array:
    """-mean channel-wise cosine of two identity feature maps (B,h,w,C) (or embeddings (B,D))."""
    return -jnp.mean(channel_cosine(id_clean, id_adv))


def feature_loss(f: jax.Array, f_adv: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE of mid features (B,h,w,C) masked by the binary mask resized to (h, w)."""
    m = resize_align_corners(mask[..., :1].astype(jnp.float32), f.shape[1:3])
    return mse(f * m, f_adv * m)


def branch_losses(cfg: LossConfig, o, f, id_clean, o_adv, f_adv, id_adv, mask, heatmap) -> dict:
    """Losses of one adversarial branch against one target: {'mask','id','feat','total'}."""
    lm = mask_loss(o, o_adv, mask, heatmap, cfg.mask_mode)
    li = identity_loss(id_clean, id_adv)
    lf = feature_loss(f, f_adv, mask)
    return {"mask": lm, "id": li, "feat": lf,
            "total": cfg.w_mask * lm + cfg.w_id * li + cfg.w_feat * lf}
