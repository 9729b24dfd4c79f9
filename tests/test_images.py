"""Array image maths (the align_corners resize against torch's definition, uint8 <-> [-1, 1]) and
reading image files."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idguard_jax import image_files, images


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((256, 256), (112, 112)),
                                     ((64, 48), (16, 20)), ((1, 5), (3, 5))])
def test_resize_matches_torch_align_corners(src, dst):
    x = np.random.default_rng(0).normal(size=(2, 3) + src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=True).numpy()
    out = images.resize_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5)


def test_uint8_float_round_trip():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    f = images.to_float(u)
    assert f.min() == -1 and f.max() == 1
    np.testing.assert_array_equal(images.to_uint8(f), u)


def test_read_rgb_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        image_files.read_rgb(bad)
