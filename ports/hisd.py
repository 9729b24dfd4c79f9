"""HiSD's generator (imlixinyang/HiSD `core/networks.py::Gen`, as ID-Guard's `deepfake.py`
runs it), NHWC.

    e = encoder(x)                                   # (B, H/4, W/4, 256): the mid features
    s = extractor(reference)[:, tag]                 # reference-guided, or
    s = mapper[tag](noise, attribute)                # latent-guided, (B, style_dim)
    image = decoder(translator[tag](e, s))           # (B, H, W, 3), no tanh: unbounded

Submodule names mirror the torch keys of the `gen_test` state_dict (`encoder.1.in1.weight` ->
('encoder_1', 'in1', 'scale'), `mappers.2.post_models.2.2.weight` -> ('mappers_2',
'post_models_2_2', 'kernel')), so a converted file maps one to one.

HiSD's own InstanceNorm divides by the UNBIASED standard deviation plus eps (eps outside the
square root); its AdaIN uses the same statistics with weight/bias sliced from the translator's
`style_to_params` output. Every block is LeakyReLU(0.2), and its output is (residual + out)/sqrt(2).

The second half of this file is the target glue: the conditions (which reference or noise, tag
and attribute each manipulation uses) and the reference images, which are frozen data carried in
the variables' 'references' collection so that they enter a jitted step as arguments.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import Conv3x3Resampled, affine_params, conv2d, dense

__all__ = ["HiSDConfig", "HiSD", "CELEBA_HQ_256", "config_from_hyperparameters", "latent_noise"]

Dtype = Any

_EPS = 1e-5
_SLOPE = 0.2

# configs/celeba-hq_256.yaml (the checkpoint gen_00600000.pt), in this port's flat form.
CELEBA_HQ_256 = {
    "style_dim": 256,
    "noise_dim": 32,
    "input_dim": 3,
    "encoder_channels": [64, 128, 256],
    "decoder_channels": [256, 128, 64],
    "extractor_channels": [32, 64, 128, 256, 512, 512, 512],
    "translator_channels": [64] * 8,
    "mapper_pre_channels": [256, 256, 256],
    "mapper_post_channels": [256, 256, 256],
    "tags": [["Bangs", ["with", "without"]],
             ["Eyeglasses", ["with", "without"]],
             ["HairColor", ["black", "blond", "brown"]]],
}


@dataclasses.dataclass(frozen=True)
class HiSDConfig:
    """The generator's architecture (hashable); `tags` = ((name, (attribute names...)), ...)."""
    style_dim: int
    noise_dim: int
    input_dim: int
    encoder_channels: tuple[int, ...]
    decoder_channels: tuple[int, ...]
    extractor_channels: tuple[int, ...]
    translator_channels: tuple[int, ...]
    mapper_pre_channels: tuple[int, ...]
    mapper_post_channels: tuple[int, ...]
    tags: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        problems = [f"{name} is empty" for name in (
            "encoder_channels", "decoder_channels", "extractor_channels", "mapper_pre_channels",
            "mapper_post_channels") if not getattr(self, name)]
        if len(self.translator_channels) < 2:
            problems.append("translator_channels needs at least 2 entries (one AdaIN block)")
        if problems:
            raise ValueError("HiSD config: " + "; ".join(problems))
        if self.decoder_channels[0] != self.encoder_channels[-1]:
            # the translator blends its output with the encoder's: f*m + e*(1-m)
            problems.append("decoder_channels[0] must equal encoder_channels[-1]")
        if self.mapper_post_channels[0] != self.mapper_pre_channels[-1]:
            problems.append("mapper_post_channels[0] must equal mapper_pre_channels[-1]")
        if not self.tags or any(not attrs for _, attrs in self.tags):
            problems.append("tags: need at least one tag, each with at least one attribute")
        if problems:
            raise ValueError("HiSD config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping) -> "HiSDConfig":
        """From the flat form of CELEBA_HQ_256 (lists or tuples, e.g. read back from JSON)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = fields - set(d), set(d) - fields
        if missing or unknown:
            raise ValueError(f"HiSD config: missing fields {sorted(missing)}, "
                             f"unknown fields {sorted(unknown)}")
        kw = {k: (int(v) if k in ("style_dim", "noise_dim", "input_dim")
                  else tuple(int(c) for c in v)) for k, v in d.items() if k != "tags"}
        tags = tuple((str(name), tuple(str(a) for a in attrs)) for name, attrs in d["tags"])
        return cls(tags=tags, **kw)

    def to_dict(self) -> dict:
        """The flat JSON-friendly form (lists)."""
        def lists(v):
            return [lists(item) for item in v] if isinstance(v, tuple) else v

        return {k: lists(v) for k, v in dataclasses.asdict(self).items()}

    @property
    def num_adain_params(self) -> int:
        """Width of style_to_params: 2*(in + out) per translator block (bias and weight each)."""
        ch = self.translator_channels
        return sum(2 * (ch[i] + ch[i + 1]) for i in range(len(ch) - 1))


_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(HiSDConfig))


def config_from_hyperparameters(hp: Mapping) -> dict:
    """HiSD's YAML layout (hp['encoder']['channels'], hp['tags'][i]['attributes'][j]['name'], ...)
    -> the flat form of CELEBA_HQ_256, plus 'reference_size' (its new_size) when present.

    Raises ValueError naming the first missing field.
    """
    def get(*path):
        node = hp
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"HiSD config: no field {'.'.join(map(str, path))}")
            node = node[key]
        return node

    tags = get("tags")
    if not isinstance(tags, Sequence) or not tags:
        raise ValueError("HiSD config: 'tags' must be a non-empty list")
    cfg = {
        "style_dim": get("style_dim"), "noise_dim": get("noise_dim"),
        "input_dim": get("input_dim"),
        "encoder_channels": get("encoder", "channels"),
        "decoder_channels": get("decoder", "channels"),
        "extractor_channels": get("extractors", "channels"),
        "translator_channels": get("translators", "channels"),
        "mapper_pre_channels": get("mappers", "pre_channels"),
        "mapper_post_channels": get("mappers", "post_channels"),
        "tags": [[t.get("name", str(i)), [a.get("name", str(j))
                                          for j, a in enumerate(t.get("attributes") or [])]]
                 for i, t in enumerate(tags)],
    }
    out = HiSDConfig.from_dict(cfg).to_dict()
    if "new_size" in hp:
        out["reference_size"] = int(hp["new_size"])
    return out


# ------------------------------------------------------------------------------------------------
# Layers


def _leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, _SLOPE)


def _avg_pool2(x: jax.Array) -> jax.Array:
    """F.avg_pool2d(x, 2) on NHWC (H, W even)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample2(x: jax.Array) -> jax.Array:
    """F.interpolate(x, scale_factor=2, mode='nearest') on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _standardize(x: jax.Array) -> jax.Array:
    """(x - mean_HW) / (unbiased std_HW + eps), in float32: HiSD's IN/AdaIN statistics."""
    return _standardize_f32(x.astype(jnp.float32))


@jax.custom_vjp
def _standardize_f32(x: jax.Array) -> jax.Array:
    """_standardize of float32 x. Its gradient is the closed form, per image and channel,
    dx = r g - r mean(g) - k (x - mean) with r = 1 / (std + eps) and
    k = r^2 sum(g (x - mean)) / ((n - 1) std): two reductions and one elementwise pass, as
    ports.layers.normalize's and for the same reason (XLA:CPU's autodiff form is slower)."""
    return _standardize_fwd(x)[0]


def _standardize_fwd(x):
    n = x.shape[1] * x.shape[2]
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    centred = x - mean
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=(1, 2), keepdims=True) / (n - 1))
    return centred / (std + _EPS), (centred, std)


def _standardize_bwd(residuals, g):
    centred, std = residuals
    n = centred.shape[1] * centred.shape[2]
    rstd = 1.0 / (std + _EPS)
    sum_g = jnp.sum(g, axis=(1, 2), keepdims=True)
    sum_gc = jnp.sum(g * centred, axis=(1, 2), keepdims=True)
    b = -rstd * sum_g / n
    k = -rstd * rstd * sum_gc / ((n - 1) * std)
    return (g * rstd + centred * k + b,)


_standardize_f32.defvjp(_standardize_fwd, _standardize_bwd)


def _adain(x: jax.Array, params: jax.Array) -> jax.Array:
    """AdaIN of (B, H, W, C) with params (B, 2C) = [bias | weight - 1] (translator order)."""
    c = x.shape[-1]
    bias = params[:, None, None, :c]
    weight = params[:, None, None, c:2 * c] + 1.0
    return (_standardize(x) * weight + bias).astype(x.dtype)


class InstanceNorm(nn.Module):
    """HiSD's InstanceNorm2d: affine, unbiased std, eps added to the std. torch weight/bias are
    (1, C, 1); here scale/bias (C,)."""
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = affine_params(self, c)
        return (_standardize(x) * scale + bias).astype(self.dtype or x.dtype)


def _conv3(features: int, name: str, dtype: Dtype) -> nn.Conv:
    return conv2d(features, 3, 1, 1, bias=True, name=name, dtype=dtype)


def _conv1(features: int, name: str, dtype: Dtype, bias: bool = True) -> nn.Conv:
    return conv2d(features, 1, 1, 0, bias=bias, name=name, dtype=dtype)


class DownBlock(nn.Module):
    """(B, H, W, in) -> (B, H/2, W/2, out). residual = pool(sc(x)); out = conv2(act(
    [in2](pool(conv1(act([in1](x))))))); keys conv1, conv2, sc (no bias) [, in1, in2: both `in`
    channels]. pool(sc(x)) runs as sc(pool(x)) and pool(conv1(.)) as one strided conv
    (`Conv3x3Resampled`): the same maps, fewer multiply-adds. `normalize` selects DownBlockIN
    (the encoder) over DownBlock (the extractor)."""
    out_dim: int
    normalize: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, in_dim = self.dtype, x.shape[-1]
        norm1 = InstanceNorm(dt, name="in1") if self.normalize else (lambda h: h)
        norm2 = InstanceNorm(dt, name="in2") if self.normalize else (lambda h: h)
        # pool(sc(x)) as sc(pool(x)): the same linear map (a 1x1 conv without bias) at a
        # quarter of the pixels, and XLA:CPU fuses a conv followed by the pool's sum badly
        residual = _conv1(self.out_dim, "sc", dt, bias=False)(_avg_pool2(x))
        h = Conv3x3Resampled(in_dim, "down", dtype=dt, name="conv1")(_leaky_relu(norm1(x)))
        h = _conv3(self.out_dim, "conv2", dt)(_leaky_relu(norm2(h)))
        return (residual + h) / math.sqrt(2)


class UpBlockIN(nn.Module):
    """(B, H, W, in) -> (B, 2H, 2W, out). residual = up(sc(x)); out = conv2(act(in2(conv1(up(
    act(in1(x))))))); in1 has `in` channels, in2 `out`. conv1(up(.)) runs at the input's
    resolution (`Conv3x3Resampled`)."""
    out_dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        residual = _upsample2(_conv1(self.out_dim, "sc", dt, bias=False)(x))
        h = _leaky_relu(InstanceNorm(dt, name="in1")(x))
        h = Conv3x3Resampled(self.out_dim, "up", dtype=dt, name="conv1")(h)
        h = _conv3(self.out_dim, "conv2", dt)(_leaky_relu(InstanceNorm(dt, name="in2")(h)))
        return (residual + h) / math.sqrt(2)


class MiddleBlock(nn.Module):
    """(B, H, W, in), AdaIN params (B or 1, 2*in + 2*out) -> (B, H, W, out).
    residual = sc(x); out = conv2(act(adain2(conv1(act(adain1(x))))))."""
    out_dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, params: jax.Array) -> jax.Array:
        dt, in_dim = self.dtype, x.shape[-1]
        residual = _conv1(self.out_dim, "sc", dt, bias=False)(x)
        h = _conv3(self.out_dim, "conv1", dt)(_leaky_relu(_adain(x, params[:, :2 * in_dim])))
        h = _adain(h, params[:, 2 * in_dim:2 * (in_dim + self.out_dim)])
        h = _conv3(self.out_dim, "conv2", dt)(_leaky_relu(h))
        return (residual + h) / math.sqrt(2)


class LinearBlock(nn.Module):
    """linear(relu(x)): the activation comes BEFORE the layer (key `linear`)."""
    out_dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return dense(self.out_dim, name="linear", dtype=self.dtype)(nn.relu(z))


# ------------------------------------------------------------------------------------------------
# Generator parts


class Extractors(nn.Module):
    """Reference (B, H, W, 3) -> styles (B, num_tags, style_dim); keys model.{i}. H must be
    divisible by 2^(len(extractor_channels) - 1)."""
    config: HiSDConfig
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        ch = cfg.extractor_channels
        h = _conv1(ch[0], "model_0", dt)(x)
        for i in range(1, len(ch)):
            h = DownBlock(ch[i], dtype=dt, name=f"model_{i}")(h)
        h = jnp.mean(h, axis=(1, 2), keepdims=True)  # model.{len(ch)}: AdaptiveAvgPool2d(1)
        s = _conv1(cfg.style_dim * len(cfg.tags), f"model_{len(ch) + 1}", dt)(h)
        # torch views the (B, T*S, 1, 1) output as (B, T, S): channel t*S + s
        return s.reshape(x.shape[0], len(cfg.tags), cfg.style_dim)


class Translator(nn.Module):
    """(e (B, h, w, C_enc), style (B or 1, style_dim)) -> features(mid)*m + e*(1-m), m =
    sigmoid(masks(mid)), mid = model(e) with AdaIN params = style_to_params(style), sliced in
    block order (adain1 then adain2 of each block)."""
    config: HiSDConfig
    dtype: Dtype = None

    @nn.compact
    def __call__(self, e: jax.Array, style: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        ch = cfg.translator_channels
        params = dense(cfg.num_adain_params, name="style_to_params", dtype=dt)(style)
        mid = _conv1(ch[0], "model_0", dt)(e)
        offset = 0
        for i in range(1, len(ch)):
            width = 2 * (ch[i - 1] + ch[i])
            mid = MiddleBlock(ch[i], dtype=dt, name=f"model_{i}")(
                mid, params[:, offset:offset + width])
            offset += width
        features = _conv1(cfg.decoder_channels[0], "features_0", dt)(mid)
        m = nn.sigmoid(_conv1(cfg.decoder_channels[0], "masks_0", dt)(mid))
        return features * m + e * (1 - m)


class Mapper(nn.Module):
    """(noise (B, noise_dim), attribute: static int) -> style (B, style_dim) =
    post_models[attribute](pre_model(noise)); keys pre_model.{i}, post_models.{j}.{k}. Calling it
    once per attribute creates every post model."""
    config: HiSDConfig
    dtype: Dtype = None

    @nn.compact
    def __call__(self, z: jax.Array, attribute: int) -> jax.Array:
        cfg, dt = self.config, self.dtype
        pre, post = cfg.mapper_pre_channels, cfg.mapper_post_channels
        z = dense(pre[0], name="pre_model_0", dtype=dt)(z)
        for i in range(1, len(pre)):
            z = LinearBlock(pre[i], dt, name=f"pre_model_{i}")(z)
        for k in range(1, len(post)):
            z = LinearBlock(post[k], dt, name=f"post_models_{attribute}_{k - 1}")(z)
        return dense(cfg.style_dim, name=f"post_models_{attribute}_{len(post) - 1}", dtype=dt)(z)


def _pick(index: jax.Array, trees: list) -> Any:
    """trees[index] for a traced index, by lax.switch over PARAMETERS rather than over the
    computation: under vmap (the train step maps over conditions) a batched index turns
    lax.switch into a select that would run every branch; selecting the parameters keeps one
    branch's compute. Out-of-range indices clamp, as lax.switch does."""
    return jax.lax.switch(index, [lambda t=t: t for t in trees])


class HiSD(nn.Module):
    """(x (B, H, W, 3) in [-1, 1], condition) -> (image (B, H, W, 3) float32, unbounded;
    mid = encoder(x) (B, H/2^k, W/2^k, encoder_channels[-1]), k = len(encoder_channels) - 1).

    condition is one of (leaves lead with the batch axis; the batch shares ONE condition, so
    element 0 of 'reference', 'tag' and 'attribute' is used, as ID-Guard applies one reference
    to the whole batch):
      - reference-guided {'reference': (B,) int, 'tag': (B,) int}: style =
        extractor(references[reference])[:, tag]; the extractor sees only the reference image,
        read from the 'references' collection {'images': (R, h, w, 3) in [-1, 1]}.
      - latent-guided {'noise': (B, noise_dim) or 'seed': (B,) int, 'tag': (B,) int,
        'attribute': (B,) int}: style = mappers[tag](noise, attribute), the noise per batch
        element, or latent_noise(seed) shared by the batch (the reference draws randn(1, dim)).
    The tag (and attribute) may be traced: the branch is chosen inside jit by lax.switch.
    `num_references` sizes the zero references `init` creates (at x's size; none when 0).
    `dtype` is the compute dtype (parameters float32, norm statistics float32).
    """
    config: HiSDConfig
    num_references: int = 0
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, condition: Mapping) -> tuple[jax.Array, jax.Array]:
        cfg, dt = self.config, self.dtype
        if dt is not None:
            x = x.astype(dt)
        enc, dec = cfg.encoder_channels, cfg.decoder_channels
        e = _conv1(enc[0], "encoder_0", dt)(x)
        for i in range(1, len(enc)):
            e = DownBlock(enc[i], normalize=True, dtype=dt, name=f"encoder_{i}")(e)

        extractors = Extractors(cfg, dt, name="extractors")
        num_tags = len(cfg.tags)
        if self.is_initializing():  # create every branch's parameters; return tag 0's image
            if self.num_references:
                self.variable("references", "images", jnp.zeros,
                              (self.num_references, *x.shape[1:3], cfg.input_dim), jnp.float32)
            style = extractors(x[:1])[:, 0]
            for t, (_, attrs) in enumerate(cfg.tags):
                mapper = Mapper(cfg, dt, name=f"mappers_{t}")
                for j in range(len(attrs)):
                    mapper(jnp.zeros((x.shape[0], cfg.noise_dim), x.dtype), j)
            translated = [Translator(cfg, dt, name=f"translators_{t}")(e, style)
                          for t in range(num_tags)][0]
        else:
            params = self.variables["params"]
            tag = jnp.asarray(condition["tag"])[0]
            if "reference" in condition:
                if not self.has_variable("references", "images"):
                    raise ValueError("HiSD: a reference-guided condition needs the reference "
                                     "images, variables['references']['images'] (targets.load "
                                     "adds them: ports.hisd.load_references)")
                images = self.variable("references", "images").value
                ref = jax.lax.dynamic_index_in_dim(images, jnp.asarray(condition["reference"])[0],
                                                   keepdims=True)
                styles = extractors(ref.astype(dt) if dt is not None else ref)
                style = jax.lax.dynamic_index_in_dim(styles, tag, axis=1, keepdims=False)
            else:
                noise = condition.get("noise")
                if noise is None:
                    noise = latent_noise(jnp.asarray(condition["seed"])[0], cfg.noise_dim)
                style = self._map(params, noise, tag, jnp.asarray(condition["attribute"])[0])
            translator = _pick(tag, [params[f"translators_{t}"] for t in range(num_tags)])
            translated = Translator(cfg, dt, parent=None).apply({"params": translator}, e, style)

        h = translated
        for i in range(1, len(dec)):
            h = UpBlockIN(dec[i], dtype=dt, name=f"decoder_{i - 1}")(h)
        image = _conv1(cfg.input_dim, f"decoder_{len(dec) - 1}", dt)(h)
        return image.astype(jnp.float32), e

    def _map(self, params: Mapping, noise: jax.Array, tag: jax.Array,
             attribute: jax.Array) -> jax.Array:
        """mappers[tag](noise, attribute), the (tag, attribute) branch picked by lax.switch."""
        cfg = self.config
        branches, offsets = [], []
        for t, (_, attrs) in enumerate(cfg.tags):
            offsets.append(len(branches))
            mapper = params[f"mappers_{t}"]
            shared = {k: v for k, v in mapper.items() if k.startswith("pre_model_")}
            for j in range(len(attrs)):
                prefix = f"post_models_{j}_"
                # one attribute's path, its post model renamed as attribute 0's
                branches.append({**shared, **{"post_models_0_" + k[len(prefix):]: v
                                              for k, v in mapper.items()
                                              if k.startswith(prefix)}})
        index = jnp.asarray(offsets, jnp.int32)[tag] + attribute
        noise = noise.astype(self.dtype) if self.dtype is not None else noise
        return Mapper(cfg, self.dtype, parent=None).apply(
            {"params": _pick(index, branches)}, noise, 0)


def latent_noise(seed: jax.Array | int, noise_dim: int) -> jax.Array:
    """(1, noise_dim) standard normal noise of a latent-guided condition's seed (jax.random: the
    same seed does not give torch's randn values)."""
    return jax.random.normal(jax.random.key(seed), (1, noise_dim))
