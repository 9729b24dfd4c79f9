"""The frozen weights of a run: every target's and the identity network's (never trained).

    frozen = load_frozen(cfg, "weights/")            # converted bundles (convert/convert.py)
    frozen = init_frozen_random(cfg, key)            # small random networks (tests)
    frozen = init_frozen_demo(cfg)                   # random targets, the real identity network
    state, metrics = step_fn(state, batch, frozen)   # an argument of the step, never a constant
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import struct

from idguard_jax.config import TrainConfig
from idguard_jax.networks import identity as identity_lib
from idguard_jax.networks import targets as targets_lib

__all__ = ["Frozen", "init_frozen_random", "init_frozen_demo", "load_frozen",
           "resolve_identity"]


@struct.dataclass
class Frozen:
    """A pytree of the weights the step reads and never changes."""
    targets: dict[str, Any]      # target name -> its variables
    identity: Any                # the identity network's variables


def _identity_random(cfg: TrainConfig, key: jax.Array):
    return identity_lib.init_random(cfg.identity, key, config=dict(cfg.identity_config))[1]


def _stand_in_targets(cfg: TrainConfig, key: jax.Array) -> dict[str, Any]:
    stand_ins = targets_lib.init_stand_ins(cfg.targets, key, image_size=cfg.image_size,
                                           size=cfg.target_size)
    return {name: variables for name, (_, variables) in stand_ins.items()}


def _identity_weights(cfg: TrainConfig, weights_dir: str | os.PathLike | None):
    """cfg's identity network: converted in weights_dir, dlib's from its installed .dat, or the
    random stand-in ('standin', drawn from cfg.seed + 1)."""
    if cfg.identity == "standin":
        return _identity_random(cfg, jax.random.key(cfg.seed + 1))
    return identity_lib.load(cfg.identity, weights_dir,
                             normalisation=cfg.identity_normalisation)[1]


def init_frozen_random(cfg: TrainConfig, key: jax.Array) -> Frozen:
    """Random weights for every target of cfg (at cfg.target_size) and its identity network
    (tests only: they manipulate and recognise nothing meaningful), from `key` split by the
    targets' positions (the tests' fixed draws; the demo's are `targets.init_stand_ins`')."""
    keys = jax.random.split(key, len(cfg.targets) + 1)
    targets = {name: targets_lib.init_random(
                   name, k, image_size=cfg.image_size,
                   config=targets_lib.size_config(name, cfg.target_size))[1]
               for name, k in zip(cfg.targets, keys[:-1])}
    return Frozen(targets=targets, identity=_identity_random(cfg, keys[-1]))


def init_frozen_demo(cfg: TrainConfig, weights_dir: str | os.PathLike | None = None) -> Frozen:
    """The demo's networks: RANDOM targets drawn from cfg.seed (no target weights exist offline;
    `evaluate.py --config demo --seed S` scores the same ones, `targets.init_stand_ins`) and
    cfg's real identity network (`load_frozen`'s: dlib's needs nothing but its installed .dat)."""
    return Frozen(targets=_stand_in_targets(cfg, jax.random.key(cfg.seed)),
                  identity=_identity_weights(cfg, weights_dir))


def load_frozen(cfg: TrainConfig, weights_dir: str | os.PathLike) -> Frozen:
    """The converted targets of cfg from weights_dir (convert/convert.py) and its identity
    network (converted too, dlib's from its installed .dat, or the random stand-in).
    Raises FileNotFoundError / ValueError naming the bundle."""
    targets = {name: targets_lib.load(name, weights_dir)[1] for name in cfg.targets}
    return Frozen(targets=targets, identity=_identity_weights(cfg, weights_dir))


def resolve_identity(cfg: TrainConfig, weights_dir: str | os.PathLike | None) -> TrainConfig:
    """cfg with identity='auto' made concrete: a converted ArcFace in weights_dir, else dlib
    (identity_lib.default_loss_network)."""
    if cfg.identity != "auto":
        return cfg
    return dataclasses.replace(cfg, identity=identity_lib.default_loss_network(weights_dir))
