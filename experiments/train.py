"""Train ID-Guard's perturbation generator.

    python experiments/train.py --config=demo                 # a few CPU minutes, random targets
    python experiments/train.py --config=offline              # minutes, the face model trained
                                                              # by experiments/offline.py target
    python experiments/train.py --strategy=kpi --weights weights/ --data FACES_DIR --prior PRIOR
    python experiments/train.py --config=reference --weights weights/ --data REF_CACHE  # the code's
    # several hosts: the same command in each, with a shared --workdir
    python experiments/train.py --distributed --coordinator HOST0:1234 --num-processes 2 \
        --process-id I --workdir /shared/run ...

The paper's configuration (the default) needs converted target weights (convert/convert.py) and
face images; it says exactly what is missing. `--config=demo` runs on any machine with small
RANDOMLY initialised targets and the real parts that exist offline (dlib's identity network,
masks from dlib's 68 landmarks, cached in WORKDIR): it shows the machinery working, not the
paper's numbers. `--config=offline` is the demo with no random network: its target is a face
model trained here (experiments/offline.py target), its data the training identities of that
command's split (defaults: --data runs/offline/faces/train, --weights runs/offline/targets).
Output: one JSON line of metrics per step (stdout and WORKDIR/metrics.jsonl), checkpoints in
WORKDIR/checkpoints (continue with --resume), the trained generator in WORKDIR/generator.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from idguard_jax import compile_cache, startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FACES = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "faces", "celebahq"))
# where experiments/offline.py target puts its split and its trained target(s)
OFFLINE_FACES = os.path.join("runs", "offline", "faces", "train")
OFFLINE_WEIGHTS = os.path.join("runs", "offline", "targets")


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.training.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("paper", "reference", "demo", "offline"),
                   default="paper",
                   help="paper: 256 px, batch 32, the official targets; reference: the released "
                   "code's recipe (batch 3, one epoch, MGDA, its soft JPEG masks: a cache from "
                   "prepare.py celebamask-hq --masks reference); demo: 64 px CPU demo; offline: "
                   "the demo against a face model trained here (experiments/offline.py target)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="task weighting (default: the config's; paper kpi = S-II, reference mgda)")
    p.add_argument("--data", default=None, help="a cache from experiments/prepare.py, or a "
                   "folder of aligned face images (stand-in masks and labels; demo default: "
                   f"{DEMO_FACES})")
    p.add_argument("--weights", default=None,
                   help="folder of converted target weights (convert/convert.py MODEL CKPT DIR)")
    p.add_argument("--prior", default=None,
                   help="gradient prior bundle from experiments/prior.py (default: zeros)")
    p.add_argument("--workdir", default=None, help="run folder (default runs/CONFIG-STRATEGY)")
    p.add_argument("--steps", type=int, default=None, help="number of steps (default: the config's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any TrainConfig field, e.g. --set batch_size=8 --set dtype=bfloat16")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: run this same command in every process (shared --workdir); "
                   "the cluster is detected (SLURM, MPI, TPU) or given by the three flags below")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --distributed: process 0's address")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _config(args):
    """The run's TrainConfig from --config, --strategy, --steps and --set (ValueError if bad),
    with identity 'auto' resolved against --weights."""
    from idguard_jax import config as config_lib
    from idguard_jax.training import frozen as frozen_lib

    cfg = {"paper": config_lib.paper, "reference": config_lib.reference,
           "demo": config_lib.demo, "offline": config_lib.offline}[args.config]()
    if args.strategy:
        cfg = dataclasses.replace(cfg, strategy=args.strategy)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, num_steps=args.steps)
    cfg = config_lib.apply_overrides(cfg, args.set)
    resolved = frozen_lib.resolve_identity(cfg, args.weights)
    if cfg.identity == "auto" and resolved.identity == "dlib":
        _note("no converted ArcFace in --weights: the identity loss uses dlib's face "
              "recognition network (cosine of its descriptors)")
    return resolved


def _report_missing(problems: list[str]) -> int:
    print("Cannot start training; missing:", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def _open_faces(cfg, data_dir: str, workdir: str):
    """The training faces (a cache or a folder); FileNotFoundError / ValueError if unusable.
    A folder's landmarks are found once and kept in the run's workdir (never beside the faces:
    that folder may be read-only)."""
    from idguard_jax.data.cache import check_mask_pipeline
    from idguard_jax.data.datasets import open_dataset
    from idguard_jax.data.folder_landmarks import LANDMARKS_FILE
    from idguard_jax.networks import identity

    chip_based = identity.build(cfg.identity).chip_based
    try:
        faces = open_dataset(data_dir, cfg.image_size, seed=cfg.seed, landmarks=chip_based,
                             folder_masks=cfg.folder_masks, log=_note,
                             landmark_cache=os.path.join(workdir, LANDMARKS_FILE))
        check_mask_pipeline(data_dir, faces.mask_pipeline, cfg.mask_pipeline)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--data {e}") from e
    for note in faces.notes:
        _note(note)
    if len(faces) < cfg.batch_size:
        raise ValueError(f"--data {data_dir}: {len(faces)} images, fewer than one batch of "
                         f"{cfg.batch_size} (lower it with --set batch_size=N)")
    return faces


def _frozen(cfg, args):
    """The targets' and identity network's weights: random for the demo, else --weights."""
    from idguard_jax.training import frozen as frozen_lib

    if cfg.identity == "standin":
        _note("the identity network is a RANDOM stand-in (--set identity=arcface for the "
              "paper's)")
    if args.config == "demo":
        return frozen_lib.init_frozen_demo(cfg, args.weights)
    return frozen_lib.load_frozen(cfg, args.weights)


def _missing_learned(cfg, weights: str) -> list[str]:
    """--config=offline: the trained targets it needs and their architecture, one line per
    problem (a bundle of another architecture than the step builds is refused here, by name)."""
    from idguard_jax.checkpoint import read_meta
    from idguard_jax.networks import targets

    problems = []
    for name in cfg.targets:
        spec, path = targets.TARGETS[name], os.path.join(weights, name)
        make = spec.make_command or f"python convert/convert.py {name} CHECKPOINT {weights}"
        if not os.path.isfile(os.path.join(path, "meta.json")):
            problems.append(f"--weights {weights}: no {name!r}; run: {make}")
            continue
        built = {**spec.default_config, **targets.size_config(name, cfg.target_size)}
        stored = {**spec.default_config, **read_meta(path).get("config", {})}
        if stored != built:
            problems.append(f"--weights {path}: trained with {stored}, but target_size="
                            f"{cfg.target_size!r} builds {built}; retrain it or --set "
                            "target_size=...")
    return problems


def _offline_banner(cfg) -> str:
    return (f"OFFLINE: the targets ({', '.join(cfg.targets)}) are face models TRAINED HERE on the "
            f"training identities (experiments/offline.py target); the identity loss uses "
            f"{cfg.identity}'s real network; the masks come from dlib's 68 landmarks; the "
            "attribute labels and heatmaps are stand-ins. Not the paper's GANs.")


def _demo_banner(cfg) -> str:
    """What of the demo is random, what is a stand-in and what is real."""
    random_parts = ["targets"] + (["identity network"] if cfg.identity == "standin" else [])
    real = ([f"the identity loss uses {cfg.identity}'s real face recognition network"]
            if cfg.identity != "standin" else [])
    real += (["the masks come from dlib's 68 landmarks (brows, eyes, nose, mouth)"]
             if cfg.folder_masks == "landmarks" else ["the masks are a stand-in central box"])
    return (f"DEMO: only the {' and '.join(random_parts)} are RANDOM (small, randomly "
            f"initialised: no target weights exist offline); {'; '.join(real)}; the attribute "
            "labels and heatmaps are stand-ins (see the notes). This shows the training "
            "machinery, not the paper's results.")


def _delta_p(cfg, prior: str | None):
    if prior is None:
        _note("no --prior: delta_p starts at zero (the paper starts from a PGD prior made by "
              "experiments/prior.py)")
        return None
    from idguard_jax.training.prior import load_prior
    return load_prior(prior, cfg.image_size)


@startup.command
@compile_cache.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.distributed:   # before any other JAX work
        from idguard_jax.training.runner import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from idguard_jax.training.runner import fit, missing_inputs

    try:
        cfg = _config(args)
    except ValueError as e:
        return _fail(str(e))
    data_dir = args.data or {"demo": DEMO_FACES, "offline": OFFLINE_FACES}.get(args.config)
    if args.config == "offline":
        args.weights = args.weights or OFFLINE_WEIGHTS
    problems = missing_inputs(cfg, data=data_dir, weights=args.weights, prior=args.prior,
                              converted=args.config not in ("demo", "offline"))
    if args.config == "offline":
        problems += _missing_learned(cfg, args.weights)
    if problems:
        return _report_missing(problems)
    if args.config in ("demo", "offline"):
        print((_demo_banner if args.config == "demo" else _offline_banner)(cfg), file=sys.stderr)
    workdir = args.workdir or os.path.join("runs", f"{args.config}-{cfg.strategy}")
    try:
        faces = _open_faces(cfg, data_dir, workdir)
        frozen = _frozen(cfg, args)
        delta_p = _delta_p(cfg, args.prior)
        fit(cfg, faces, frozen, workdir, resume=args.resume, delta_p=delta_p)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
