"""`python -m idguard_jax.networks.summary`: one line per network, `NAME PARAMS`, at the official sizes.

Counted from `jax.eval_shape` (shapes only, nothing allocated): trainable parameters, not
BatchNorm running statistics. Later ports register here through idguard_jax.networks.targets/identity.
"""
from __future__ import annotations

import math
import sys

import jax

from idguard_jax.networks import identity
from idguard_jax.networks import targets
from idguard_jax.generator import GeneratorConfig, abstract_generator


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def network_sizes() -> dict[str, int]:
    """{name: parameter count} for the generator, every registered target and every identity
    network but the random stand-in."""
    gen = abstract_generator(GeneratorConfig())
    sizes = {"generator": count(gen["params"])}
    for name in targets.TARGETS:
        sizes[name] = count(targets.abstract_variables(name, image_size=256)["params"])
    for name in identity.IDENTITY_NETS:
        if name != "standin":
            sizes[name] = count(identity.abstract_variables(name)["params"])
    return sizes


def main() -> int:
    for name, n in network_sizes().items():
        print(f"{name} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
