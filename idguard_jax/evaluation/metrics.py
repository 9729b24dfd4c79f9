"""Image and defence metrics, in NumPy (evaluation and reporting run on the host).

Conventions: images are (..., H, W, C). "float" images are in [-1, 1] (the library's scale);
uint8 images are [0, 255]. Masks are (..., H, W, 1) or (..., H, W) in {0, 1}.

- `l2_face`: the paper's L2_face (eq. 13): squared error inside the binary face mask, averaged
  over the mask's pixels and the channels, on images in [-1, 1].
- `mse`: the same over the whole image (Disrupting Deepfakes' criterion: > 0.05 is a success).
- `psnr`, `ssim`: the visible cost of a perturbation (protected vs original).
- `cosine`, `euclidean`: identity similarity / distance of two embeddings.
- success criteria: `defense_success` (the paper's DSR event), `identity_destroyed` (ArcFace
  cosine < 0.4 or dlib distance >= 0.6), `cmua_l2` (CMUA-Watermark's masked MSE), MSE_SUCCESS
  (Disrupting Deepfakes').
"""
from __future__ import annotations

import numpy as np

__all__ = ["l2_face", "mse", "psnr", "ssim", "cosine", "gaussian_window", "euclidean",
           "cmua_mask", "cmua_l2", "identity_destroyed", "defense_success",
           "L2_FACE_SUCCESS", "ID_SIM_SUCCESS", "DLIB_SAME_PERSON", "MSE_SUCCESS", "CMUA_CHANGE",
           "CMUA_SUCCESS"]

# The paper's success criterion (IV-A4): L2_face > 0.05 AND ArcFace ID similarity < 0.4.
L2_FACE_SUCCESS = 0.05
ID_SIM_SUCCESS = 0.4
# dlib's own threshold: descriptors closer than 0.6 (Euclidean) are the same person.
DLIB_SAME_PERSON = 0.6


def _as_mask(mask, like: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, np.float64)
    if m.ndim == like.ndim - 1:
        m = m[..., None]
    if m.shape[-1] != 1:
        raise ValueError(f"mask must have one channel, got shape {m.shape}")
    return m


def l2_face(y, y_hat, face_mask) -> np.ndarray:
    """Eq. 13: sum over the face mask of the squared error / (mask pixels x channels).

    y, y_hat (..., H, W, C) float in [-1, 1]; face_mask (..., H, W[, 1]) in {0, 1}.
    Returns (...,) float64. An empty mask gives NaN (there is no face to measure)."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    m = _as_mask(face_mask, y)
    num = (m * (y - y_hat) ** 2).sum(axis=(-3, -2, -1))
    den = np.broadcast_to(m, y.shape[:-1] + (1,)).sum(axis=(-3, -2, -1)) * y.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def mse(y, y_hat) -> np.ndarray:
    """Mean squared error over (H, W, C): (...,) float64."""
    d = np.asarray(y, np.float64) - np.asarray(y_hat, np.float64)
    return (d ** 2).mean(axis=(-3, -2, -1))


def _range(a) -> tuple[np.ndarray, float]:
    """float64 pixels and their data range: uint8 as is (range 255); float images in [-1, 1]
    mapped to [0, 1] (range 1), since SSIM's luminance term depends on the offset, not only the
    scale, and must not change with the storage format."""
    if np.asarray(a).dtype == np.uint8:
        return np.asarray(a, np.float64), 255.0
    return (np.asarray(a, np.float64) + 1.0) / 2.0, 1.0


def psnr(a, b) -> np.ndarray:
    """Peak signal-to-noise ratio in dB over (H, W, C) of uint8 or float [-1, 1] images (the
    same value for the same picture in either format). Identical images give +inf."""
    a, peak = _range(a)
    b, _ = _range(b)
    err = ((a - b) ** 2).mean(axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak ** 2 / err)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps (size,)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (..., H, W, C) over H and W: one vectorised add per tap,
    so memory stays O(image) for multi-megapixel photos."""
    k = len(w)
    h, wd = x.shape[-3], x.shape[-2]
    rows = sum(w[i] * x[..., i:h - k + 1 + i, :, :] for i in range(k))
    return sum(w[i] * rows[..., :, i:wd - k + 1 + i, :] for i in range(k))


def ssim(a, b, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> np.ndarray:
    """Structural similarity (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1 0.01,
    K2 0.03, population (co)variances, valid windows only, mean over pixels and channels.
    (skimage's structural_similarity with gaussian_weights=True, use_sample_covariance=False.)
    uint8 or float [-1, 1] images (..., H, W, C), H and W >= window. Returns (...,) float64."""
    a, rng = _range(a)
    b, _ = _range(b)
    if min(a.shape[-3:-1]) < window:
        raise ValueError(f"ssim needs images at least {window} px on each side, got {a.shape}")
    w = gaussian_window(window, sigma)
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a ** 2
    var_b = _filter_valid(b * b, w) - mu_b ** 2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(-3, -2, -1))


def cosine(u, v) -> np.ndarray:
    """Cosine similarity of embeddings (..., D) -> (...,)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    den = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    return (u * v).sum(-1) / np.maximum(den, 1e-12)


# --------------------------------------------------------------------------------------------
# Success criteria (evaluation tables)
# --------------------------------------------------------------------------------------------

# Disrupting Deepfakes (natanielruiz/disrupting-deepfakes): unmasked MSE of the two manipulated outputs > 0.05.
MSE_SUCCESS = 0.05
# CMUA-Watermark (VDIGPKU/CMUA-Watermark): the same error inside the pixels the manipulation changed
# (sum over channels of |clean output - clean input| > 0.5) > 0.05.
CMUA_CHANGE = 0.5
CMUA_SUCCESS = 0.05


def euclidean(u, v) -> np.ndarray:
    """Euclidean distance of descriptors (..., D) -> (...,) (dlib's same-person test: < 0.6)."""
    d = np.asarray(u, np.float64) - np.asarray(v, np.float64)
    return np.sqrt((d ** 2).sum(-1))


def cmua_mask(clean_input, clean_output, change: float = CMUA_CHANGE) -> np.ndarray:
    """CMUA's evaluation mask (..., H, W, 1) float64 in {0, 1}: pixels where the manipulation of
    the CLEAN image changed it, sum over channels of |output - input| > change (images in
    [-1, 1])."""
    diff = np.abs(np.asarray(clean_output, np.float64) - np.asarray(clean_input, np.float64))
    return (diff.sum(-1, keepdims=True) > change).astype(np.float64)


def cmua_l2(y, y_hat, clean_input) -> np.ndarray:
    """CMUA's masked MSE: squared error of the manipulated outputs y (clean) and y_hat
    (protected) inside `cmua_mask(clean_input, y)`, over mask pixels x channels; NaN where the
    manipulation changed nothing (its code would divide by zero)."""
    return l2_face(y, y_hat, cmua_mask(clean_input, y))


def identity_destroyed(value, criterion: str, threshold: float | None = None) -> np.ndarray:
    """Whether identity is destroyed, per element: criterion 'cosine' (ArcFace-like similarity,
    destroyed when < threshold, default ID_SIM_SUCCESS 0.4) or 'distance' (dlib descriptor
    distance, destroyed when >= threshold, default DLIB_SAME_PERSON 0.6). NaN -> False."""
    v = np.asarray(value, np.float64)
    with np.errstate(invalid="ignore"):
        if criterion == "cosine":
            return v < (ID_SIM_SUCCESS if threshold is None else threshold)
        if criterion == "distance":
            return v >= (DLIB_SAME_PERSON if threshold is None else threshold)
    raise ValueError(f"criterion={criterion!r}: 'cosine' or 'distance'")


def defense_success(l2_face_value, destroyed) -> np.ndarray:
    """The paper's DSR event (IV-A4): L2_face > 0.05 AND identity destroyed. NaN L2 -> False."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(l2_face_value, np.float64) > L2_FACE_SUCCESS) & np.asarray(destroyed, bool)
