"""Protection measured with no random network in the loop: a face model trained here as the
target, judged by dlib's real face recognition network.

    python experiments/offline.py target            # split the faces, train face_ae (minutes)
    python experiments/train.py --config=offline    # the generator against it (minutes)
    python experiments/offline.py figure            # evaluate.py on the held-out faces + the grid

`target` splits the faces BY IDENTITY into WORKDIR/faces/train and WORKDIR/faces/heldout
(symbolic links: the faces are never copied), trains the target(s) on the training faces, saves
them as target bundles in WORKDIR/targets (what `--weights` reads) and reports on the held-out
faces: reconstruction PSNR / L1, and the fraction whose model output dlib still recognises as the
person (descriptor distance < 0.6 to the photo; without that the experiment means nothing).
`figure` runs experiments/evaluate.py on the held-out faces for the trained generator, uniform
noise and per-image PGD at the same eps, and writes the grid (original | model output | protected
| model output of protected) to --grid-out, by default docs/offline_grid.png. Every number is one
JSON line on stdout; errors go to stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from idguard_jax import compile_cache, startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FACES = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "faces", "celebahq"))
WORKDIR = os.path.join("runs", "offline")
DEFAULT_GRID = os.path.join(REPO, "docs", "offline_grid.png")
GRID_SCALE = 2      # the 64 px faces are enlarged (nearest neighbour) in the docs grid


class CliError(Exception):
    """A user error: printed as `error: ...` and exit code 2."""


def _emit(record: dict) -> None:
    from idguard_jax.evaluation.measure import to_jsonable   # NaN -> null: strict JSON

    print(json.dumps(to_jsonable(record)), flush=True)


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("target", help="split the faces by identity, train and save the target")
    t.add_argument("--faces", default=SHARED_FACES, help=f"aligned faces (default {SHARED_FACES})")
    t.add_argument("--workdir", default=WORKDIR, help=f"output folder (default {WORKDIR})")
    t.add_argument("--held-out-every", type=int, default=3,
                   help="hold out every N-th identity (default 3: a third)")
    t.add_argument("--size", choices=("official", "tiny"), default="official",
                   help="architecture: official (what --config=offline trains against) or tiny "
                   "(tests, with --config tiny)")
    t.add_argument("--image-size", type=int, default=None,
                   help="px (default: the offline config's, 64)")
    t.add_argument("--steps", type=int, default=400, help="Adam steps (default 400)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--no-judge", action="store_true",
                   help="skip dlib's check of the held-out outputs (tests)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing target bundle")

    f = sub.add_parser("figure", help="evaluate.py on the held-out faces, and the docs grid")
    f.add_argument("--workdir", default=WORKDIR, help=f"the target's folder (default {WORKDIR})")
    f.add_argument("--generator", default=os.path.join("runs", "offline-kpi", "generator"),
                   help="the generator trained by train.py --config=offline (default "
                   "runs/offline-kpi/generator)")
    f.add_argument("--out", default=None, help="evaluation folder (default WORKDIR/eval)")
    f.add_argument("--grid-out", default=DEFAULT_GRID,
                   help="the grid PNG (default docs/offline_grid.png; replaced)")
    f.add_argument("--grid", type=int, default=4, help="held-out faces in the grid")
    f.add_argument("--pgd-steps", type=int, default=10)
    f.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------------------------------
# target
# ------------------------------------------------------------------------------------------

def _split(args) -> tuple[str, str, list, list]:
    """(train folder, held-out folder, train paths, held-out paths) under WORKDIR/faces."""
    from idguard_jax.image_files import list_images
    from idguard_jax.networks import learned

    if not os.path.isdir(args.faces):
        raise CliError(f"--faces {args.faces}: no such folder")
    try:
        train, held = learned.split_by_identity(list_images(args.faces), args.held_out_every)
        faces = os.path.join(args.workdir, "faces")
        return (learned.link_split(train, os.path.join(faces, "train")),
                learned.link_split(held, os.path.join(faces, "heldout")), train, held)
    except (ValueError, FileExistsError) as e:
        raise CliError(f"--faces/--workdir: {e}") from None


def _read(paths: list, size: int):
    import numpy as np

    from idguard_jax.image_files import read_rgb

    return np.stack([read_rgb(p, size) for p in paths])


def recognised(target, variables, images_u8) -> dict:
    """dlib's verdict on the target's clean outputs: per image the descriptor distance of the
    output to the photo's (evaluation.measure.distances_to_photos: NaN where the photo has no
    face); and the fraction below dlib's 0.6."""
    import numpy as np

    from idguard_jax.evaluation import measure, metrics
    from idguard_jax.evaluation.judge import FaceFinder, make_judge
    from idguard_jax.images import to_float

    finder, recognizer = FaceFinder(), make_judge("dlib")
    x = to_float(images_u8)
    condition = target.select(target.conditions(np.zeros((len(x), 5), np.float32)), 0)
    y = np.asarray(target.forward(variables, x, condition)[0])
    photos = measure.input_faces(x, finder, None, recognizer)
    distances = measure.distances_to_photos(recognizer, finder, y[None], photos)[0][0]
    measured = np.isfinite(distances)
    return {"distances": [round(v, 4) for v in distances.tolist()],
            "recognised": float(np.mean(distances[measured] < metrics.DLIB_SAME_PERSON))
            if measured.any() else float("nan"),
            "judged": int(measured.sum())}


def _target(args) -> int:
    import jax

    from idguard_jax import config as config_lib
    from idguard_jax.evaluation.measure import to_jsonable
    from idguard_jax.networks import learned, targets

    size = args.image_size or config_lib.offline().image_size
    if args.steps < 1 or args.batch_size < 1:
        raise CliError("--steps and --batch-size must be positive")
    arch = targets.size_config("face_ae", args.size) or dict(learned.AUTOENCODER_CONFIG)
    if size % 2 ** arch["depth"]:
        raise CliError(f"--image-size {size}: must be a multiple of {2 ** arch['depth']}")
    weights = os.path.join(args.workdir, "targets")
    bundle = os.path.join(weights, "face_ae")
    if os.path.exists(os.path.join(bundle, "meta.json")) and not args.overwrite:
        raise CliError(f"{bundle}: a target is already there (--overwrite replaces it)")
    train_dir, held_dir, train, held = _split(args)
    _emit({"split": {"train": train_dir, "heldout": held_dir, "train_images": len(train),
                     "heldout_images": len(held)}})
    t0 = time.perf_counter()
    variables = learned.train_autoencoder(
        _read(train, size), steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, config=arch, log_every=args.log_every,
        callback=lambda r: _emit({"target": "face_ae", **r}))
    train_s = time.perf_counter() - t0
    target = targets.build("face_ae", arch)
    variables = jax.device_get(variables)
    report = {"target": "face_ae", "config": arch, "image_size": size, "steps": args.steps,
              "batch_size": args.batch_size, "train_s": round(train_s, 1),
              "train_identities": sorted({learned.identity_of(p) for p in train}),
              "heldout_identities": sorted({learned.identity_of(p) for p in held})}
    quality = learned.reconstruction_quality(target, variables, _read(held, size))
    report["heldout_psnr"], report["heldout_l1"] = quality["psnr_mean"], quality["l1_mean"]
    report["train_psnr"] = learned.reconstruction_quality(
        target, variables, _read(train, size))["psnr_mean"]
    if not args.no_judge:
        verdict = recognised(target, variables, _read(held, size))
        report["heldout_recognised"] = verdict["recognised"]
        report["heldout_dlib_distance"] = verdict["distances"]
    learned.save_target(weights, "face_ae", variables, arch,
                        meta={"trained_by": "experiments/offline.py target", "faces": args.faces,
                              "size": args.size, **to_jsonable(report)},
                        overwrite=args.overwrite)
    with open(os.path.join(args.workdir, "target_report.json"), "w") as f:
        json.dump(to_jsonable(report), f, indent=1)
    _emit({"saved": bundle, **{k: v for k, v in report.items() if "identities" not in k}})
    return 0


# ------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------

def _figure(args) -> int:
    from experiments import evaluate

    held = os.path.join(args.workdir, "faces", "heldout")
    weights = os.path.join(args.workdir, "targets")
    for path, what in ((held, "held-out faces"), (os.path.join(weights, "face_ae"), "target")):
        if not os.path.isdir(path):
            raise CliError(f"{path}: no {what}; run: python experiments/offline.py target "
                           f"--workdir {args.workdir}")
    out = args.out or os.path.join(args.workdir, "eval")
    code = evaluate.main([
        "--generator", f"trained={args.generator}", "--weights", weights, "--targets", "face_ae",
        "--dataset", held, "--out", out, "--method", "idguard", "--method", "noise",
        "--method", "pgd", "--identity", "dlib", "--grid", str(args.grid),
        "--pgd-steps", str(args.pgd_steps), "--seed", str(args.seed)])
    if code:
        return code
    grid = os.path.join(out, "grids", "heldout_idguard-trained_face_ae.png")
    _emit({"grid": _enlarge(grid, args.grid_out), "table": os.path.join(out, "table1.md"),
           "details": os.path.join(out, "details.md")})
    return 0


def _enlarge(src: str, dst: str) -> str:
    """The evaluation's grid, GRID_SCALE times larger (nearest neighbour), as dst."""
    from PIL import Image

    with Image.open(src) as im:
        big = im.resize((im.width * GRID_SCALE, im.height * GRID_SCALE), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    big.save(dst, optimize=True)
    return dst


@startup.command
@compile_cache.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"target": _target, "figure": _figure}[args.command](args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
