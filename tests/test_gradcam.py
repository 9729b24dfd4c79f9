"""Grad-CAM++ heatmaps against an independent torch + NumPy computation of ID-Guard's
`solver.heatmap` (pytorch-grad-cam 1.4.8 formulas), on a random narrow VGGFace
converted and loaded as a user would; and the heatmap command line (resumable cache)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convert.convert import convert_identity
from experiments.heatmaps import main as heatmaps_main
from idguard_jax.networks import gradcam
from idguard_jax.networks import identity
from idguard_jax.image_files import read_rgb
from idguard_jax.images import to_float
from torch_reference.vggface import VggFace, denorm, resize_image

VGG_CONFIG = {"widths": (8, 16, 16, 32, 32), "fc_width": 64, "num_classes": 10}
IMAGE_SIZE = 64


@torch.no_grad()
def _random_vggface(seed: int) -> VggFace:
    """He-normal weights (torch's default init fades the signal out through 13 layers)."""
    gen = torch.Generator().manual_seed(seed)
    net = VggFace(VGG_CONFIG["widths"], VGG_CONFIG["fc_width"], VGG_CONFIG["num_classes"])
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                           * (2 / m.weight[0].numel()) ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return net.eval()


def _scale_cam(cams: np.ndarray, size: int | None) -> np.ndarray:
    """scale_cam_image: per image -min, /(max + 1e-7), then cv2 INTER_LINEAR, which for
    enlarging equals torch's bilinear with align_corners=False."""
    out = []
    for cam in cams:
        cam = cam - np.min(cam)
        cam = cam / (1e-7 + np.max(cam))
        if size is not None:
            cam = F.interpolate(torch.from_numpy(cam)[None, None], size=(size, size),
                                mode="bilinear", align_corners=False)[0, 0].numpy()
        out.append(cam)
    return np.float32(out)


def reference_heatmap(vgg: VggFace, x_real: torch.Tensor):
    """ID-Guard's solver.heatmap with GradCAMPlusPlus(vgg, [vgg.conv5]) written out."""
    captured = {}

    def keep_activation(module, inputs, output):  # as ActivationsAndGradients: A and dscore/dA
        output.retain_grad()
        captured["A"] = output

    hook = vgg.conv5.register_forward_hook(keep_activation)
    resized = resize_image(denorm(x_real), 224)
    outputs = vgg(resized)
    classes = np.argmax(outputs.detach().numpy(), axis=-1)
    score = sum(out[c] for out, c in zip(outputs, classes))
    score.backward()
    hook.remove()
    a = captured["A"].detach().numpy()
    g = captured["A"].grad.numpy()
    g2, g3 = g ** 2, g ** 3
    alpha = g2 / (2 * g2 + np.sum(a, axis=(2, 3))[:, :, None, None] * g3 + 0.000001)
    alpha = np.where(g != 0, alpha, 0)
    weights = np.sum(np.maximum(g, 0) * alpha, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    cam = _scale_cam(np.maximum(_scale_cam(cam, 224), 0), None)
    heat = resize_image(torch.from_numpy(cam)[:, None], x_real.shape[2])
    return heat.permute(0, 2, 3, 1).numpy(), classes


@pytest.fixture(scope="module")
def vggface(tmp_path_factory):
    """(torch reference, weights folder, loaded net, variables)."""
    folder = tmp_path_factory.mktemp("vgg")
    reference = _random_vggface(0)
    torch.save(reference.state_dict(), folder / "vggface.pth")
    convert_identity("vggface", str(folder / "vggface.pth"), str(folder / "weights"),
                     config=VGG_CONFIG)
    net, variables = identity.load("vggface", folder / "weights")
    return reference, folder / "weights", net, variables


def test_heatmaps_match_reference(vggface):
    reference, _, net, variables = vggface
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
    want, want_classes = reference_heatmap(reference, x)
    got = gradcam.heatmaps(net.module, variables, x.permute(0, 2, 3, 1).numpy())
    _, classes = gradcam.gradcam_plusplus(
        net.module, variables, resize_image(denorm(x), 224).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(classes, want_classes)
    assert got.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 1) and got.dtype == jnp.float32
    assert float(np.std(want)) > 0.05 and np.max(want) > 0.99  # a real, normalised map
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"heatmap: max abs error {err:.3g}")
    assert err <= 1e-4


def test_cam_weights_formula_with_zero_gradients():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 3, 4)).astype(np.float32)
    g = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    g[0, 1, 1, :] = 0.0
    g[1, :, :, 2] = 0.0
    want = []
    for ab, gb in zip(a, g):
        s = ab.sum(axis=(0, 1))
        alpha = np.where(gb != 0, gb ** 2 / (2 * gb ** 2 + s * gb ** 3 + 1e-6), 0.0)
        want.append((np.maximum(gb, 0) * alpha).sum(axis=(0, 1)))
    got = gradcam.cam_weights(jnp.asarray(a), jnp.asarray(g))
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-7)
    assert float(got[1, 2]) == 0.0


def test_half_pixel_resize_is_cv2_inter_linear():
    # cv2.resize([[0, 1]], (4, 1), interpolation=INTER_LINEAR) == [[0, 0.25, 0.75, 1]]
    row = gradcam.resize_half_pixel(jnp.array([[[0.0, 1.0], [0.0, 1.0]]]), 4)
    np.testing.assert_allclose(row[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    cam = jax.random.uniform(jax.random.key(0), (2, 7, 7))
    want = jax.image.resize(cam, (2, 224, 224), "linear", antialias=False)
    np.testing.assert_allclose(gradcam.resize_half_pixel(cam, 224), want, atol=1e-6)


def _write_faces(folder, n: int) -> list:
    rng = np.random.default_rng(3)
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_heatmaps_cli_writes_and_resumes(vggface, tmp_path, capsys):
    _, weights, net, variables = vggface
    faces = _write_faces(tmp_path / "faces", 3)
    out = tmp_path / "heat"
    args = [str(tmp_path / "faces"), str(out), "--weights", str(weights),
            "--image-size", str(IMAGE_SIZE), "--batch-size", "2"]
    assert heatmaps_main(args) == 0
    assert "wrote 3 heatmaps" in capsys.readouterr().out
    batch = to_float(np.stack([read_rgb(p, IMAGE_SIZE) for p in faces[:2]]))
    want = np.asarray(gradcam.heatmaps(net.module, variables, batch))[..., 0]
    for i in range(2):
        got = np.load(out / f"face{i}.npy", mmap_mode="r")
        assert got.shape == (IMAGE_SIZE, IMAGE_SIZE) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want[i])
    assert json.loads((out / "heatmaps.json").read_text())["image_size"] == IMAGE_SIZE

    (out / "face1.npy").unlink()
    before = (out / "face0.npy").stat().st_mtime_ns
    assert heatmaps_main(args) == 0
    assert "wrote 1 heatmaps" in capsys.readouterr().out
    assert (out / "face1.npy").exists() and (out / "face0.npy").stat().st_mtime_ns == before

    assert heatmaps_main(args[:-3] + ["128", "--batch-size", "2"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert heatmaps_main([str(tmp_path / "faces"), str(out), "--weights", str(tmp_path)]) == 2
    assert "convert/convert.py vggface" in capsys.readouterr().err
