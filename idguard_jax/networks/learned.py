"""Face models trained HERE, on real faces, as targets: a manipulation network that is neither
random nor a paper GAN (whose weights cannot be had offline).

    train, held_out = learned.split_by_identity(list_images("faces/"))
    variables = learned.train_autoencoder(images_u8, steps=400)
    learned.save_target("runs/offline/targets", "face_ae", variables, meta={...})
    target, variables = targets.load("face_ae", "runs/offline/targets")   # as any target

`face_ae` is the gradient prior's face-reconstruction autoencoder
(`training.surrogate.SurrogateAutoencoder`) trained to reconstruct faces (MSE, the faces and their
mirror images): one condition (plain reconstruction), its bottleneck as the mid features of
ID-Guard's feature loss. Its bundle is a target bundle like a converted GAN's (kind 'target',
'model', 'config'), so `networks.targets.load`, `training.frozen.load_frozen` and
experiments/evaluate.py's `--weights` read it unchanged.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idguard_jax.training.surrogate import SurrogateAutoencoder, train_surrogate

__all__ = ["LEARNED_TARGETS", "FaceAutoencoder", "NoCondition", "no_condition_example",
           "AUTOENCODER_CONFIG",
           "AUTOENCODER_SIZES", "identity_of", "split_by_identity", "link_split",
           "train_autoencoder", "save_target", "reconstruction_quality", "TRAIN_COMMAND"]

LEARNED_TARGETS = ("face_ae",)
# The architecture experiments/offline.py trains by default ('official' size of the registry)
# and the narrower ones of the registry's sizes ('tiny': the tests).
AUTOENCODER_CONFIG = {"width": 16, "depth": 3}
AUTOENCODER_SIZES = {"demo": dict(AUTOENCODER_CONFIG), "tiny": {"width": 4, "depth": 2}}
TRAIN_COMMAND = "python experiments/offline.py target"


class FaceAutoencoder(nn.Module):
    """The `face_ae` target: (B, H, W, 3) in [-1, 1], a condition (ignored) -> (reconstruction
    (B, H, W, 3) in (-1, 1), bottleneck (B, H / 2**depth, W / 2**depth, C)). The parameters are
    a `SurrogateAutoencoder`'s, under 'autoencoder'."""
    width: int = AUTOENCODER_CONFIG["width"]
    depth: int = AUTOENCODER_CONFIG["depth"]
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, condition: Any = None) -> tuple[jax.Array, jax.Array]:
        del condition   # one condition: reconstruction
        return SurrogateAutoencoder(width=self.width, depth=self.depth, dtype=self.dtype,
                                    name="autoencoder")(x, return_features=True)


@dataclasses.dataclass(frozen=True)
class NoCondition:
    """The conditions of a target with a single one: labels (B, ...) -> zeros (1, B, 1)."""
    num_conditions: int = 1

    def __call__(self, labels: jax.Array) -> jax.Array:
        return jnp.zeros((1, labels.shape[0], 1), jnp.float32)


def no_condition_example(batch: int) -> jax.Array:
    """One condition of `NoCondition` for `batch` images (init and eval_shape)."""
    return jnp.zeros((batch, 1), jnp.float32)


def identity_of(path: str) -> str:
    """The person in a face file: the last '_'-separated part of its name (the shared faces are
    named split_gender_CelebA-id), else the whole name without its suffix."""
    return os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]


def split_by_identity(paths: Sequence[str], held_out_every: int = 3) -> tuple[list, list]:
    """(train paths, held-out paths): every `held_out_every`-th identity (in the order of the
    sorted file names, from the first) is held out with all of its files, so no person is in
    both. Raises ValueError if either side would be empty."""
    if held_out_every < 2:
        raise ValueError(f"held_out_every={held_out_every}: must be 2 or more")
    order: dict[str, int] = {}
    for p in sorted(paths):
        order.setdefault(identity_of(p), len(order))
    held = [p for p in sorted(paths) if order[identity_of(p)] % held_out_every == 0]
    train = [p for p in sorted(paths) if order[identity_of(p)] % held_out_every != 0]
    if not train or not held:
        raise ValueError(f"{len(order)} identities: too few to hold out every "
                         f"{held_out_every}-th and train on the rest")
    return train, held


def link_split(paths: Sequence[str], folder: str | os.PathLike) -> str:
    """A folder of symbolic links to `paths` (the faces are read where they are, never copied),
    for the commands that take a folder. An existing folder must hold exactly these links
    (then it is kept); anything else there is refused, never overwritten."""
    folder = os.fspath(folder)
    wanted = {os.path.basename(p): os.path.abspath(p) for p in paths}
    if os.path.isdir(folder):
        have = {n: os.path.realpath(os.path.join(folder, n)) for n in os.listdir(folder)}
        if have != {n: os.path.realpath(p) for n, p in wanted.items()}:
            raise FileExistsError(f"{folder}: already exists with other files than this split's "
                                  "links; remove it or choose another workdir")
        return folder
    os.makedirs(folder)
    for name, target in wanted.items():
        os.symlink(target, os.path.join(folder, name))
    return folder


def train_autoencoder(images_u8: np.ndarray, *, steps: int, batch_size: int = 16,
                      learning_rate: float = 1e-3, seed: int = 0,
                      config: dict | None = None, log_every: int = 100,
                      callback: Callable[[dict], None] | None = None) -> dict:
    """The `face_ae` target's variables {'params': {'autoencoder': ...}}: a SurrogateAutoencoder
    of `config` (default AUTOENCODER_CONFIG) trained by `training.surrogate.train_surrogate`
    (Adam on the MSE, `steps` steps of `batch_size`) on uint8 (N, S, S, 3) faces and their
    mirror images (2N: the faces are few)."""
    config = {**AUTOENCODER_CONFIG, **(config or {})}
    images_u8 = np.asarray(images_u8)
    mirrored = np.concatenate([images_u8, images_u8[:, :, ::-1]])
    variables = train_surrogate(mirrored, steps=steps, batch_size=batch_size,
                                learning_rate=learning_rate, seed=seed, log_every=log_every,
                                callback=callback, **config)
    return {"params": {"autoencoder": variables["params"]}}


def save_target(weights_dir: str | os.PathLike, name: str, variables: dict, config: dict,
                meta: dict | None = None, overwrite: bool = False) -> str:
    """Write the target bundle WEIGHTS_DIR/NAME (kind 'target', as convert/convert.py writes a
    GAN's) that `targets.load(name, weights_dir)` reads; `meta` adds how it was trained.
    Refuses an existing bundle unless `overwrite`. Returns its path."""
    from idguard_jax.checkpoint import save_bundle

    full = {**(meta or {}), "kind": "target", "model": name, "config": dict(config)}
    return save_bundle(os.path.join(os.fspath(weights_dir), name), variables, full,
                       overwrite=overwrite)


def reconstruction_quality(target, variables: dict, images_u8: np.ndarray,
                           batch_size: int = 16) -> dict:
    """How well a target reproduces faces under its condition 0: per image 'psnr' (dB) and 'l1'
    (mean |y - x| in [-1, 1] units) of its output y against x, and their means."""
    from idguard_jax.evaluation import metrics
    from idguard_jax.images import to_float

    forward = jax.jit(lambda v, x, c: target.forward(v, x, c)[0])
    psnr, l1 = [], []
    for start in range(0, len(images_u8), batch_size):
        x = to_float(np.asarray(images_u8[start:start + batch_size]))
        condition = target.select(target.conditions(jnp.zeros((len(x), 5))), 0)
        y = np.asarray(forward(variables, jnp.asarray(x), condition))
        psnr.append(metrics.psnr(x, y))
        l1.append(np.abs(y - x).mean(axis=(1, 2, 3)))
    psnr, l1 = np.concatenate(psnr), np.concatenate(l1)
    return {"psnr": psnr, "l1": l1, "psnr_mean": float(psnr.mean()), "l1_mean": float(l1.mean())}
