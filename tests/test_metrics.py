"""Metrics against hand-computed values on constructed inputs."""
import numpy as np
import pytest

from idguard_jax.evaluation import metrics


def test_l2_face_is_squared_error_inside_the_mask_over_pixels_and_channels():
    y = np.zeros((2, 8, 8, 3))
    y_hat = np.zeros((2, 8, 8, 3))
    mask = np.zeros((2, 8, 8, 1))
    mask[0, 2:4, 2:5] = 1                        # 6 face pixels
    y_hat[0, 2:4, 2:5, 0] = 0.5                  # error 0.25 on one channel of each
    y_hat[0, 0, 0] = 1.0                         # outside the mask: ignored
    mask[1, :, :] = 1
    y_hat[1] = 0.3
    got = metrics.l2_face(y, y_hat, mask)
    np.testing.assert_allclose(got, [6 * 0.25 / (6 * 3), 0.09])
    assert np.isnan(metrics.l2_face(y[:1], y_hat[:1], np.zeros((1, 8, 8))))[0]
    np.testing.assert_allclose(metrics.mse(y, y_hat)[0], (6 * 0.25 + 3) / (64 * 3))


def test_psnr_known_values():
    a = np.full((4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0, 0] = 110                             # mse 100 / 48
    np.testing.assert_allclose(metrics.psnr(a, b), 10 * np.log10(255 ** 2 * 48 / 100))
    assert metrics.psnr(a, a) == np.inf
    # float images in [-1, 1]: the same picture in either format gives the same value
    np.testing.assert_allclose(metrics.psnr(np.zeros((2, 2, 1)), np.full((2, 2, 1), 0.2)),
                               10 * np.log10(4 / 0.04))


def _ssim_direct(a, b, window=11, sigma=1.5, rng=255.0):
    """Wang et al.'s formula evaluated window by window (slow, obviously right)."""
    w1 = metrics.gaussian_window(window, sigma)
    w = np.outer(w1, w1)[..., None]
    h, wd, _ = a.shape
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    vals = []
    for i in range(h - window + 1):
        for j in range(wd - window + 1):
            pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
            ma, mb = (w * pa).sum((0, 1)), (w * pb).sum((0, 1))
            va, vb = (w * (pa - ma) ** 2).sum((0, 1)), (w * (pb - mb) ** 2).sum((0, 1))
            cov = (w * (pa - ma) * (pb - mb)).sum((0, 1))
            vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                        / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_matches_the_windowed_definition():
    # (It also matched skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False) to 1e-16 when checked by hand; skimage is not a dependency.)
    r = np.random.default_rng(0)
    a = r.integers(0, 256, (16, 19, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + r.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(metrics.ssim(a, b), _ssim_direct(a.astype(float), b.astype(float)),
                               rtol=1e-12)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    # batched, and float images in [-1, 1] are measured on their own range
    fa, fb = a / 127.5 - 1, b / 127.5 - 1
    np.testing.assert_allclose(metrics.ssim(np.stack([fa, fa]), np.stack([fb, fa])),
                               [metrics.ssim(a, b), 1.0], rtol=1e-10)
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(a[:8], b[:8])


def test_cosine():
    np.testing.assert_allclose(metrics.cosine([[1, 0], [1, 1]], [[0, 2], [2, 2]]), [0, 1])
