"""Make ID-Guard's gradient prior perturbation delta_p (paper III-D, IV-A5).

    python experiments/prior.py train-surrogate FACES_DIR OUT_DIR [--size 256 --steps 5000 ...]
    python experiments/prior.py compute FACES_DIR OUT_DIR --surrogate SURROGATE_DIR \
        [--num-images 2000 --eps 0.05 --steps 10 --step-size 0.01 --seed 0]

`train-surrogate` writes a surrogate bundle (kind 'idguard-surrogate') to OUT_DIR; `compute`
runs PGD against it on N randomly chosen faces of FACES_DIR and writes their average as a prior
bundle (kind 'idguard-prior', read it with `idguard_jax.training.prior.load_prior`) plus `delta_p.png`
(the perturbation scaled from [-eps, eps] to [0, 255], for looking at). Progress and the final
metrics are printed as one JSON object per line on stdout; errors go to stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from idguard_jax import compile_cache, startup


__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as `error: ...` and exit code 2."""


def _emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prior.py", description="Train the surrogate autoencoder and compute ID-Guard's "
        "gradient prior perturbation (average of PGD perturbations against it).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-surrogate", help="train the face-reconstruction surrogate M_s")
    t.add_argument("faces_dir", metavar="FACES_DIR", help="folder of face images")
    t.add_argument("out_dir", metavar="OUT_DIR", help="surrogate bundle folder to write")
    t.add_argument("--size", type=int, default=256, help="image size in pixels (default 256, "
                   "the paper's)")
    t.add_argument("--steps", type=int, default=5000, help="Adam steps (default 5000)")
    t.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    t.add_argument("--learning-rate", type=float, default=1e-3, help="Adam lr (default 1e-3)")
    t.add_argument("--width", type=int, default=32, help="channels of the first conv (default 32)")
    t.add_argument("--depth", type=int, default=4, help="stride-2 levels (default 4; --size must "
                   "be a multiple of 2**depth)")
    t.add_argument("--max-images", type=int, default=None, help="use at most this many images "
                   "(the first ones in name order; default all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100, help="steps per JSON metrics line")
    t.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR bundle")

    c = sub.add_parser("compute", help="average PGD perturbations against the surrogate")
    c.add_argument("faces_dir", metavar="FACES_DIR", help="folder of face images")
    c.add_argument("out_dir", metavar="OUT_DIR", help="prior bundle folder to write")
    c.add_argument("--surrogate", required=True, metavar="DIR",
                   help="surrogate bundle written by train-surrogate")
    c.add_argument("--num-images", type=int, default=2000, help="N faces, drawn at random "
                   "(default 2000, the paper's; capped at the number found)")
    c.add_argument("--size", type=int, default=None, help="image size (default: the size the "
                   "surrogate was trained at)")
    c.add_argument("--eps", type=float, default=0.05, help="L-inf bound in [-1, 1] units "
                   "(default 0.05)")
    c.add_argument("--steps", type=int, default=10, help="PGD iterations (default 10)")
    c.add_argument("--step-size", type=float, default=0.01, help="PGD step (default 0.01)")
    c.add_argument("--batch-size", type=int, default=32, help="images per PGD call (default 32)")
    c.add_argument("--seed", type=int, default=0, help="seeds the image choice and the random "
                   "starts")
    c.add_argument("--log-every", type=int, default=10, help="batches per JSON progress line")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR bundle")
    return p


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse (before any work) to write into an existing non-empty OUT_DIR without --overwrite."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise CliError(f"OUT_DIR {out_dir}: exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise CliError(f"OUT_DIR {out_dir}: already exists and is not empty; pass "
                           "--overwrite to replace it (nothing was written)")


def _check_faces_dir(faces_dir: str) -> list[str]:
    from idguard_jax.image_files import list_images

    if not os.path.isdir(faces_dir):
        raise CliError(f"FACES_DIR {faces_dir}: no such folder")
    paths = list_images(faces_dir)
    if not paths:
        raise CliError(f"FACES_DIR {faces_dir}: no images found (looked for "
                       f"{', '.join(_suffixes())})")
    return paths


def _suffixes():
    from idguard_jax.image_files import IMAGE_SUFFIXES
    return IMAGE_SUFFIXES


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise CliError(f"{name} must be positive, got {value}")


def _train_surrogate(args) -> int:
    import numpy as np

    from idguard_jax.data.datasets import load_folder
    from idguard_jax.training.surrogate import (SurrogateAutoencoder, reconstruction_loss,
                                                save_surrogate, train_surrogate)

    for name in ("size", "steps", "batch_size", "learning_rate", "width", "depth", "log_every"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--max-images", args.max_images, allow_none=True)
    if args.size % 2 ** args.depth:
        raise CliError(f"--size {args.size} must be a multiple of 2**--depth = {2 ** args.depth}")
    _check_out_dir(args.out_dir, args.overwrite)
    _check_faces_dir(args.faces_dir)
    try:
        images, paths = load_folder(args.faces_dir, args.size, limit=args.max_images)
    except FileNotFoundError as e:
        raise CliError(f"FACES_DIR {e}") from e
    _emit({"event": "data", "faces_dir": os.path.abspath(args.faces_dir),
           "num_images": len(paths), "size": args.size})
    t0 = time.perf_counter()
    variables = train_surrogate(
        images, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seed=args.seed, width=args.width, depth=args.depth, log_every=args.log_every,
        callback=lambda m: _emit({"event": "train", **m}))
    model = SurrogateAutoencoder(width=args.width, depth=args.depth)
    final = reconstruction_loss(model.apply, variables, images, batch_size=args.batch_size)
    meta = {"image_size": args.size, "steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "seed": args.seed,
            "faces_dir": os.path.abspath(args.faces_dir), "num_images": len(paths),
            "final_reconstruction_mse": final}
    path = save_surrogate(args.out_dir, model, variables, meta, overwrite=args.overwrite)
    _emit({"event": "done", "out_dir": path, "reconstruction_mse": final,
           "num_params": int(sum(np.size(a) for a in _leaves(variables))),
           "elapsed_s": time.perf_counter() - t0})
    return 0


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _check_surrogate(args) -> None:
    """CliError unless --surrogate is a surrogate bundle."""
    from idguard_jax.checkpoint import read_meta

    if not os.path.isdir(args.surrogate):
        raise CliError(f"--surrogate {args.surrogate}: no such folder")
    try:
        kind = read_meta(args.surrogate).get("kind")
    except FileNotFoundError as e:
        raise CliError(f"--surrogate {e}") from e
    if kind != "idguard-surrogate":
        raise CliError(f"--surrogate {args.surrogate}: not a surrogate bundle (kind={kind!r}); "
                       "make one with `prior.py train-surrogate`")


def _image_size(args, model, smeta) -> int:
    """--size, else the surrogate's training size; a multiple of 2**depth."""
    size = args.size if args.size is not None else int(smeta["image_size"])
    if size % 2 ** model.depth:
        raise CliError(f"--size {size} must be a multiple of {2 ** model.depth} for this "
                       f"surrogate (depth {model.depth})")
    if size != int(smeta["image_size"]):
        _emit({"event": "note", "message": f"--size {size} differs from the surrogate's training "
               f"size {smeta['image_size']} (it is fully convolutional, but was not trained there)"})
    return size


def _read_faces(args, paths: list[str], size: int):
    """--num-images random readable faces (capped at those found): (images, their paths)."""
    from idguard_jax.training.prior_faces import read_random_faces

    n = args.num_images
    if n > len(paths):
        _emit({"event": "note", "message": f"--num-images {n} capped at the {len(paths)} images "
               f"found in {args.faces_dir}", "num_images": len(paths)})
        print(f"note: --num-images {n} capped at the {len(paths)} images found in "
              f"{args.faces_dir}", file=sys.stderr)
        n = len(paths)
    images, used = read_random_faces(paths, n, size, args.seed)
    if images is None:
        raise CliError(f"FACES_DIR {args.faces_dir}: no readable images")
    if len(used) < n:
        _emit({"event": "note", "message": f"only {len(used)} of the images could be read",
               "num_images": len(used)})
    return images, used


def _compute(args) -> int:
    from idguard_jax.training.prior import save_prior
    from idguard_jax.training.prior_faces import compute_prior, write_preview
    from idguard_jax.training.surrogate import load_surrogate

    for name in ("num_images", "eps", "steps", "step_size", "batch_size", "log_every"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--size", args.size, allow_none=True)
    _check_surrogate(args)
    _check_out_dir(args.out_dir, args.overwrite)
    paths = _check_faces_dir(args.faces_dir)
    model, variables, smeta = load_surrogate(args.surrogate)
    size = _image_size(args, model, smeta)
    images, used = _read_faces(args, paths, size)
    _emit({"event": "data", "faces_dir": os.path.abspath(args.faces_dir),
           "num_images": len(used), "size": size})
    delta_p, stats = compute_prior(model.apply, variables, images, seed=args.seed, eps=args.eps,
                                   steps=args.steps, step_size=args.step_size,
                                   batch_size=args.batch_size, log_every=args.log_every,
                                   callback=lambda m: _emit({"event": "pgd", **m}))
    summary = {"num_images": len(used), "size": size, "eps": args.eps, "steps": args.steps,
               "step_size": args.step_size, "seed": args.seed, **stats}
    meta = {**summary, "surrogate": os.path.abspath(args.surrogate),
            "faces_dir": os.path.abspath(args.faces_dir),
            "images": [os.path.basename(p) for p in used],
            "note": "disruption = mean per-image MSE(M_s(x + d), M_s(x)) in [-1, 1] units"}
    path = save_prior(args.out_dir, delta_p, meta, overwrite=args.overwrite)
    write_preview(os.path.join(path, "delta_p.png"), delta_p, args.eps)
    _emit({"event": "done", "out_dir": path, **summary})
    return 0


@startup.command
@compile_cache.command
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code) if e.code is not None else 0
    try:
        if args.command == "train-surrogate":
            return _train_surrogate(args)
        return _compute(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
