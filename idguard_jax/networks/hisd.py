"""HiSD as a target: its conditions and reference images (the port is ports/hisd.py).

Reference images are frozen DATA: they travel in the target's variables
(`variables['references']['images']`, (R, S, S, 3) in [-1, 1]) so they enter the jitted step as
arguments. A condition selects a reference (reference-guided) or a tag/attribute/noise seed
(latent-guided).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.image_files import read_rgb
from idguard_jax.images import as_float_images, to_float
from ports.hisd import _ARCH_FIELDS, CELEBA_HQ_256, HiSD, HiSDConfig

Dtype = Any

__all__ = ["DEFAULT_REFERENCES", "DEFAULT_CONDITIONS", "PAPER_CONDITIONS", "Condition",
           "ConditionTable", "default_target_config", "check_target_config", "build_module",
           "example_condition", "load_references"]


# The reference code attacks every image of model/HiSD/examples, sorted by name: the glasses
# example with Eyeglasses (tag 1), the three hair-colour examples with HairColor (tag 2).
DEFAULT_REFERENCES = ("reference_glasses_0.jpg", "reference_haircolor_0.jpg",
                      "reference_haircolor_1.jpg", "reference_haircolor_2.jpg")
DEFAULT_CONDITIONS = ({"reference": 0, "tag": 1}, {"reference": 1, "tag": 2},
                      {"reference": 2, "tag": 2}, {"reference": 3, "tag": 2})
# The paper's five manipulations (black, blond, brown hair, glasses, bangs), latent-guided, so
# they need no reference images; use with references=[].
PAPER_CONDITIONS = ({"tag": 2, "attribute": 0, "seed": 0}, {"tag": 2, "attribute": 1, "seed": 1},
                    {"tag": 2, "attribute": 2, "seed": 2}, {"tag": 1, "attribute": 0, "seed": 3},
                    {"tag": 0, "attribute": 0, "seed": 4})


@dataclasses.dataclass(frozen=True)
class Condition:
    """One manipulation: reference-guided (reference index, tag) or latent-guided (tag,
    attribute, noise seed)."""
    tag: int
    reference: int | None = None
    attribute: int | None = None
    seed: int = 0

    @property
    def latent(self) -> bool:
        return self.reference is None

    @classmethod
    def from_entry(cls, entry: "Mapping | Condition", position: int) -> "Condition":
        """{'reference': i, 'tag': t} or {'tag': t, 'attribute': j[, 'seed': n]} (seed default:
        the entry's position)."""
        if isinstance(entry, Condition):
            return entry
        keys = set(entry)
        if keys == {"reference", "tag"}:
            return cls(tag=int(entry["tag"]), reference=int(entry["reference"]))
        if keys in ({"tag", "attribute"}, {"tag", "attribute", "seed"}):
            return cls(tag=int(entry["tag"]), attribute=int(entry["attribute"]),
                       seed=int(entry.get("seed", position)))
        raise ValueError(f"HiSD condition {position} {dict(entry)}: expected the keys "
                         "reference+tag or tag+attribute[+seed]")


@dataclasses.dataclass(frozen=True)
class ConditionTable:
    """HiSD's conditions (targets.TargetSpec.condition_fields: `conditions`).

    labels (B, ...) (only B is read) -> the condition pytree, leaves leading with
    (num_conditions, B): {'reference', 'tag'} or {'seed', 'tag', 'attribute'}, int32. The entries
    must be of one kind, since the two kinds' pytrees differ. Hashed by value; entries read back
    from JSON (dicts) become Conditions.
    """
    conditions: tuple = DEFAULT_CONDITIONS

    def __post_init__(self):
        conditions = tuple(Condition.from_entry(c, n) for n, c in enumerate(self.conditions))
        if not conditions:
            raise ValueError("HiSD: no conditions")
        if len({c.latent for c in conditions}) > 1:
            raise ValueError("HiSD conditions: reference-guided and latent-guided entries cannot "
                             "be mixed in one target")
        object.__setattr__(self, "conditions", conditions)

    @property
    def num_conditions(self) -> int:
        return len(self.conditions)

    def __call__(self, labels: jax.Array) -> dict:
        def column(values):
            table = jnp.asarray(values, jnp.int32)
            return jnp.broadcast_to(table[:, None], (len(values), labels.shape[0]))

        c = self.conditions
        if c[0].latent:
            return {"seed": column([x.seed for x in c]), "tag": column([x.tag for x in c]),
                    "attribute": column([x.attribute for x in c])}
        return {"reference": column([x.reference for x in c]), "tag": column([x.tag for x in c])}


def default_target_config() -> dict:
    """The target configuration (JSON-friendly): the architecture, HiSD's new_size (the size
    reference images are resized to), the reference files and the conditions."""
    return {**CELEBA_HQ_256, "reference_size": 256, "references": list(DEFAULT_REFERENCES),
            "conditions": [dict(c) for c in DEFAULT_CONDITIONS]}


def check_target_config(config: Mapping) -> None:
    """Every condition's tag, attribute and reference index in range; ValueError naming the
    entry otherwise. (Inside jit an out-of-range index would clamp silently.)"""
    arch = HiSDConfig.from_dict({k: v for k, v in config.items() if k in _ARCH_FIELDS})
    num_refs = len(config["references"])
    for n, cond in enumerate(ConditionTable(tuple(config["conditions"])).conditions):
        where = f"HiSD condition {n} ({cond})"
        if not 0 <= cond.tag < len(arch.tags):
            raise ValueError(f"{where}: tag out of range; the config has {len(arch.tags)} tags")
        name, attrs = arch.tags[cond.tag]
        if cond.latent and not 0 <= cond.attribute < len(attrs):
            raise ValueError(f"{where}: attribute out of range for tag {name!r} {list(attrs)}")
        if not cond.latent and not 0 <= cond.reference < num_refs:
            raise ValueError(f"{where}: reference out of range; the config names {num_refs} "
                             "reference images")


def build_module(dtype: Dtype = None, references: Sequence[str] = (), reference_size: int = 256,
                 **arch) -> HiSD:
    """The HiSD module of a target configuration without its conditions; init creates a zero
    image per named reference. (reference_size is used by load_references.)"""
    del reference_size
    return HiSD(HiSDConfig.from_dict(arch), len(references), dtype)


def example_condition(batch: int) -> dict:
    """A reference-guided condition for init / eval_shape (init creates every branch anyway)."""
    return {"reference": jnp.zeros((batch,), jnp.int32), "tag": jnp.zeros((batch,), jnp.int32)}


def load_references(config: Mapping, bundle_path: str | os.PathLike,
                    references: Any = None) -> dict:
    """The 'references' collection of a target configuration: {'references': {'images':
    (R, S, S, 3) float32 in [-1, 1]}}, R = len(config['references']); {} when R = 0.

    references: a folder holding the files config['references'] names (default: the folder
    `references` in the bundle), a list of image files, or an array (R, h, w, 3) (uint8, or
    float in [-1, 1]). Files are resized to S x S, S = reference_size, with PIL bilinear (the
    reference's Resize(256) for its square examples; a non-square file is squashed to a square,
    where Resize would keep its aspect ratio). Checks the conditions against the configuration.
    Raises ValueError / FileNotFoundError naming the source.
    """
    check_target_config(config)
    names = list(config["references"])
    if not names:
        return {}
    if references is None:
        references = os.path.join(os.fspath(bundle_path), "references")
    what = "HiSD references"
    if isinstance(references, (str, os.PathLike)):
        what = os.fspath(references)
        missing = [n for n in names if not os.path.isfile(os.path.join(what, n))]
        if missing:
            raise FileNotFoundError(
                f"{what}: HiSD's reference images {missing} are missing (copy them there, or "
                "pass references=FOLDER, a list of image files or an array)")
        references = [os.path.join(what, n) for n in names]
    if isinstance(references, (np.ndarray, jax.Array)):
        images = np.asarray(references)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{what}: expected an array (R, h, w, 3), got shape {images.shape}")
        images = as_float_images(images)
    else:
        size = int(config["reference_size"])
        images = np.zeros((0, size, size, 3), np.float32)
        if len(references):
            images = np.stack([to_float(read_rgb(path, size)) for path in references])
    if len(images) != len(names):
        raise ValueError(f"{what}: {len(images)} reference images, but the configuration names "
                         f"{len(names)} ({names})")
    return {"references": {"images": images}}
