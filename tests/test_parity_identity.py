"""The identity-network ports + converters reproduce the official torch networks exactly, and
`idguard_jax.networks.identity` feeds each network the reference's input.

Official key names and widths with fewer blocks per stage (ArcFace, IR-SE50, iresnet) or narrower
layers (VGGFace), through the real converter and the library's loader; the full-size networks
are checked by shapes only (jax.eval_shape).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert.convert import convert_identity, main as convert_main
from idguard_jax.networks import identity
from idguard_jax.images import resize_align_corners
from idguard_jax.networks.summary import network_sizes
from torch_reference import assert_matches, randomize_norms_
from torch_reference.arcface import ResNet, randomize_prelus_
from torch_reference.iresnet import IResNet
from torch_reference.irse import Backbone, psp_extract_input
from torch_reference.vggface import VggFace, denorm, resize_image

BATCH = 2
ARCFACE_LAYERS = (1, 2, 1, 1)  # a stage without and one with a non-first block
IRSE_UNITS = (2, 1, 2, 1)      # MaxPool(1, 2) and MaxPool(1, 1) shortcuts, and 1x1 conv ones
IRESNET_LAYERS = {"iresnet50": (1, 2, 1, 1), "iresnet100": (1, 1, 2, 1)}
VGG_CONFIG = {"widths": (8, 16, 16, 32, 32), "fc_width": 64, "num_classes": 10}


def _random_reference(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return randomize_prelus_(randomize_norms_(module, gen), gen).eval()


@torch.no_grad()
def _he_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """He-normal weights and small random biases: VGG has no norms, and torch's default init
    shrinks the signal ~10x per layer, which would leave a parity bound with nothing to bite."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return module.eval()


def _convert(model: str, reference: torch.nn.Module, tmp_path, config: dict):
    """torch.save -> convert_identity -> identity.load, as a user would."""
    checkpoint = tmp_path / f"{model}.pth"
    torch.save(reference.state_dict(), checkpoint)
    convert_identity(model, str(checkpoint), str(tmp_path / "weights"), config=config)
    return identity.load(model, tmp_path / "weights")


def _images(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 3, size, size, generator=gen) * 2 - 1


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _raw_embedding(net, variables, x):
    return net.module.apply(variables, net.prepare(x), method=net.embed_method)


@pytest.fixture(scope="module")
def arcface(tmp_path_factory):
    reference = _random_reference(ResNet(ARCFACE_LAYERS), 0)
    net, variables = _convert("arcface", reference, tmp_path_factory.mktemp("arcface"),
                              {"layers": ARCFACE_LAYERS})
    return reference, net, variables


@pytest.fixture(scope="module")
def vggface(tmp_path_factory):
    cfg = VGG_CONFIG
    reference = _he_init_(VggFace(cfg["widths"], cfg["fc_width"], cfg["num_classes"]), 3)
    net, variables = _convert("vggface", reference, tmp_path_factory.mktemp("vggface"), cfg)
    return reference, net, variables


def test_arcface_matches_id_guard(arcface):
    """ID-Guard's path: features(resize_image(o, 112)) on [-1, 1] outputs, no normalisation."""
    reference, net, variables = arcface
    x = _images(128, 1)
    with torch.no_grad():
        x112 = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True)
        want_map, want_emb = reference.features(x112), reference(x112)
    assert_matches(jax.jit(net.features)(variables, _nhwc(x)), want_map, "arcface bn2 map")
    assert_matches(jax.jit(lambda v, x: _raw_embedding(net, v, x))(variables, _nhwc(x)),
                   want_emb, "arcface embedding")
    assert_matches(jax.jit(net.embed)(variables, _nhwc(x)), F.normalize(want_emb),
                   "arcface unit embedding")


def test_irse50_matches_psp_id_loss(tmp_path):
    """pSp's IDLoss: crop 35:223 x 32:220 of a 256 image, adaptive avg pool to 112 (non-uniform
    windows), backbone, L2 norm."""
    reference = _random_reference(Backbone(IRSE_UNITS), 4)
    net, variables = _convert("irse50", reference, tmp_path, {"units": IRSE_UNITS})
    x = _images(256, 5)
    with torch.no_grad():
        x112 = psp_extract_input(x)
        want_map, want_emb = reference.feature_map(x112), reference(x112)
    np.testing.assert_allclose(net.prepare(_nhwc(x)), _nhwc(x112), rtol=0, atol=1e-6)
    assert_matches(jax.jit(net.features)(variables, _nhwc(x)), want_map, "irse50 map")
    assert_matches(jax.jit(net.embed)(variables, _nhwc(x)), want_emb, "irse50 unit embedding")


@pytest.mark.parametrize("model", ["iresnet50", "iresnet100"])
def test_iresnet_matches_insightface(model, tmp_path):
    layers = IRESNET_LAYERS[model]
    reference = _random_reference(IResNet(layers), 6)
    net, variables = _convert(model, reference, tmp_path, {"layers": layers})
    x = _images(112, 7)
    with torch.no_grad():
        want_map, want_emb = reference.feature_map(x), reference(x)
    assert_matches(jax.jit(net.features)(variables, _nhwc(x)), want_map, f"{model} bn2 map")
    assert_matches(jax.jit(lambda v, x: _raw_embedding(net, v, x))(variables, _nhwc(x)),
                   want_emb, f"{model} embedding")


def test_vggface_matches_id_guard(vggface):
    """ID-Guard's path: VggFace.features(resize_image(o, 224)), denorm inside, no mean."""
    reference, net, variables = vggface
    x = _images(96, 8)
    with torch.no_grad():
        x224 = resize_image(x, 224)
        want_map, want_desc = reference.features(x224), reference.descriptor(x224)
        want_logits = reference(x224)
    assert_matches(jax.jit(net.features)(variables, _nhwc(x)), want_map, "vggface conv5")
    assert_matches(jax.jit(lambda v, x: _raw_embedding(net, v, x))(variables, _nhwc(x)),
                   want_desc, "vggface descriptor")
    logits = net.module.apply(variables, net.prepare(_nhwc(x)))
    assert_matches(logits, want_logits, "vggface logits")


def test_vggface_ceil_mode_pooling(vggface):
    """At 200 px the pools meet odd sizes (25 -> 13 -> 7): ceil_mode keeps the last window."""
    reference, net, variables = vggface
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(BATCH, 3, 200, 200, generator=gen)  # [0, 1]: the reference's denorm is a no-op
    with torch.no_grad():
        want = reference.features(x)
    assert want.shape[2:] == (7, 7)
    got = net.module.apply(variables, _nhwc(x), method="feature_map")
    assert_matches(got, want, "vggface conv5 at 200 px")


def test_default_inputs_are_the_references(arcface, vggface):
    """ArcFace gets [-1, 1] at 112 px unnormalised; VGGFace gets denorm (decided over the whole
    batch) of the 224 px resize, no mean."""
    _, arc, arc_vars = arcface
    x = _images(64, 10)
    x112 = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True)
    got = arc.prepare(_nhwc(x))
    np.testing.assert_allclose(got, _nhwc(x112), rtol=0, atol=1e-6)
    assert float(jnp.min(got)) < -0.9 and float(jnp.max(got)) > 0.9  # still [-1, 1]
    np.testing.assert_array_equal(
        arc.features(arc_vars, _nhwc(x)),
        arc.module.apply(arc_vars, resize_align_corners(jnp.asarray(_nhwc(x)), 112),
                         method="feature_map"))

    _, vgg, _ = vggface
    bright = _images(64, 13)[:1].abs() * 0.5 + 0.25  # min >= 0 on its own
    dark = _images(64, 11)[:1]                        # min < 0
    for batch, maps in ((torch.cat([bright, dark]), True), (bright, False)):
        want = _nhwc(denorm(resize_image(batch, 224)))
        got = vgg.prepare(_nhwc(batch))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        # data dependent: the bright image is mapped only when its batch holds a negative value
        mapped = not np.allclose(got[0], _nhwc(resize_image(bright, 224))[0], atol=1e-6)
        assert mapped == maps


def test_trained_normalisation():
    x = _images(64, 12)
    unit = (F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True) + 1) / 2
    mean = torch.tensor(identity.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(identity.IMAGENET_STD)[:, None, None]
    arc = identity.build("arcface", {"layers": ARCFACE_LAYERS}, normalisation="trained")
    np.testing.assert_allclose(arc.prepare(_nhwc(x)), _nhwc((unit - mean) / std), atol=1e-5)

    vgg = identity.build("vggface", VGG_CONFIG, normalisation="trained")
    want = (resize_image(x, 224) + 1) / 2 - torch.tensor(identity.VGGFACE_MEAN_RGB)[:, None, None]
    np.testing.assert_allclose(vgg.prepare(_nhwc(x)), _nhwc(want), atol=1e-6)
    with pytest.raises(ValueError, match="normalisation"):
        identity.build("arcface", normalisation="imagenet")


@pytest.mark.parametrize("name, map_shape, emb_dim", [
    ("arcface", (7, 7, 512), 512), ("irse50", (7, 7, 512), 512), ("iresnet50", (7, 7, 512), 512),
    ("iresnet100", (7, 7, 512), 512), ("vggface", (7, 7, 512), 4096)])
def test_full_size_shapes(name, map_shape, emb_dim):
    variables = identity.abstract_variables(name)
    net = identity.build(name)
    x = jax.ShapeDtypeStruct((3, 256, 256, 3), jnp.float32)
    assert jax.eval_shape(net.features, variables, x).shape == (3, *map_shape)
    assert jax.eval_shape(net.embed, variables, x).shape == (3, emb_dim)


def test_full_size_official_keys():
    params = identity.abstract_variables("arcface")["params"]
    assert len([k for k in params if k.startswith("layer3_")]) == 23
    assert params["layer3_22"]["prelu"]["weight"].shape == (1,)
    assert params["layer2_0"]["se"]["fc_1"]["weight"].shape == (1,)
    assert params["fc"]["kernel"].shape == (25088, 512)
    irse = identity.abstract_variables("irse50")["params"]
    assert len([k for k in irse if k.startswith("body_")]) == 24
    assert irse["body_3"]["res_layer_2"]["weight"].shape == (128,)


def test_parameter_counts():
    sizes = network_sizes()
    assert sizes["arcface"] == 52_193_215
    assert sizes["irse50"] == 43_797_696
    assert sizes["iresnet50"] == 43_590_848
    assert sizes["iresnet100"] == 65_156_160
    assert sizes["vggface"] == 145_002_878
    assert "standin" not in sizes


def test_cli_converts_identity_networks_at_official_size(tmp_path, capsys):
    """The command line routes identity networks to the official architecture: a reduced file
    is refused with the keys named."""
    checkpoint = tmp_path / "arcface_ir_se50.pth"
    torch.save(ResNet(ARCFACE_LAYERS).state_dict(), checkpoint)
    assert convert_main(["arcface", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "missing keys" in err and "layer1.1." in err


def test_load_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert/convert.py vggface"):
        identity.load("vggface", tmp_path)
