"""Evaluate protections against face manipulation: the paper's Tables I, III and VII.

    python experiments/evaluate.py --generator runs/demo-kpi/generator --config demo \\
        --dataset ../shared/data/faces/celebahq --out eval/ --robustness
    python experiments/evaluate.py --generator kpi=G1 --generator mgda=G2 --weights weights/ \\
        --dataset cache/test --dataset cache/lfw --out eval/ --method idguard --method cmua

Methods: idguard (each --generator), disrupting (PGD on StarGAN), cmua (universal perturbation
fitted on the first --cmua-images of --fit-data), pg (a perturbation generator against a
surrogate autoencoder), pgd (per-image PGD on every target), noise (uniform random noise: the
floor). IAP has no public code and is not included. Every method works within one budget, --eps (paper IV-A5: 0.05 for all): the
baselines attack within it and every protected image is saved as uint8 within it (a generator
trained at another eps is noted, and its images are clipped to --eps).
Without --weights the targets are RANDOM stand-ins of the --config size: the numbers then show
the machinery, not the paper's results (every table says so).

Writes to --out: table1.{md,csv} (per dataset and method: per target L2_face, ID sim, DSR),
details.{md,csv} (older criteria, misdirection, NaN counts, mask sources, PSNR/SSIM),
table3.{md,csv} (DSR per strategy, with several generators), robustness.{md,csv} (with
--robustness: per dataset, operation and method), grids/*.png (original, manipulated,
protected, manipulated protected) and results.json (every summary number, every per-image
value and the settings).

Every protector is jitted and always sees the same batch size (a short last batch is padded with
copies of its first image, whose results are dropped), so each compiles once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from idguard_jax import compile_cache, startup
from idguard_jax.networks.targets import PAPER_TARGETS, TARGETS

ALL_TARGETS = tuple(TARGETS)
# Options that must be >= 1 (None: not given, a default applies).
_POSITIVE = ("batch_size", "limit", "pg_steps", "pg_batch", "pg_ngf", "pg_blocks", "cmua_batch",
             "cmua_images", "cmua_epochs", "surrogate_steps", "pgd_steps")


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.evaluation.baselines import EPS, METHODS
    from idguard_jax.evaluation.runner import CONFIG_SIZES
    from idguard_jax.networks.identity import NORMALISATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", action="append", default=[], metavar="[LABEL=]PATH",
                   help="an ID-Guard generator bundle (repeatable: one Table III row each); the "
                   "label defaults to the bundle's strategy")
    p.add_argument("--method", action="append", default=[], choices=METHODS,
                   help="what protects the images (repeatable; default idguard)")
    p.add_argument("--targets", default=",".join(PAPER_TARGETS),
                   help=f"comma-separated targets (default the paper's {','.join(PAPER_TARGETS)}; "
                   f"any of {','.join(ALL_TARGETS)})")
    p.add_argument("--weights", default=None, help="folder of converted targets (and ArcFace); "
                   "without it the targets are RANDOM stand-ins")
    p.add_argument("--dataset", action="append", default=[], required=True,
                   help="a folder of aligned faces or a cache from experiments/prepare.py "
                   "(repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", choices=tuple(CONFIG_SIZES), default="tiny",
                   help="size of the random stand-in targets without --weights (tiny: 32 px, "
                   "demo: 64 px)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the generator's; else 256 with --weights, else the config's "
                   "(a multiple of 4)")
    p.add_argument("--limit", type=int, default=None, help="images per dataset (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eps", type=float, default=EPS,
                   help=f"L-inf budget of every method, [-1, 1] units (default {EPS}: the "
                   "paper's for all methods)")
    p.add_argument("--identity", default="auto", help="identity judge: auto (ArcFace if "
                   "converted in --weights, else dlib), arcface, dlib, ...")
    p.add_argument("--identity-normalisation", choices=NORMALISATIONS, default="reference",
                   help="how the judge sees the outputs: reference (default: what ID-Guard's "
                   "code feeds ArcFace, [-1, 1] resized to 112 without a crop, so the numbers "
                   "compare with the paper's code) or trained (what the network was trained on)")
    p.add_argument("--robustness", action="store_true", help="also the robustness table")
    p.add_argument("--ops", default=None, help="comma-separated robustness operations "
                   "(default: idguard_jax.evaluation.robustness.DEFAULT_OPS), e.g. jpeg:75,resize:0.5+jpeg:90")
    p.add_argument("--grid", type=int, default=4, help="images per grid (0: no grids)")
    p.add_argument("--fit-data", default=None, help="images that cmua and pg learn from "
                   "(default: the first --dataset, noted in the tables)")
    p.add_argument("--cmua-images", type=int, default=128, help="CMUA learns from the first N "
                   "--fit-data images (default 128: its num_test, 2 batches of 64)")
    p.add_argument("--cmua-batch", type=int, default=64, help="CMUA batch size (its 64)")
    p.add_argument("--cmua-epochs", type=int, default=1)
    p.add_argument("--pg-steps", type=int, default=500, help="PG generator training steps")
    p.add_argument("--pg-lr", type=float, default=1e-4, help="PG's Adam learning rate")
    p.add_argument("--pg-batch", type=int, default=32,
                   help="PG's training batch (default 32, ID-Guard's)")
    p.add_argument("--pg-ngf", type=int, default=None, help="PG generator width (default: the "
                   "first --generator's; else 64 with --weights, the paper's; else the --config "
                   "generator's)")
    p.add_argument("--pg-blocks", type=int, default=None, help="PG generator residual blocks "
                   "(default as for --pg-ngf: 6 with --weights)")
    p.add_argument("--surrogate", default=None, help="PG's surrogate bundle (experiments/prior.py "
                   "train-surrogate); default: trained here on --fit-data for --surrogate-steps")
    p.add_argument("--surrogate-steps", type=int, default=300)
    p.add_argument("--pgd-steps", type=int, default=10, help="steps of disrupting and pgd")
    p.add_argument("--no-misdirection", action="store_true",
                   help="skip the dlib face-recognition misdirection rate")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the random stand-in targets without --weights (the same networks "
                        "the demo trains against with --set seed=S) and the baselines' noise")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _generator_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    return (label, path) if sep and not os.path.exists(text) else ("", text)


def _generator_label(label: str, path: str) -> str:
    """LABEL of LABEL=PATH, else the bundle's strategy, else the bundle folder's name."""
    if label:
        return label
    with open(os.path.join(path, "meta.json")) as f:
        strategy = json.load(f).get("strategy")
    return strategy or os.path.basename(os.path.normpath(path))


def _check_generators(args, problems: list) -> list[tuple[str, str]]:
    """(label, path) per --generator; a problem for each unreadable bundle or repeated label."""
    generators, seen = [], {}
    for label, path in map(_generator_arg, args.generator):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            problems.append(f"--generator {path}: not a generator bundle")
            continue
        try:
            label = _generator_label(label, path)
        except (OSError, ValueError) as e:
            problems.append(f"--generator {path}: unreadable meta.json ({e})")
            continue
        if label in seen:   # one would overwrite the other's results (and Table III row)
            problems.append(f"--generator {path}: label {label!r} is also {seen[label]}'s (the "
                            "label defaults to the bundle's strategy); give each its own with "
                            "--generator LABEL=PATH")
        seen.setdefault(label, path)
        generators.append((label, path))
    return generators


def _check_inputs(args, methods, target_names, problems: list) -> None:
    """Methods, targets and the folders they need."""
    if "idguard" in methods and not args.generator:
        problems.append("--method idguard needs --generator PATH (a bundle written by "
                        "experiments/train.py or convert/convert.py generator)")
    if "disrupting" in methods and "stargan" not in target_names:
        problems.append("--method disrupting attacks StarGAN: include stargan in --targets")
    for d in args.dataset + ([args.fit_data] if args.fit_data else []):
        if not os.path.isdir(d):
            problems.append(f"--dataset/--fit-data {d}: no such folder")
    if args.weights is not None:
        for t in target_names:
            if not os.path.isdir(os.path.join(args.weights, t)):
                problems.append(f"--weights {args.weights}: no converted {t!r}; run: python "
                                f"convert/convert.py {t} CHECKPOINT {args.weights}")
    if args.surrogate and not os.path.isfile(os.path.join(args.surrogate, "meta.json")):
        problems.append(f"--surrogate {args.surrogate}: not a surrogate bundle")


def _check_numbers(args, problems: list) -> None:
    for name in _POSITIVE:
        v = getattr(args, name)
        if v is not None and v < 1:
            problems.append(f"--{name.replace('_', '-')} {v}: must be positive")
    if args.grid < 0:
        problems.append(f"--grid {args.grid}: must be 0 or more")
    if not 0 < args.eps <= 1:
        problems.append(f"--eps {args.eps}: must be in (0, 1] ([-1, 1] units)")
    if args.image_size is not None and (args.image_size < 4 or args.image_size % 4):
        problems.append(f"--image-size {args.image_size}: must be a positive multiple of 4 "
                        "(StarGAN-family targets halve the image twice and double it back)")


def _config(args, methods, target_names, generators):
    """The options as the library's EvaluationConfig."""
    from idguard_jax.evaluation import robustness
    from idguard_jax.evaluation.protectors import BaselineOptions
    from idguard_jax.evaluation.runner import EvaluationConfig

    ops = (args.ops.split(",") if args.ops else robustness.DEFAULT_OPS) if args.robustness else ()
    baselines = BaselineOptions(
        eps=args.eps, pgd_steps=args.pgd_steps, cmua_images=args.cmua_images,
        cmua_batch=args.cmua_batch, cmua_epochs=args.cmua_epochs, pg_steps=args.pg_steps,
        pg_lr=args.pg_lr, pg_batch=args.pg_batch, surrogate=args.surrogate,
        surrogate_steps=args.surrogate_steps, seed=args.seed)
    return EvaluationConfig(
        targets=tuple(target_names), datasets=tuple(args.dataset), out=args.out,
        generators=tuple(generators), methods=tuple(methods), weights=args.weights,
        config=args.config, image_size=args.image_size, limit=args.limit,
        batch_size=args.batch_size, identity=args.identity,
        identity_normalisation=args.identity_normalisation, robustness_ops=tuple(ops),
        grid=args.grid, fit_data=args.fit_data, misdirection=not args.no_misdirection,
        seed=args.seed, pg_ngf=args.pg_ngf, pg_blocks=args.pg_blocks, baselines=baselines)


@startup.command
@compile_cache.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    methods = list(dict.fromkeys(args.method or ["idguard"]))
    target_names = [t for t in args.targets.split(",") if t]
    problems = []
    unknown = sorted(set(target_names) - set(ALL_TARGETS))
    if unknown or not target_names:
        problems.append(f"--targets: unknown {unknown}; choose from {', '.join(ALL_TARGETS)}")
    generators = _check_generators(args, problems)
    _check_inputs(args, methods, target_names, problems)
    _check_numbers(args, problems)
    if problems:
        print("Cannot evaluate:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    from idguard_jax.evaluation import runner

    t_start = time.perf_counter()
    try:
        results, written = runner.evaluate(_config(args, methods, target_names, generators),
                                           log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    for n in results["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(json.dumps({"out": os.path.abspath(args.out), "files": [os.path.basename(p) for p in written]
                      + ["results.json"], "elapsed_s": round(time.perf_counter() - t_start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
