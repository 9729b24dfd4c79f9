"""Robustness operations: their effects on constructed and real images."""
import numpy as np
import pytest

from idguard_jax.evaluation import robustness
from idguard_jax.data.datasets import load_folder


@pytest.fixture(scope="module")
def faces(shared_faces_dir):
    return load_folder(shared_faces_dir, 64, limit=2)[0]


def _err(a, b):
    return np.mean((a.astype(float) - b.astype(float)) ** 2)


def test_jpeg_error_falls_as_quality_rises(faces):
    errs = [_err(robustness.jpeg(faces, q), faces) for q in (50, 75, 95, 100)]
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0
    assert robustness.jpeg(faces, 75).shape == faces.shape
    for bad in (0, 101):                             # PIL's scale is 1..100
        with pytest.raises(ValueError, match="1..100"):
            robustness.jpeg(faces, bad)


def test_resize_round_trip_keeps_the_shape_and_loses_more_when_smaller(faces):
    half, most = robustness.resize_round_trip(faces, 0.5), robustness.resize_round_trip(faces, 0.75)
    assert half.shape == most.shape == faces.shape and half.dtype == np.uint8
    assert _err(half, faces) > _err(most, faces) > 0
    np.testing.assert_array_equal(robustness.resize_round_trip(faces, 1.0), faces)


def test_blur_is_a_normalised_gaussian():
    flat = np.full((1, 16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(robustness.gaussian_blur(flat, 1.0), flat)
    dot = np.zeros((1, 21, 21, 3), np.uint8)
    dot[0, 10, 10] = 255
    out = robustness.gaussian_blur(dot, 1.0).astype(float)
    x = np.arange(-3, 4)
    g = np.exp(-x ** 2 / 2)
    g /= g.sum()
    np.testing.assert_allclose(out[0, 7:14, 7:14, 0], np.rint(255 * np.outer(g, g)), atol=1)
    assert out[0, 10, 10, 0] < 255 and abs(out.sum() / 3 - 255) < 10


def test_chains_apply_left_to_right_and_bad_specs_are_named(faces):
    chained = robustness.apply("resize:0.5+jpeg:75", faces)
    np.testing.assert_array_equal(
        chained, robustness.jpeg(robustness.resize_round_trip(faces, 0.5), 75))
    for bad in ("jpeg", "jpeg:x", "sharpen:2", "resize:2", "blur:0"):
        with pytest.raises(ValueError, match="robustness op|must be"):
            robustness.parse(bad)
    with pytest.raises(ValueError, match="uint8"):
        robustness.jpeg(faces.astype(np.float32), 75)
