"""The frozen face-manipulation networks ID-Guard attacks, behind one interface.

A `Target` is static (hashable: it goes into jit as a constant description, never its weights).
Its weights are a separate pytree that enters the jitted train step as an ARGUMENT.

    target, variables = targets.load("stargan", "weights/")
    table = target.conditions(labels)                  # leading axis = the target's conditions
    image, features = target.forward(variables, x, target.select(table, i))

Images at this interface are NHWC float32 in [-1, 1]. `forward` gives, from ONE pass, both the
manipulated image and the mid features the feature loss uses (targets.md 0.2).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from ports.stargan import StarGANFamilyGenerator

__all__ = ["Target", "TargetSpec", "TARGETS", "build", "load", "init_random", "stargan_conditions",
           "STARGAN_ATTRIBUTES", "PRIOR_WEIGHTS"]

# The attribute order of every StarGAN-family checkpoint (targets.md 1, 10.7).
STARGAN_ATTRIBUTES = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
_HAIR = (0, 1, 2)

# alpha_k = 10^n of the `prior` and `kpi` strategies (paper eq. 10).
PRIOR_WEIGHTS = {
    # what the reference code uses (configs/prior_weight.json, targets.md 0.5)
    "reference": {"stargan": 1.0, "aggan": 10.0, "fpgan": 1.0, "relgan": 10.0, "hisd": 100.0},
    # what the paper states (IV-A5)
    "paper": {"stargan": 1.0, "aggan": 1.0, "fpgan": 1.0, "relgan": 10.0, "hisd": 100.0},
}


def stargan_conditions(labels: jax.Array) -> jax.Array:
    """The 5 target label vectors of the reference's create_labels, (5, B, 5) from (B, 5).

    Condition i: a hair colour (i < 3) is set to 1 and the other hair colours to 0; otherwise
    (Male, Young) attribute i is flipped.
    """
    labels = jnp.asarray(labels, jnp.float32)
    out = []
    for i in range(len(STARGAN_ATTRIBUTES)):
        c = labels
        if i in _HAIR:
            hair = jnp.zeros((len(STARGAN_ATTRIBUTES),)).at[jnp.array(_HAIR)].set(1.0)
            c = c * (1.0 - hair)
            c = c.at[:, i].set(1.0)
        else:
            c = c.at[:, i].set(1.0 - c[:, i])
        out.append(c)
    return jnp.stack(out)


@dataclasses.dataclass(frozen=True)
class Target:
    """One frozen manipulation network (static description; weights travel separately)."""
    name: str
    module: nn.Module
    num_conditions: int
    make_conditions: Callable[[jax.Array], Any]

    def forward(self, variables: dict, x: jax.Array, condition: Any) -> tuple[jax.Array, jax.Array]:
        """(B,H,W,3) in [-1,1], one condition -> (manipulated image (B,H,W,3), mid features)."""
        image, features = self.module.apply(variables, x, condition)
        return image.astype(jnp.float32), features.astype(jnp.float32)

    def conditions(self, labels: jax.Array) -> Any:
        """All conditions for a batch: a pytree whose leaves lead with num_conditions."""
        return self.make_conditions(labels)

    def select(self, table: Any, index: jax.Array | int) -> Any:
        """Condition `index` (may be traced: a dynamic index inside the jitted step)."""
        return jax.tree.map(lambda a: jnp.take(a, index, axis=0), table)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How to build one registered target; `config` holds the architecture's fields."""
    build_module: Callable[..., nn.Module]
    default_config: dict
    num_conditions: int
    make_conditions: Callable[[jax.Array], Any]
    example_condition: Callable[[int], Any]  # batch size -> one condition, for init/eval_shape


def _stargan_spec(variant: str) -> TargetSpec:
    return TargetSpec(
        build_module=lambda dtype=None, **cfg: StarGANFamilyGenerator(variant=variant, dtype=dtype, **cfg),
        default_config={"conv_dim": 64, "c_dim": 5, "repeat_num": 6},
        num_conditions=len(STARGAN_ATTRIBUTES),
        make_conditions=stargan_conditions,
        example_condition=lambda b: jnp.zeros((b, len(STARGAN_ATTRIBUTES)), jnp.float32),
    )


TARGETS: dict[str, TargetSpec] = {
    "stargan": _stargan_spec("stargan"),
    "aggan": _stargan_spec("aggan"),
    "fpgan": _stargan_spec("fpgan"),
}


def _spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def build(name: str, config: dict | None = None, dtype: Any = None) -> Target:
    """The Target `name` with architecture `config` (defaults: the official one)."""
    spec = _spec(name)
    unknown = set(config or {}) - set(spec.default_config) - {"variant"}
    if unknown:
        raise ValueError(f"target {name!r}: unknown config fields {sorted(unknown)}")
    cfg = {**spec.default_config,
           **{k: v for k, v in (config or {}).items() if k in spec.default_config}}
    return Target(name=name, module=spec.build_module(dtype=dtype, **cfg),
                  num_conditions=spec.num_conditions, make_conditions=spec.make_conditions)


def init_random(name: str, key: jax.Array, image_size: int, config: dict | None = None,
                dtype: Any = None) -> tuple[Target, dict]:
    """A randomly initialised target (demos and tests only: it manipulates nothing meaningful)."""
    target = build(name, config, dtype)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = target.module.init(key, x, _spec(name).example_condition(1))
    return target, dict(variables)


def abstract_variables(name: str, image_size: int = 256, config: dict | None = None) -> dict:
    """Shapes of the target's variables, without allocating them (jax.eval_shape)."""
    return jax.eval_shape(lambda k: init_random(name, k, image_size, config)[1], jax.random.key(0))


def load(name: str, weights_dir: str | os.PathLike, dtype: Any = None) -> tuple[Target, dict]:
    """A converted target: reads the bundle `weights_dir/name` written by convert/convert.py."""
    from idguard_jax.checkpoint import load_bundle

    path = os.path.join(os.fspath(weights_dir), name)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path}: no converted weights for target {name!r}. Convert the official checkpoint "
            f"with: python convert/convert.py {name} CHECKPOINT {os.fspath(weights_dir)}")
    tree, meta = load_bundle(path)
    if meta.get("model") != name:
        raise ValueError(f"{path}: holds {meta.get('model')!r}, not {name!r}")
    target = build(name, meta.get("config"), dtype)
    return target, jax.tree.map(jnp.asarray, dict(tree))
