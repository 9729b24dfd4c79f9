"""Lossy channels a protected photo meets before a forger edits it (paper IV-D4, Table VII).

Operations act on uint8 RGB images (B, H, W, 3) -> same shape, as a photo is stored and sent:
- `jpeg:Q`   JPEG encode + decode at quality Q (PIL/libjpeg, 4:2:0 chroma subsampling)
- `resize:F` down to round(F x size) with PIL bicubic (antialiased), then back up (bicubic)
- `blur:S`   Gaussian blur, standard deviation S px, taps out to 3 S, edges reflected
- chains joined by `+`, applied left to right: `resize:0.5+jpeg:75`

`parse` turns such a spec into a callable; `DEFAULT_OPS` is the table the evaluation reports.
The evaluation passes BOTH the clean and the protected image through the same operation before
manipulation, so what is measured is the perturbation that survived, not the channel's own
damage to the edit.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
from PIL import Image

__all__ = ["jpeg", "resize_round_trip", "gaussian_blur", "gaussian_blur_levels", "parse",
           "parse_all", "apply", "DEFAULT_OPS"]

DEFAULT_OPS = ("jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "resize:0.75", "blur:0.5",
               "blur:1.0", "resize:0.75+jpeg:75", "jpeg:90+jpeg:75+jpeg:50")


def _check(images) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {a.dtype} {a.shape}")
    return a


def jpeg(images, quality: int) -> np.ndarray:
    """JPEG round trip at `quality` 1..100 (PIL's scale; PIL advises against more than 95) of
    uint8 (B, H, W, 3)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality {quality}: must be in 1..100")
    out = []
    for im in _check(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert("RGB"), np.uint8))
    return np.stack(out)


def resize_round_trip(images, factor: float) -> np.ndarray:
    """Down to round(factor x H) x round(factor x W) and back (PIL bicubic both ways)."""
    if not 0 < factor <= 1:
        raise ValueError(f"resize factor {factor}: must be in (0, 1]")
    a = _check(images)
    h, w = a.shape[1:3]
    small = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.stack([np.asarray(Image.fromarray(im).resize(small, Image.BICUBIC)
                                .resize((w, h), Image.BICUBIC), np.uint8) for im in a])


def _gaussian_taps(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def gaussian_blur(images, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 (B, H, W, 3), std `sigma` px, reflected edges, rounded."""
    return np.clip(np.rint(gaussian_blur_levels(images, sigma)), 0, 255).astype(np.uint8)


def gaussian_blur_levels(images, sigma: float) -> np.ndarray:
    """`gaussian_blur` before its rounding: float64 (B, H, W, 3) in grey levels (the reference
    of the differentiable `idguard_jax.channels.gaussian_blur`)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma {sigma}: must be > 0")
    a = _check(images).astype(np.float64)
    w = _gaussian_taps(sigma)
    r = len(w) // 2
    h, wd = a.shape[1:3]
    p = np.pad(a, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect" if h > r else "edge")
    a = sum(w[i] * p[:, i:i + h] for i in range(len(w)))
    p = np.pad(a, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect" if wd > r else "edge")
    return sum(w[i] * p[:, :, i:i + wd] for i in range(len(w)))


_OPS = {"jpeg": (jpeg, int), "resize": (resize_round_trip, float), "blur": (gaussian_blur, float)}


def parse(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """'jpeg:75', 'resize:0.5', 'blur:1.0' or a chain 'a+b+...' -> uint8 images -> uint8 images.
    ValueError naming the spec if it is malformed."""
    steps = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name not in _OPS or not arg:
            raise ValueError(f"robustness op {spec!r}: {part!r} is not one of "
                             f"jpeg:QUALITY, resize:FACTOR, blur:SIGMA")
        fn, kind = _OPS[name]
        try:
            value = kind(arg)
        except ValueError as e:
            raise ValueError(f"robustness op {spec!r}: bad value {arg!r} for {name}") from e
        fn(np.zeros((1, 8, 8, 3), np.uint8), value)     # validates the value now, not later
        steps.append((fn, value))

    def run(images):
        out = _check(images)
        for fn, value in steps:
            out = fn(out, value)
        return out
    return run


def apply(spec: str, images: np.ndarray) -> np.ndarray:
    return parse(spec)(images)


def parse_all(specs: Sequence[str]) -> dict[str, Callable]:
    return {s: parse(s) for s in specs}
