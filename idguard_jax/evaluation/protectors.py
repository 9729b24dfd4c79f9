"""What protects a batch in an evaluation: ID-Guard's generators and the baselines, by name.

    keys = protectors.method_keys(seed)
    cmua = protectors.make_protector("cmua", models, options, key=keys["cmua"], fit=fit)
    protected = cmua.protect(x, labels, None)

A protector maps (images (B, S, S, 3) float32 in [-1, 1], labels (B, 5), key or None) to the
protected images (B, S, S, 3) in [-1, 1] within eps (L-inf). `make_protector` builds one of
`baselines.METHODS` (fitting cmua and pg first) and says in a note, for the tables, how.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import numpy as np

from idguard_jax import config as config_lib
from idguard_jax.evaluation import baselines
from idguard_jax.evaluation.measure import Models
from idguard_jax.generator import GeneratorConfig, protect_eval
from idguard_jax.images import to_float

__all__ = ["Protector", "Baseline", "BaselineOptions", "FitData", "PGSize", "KEY_SALTS",
           "method_keys", "idguard_protector", "pg_generator_size", "make_protector"]

Protector = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]
Log = Callable[[str], None]

# Salts folded into the seed's key, one per random use, so that no two uses share a key: the
# per-batch attack starts (then folded with the dataset's and the batch's index), CMUA's fit
# and PG's initialisation.
KEY_SALTS = {"disrupting": 1, "pgd": 2, "cmua": 3, "pg": 4, "noise": 5}


@dataclasses.dataclass(frozen=True)
class BaselineOptions:
    """How the baselines attack and learn (experiments/evaluate.py's options of these names)."""
    eps: float = baselines.EPS     # L-inf budget of every method, [-1, 1] units
    pgd_steps: int = 10            # PGD steps of disrupting and pgd
    cmua_images: int = 128         # CMUA learns from the first N fit images (its num_test)
    cmua_batch: int = 64           # CMUA's batch size
    cmua_epochs: int = 1
    pg_steps: int = 500            # PG's generator training steps
    pg_lr: float = 1e-4            # PG's Adam learning rate
    pg_batch: int = 32             # PG's training batch (ID-Guard's)
    surrogate: str | None = None   # PG's surrogate bundle; None: one trained on the fit images
    surrogate_steps: int = 300     # steps of that surrogate's training
    seed: int = 0                  # seeds the surrogate trained here


@dataclasses.dataclass(frozen=True)
class FitData:
    """The images cmua and pg learn from."""
    path: str             # where they came from (named in the notes and settings)
    images: np.ndarray    # uint8 (N, S, S, 3)
    labels: np.ndarray    # float32 (N, 5)


@dataclasses.dataclass(frozen=True)
class PGSize:
    """The width of the generator PG trains, and where it came from (for the notes)."""
    ngf: int
    n_blocks: int
    source: str


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A built baseline."""
    protect: Protector
    note: str                      # one line for the tables: what was attacked or fitted, how
    settings: dict | None = None   # what results.json records under settings[name]


def method_keys(seed: int) -> dict[str, jax.Array]:
    """One key per random use of the baselines (KEY_SALTS), from `seed`."""
    key = jax.random.key(seed)
    return {m: jax.random.fold_in(key, salt) for m, salt in KEY_SALTS.items()}


def idguard_protector(config: GeneratorConfig, variables: dict, delta_p) -> Protector:
    """A trained ID-Guard generator (eval mode, its own eps) as a protector."""
    return lambda x, labels, key: protect_eval(variables, delta_p, x, config=config,
                                               eps=config.eps)


def pg_generator_size(ngf: int | None, n_blocks: int | None, *,
                      generator: GeneratorConfig | None, converted: bool,
                      config_name: str) -> PGSize:
    """PG's generator width: `ngf` / `n_blocks` where given, the rest from `generator` (the first
    evaluated ID-Guard generator), else the paper's (64, 6) with converted targets, else the
    random stand-ins' config (`idguard_jax.config.<config_name>`)."""
    if generator is not None:
        base, source = generator, "the first --generator's"
    elif converted:
        base, source = GeneratorConfig(), "the paper's"
    else:
        base, source = getattr(config_lib, config_name)(), f"the {config_name} config's"
    if ngf or n_blocks:
        source = "--pg-ngf/--pg-blocks" + ("" if ngf and n_blocks else f", the rest {source}")
    return PGSize(ngf or base.ngf, n_blocks or base.n_blocks, source)


def _disrupting(models: Models, opts: BaselineOptions) -> Baseline:
    stargan = next(t for t in models.targets if t.name == "stargan")
    variables = models.variables["stargan"]
    return Baseline(
        lambda x, labels, key: baselines.disrupting(stargan, variables, x, labels, key,
                                                    eps=opts.eps, steps=opts.pgd_steps),
        f"disrupting: one perturbation per image for all of StarGAN's conditions "
        f"({opts.pgd_steps} PGD steps)")


def _pgd(models: Models, opts: BaselineOptions) -> Baseline:
    return Baseline(
        lambda x, labels, key: baselines.pgd_all(models.targets, models.variables, x, labels, key,
                                                 eps=opts.eps, steps=opts.pgd_steps),
        f"pgd: one perturbation per image against every target and condition "
        f"({opts.pgd_steps} PGD steps)")


def _noise(opts: BaselineOptions) -> Baseline:
    return Baseline(lambda x, labels, key: baselines.uniform_noise(x, key, eps=opts.eps),
                    f"noise: uniform random noise in [-{opts.eps:g}, {opts.eps:g}] per pixel")


def _cmua(models: Models, opts: BaselineOptions, key: jax.Array, fit: FitData,
          log: Log) -> Baseline:
    """CMUA's universal perturbation, fitted on the first --cmua-images fit images."""
    n = min(opts.cmua_images, len(fit.images))
    batch = min(opts.cmua_batch, n)
    t0 = time.perf_counter()
    up = baselines.cmua_fit(models.targets, models.variables, to_float(fit.images[:n]),
                            fit.labels[:n], key, batch_size=opts.cmua_batch,
                            epochs=opts.cmua_epochs, eps=opts.eps)
    log(f"cmua: universal perturbation fitted in {time.perf_counter() - t0:.1f} s")
    note = (f"cmua: one universal perturbation fitted on the first {n} images of {fit.path} "
            f"with their labels ({n // batch} batch(es) of {batch}, {opts.cmua_epochs} "
            "epoch(s))" + (f"; only {n} there, --cmua-images asked for {opts.cmua_images}"
                           if n < opts.cmua_images else ""))
    return Baseline(lambda x, labels, k: baselines.cmua_apply(up, x, eps=opts.eps), note,
                    {"images": n, "batch": batch, "batches": n // batch,
                     "epochs": opts.cmua_epochs, "fit_data": fit.path})


def _pg_surrogate(opts: BaselineOptions, fit: FitData, image_size: int):
    """(surrogate module, its variables, how the notes name it): the given bundle, else a small
    face-reconstruction autoencoder trained here on the fit images."""
    from idguard_jax.training import surrogate as surrogate_lib

    if opts.surrogate:
        model, variables, _ = surrogate_lib.load_surrogate(opts.surrogate)
        return model, variables, opts.surrogate
    depth = 4 if image_size % 16 == 0 else 2
    model = surrogate_lib.SurrogateAutoencoder(width=16, depth=depth)
    variables = surrogate_lib.train_surrogate(fit.images, steps=opts.surrogate_steps,
                                              batch_size=16, width=16, depth=depth,
                                              seed=opts.seed)
    return model, variables, (f"a face-reconstruction autoencoder (width 16, depth {depth}) "
                              f"trained here for {opts.surrogate_steps} steps, batch 16")


def _pg(opts: BaselineOptions, key: jax.Array, fit: FitData, image_size: int, size: PGSize,
        log: Log) -> Baseline:
    """PG: a ResnetGenerator trained against the surrogate on the fit images."""
    t0 = time.perf_counter()
    model, svars, surrogate = _pg_surrogate(opts, fit, image_size)
    config = GeneratorConfig(ngf=size.ngf, n_blocks=size.n_blocks, image_size=image_size,
                             eps=opts.eps)
    batch = min(opts.pg_batch, len(fit.images))
    variables = baselines.pg_train(model.apply, svars, to_float(fit.images), key, config=config,
                                   steps=opts.pg_steps, batch_size=batch,
                                   learning_rate=opts.pg_lr)
    log(f"pg: generator trained in {time.perf_counter() - t0:.1f} s")
    note = (f"pg: a ResnetGenerator (ngf {size.ngf}, {size.n_blocks} blocks: {size.source}) "
            f"trained for {opts.pg_steps} steps, batch {batch}, Adam lr {opts.pg_lr:g}, "
            f"against {surrogate}")
    return Baseline(lambda x, labels, k: baselines.pg_protect(variables, x, config=config), note,
                    {"ngf": size.ngf, "n_blocks": size.n_blocks, "size_from": size.source,
                     "steps": opts.pg_steps, "batch": batch, "lr": opts.pg_lr,
                     "surrogate": surrogate})


def make_protector(name: str, models: Models, options: BaselineOptions, *,
                   key: jax.Array | None = None, fit: FitData | None = None,
                   image_size: int | None = None, pg_size: PGSize | None = None,
                   log: Log | None = None) -> Baseline:
    """The baseline `name` (disrupting, pgd, cmua, pg, noise) against `models`, fitted first
    where it learns: cmua needs `key` and `fit`; pg `key`, `fit`, `image_size` and `pg_size`. `log`
    receives one line per fit (its time)."""
    log = log or (lambda line: None)
    if name == "disrupting":
        return _disrupting(models, options)
    if name == "pgd":
        return _pgd(models, options)
    if name == "noise":
        return _noise(options)
    if name in ("cmua", "pg") and (key is None or fit is None):
        raise ValueError(f"{name} learns: give it a key and the images to fit on")
    if name == "cmua":
        return _cmua(models, options, key, fit, log)
    if name == "pg":
        if image_size is None or pg_size is None:
            raise ValueError("pg trains a generator: give its image_size and pg_size")
        return _pg(options, key, fit, image_size, pg_size, log)
    raise ValueError(f"unknown baseline {name!r}; choose from "
                     f"{', '.join(m for m in baselines.METHODS if m != 'idguard')}")
