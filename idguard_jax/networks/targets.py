"""The frozen face-manipulation networks ID-Guard attacks, behind one interface.

A `Target` is static (hashable: it goes into jit as a constant description, never its weights).
Its weights are a separate pytree that enters the jitted train step as an ARGUMENT.

    target, variables = targets.load("stargan", "weights/")
    table = target.conditions(labels)                  # leading axis = the target's conditions
    image, features = target.forward(variables, x, target.select(table, i))

Images at this interface are NHWC float32 in [-1, 1]. `forward` gives, from ONE pass, both the
manipulated image and the mid features ID-Guard's feature loss uses.

Registered: the paper's five GANs (PAPER_TARGETS, converted from their official checkpoints) and
the face models trained here (`networks.learned.LEARNED_TARGETS`, made by experiments/offline.py).
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from idguard_jax.networks import hisd, learned
from idguard_jax.networks.random_init import random_variables
from ports.relgan import RelGANGenerator
from ports.stargan import StarGANFamilyGenerator

__all__ = ["Target", "TargetSpec", "TARGETS", "PAPER_TARGETS", "build", "load", "init_random",
           "init_stand_ins", "abstract_variables",
           "stargan_conditions",
           "STARGAN_ATTRIBUTES", "PRIOR_WEIGHTS", "RELGAN_VECTORS", "RelativeVectors", "SIZES",
           "size_config"]

# The attribute order of every StarGAN-family checkpoint (StarGAN's `main.py --selected_attrs`).
STARGAN_ATTRIBUTES = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
_HAIR = (0, 1, 2)

# alpha_k = 10^n of the `prior` and `kpi` strategies (paper eq. 10).
PRIOR_WEIGHTS = {
    # what the reference code uses (its configs/prior_weight.json)
    "reference": {"stargan": 1.0, "aggan": 10.0, "fpgan": 1.0, "relgan": 10.0, "hisd": 100.0},
    # what the paper states (IV-A5)
    "paper": {"stargan": 1.0, "aggan": 1.0, "fpgan": 1.0, "relgan": 10.0, "hisd": 100.0},
    # no prior: KPI weighs by the focal weight of K alone (the paper's KPI-without-alpha ablation)
    "none": {"stargan": 1.0, "aggan": 1.0, "fpgan": 1.0, "relgan": 1.0, "hisd": 1.0},
}
for _table in PRIOR_WEIGHTS.values():   # the targets learned here: neither source gives one
    _table.update({name: 1.0 for name in learned.LEARNED_TARGETS})


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


# ID-Guard's RelGAN conditions: relative attribute vectors, presumably in the
# StarGAN attribute order; the checkpoint's order and sign convention are undocumented.
RELGAN_VECTORS = ((0, 0, 0, 1, 0), (0, -1, 0, 0, 0), (-1, 0, 0, 0, 0), (0, 0, 0, -1, 0),
                  (0, 0, 0, 0, -1))


@dataclasses.dataclass(frozen=True)
class RelativeVectors:
    """RelGAN's conditions: fixed relative attribute vectors, the same for every image.

    labels (B, ...) (only B is read) -> (K, B, n_z) for K `vectors` of n_z entries. Compared and
    hashed by value; vectors read back from a bundle's JSON meta (lists) become tuples.
    """
    vectors: tuple = RELGAN_VECTORS

    def __post_init__(self):
        vectors = tuple(tuple(float(v) for v in row) for row in self.vectors)
        if not vectors or len({len(row) for row in vectors}) != 1:
            raise ValueError(f"RelGAN vectors {self.vectors!r}: need one or more vectors, "
                             f"all of the same length n_z")
        object.__setattr__(self, "vectors", vectors)

    @property
    def num_conditions(self) -> int:
        return len(self.vectors)

    def __call__(self, labels: jax.Array) -> jax.Array:
        table = jnp.asarray(self.vectors, jnp.float32)
        k, n_z = table.shape
        return jnp.broadcast_to(table[:, None, :], (k, labels.shape[0], n_z))


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
    # Config fields that choose the conditions, not the architecture: build() sets them on
    # make_conditions (then a dataclass with these fields and a `num_conditions`).
    condition_fields: tuple[str, ...] = ()
    # Frozen data the checkpoint does not hold (HiSD's reference images): (config, bundle path,
    # load's `references`) -> extra variable collections, added by load().
    load_data: Callable[[dict, str, Any], dict] | None = None
    data_collections: tuple[str, ...] = ()   # the variable collections load_data gives
    # How its bundle is made, for load's errors (None: convert/convert.py, the GANs' way).
    make_command: str | None = None


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
    "relgan": TargetSpec(
        build_module=RelGANGenerator,
        default_config={"n_z": len(RELGAN_VECTORS[0]), "n_repeat": 6, "vectors": RELGAN_VECTORS},
        num_conditions=len(RELGAN_VECTORS),
        make_conditions=RelativeVectors(),
        example_condition=lambda b: jnp.zeros((b, len(RELGAN_VECTORS[0])), jnp.float32),
        condition_fields=("vectors",),
    ),
    "hisd": TargetSpec(
        build_module=hisd.build_module,
        default_config=hisd.default_target_config(),
        num_conditions=len(hisd.DEFAULT_CONDITIONS),
        make_conditions=hisd.ConditionTable(),
        example_condition=hisd.example_condition,
        condition_fields=("conditions",),
        load_data=hisd.load_references,
        data_collections=("references",),
    ),
    # trained here (experiments/offline.py): a face-reconstruction autoencoder
    "face_ae": TargetSpec(
        build_module=learned.FaceAutoencoder,
        default_config=dict(learned.AUTOENCODER_CONFIG),
        num_conditions=1,
        make_conditions=learned.NoCondition(),
        example_condition=learned.no_condition_example,
        make_command=learned.TRAIN_COMMAND,
    ),
}
# The paper's five GANs, in its table order (the default of the commands that list targets).
PAPER_TARGETS = ("stargan", "aggan", "fpgan", "relgan", "hisd")


# Narrow variants of each architecture for demos ('demo', 64 px) and tests ('tiny', 32 px): only
# ever randomly initialised, so they show the machinery, never the paper's numbers.
_STARGAN_SIZES = {"demo": {"conv_dim": 16, "repeat_num": 3}, "tiny": {"conv_dim": 4, "repeat_num": 3}}
SIZES: dict[str, dict[str, dict]] = {
    "stargan": _STARGAN_SIZES, "aggan": _STARGAN_SIZES, "fpgan": _STARGAN_SIZES,
    "relgan": {"demo": {"n_repeat": 3}, "tiny": {"n_repeat": 3}},   # its widths are fixed upstream
    "hisd": {
        "demo": {"style_dim": 32, "noise_dim": 8, "encoder_channels": [16, 32, 64],
                 "decoder_channels": [64, 32, 16], "extractor_channels": [8, 16, 32, 32, 64],
                 "translator_channels": [16, 16, 16], "mapper_pre_channels": [32, 32],
                 "mapper_post_channels": [32, 32, 32]},
        "tiny": {"style_dim": 8, "noise_dim": 4, "encoder_channels": [4, 8, 8],
                 "decoder_channels": [8, 8, 4], "extractor_channels": [4, 8, 8, 8],
                 "translator_channels": [8, 8], "mapper_pre_channels": [8],
                 "mapper_post_channels": [8, 8]},
    },
    "face_ae": learned.AUTOENCODER_SIZES,
}


def size_config(name: str, size: str) -> dict:
    """Architecture overrides of target `name` at `size` ('official' = none)."""
    if size == "official":
        return {}
    _spec(name)
    return dict(SIZES[name][size])


def _spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def build(name: str, config: dict | None = None, *, dtype: Any = None) -> Target:
    """The Target `name` with architecture `config` (defaults: the official one), computing in
    `dtype` (None: float32)."""
    spec = _spec(name)
    unknown = set(config or {}) - set(spec.default_config) - {"variant"}
    if unknown:
        raise ValueError(f"target {name!r}: unknown config fields {sorted(unknown)}")
    cfg = {**spec.default_config,
           **{k: v for k, v in (config or {}).items() if k in spec.default_config}}
    make_conditions, num_conditions = spec.make_conditions, spec.num_conditions
    if spec.condition_fields:
        make_conditions = dataclasses.replace(
            make_conditions, **{k: cfg.pop(k) for k in spec.condition_fields})
        num_conditions = make_conditions.num_conditions
    return Target(name=name, module=spec.build_module(dtype=dtype, **cfg),
                  num_conditions=num_conditions, make_conditions=make_conditions)


def init_random(name: str, key: jax.Array, *, image_size: int = 256, config: dict | None = None,
                dtype: Any = None) -> tuple[Target, dict]:
    """A randomly initialised target (demos and tests only: it manipulates nothing meaningful)."""
    target = build(name, config, dtype=dtype)
    shapes = abstract_variables(name, image_size=image_size, config=config)
    return target, random_variables(shapes, key)


def init_stand_ins(names, key: jax.Array, *, image_size: int = 256,
                   size: str = "official") -> dict[str, tuple[Target, dict]]:
    """name -> random `init_random` target of architecture `size` (SIZES) for each of names.

    Each network's key is `key` folded with its name, so a target's weights depend on the key
    alone, not on which other targets a run names or in what order: the demo trains against,
    and evaluate.py --config demo scores, the same networks for the same seed."""
    return {name: init_random(name, jax.random.fold_in(key, zlib.crc32(name.encode())),
                              image_size=image_size, config=size_config(name, size))
            for name in names}


def abstract_variables(name: str, *, image_size: int = 256, config: dict | None = None) -> dict:
    """Shapes of the target's variables for (image_size x image_size) images, without allocating
    them (jax.eval_shape)."""
    module = build(name, config).module
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x, _spec(name).example_condition(1))


def load(name: str, weights_dir: str | os.PathLike, *, dtype: Any = None,
         references: Any = None) -> tuple[Target, dict]:
    """A converted or learned target: reads the bundle `weights_dir/name` written by
    convert/convert.py (or, for a learned one, experiments/offline.py), refusing one of another
    network or with other shapes than its stored config gives.

    references (HiSD only): its reference images, a folder, a list of files or an array
    (idguard_jax.networks.hisd.load_references); default the folder `weights_dir/hisd/references`.
    """
    from idguard_jax.checkpoint import load_bundle

    path = os.path.join(os.fspath(weights_dir), name)
    spec = _spec(name)
    hint = (f"train it with: {spec.make_command} (its bundle goes to WORKDIR/targets)"
            if spec.make_command else
            f"convert the official checkpoint with: python convert/convert.py {name} CHECKPOINT "
            f"{os.fspath(weights_dir)}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no {'trained' if spec.make_command else 'converted'} "
                                f"weights for target {name!r}; {hint}")
    if references is not None and spec.load_data is None:
        raise ValueError(f"target {name!r} takes no reference images")
    tree, meta = load_bundle(path, kind="target", what=f"target {name!r}", hint=hint,
                             abstract=lambda meta: _stored_shapes(name, meta))
    target = build(name, meta.get("config"), dtype=dtype)
    data = spec.load_data({**spec.default_config, **meta.get("config", {})}, path,
                          references) if spec.load_data else {}
    return target, jax.tree.map(jnp.asarray, {**dict(tree), **data})


def _stored_shapes(name: str, meta: dict) -> dict:
    """What a converted bundle of target `name` must hold: its variables for the stored config,
    less the frozen data `load` adds (HiSD's references); refuses another network's bundle."""
    if meta.get("model") != name:
        raise ValueError(f"holds {meta.get('model')!r}, not {name!r}")
    return {c: t for c, t in abstract_variables(name, config=meta.get("config")).items()
            if c not in _spec(name).data_collections}
