"""The training loop around the jitted step: data, devices, logging, checkpoints, export.

Metrics: one JSON line per logged step on stdout and in WORKDIR/metrics.jsonl. Checkpoints: every
`checkpoint_every` steps and at the end, in WORKDIR/checkpoints (Orbax). The trained generator
(with its delta_p) is exported as a bundle to WORKDIR/generator for `idguard_jax.protection.faces`.

Devices: the batch axis is split over a 1-D mesh of every device of every process; the state
and frozen weights are replicated. Several hosts (processes) run the same program: call
`initialize_distributed` in each before any other JAX work, then `fit` as usual. Each process
then reads only its own rows of every global batch (the rows its devices hold) and the step
sees one global batch; WORKDIR must be shared by all processes (Orbax writes checkpoints
together); process 0 alone logs and writes metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idguard_jax.checkpoint import RunCheckpointer
from idguard_jax.config import TrainConfig
from idguard_jax.data.loader import prefetch
from idguard_jax.data.loader import BatchSampler
from idguard_jax.data.datasets import FaceData
from idguard_jax.generator import save_generator
from idguard_jax.training.frozen import Frozen
from idguard_jax.training.step import TrainState, create_setup, init_state, make_train_step

__all__ = ["fit", "missing_inputs", "data_mesh", "shard_batch", "replicate", "process_rows",
           "initialize_distributed"]

# Fields that must agree between a run and the checkpoint it resumes.
_RESUME_FIELDS = ("image_size", "batch_size", "ngf", "n_blocks", "eps", "targets", "strategy",
                  "seed", "identity", "dtype", "robust")
# A field a checkpoint's saved config lacks (saved before the field existed) had its default.
_FIELD_DEFAULTS = {f: getattr(TrainConfig, f, None) for f in _RESUME_FIELDS}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize for a multi-host run; call it first, in every process.

    Without arguments JAX detects the cluster (SLURM, Open MPI, TPU pods, ...); otherwise give
    coordinator 'host:port' (process 0's address), num_processes and this process's id. CPU
    devices exchange data through gloo (XLA:CPU has no collectives of its own across hosts).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over the given devices (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold on the 'data' axis."""
    index_map = NamedSharding(mesh, P("data")).addressable_devices_indices_map((global_batch,))
    rows = sorted({(ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop)
                   for ix in index_map.values()})
    lo, hi = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != hi - lo:
        raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the batch")
    return slice(lo, hi)


def shard_batch(mesh: Mesh, batch: dict, global_batch: int | None = None) -> dict:
    """Split the batch axis over the mesh (the global batch stays one logical array).

    One process: `batch` is the global batch. Several: `batch` is this process's rows
    (process_rows) of a global batch of `global_batch` rows."""
    n = mesh.devices.size
    b = len(next(iter(batch.values())))
    global_batch = b if global_batch is None else global_batch
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices")
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, np.asarray(a), (global_batch,) + np.shape(a)[1:]), batch)


def replicate(mesh: Mesh, tree):
    """The same value on every device (every process must pass the same value)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


class _Rows:
    """A sampler's batches cut to this process's rows (multi-host: each reads only its own)."""

    def __init__(self, sampler: BatchSampler, rows: slice):
        self.sampler, self.rows = sampler, rows

    def indices(self, step: int) -> np.ndarray:
        return self.sampler.indices(step)[self.rows]


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def missing_inputs(cfg: TrainConfig, *, data: str | None, weights: str | None,
                   prior: str | None, converted: bool) -> list[str]:
    """What a run of cfg lacks before it can start, one line per problem, phrased for
    experiments/train.py's options (--data, --weights, --prior); [] if nothing.

    converted: the targets (and a converted identity network) come from --weights (the paper's
    configuration; the demo's are random). cfg.identity must be resolved
    (frozen.resolve_identity)."""
    problems = []
    if data is None:
        problems.append("--data: give a folder of aligned face images (CelebA-HQ-like, any size; "
                        "they are resized to the configured image_size)")
    elif not os.path.isdir(data):
        problems.append(f"--data {data}: no such folder")
    if converted and weights is None:
        problems.append("--weights: give the folder of converted targets; convert each "
                        "official checkpoint once with: " + "; ".join(
                            f"python convert/convert.py {t} CHECKPOINT weights/"
                            for t in cfg.targets))
    elif converted:
        needed = list(cfg.targets) + ([cfg.identity] if cfg.identity not in
                                      ("standin", "dlib") else [])
        for t in needed:
            if not os.path.isdir(os.path.join(weights, t)):
                problems.append(f"--weights {weights}: no converted {t!r}; run: python "
                                f"convert/convert.py {t} CHECKPOINT {weights}")
    if prior is not None and not os.path.isdir(prior):
        problems.append(f"--prior {prior}: no such bundle folder (make one with "
                        "python experiments/prior.py)")
    return problems


def fit(cfg: TrainConfig, data: FaceData, frozen: Frozen, workdir: str, *, resume: bool = False,
        delta_p=None, devices=None, log: Callable[[str], None] | None = None,
        progress: bool = True) -> TrainState:
    """Train the generator; returns the final state (also checkpointed and exported).

    Multi-host: call initialize_distributed first in every process, then this in every process
    with the same arguments (see the module's docstring)."""
    primary = jax.process_index() == 0
    log = log or (lambda line: print(line, flush=True))
    if not primary:
        log, progress = (lambda line: None), False
    setup = create_setup(cfg)
    sampler = BatchSampler(len(data), cfg.batch_size, cfg.seed)
    total = cfg.num_steps if cfg.num_steps is not None else sampler.steps_per_epoch
    mesh = data_mesh(devices)
    if cfg.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the "
                         f"{mesh.devices.size} devices")
    os.makedirs(workdir, exist_ok=True)
    ckpt = RunCheckpointer(workdir, cfg.max_to_keep)
    record = {"config": cfg.to_json(), "data": {"n": len(data), "notes": list(data.notes)}}
    state = _initial_state(setup, cfg, ckpt, record, workdir, resume, delta_p)
    start = int(state.step)
    if jax.process_count() > 1:   # each process gathers only its own rows of every batch
        sampler = _Rows(sampler, process_rows(mesh, cfg.batch_size))
    batches = prefetch(data, sampler, start, total,
                       put=lambda b: shard_batch(mesh, b, cfg.batch_size))
    metrics_path = os.path.join(workdir, "metrics.jsonl") if primary else os.devnull
    # disable=None: the bar shows only when stderr is a terminal
    bar = tqdm(total=total, desc="train", unit="step", initial=start,
               disable=None if progress else True)
    with open(metrics_path, "a") as mfile, bar:
        state = _train_loop(cfg, make_train_step(setup), replicate(mesh, state),
                            replicate(mesh, frozen), zip(range(start, total), batches), total,
                            ckpt, record, lambda line: _log_metrics(line, log, mfile), bar)
    ckpt.close()
    return _export_generator(cfg, state, data, workdir, primary)


def _initial_state(setup, cfg: TrainConfig, ckpt: RunCheckpointer, record: dict, workdir: str,
                   resume: bool, delta_p) -> TrainState:
    """A fresh state, or with `resume` the latest checkpoint (refused if its settings differ);
    without `resume`, existing checkpoints are refused rather than overwritten."""
    state = init_state(setup, jax.random.key(cfg.seed), delta_p)
    if resume:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"--resume: {ckpt.directory} holds no checkpoint")
        state, saved = ckpt.restore(jax.tree.map(jnp.asarray, state))
        diff = [f for f in _RESUME_FIELDS if saved["config"].get(f, _FIELD_DEFAULTS[f])
                != record["config"].get(f, _FIELD_DEFAULTS[f])]
        if diff:
            raise ValueError(f"--resume: {workdir} was trained with other settings for "
                             f"{', '.join(diff)}; use the same settings or another workdir")
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{workdir} already holds checkpoints (step {ckpt.latest_step()}): "
                              "pass --resume to continue it, or choose another workdir")
    return state


def _log_metrics(line: str, log: Callable[[str], None], mfile) -> None:
    log(line)
    mfile.write(line + "\n")
    mfile.flush()


def _train_loop(cfg: TrainConfig, step_fn, state: TrainState, frozen: Frozen, batches, total: int,
                ckpt: RunCheckpointer, record: dict, write: Callable[[str], None],
                bar) -> TrainState:
    """Run the steps of `batches` ((step, batch) pairs): one JSON line of metrics every
    `log_every` steps and at the end, a checkpoint every `checkpoint_every` and at the end."""
    t_last = time.perf_counter()
    for step, batch in batches:
        state, metrics = step_fn(state, batch, frozen)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            now = time.perf_counter()
            write(json.dumps({"step": done, "time_s": round(now - t_last, 4),
                              **_scalars(metrics)}))
            t_last = now
        if done % cfg.checkpoint_every == 0 or done == total:
            ckpt.save(done, state, {**record, "step": done})
        bar.update()
    return state


def _export_generator(cfg: TrainConfig, state: TrainState, data: FaceData, workdir: str,
                      primary: bool) -> TrainState:
    """WORKDIR/generator: the trained generator with its delta_p, for protection."""
    host_state = jax.device_get(state)
    save_generator(os.path.join(workdir, "generator"),
                   {"params": host_state.params, "batch_stats": host_state.batch_stats},
                   host_state.delta_p, cfg.generator,
                   extra_meta={"trained_steps": int(host_state.step), "strategy": cfg.strategy,
                               "targets": list(cfg.targets), "data_notes": list(data.notes)},
                   overwrite=True)
    if primary:
        print(f"generator exported to {os.path.join(workdir, 'generator')}", file=sys.stderr)
    return host_state
