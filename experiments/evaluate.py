"""Evaluate protections against face manipulation: the paper's Tables I, III and VII.

    python experiments/evaluate.py --generator runs/demo-kpi/generator --config demo \\
        --dataset ../shared/data/faces/celebahq --out eval/ --robustness
    python experiments/evaluate.py --generator kpi=G1 --generator mgda=G2 --weights weights/ \\
        --dataset cache/test --dataset cache/lfw --out eval/ --method idguard --method cmua

Methods: idguard (each --generator), disrupting (PGD on StarGAN), cmua (universal perturbation
fitted on the first --cmua-images of --fit-data), pg (a perturbation generator against a
surrogate autoencoder), pgd (per-image PGD on every target). IAP has no public code and is not
included. Every method works within one budget, --eps (paper IV-A5: 0.05 for all): the
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

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idguard_jax.networks.targets import TARGETS  # noqa: E402  (after the path set-up above

ALL_TARGETS = tuple(TARGETS)

CONFIG_SIZES = {"tiny": 32, "demo": 64}
# Salts folded into --seed's key, one per random use, so that no two uses share a key: the
# per-batch attack starts (then folded with the dataset's and the batch's index), CMUA's fit
# and PG's initialisation.
KEY_SALTS = {"disrupting": 1, "pgd": 2, "cmua": 3, "pg": 4}
# Options that must be >= 1 (None: not given, a default applies).
_POSITIVE = ("batch_size", "limit", "pg_steps", "pg_batch", "pg_ngf", "pg_blocks", "cmua_batch",
             "cmua_images", "cmua_epochs", "surrogate_steps", "pgd_steps")


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.evaluation.baselines import EPS, METHODS
    from idguard_jax.networks.identity import NORMALISATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", action="append", default=[], metavar="[LABEL=]PATH",
                   help="an ID-Guard generator bundle (repeatable: one Table III row each); the "
                   "label defaults to the bundle's strategy")
    p.add_argument("--method", action="append", default=[], choices=METHODS,
                   help="what protects the images (repeatable; default idguard)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated targets (default {','.join(ALL_TARGETS)})")
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
    p.add_argument("--seed", type=int, default=0)
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


def _load_dataset(path: str, size: int, limit: int | None):
    """(name, images uint8 (N,S,S,3), labels (N,5), face masks (N,S,S,1) or None, notes)."""
    import numpy as np

    from idguard_jax.data.cache import FACE_MASKS_FILE, open_cache
    from idguard_jax.data.datasets import load_folder

    name = os.path.basename(os.path.normpath(path))
    if os.path.exists(os.path.join(path, "meta.json")):
        data = open_cache(path)
        rows = data.rows if data.rows is not None else np.arange(len(data.images))
        rows = rows[:limit] if limit else rows
        if data.images.shape[1] != size:
            raise ValueError(f"--dataset {path}: cached at {data.images.shape[1]} px, the "
                             f"evaluation runs at {size} px")
        masks_path = os.path.join(path, FACE_MASKS_FILE)
        masks = np.asarray(np.load(masks_path, mmap_mode="r")[rows]) if os.path.exists(
            masks_path) else None
        notes = [] if masks is not None else [
            f"{name}: no whole-face masks in the cache; found by dlib on the inputs"]
        return name, np.asarray(data.images[rows]), np.asarray(data.labels[rows]), masks, notes
    images, _ = load_folder(path, size, limit)
    return name, images, np.zeros((len(images), 5), np.float32), None, [
        f"{name}: a folder: StarGAN labels all zero (none given)"]


def _batch_rows(start: int, n: int, batch: int):
    """(row indices (batch,), real rows m) of the batch from `start` of n images: a short last
    batch is padded with copies of its first row (one shape for every jitted protector call)."""
    import numpy as np

    m = min(batch, n - start)
    idx = np.full(batch, start)
    idx[:m] = np.arange(start, start + m)
    return idx, m


def _pg_size(args, loaded) -> tuple[int, int, str]:
    """PG generator's (ngf, n_blocks, where they came from): --pg-ngf / --pg-blocks, else the
    first --generator's, else the paper's (64, 6) with --weights, else the --config's."""
    from idguard_jax import config as config_lib
    from idguard_jax.generator import GeneratorConfig

    if loaded:
        base, source = loaded[0][3], "the first --generator's"
    elif args.weights is not None:
        base, source = GeneratorConfig(), "the paper's"
    else:
        base, source = getattr(config_lib, args.config)(), f"the {args.config} config's"
    if args.pg_ngf or args.pg_blocks:
        source = "--pg-ngf/--pg-blocks" + ("" if args.pg_ngf and args.pg_blocks
                                           else f", the rest {source}")
    return args.pg_ngf or base.ngf, args.pg_blocks or base.n_blocks, source


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    methods = list(dict.fromkeys(args.method or ["idguard"]))
    target_names = [t for t in args.targets.split(",") if t]
    problems = []
    unknown = sorted(set(target_names) - set(ALL_TARGETS))
    if unknown or not target_names:
        problems.append(f"--targets: unknown {unknown}; choose from {', '.join(ALL_TARGETS)}")
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
    if problems:
        print("Cannot evaluate:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    try:
        return _run(args, methods, target_names, generators)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))


def _run(args, methods, target_names, generators) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from idguard_jax.evaluation import baselines
    from idguard_jax.evaluation import measure as evaluation
    from idguard_jax.evaluation import report
    from idguard_jax.evaluation import robustness
    from idguard_jax.generator import GeneratorConfig, load_generator, perturb
    from idguard_jax.images import to_float

    t_start = time.perf_counter()
    ops = robustness.parse_all(args.ops.split(",") if args.ops else robustness.DEFAULT_OPS) \
        if args.robustness else {}
    loaded = [(label, *load_generator(path)) for label, path in generators]
    sizes = {cfg.image_size for *_, cfg in loaded}
    if len(sizes) > 1:
        raise ValueError(f"--generator: the generators work at different sizes {sorted(sizes)}")
    size = args.image_size or (sizes.pop() if sizes else 256 if args.weights
                               else CONFIG_SIZES[args.config])
    if loaded and size != loaded[0][3].image_size:
        raise ValueError(f"--image-size {size}: the generator works at {loaded[0][3].image_size}")
    eps = args.eps
    notes = []
    models = evaluation.load_models(target_names, args.weights, image_size=size,
                                    size=args.config, seed=args.seed)
    if models.random:
        notes.append(f"TARGETS ARE RANDOM STAND-INS ({args.config} architectures, {size} px): "
                     "these numbers show the machinery, not the paper's results")
    judge = evaluation.make_judge(args.identity, args.weights, seed=args.seed,
                                  normalisation=args.identity_normalisation)
    notes.append(f"identity destroyed: {judge.describe()}; DSR = L2_face > 0.05 and identity "
                 "destroyed")
    notes.append(f"budget: every method within eps {eps:g} (L-inf, [-1, 1] units); protected "
                 "images saved as uint8 within it")
    for label, _, _, cfg in loaded:
        if not np.isclose(cfg.eps, eps):
            msg = (f"idguard:{label} was trained at eps {cfg.eps:g}, not at the shared --eps "
                   f"{eps:g}" + ("; its images are clipped to --eps" if cfg.eps > eps else ""))
            print(f"warning: {msg}", file=sys.stderr)
            notes.append(msg)
    notes.append("IAP is not included: it has no public code")
    datasets = [_load_dataset(d, size, args.limit) for d in args.dataset]
    for *_, ds_notes in datasets:
        notes += ds_notes
    key = jax.random.key(args.seed)
    keys = {m: jax.random.fold_in(key, salt) for m, salt in KEY_SALTS.items()}
    # one batch shape for every protector call (no larger than the largest dataset)
    batch = min(args.batch_size, max(len(d[1]) for d in datasets))
    settings = {"eps": eps, "batch_size": batch, "seed": args.seed,
                "identity_normalisation": args.identity_normalisation}

    # How each method protects a batch: (float images, labels, key or None) -> float images.
    protectors = {}
    for label, variables, delta_p, cfg in loaded:
        fn = jax.jit(lambda v, d, x, c=cfg: perturb(c.module(), v, d, x, c.eps, train=False)[0])
        protectors[f"idguard:{label}"] = (
            lambda x, lab, k, fn=fn, v=variables, d=delta_p: fn(v, d, x))
    fit_images = fit_labels = None
    if {"cmua", "pg"} & set(methods):
        fit_path = args.fit_data or args.dataset[0]
        _, fit_images, fit_labels, _, _ = _load_dataset(
            fit_path, size, None if "pg" in methods else args.cmua_images)
        if not args.fit_data:
            notes.append(f"cmua/pg were fitted on the evaluation images themselves ({fit_path}); "
                         "give --fit-data for a separate training set")
    tv = models.variables
    if {"disrupting", "pgd"} & set(methods):
        settings["pgd_steps"] = args.pgd_steps
    if "disrupting" in methods:
        st = next(t for t in models.targets if t.name == "stargan")
        protectors["disrupting"] = lambda x, lab, k: baselines.disrupting(
            st, tv["stargan"], x, lab, k, eps=eps, steps=args.pgd_steps)
        notes.append(f"disrupting: one perturbation per image for all of StarGAN's conditions "
                     f"({args.pgd_steps} PGD steps)")
    if "pgd" in methods:
        protectors["pgd"] = lambda x, lab, k: baselines.pgd_all(
            models.targets, tv, x, lab, k, eps=eps, steps=args.pgd_steps)
        notes.append(f"pgd: one perturbation per image against every target and condition "
                     f"({args.pgd_steps} PGD steps)")
    if "cmua" in methods:
        n = min(args.cmua_images, len(fit_images))
        cbatch = min(args.cmua_batch, n)
        t0 = time.perf_counter()
        up = baselines.cmua_fit(models.targets, tv, to_float(fit_images[:n]), fit_labels[:n],
                                keys["cmua"], batch_size=args.cmua_batch,
                                epochs=args.cmua_epochs, eps=eps)
        print(f"cmua: universal perturbation fitted in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        protectors["cmua"] = lambda x, lab, k: baselines.cmua_apply(up, x, eps=eps)
        notes.append(f"cmua: one universal perturbation fitted on the first {n} images of "
                     f"{fit_path} with their labels ({n // cbatch} batch(es) of {cbatch}, "
                     f"{args.cmua_epochs} epoch(s))" + (
                         f"; only {n} there, --cmua-images asked for {args.cmua_images}"
                         if n < args.cmua_images else ""))
        settings["cmua"] = {"images": n, "batch": cbatch, "batches": n // cbatch,
                            "epochs": args.cmua_epochs, "fit_data": fit_path}
    if "pg" in methods:
        from idguard_jax.training import surrogate as surrogate_lib
        t0 = time.perf_counter()
        if args.surrogate:
            smodel, svars, _ = surrogate_lib.load_surrogate(args.surrogate)
            surrogate = args.surrogate
        else:
            depth = 4 if size % 16 == 0 else 2
            smodel = surrogate_lib.SurrogateAutoencoder(width=16, depth=depth)
            svars = surrogate_lib.train_surrogate(fit_images, steps=args.surrogate_steps,
                                          batch_size=16, width=16, depth=depth, seed=args.seed)
            surrogate = (f"a face-reconstruction autoencoder (width 16, depth {depth}) trained "
                         f"here for {args.surrogate_steps} steps, batch 16")
        ngf, n_blocks, source = _pg_size(args, loaded)
        gcfg = GeneratorConfig(ngf=ngf, n_blocks=n_blocks, image_size=size, eps=eps)
        pg_batch = min(args.pg_batch, len(fit_images))
        pg_vars = baselines.pg_train(smodel.apply, svars, to_float(fit_images), keys["pg"],
                                     config=gcfg, steps=args.pg_steps, batch_size=pg_batch,
                                     learning_rate=args.pg_lr)
        print(f"pg: generator trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        protectors["pg"] = lambda x, lab, k: baselines.pg_protect(pg_vars, x, config=gcfg)
        notes.append(f"pg: a ResnetGenerator (ngf {ngf}, {n_blocks} blocks: {source}) trained "
                     f"for {args.pg_steps} steps, batch {pg_batch}, Adam lr {args.pg_lr:g}, "
                     f"against {surrogate}")
        settings["pg"] = {"ngf": ngf, "n_blocks": n_blocks, "size_from": source,
                          "steps": args.pg_steps, "batch": pg_batch, "lr": args.pg_lr,
                          "surrogate": surrogate}
    order = [k for k in protectors if k.startswith("idguard")] + [
        m for m in methods if m != "idguard"]

    os.makedirs(args.out, exist_ok=True)
    finder = evaluation.FaceFinder()
    summaries, per_image, robust_rows = [], {}, []
    for d_index, (ds_name, images, labels, masks, _) in enumerate(datasets):
        for method in order:
            parts, robust_parts = [], {op: [] for op in ops}
            for i, start in enumerate(range(0, len(images), batch)):
                idx, real = _batch_rows(start, len(images), batch)
                sl = slice(start, start + real)
                clean = images[sl]
                bkey = (jax.random.fold_in(jax.random.fold_in(keys[method], d_index), i)
                        if method in keys else None)
                prot = np.asarray(protectors[method](
                    jnp.asarray(to_float(images[idx])), jnp.asarray(labels[idx]), bkey))[:real]
                prot_u8 = evaluation.quantise_within(clean, prot, eps)
                parts.append(evaluation.measure(
                    models, clean, prot_u8, judge, labels=labels[sl],
                    input_face_masks=None if masks is None else masks[sl], finder=finder,
                    recognizer=None if args.no_misdirection else "auto",
                    keep_images=start < args.grid))
                if start < args.grid:
                    parts[-1]["protected"] = prot_u8
                for op, fn in ops.items():
                    robust_parts[op].append(evaluation.measure(
                        models, fn(clean), fn(prot_u8), judge, labels=labels[sl],
                        input_face_masks=None if masks is None else masks[sl], finder=finder,
                        recognizer=None, keep_images=False))
            m = evaluation.concatenate(parts, keep_images=args.grid)
            s = evaluation.summarise(m)
            summaries.append((ds_name, method, s))
            per_image[f"{ds_name}/{method}"] = {
                k: v for k, v in m.items() if k in ("psnr", "ssim", "linf", "input_mask_source")}
            per_image[f"{ds_name}/{method}"]["targets"] = {
                t: {k: v for k, v in r.items() if not k.startswith("manipulated")}
                for t, r in m["targets"].items()}
            for op in ops:
                robust_rows.append((ds_name, op, method, evaluation.summarise(
                    evaluation.concatenate(robust_parts[op]))))
            if args.grid:
                protected = np.concatenate([p["protected"] for p in parts if "protected" in p])
                n = min(args.grid, len(images))
                for t, r in m["targets"].items():
                    report.write_grid(
                        os.path.join(args.out, "grids", f"{ds_name}_{method.replace(':', '-')}_{t}.png"),
                        [images[:n], r["manipulated_clean"][0, :n], protected[:n],
                         r["manipulated_protected"][0, :n]])
            print(json.dumps({"dataset": ds_name, "method": method,
                              "dsr": {t: s["targets"][t]["dsr"] for t in target_names},
                              "elapsed_s": round(time.perf_counter() - t_start, 1)}),
                  file=sys.stderr)

    preamble = "".join(f"- {n}\n" for n in notes)
    h, rows = report.table_one(summaries, target_names)
    written = list(report.write_table(os.path.join(args.out, "table1"), h, rows,
                                      "# Table I: L2_face, ID sim, DSR per target\n\n" + preamble))
    h, rows = report.details_table(summaries, target_names)
    written += report.write_table(os.path.join(args.out, "details"), h, rows,
                                  "# Older criteria, misdirection, masks, visible cost\n\n"
                                  + preamble + "- misdirection: dlib recogniser, distance >= 0.6 "
                                  "to the clean photo or no face found, over the outputs whose "
                                  "photo had a face\n- L2_face NaN: an empty face mask; left out "
                                  "of the mean L2_face, counted as a failure in DSR\n")
    gen_rows = [(f"{ds}/{m.split(':', 1)[-1]}", s) for ds, m, s in summaries
                if m.startswith("idguard")]
    if len(loaded) > 1:
        h, rows = report.table_three(gen_rows, target_names)
        written += report.write_table(os.path.join(args.out, "table3"), h, rows,
                                      "# Table III: DSR per strategy\n\n" + preamble)
    if robust_rows:
        h, rows = report.robustness_table(robust_rows, target_names)
        written += report.write_table(
            os.path.join(args.out, "robustness"), h, rows,
            "# Robustness: protected AND clean images through each operation before "
            "manipulation\n\n" + preamble)
    results = {"notes": notes, "image_size": size, "targets": target_names,
               "random_targets": models.random, "judge": judge.describe(),
               "settings": settings,
               "summaries": [{"dataset": d, "method": m, **s} for d, m, s in summaries],
               "robustness": [{"dataset": d, "operation": op, "method": m, **s}
                              for d, op, m, s in robust_rows],
               "per_image": per_image, "elapsed_s": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(evaluation.to_jsonable(results), f, indent=1)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(json.dumps({"out": os.path.abspath(args.out), "files": [os.path.basename(p) for p in written]
                      + ["results.json"], "elapsed_s": round(time.perf_counter() - t_start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
