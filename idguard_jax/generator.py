"""ID-Guard's perturbation generator and how its output becomes a protected image.

`ResnetGenerator` is the official `net/advGen.py::ResnetGenerator(norm_type='batch', input_nc=6)`:
reflection padding, BatchNorm, SELU outside the residual blocks and ReLU inside
them, transposed convs k3 s2 p1 output_padding 1, tanh. Submodule names mirror the official
state_dict (`model0.{i}` -> `model0_{i}`), so an official `AdvG.pth` converts one to one.

As the networks' adapters (`idguard_jax.networks`), the generator's static part (its hashable
`GeneratorConfig`) comes first and its variables after:

    cfg, variables = init_generator(GeneratorConfig(), key)
    cfg, variables, delta_p = load_generator("runs/demo/generator")
    x_adv = protect_eval(variables, delta_p, x, config=cfg, eps=cfg.eps)   # the one eval call
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.layers import BatchNorm, clamp, conv2d, conv_transpose2d, reflect_conv2d

__all__ = ["ResnetGenerator", "GeneratorConfig", "Generator", "perturb", "protect_eval",
           "init_generator", "init_kernel", "fit_delta_p", "save_generator", "load_generator",
           "load_trained", "abstract_generator", "init_bn_scale", "GENERATOR_KIND",
           "generator_input", "within_budget"]

Dtype = Any

# The reference's weights_init: every conv (transposed too) N(0, 0.02), bias 0; BN scale N(1, 0.02).
init_kernel = nn.initializers.normal(0.02)


def init_bn_scale(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class _ResnetBlock(nn.Module):
    """x + [reflpad1, conv3, BN, ReLU, reflpad1, conv3, BN](x); keys conv_block.{1,2,5,6}."""
    dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(BatchNorm, dtype=self.dtype, scale_init=init_bn_scale)
        conv = functools.partial(reflect_conv2d, bias=False, dtype=self.dtype,
                                 kernel_init=init_kernel)
        h = conv(x, self.dim, 3, name="conv_block_1")
        h = nn.relu(bn(name="conv_block_2")(h, not train))
        h = conv(h, self.dim, 3, name="conv_block_5")
        h = bn(name="conv_block_6")(h, not train)
        return x + h


class ResnetGenerator(nn.Module):
    """(B, H, W, 6) = cat(image, prior perturbation) -> (B, H, W, 3) in (-1, 1).

    H and W must be multiples of 4. `ngf` and `n_blocks` shrink the network for tests; the
    official network is ngf=64, n_blocks=6 (7,850,819 parameters).
    """
    ngf: int = 64
    n_blocks: int = 6
    out_channels: int = 3
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ngf, dt = self.ngf, self.dtype
        bn = functools.partial(BatchNorm, dtype=dt, scale_init=init_bn_scale)
        conv = functools.partial(conv2d, bias=False, dtype=dt, kernel_init=init_kernel)
        convt = functools.partial(conv_transpose2d, bias=False, dtype=dt, kernel_init=init_kernel)
        x = x.astype(dt) if dt is not None else x
        h = reflect_conv2d(x, ngf, 7, bias=False, dtype=dt, kernel_init=init_kernel,
                           name="model0_1")
        h = nn.selu(bn(name="model0_2")(h, not train))
        h = conv(ngf * 2, 3, 2, 1, name="model0_4")(h)
        h = nn.selu(bn(name="model0_5")(h, not train))
        h = conv(ngf * 4, 3, 2, 1, name="model0_7")(h)
        h = nn.selu(bn(name="model0_8")(h, not train))
        i = 10
        for _ in range(self.n_blocks):
            h = _ResnetBlock(ngf * 4, dtype=dt, name=f"model0_{i}")(h, train)
            i += 1
        h = convt(ngf * 2, 3, 2, 1, 1, name=f"model0_{i}")(h)
        h = nn.selu(bn(name=f"model0_{i + 1}")(h, not train))
        h = convt(ngf, 3, 2, 1, 1, name=f"model0_{i + 3}")(h)
        h = nn.selu(bn(name=f"model0_{i + 4}")(h, not train))
        h = reflect_conv2d(h, self.out_channels, 7, bias=True, dtype=dt, kernel_init=init_kernel,
                           name=f"model0_{i + 7}")
        return jnp.tanh(h.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What defines a generator besides its weights (stored in every saved generator)."""
    ngf: int = 64
    n_blocks: int = 6
    image_size: int = 256
    eps: float = 0.05

    def module(self, dtype: Dtype = None) -> ResnetGenerator:
        return ResnetGenerator(ngf=self.ngf, n_blocks=self.n_blocks, dtype=dtype)


def init_generator(cfg: GeneratorConfig, key: jax.Array) -> tuple[GeneratorConfig, dict]:
    """(cfg, fresh variables {'params', 'batch_stats'}) initialised as the reference does:
    kernels N(0, 0.02), BN scales N(1, 0.02), biases 0 (drawn with NumPy: the module's own
    initializers give the same distributions but compile one program each)."""
    from idguard_jax.networks.random_init import random_variables

    return cfg, random_variables(abstract_generator(cfg), key, kernel_std=0.02, scale_std=0.02)


def abstract_generator(cfg: GeneratorConfig) -> dict:
    """Shapes of the generator's variables, nothing allocated (jax.eval_shape)."""
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 6), jnp.float32)
    return jax.eval_shape(functools.partial(cfg.module().init, train=False), jax.random.key(0), x)


def perturb(module: ResnetGenerator, variables: dict, delta_p: jax.Array, x: jax.Array,
            eps: float, train: bool):
    """The protected images of a batch (paper eq. 12).

    Args:
      variables: {'params', 'batch_stats'} of the generator.
      delta_p: (H, W, 3) prior perturbation (any values; clamped to +-eps here).
      x: (B, H, W, 3) clean images in [-1, 1].
      train: BatchNorm on batch statistics (True) or running statistics (False).
    Returns:
      (x_adv, x_pri, new_batch_stats): x_adv = clamp(x + clamp(G(cat(x, p)), +-eps), -1, 1) and
      x_pri = clamp(x + p, -1, 1) with p = clamp(delta_p, +-eps); new_batch_stats is the updated
      running statistics when training, else the input ones.
    """
    p, g_in = generator_input(delta_p, x, eps)
    if train:
        g, updates = module.apply(variables, g_in, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
    else:
        g = module.apply(variables, g_in, train=False)
        new_stats = variables["batch_stats"]
    return within_budget(x, g, eps), clamp(x + p, -1.0, 1.0), new_stats


def generator_input(delta_p: jax.Array, x: jax.Array, eps: float):
    """(p, G's input): p = clamp(delta_p, +-eps) (H, W, 3) float32 and cat(x, p) (B, H, W, 6)."""
    p = clamp(delta_p.astype(jnp.float32), -eps, eps)
    return p, jnp.concatenate([x, jnp.broadcast_to(p, x.shape)], axis=-1)


def within_budget(x: jax.Array, g: jax.Array, eps: float) -> jax.Array:
    """x_adv = clamp(x + clamp(g, +-eps), -1, 1): G's output g added within the budget."""
    return clamp(x + clamp(g, -eps, eps), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("config", "eps", "dtype"))
def protect_eval(variables: dict, delta_p: jax.Array, x: jax.Array, *, config: GeneratorConfig,
                 eps: float, dtype: Dtype = None) -> jax.Array:
    """The one eval-mode generator call: x (B, S, S, 3) float in [-1, 1] -> x_adv (B, S, S, 3)
    float32, |x_adv - x| <= eps. BatchNorm uses its running statistics, so each image's
    protection does not depend on its batch. Weights are arguments; `dtype` is the generator's
    compute dtype (None: float32)."""
    x_adv, _, _ = perturb(config.module(dtype), variables, delta_p, x.astype(jnp.float32), eps,
                          train=False)
    return x_adv


@dataclasses.dataclass(frozen=True)
class Generator:
    """A trained generator: config, variables {'params', 'batch_stats'}, delta_p (S, S, 3)."""
    config: GeneratorConfig
    variables: dict
    delta_p: jax.Array


def fit_delta_p(delta_p, image_size: int, source: str = "delta_p") -> jax.Array:
    """delta_p as (image_size, image_size, 3) float32.

    A prior of another size is resized (bilinear, align_corners=True, as the reference resizes)
    with a warning naming `source`. Accepts (H, W, 3), or torch layouts (3, H, W) / (1, 3, H, W).
    """
    import warnings

    from idguard_jax.images import resize_align_corners

    d = jnp.asarray(delta_p, jnp.float32)
    if d.ndim == 4 and d.shape[0] == 1:
        d = d[0]
    if d.ndim == 3 and d.shape[0] == 3 and d.shape[-1] != 3:
        d = jnp.transpose(d, (1, 2, 0))
    if d.ndim != 3 or d.shape[-1] != 3:
        raise ValueError(f"{source}: expected an image-shaped perturbation (H, W, 3) or "
                         f"(1, 3, H, W), got shape {tuple(delta_p.shape)}")
    if d.shape[:2] != (image_size, image_size):
        warnings.warn(f"{source}: prior perturbation is {d.shape[0]}x{d.shape[1]}, resizing it to "
                      f"{image_size}x{image_size} (bilinear, align_corners=True)", stacklevel=2)
        d = resize_align_corners(d[None], image_size)[0]
    return d


GENERATOR_KIND = "idguard-generator"


def save_generator(path, variables: dict, delta_p, cfg: GeneratorConfig, extra_meta: dict | None = None,
                   overwrite: bool = False) -> str:
    """Write a generator bundle: {'params', 'batch_stats', 'delta_p'} + its GeneratorConfig."""
    from idguard_jax.checkpoint import save_bundle

    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "delta_p": jnp.asarray(delta_p, jnp.float32)}
    meta = {"kind": GENERATOR_KIND, "config": dataclasses.asdict(cfg), **(extra_meta or {})}
    return save_bundle(path, tree, meta, overwrite=overwrite)


def load_generator(path) -> tuple[GeneratorConfig, dict, jax.Array]:
    """Read a generator bundle: (config, variables {'params', 'batch_stats'}, delta_p (S, S, 3)).

    Refuses another kind of bundle, or weights whose shapes do not match the stored config."""
    from idguard_jax.checkpoint import load_bundle

    tree, meta = load_bundle(
        path, kind=GENERATOR_KIND, what="generator",
        abstract=lambda meta: abstract_generator(GeneratorConfig(**meta["config"])),
        hint="convert an official AdvG.pth with `python convert/convert.py generator ...` or "
             "export one with experiments/train.py")
    cfg = GeneratorConfig(**meta["config"])
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    delta_p = fit_delta_p(tree["delta_p"], cfg.image_size, source=f"{path} delta_p")
    return cfg, variables, delta_p


def load_trained(path) -> Generator:
    """A generator bundle as a `Generator` with device arrays (what protection runs)."""
    cfg, variables, delta_p = load_generator(path)
    return Generator(cfg, jax.tree.map(jnp.asarray, variables), jnp.asarray(delta_p))
