"""Train ID-Guard's perturbation generator.

    python experiments/train.py --config=demo                 # a few CPU minutes, random targets
    python experiments/train.py --strategy=kpi --weights weights/ --data FACES_DIR --prior PRIOR
    # several hosts: the same command in each, with a shared --workdir
    python experiments/train.py --distributed --coordinator HOST0:1234 --num-processes 2 \
        --process-id I --workdir /shared/run ...

The paper's configuration (the default) needs converted target weights (convert/convert.py) and
face images; it says exactly what is missing. `--config=demo` runs on any machine with small
RANDOMLY initialised targets: it shows the machinery working, not the paper's numbers.
Output: one JSON line of metrics per step (stdout and WORKDIR/metrics.jsonl), checkpoints in
WORKDIR/checkpoints (continue with --resume), the trained generator in WORKDIR/generator.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FACES = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "faces", "celebahq"))


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.training.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("paper", "demo"), default="paper",
                   help="paper: 256 px, batch 32, the official targets; demo: 64 px CPU demo")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="task weighting (default kpi = the paper's S-II)")
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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.distributed:   # before any other JAX work
        from idguard_jax.training.runner import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from idguard_jax import config as config_lib

    try:
        cfg = config_lib.demo() if args.config == "demo" else config_lib.paper()
        if args.strategy:
            cfg = dataclasses.replace(cfg, strategy=args.strategy)
        if args.steps is not None:
            cfg = dataclasses.replace(cfg, num_steps=args.steps)
        cfg = config_lib.apply_overrides(cfg, args.set)
    except ValueError as e:
        return _fail(str(e))

    if cfg.identity == "auto":
        from idguard_jax.networks.identity import default_loss_network
        cfg = dataclasses.replace(cfg, identity=default_loss_network(args.weights))
        if cfg.identity == "dlib":
            print("note: no converted ArcFace in --weights: the identity loss uses dlib's face "
                  "recognition network (cosine of its descriptors)", file=sys.stderr)
    data_dir = args.data or (DEMO_FACES if args.config == "demo" else None)
    problems = []
    if data_dir is None:
        problems.append("--data: give a folder of aligned face images (CelebA-HQ-like, any size; "
                        "they are resized to the configured image_size)")
    elif not os.path.isdir(data_dir):
        problems.append(f"--data {data_dir}: no such folder")
    if args.config == "paper":
        if args.weights is None:
            problems.append("--weights: give the folder of converted targets; convert each "
                            "official checkpoint once with: " + "; ".join(
                                f"python convert/convert.py {t} CHECKPOINT weights/"
                                for t in cfg.targets))
        else:
            needed = list(cfg.targets) + ([cfg.identity] if cfg.identity not in
                                          ("standin", "dlib") else [])
            for t in needed:
                if not os.path.isdir(os.path.join(args.weights, t)):
                    problems.append(f"--weights {args.weights}: no converted {t!r}; run: python "
                                    f"convert/convert.py {t} CHECKPOINT {args.weights}")
    if args.prior is not None and not os.path.isdir(args.prior):
        problems.append(f"--prior {args.prior}: no such bundle folder (make one with "
                        "python experiments/prior.py)")
    if problems:
        print("Cannot start training; missing:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2

    import jax

    from idguard_jax.data import datasets as data_lib
    from idguard_jax.networks import identity
    from idguard_jax.networks import targets
    from idguard_jax.training import step as train
    from idguard_jax.data.cache import open_cache
    from idguard_jax.training.runner import fit

    workdir = args.workdir or os.path.join("runs", f"{args.config}-{cfg.strategy}")
    if args.config == "demo":
        print("DEMO: small randomly initialised targets and identity network, stand-in masks; "
              "this shows the training machinery, not the paper's results.", file=sys.stderr)
    try:
        chip_based = identity.build(cfg.identity).chip_based
        if os.path.exists(os.path.join(data_dir, "meta.json")):   # a cache from prepare.py
            faces = open_cache(data_dir)
            if faces.images.shape[1] != cfg.image_size:
                return _fail(f"--data {data_dir}: cached at {faces.images.shape[1]} px, the "
                             f"config trains at {cfg.image_size} px")
            if chip_based and faces.landmarks is None:
                return _fail(f"--data {data_dir}: identity {cfg.identity!r} needs landmarks; "
                             "rebuild the cache with experiments/prepare.py --landmarks")
        else:
            faces = data_lib.folder_dataset(data_dir, cfg.image_size, seed=cfg.seed,
                                            landmarks=chip_based)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    for note in faces.notes:
        print(f"note: {note}", file=sys.stderr)
    if len(faces) < cfg.batch_size:
        return _fail(f"--data {data_dir}: {len(faces)} images, fewer than one batch of "
                     f"{cfg.batch_size} (lower it with --set batch_size=N)")

    setup = train.create_setup(cfg)
    if args.config == "demo":
        frozen = train.init_frozen_random(setup, jax.random.key(cfg.seed + 1))
    else:
        tvars = {}
        try:
            for name in cfg.targets:
                _, tvars[name] = targets.load(name, args.weights)
        except (FileNotFoundError, ValueError) as e:
            return _fail(str(e))
        if cfg.identity == "standin":
            print("note: the identity network is a RANDOM stand-in (--set identity=arcface for "
                  "the paper's)", file=sys.stderr)
            _, ivars = identity.init_random(cfg.identity, jax.random.key(cfg.seed + 1),
                                            **dict(cfg.identity_config))
        else:
            _, ivars = identity.load(cfg.identity, args.weights, cfg.identity_normalisation)
        frozen = {"targets": tvars, "identity": ivars}

    delta_p = None
    if args.prior:
        from idguard_jax.training.prior import load_prior
        delta_p = load_prior(args.prior, cfg.image_size)
    else:
        print("note: no --prior: delta_p starts at zero (the paper starts from a PGD prior made "
              "by experiments/prior.py)", file=sys.stderr)

    try:
        fit(cfg, faces, frozen, workdir, resume=args.resume, delta_p=delta_p)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
