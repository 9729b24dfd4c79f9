"""Evaluate protections against face manipulation: the paper's Tables I, III and VII.

    python experiments/evaluate.py --generator runs/demo-kpi/generator --config demo \\
        --dataset ../shared/data/faces/celebahq --out eval/ --robustness
    python experiments/evaluate.py --generator kpi=G1 --generator mgda=G2 --weights weights/ \\
        --dataset cache/test --dataset cache/lfw --out eval/ --method idguard --method cmua

Methods: idguard (each --generator), disrupting (PGD on StarGAN), cmua (universal perturbation
fitted on --fit-data), pg (a perturbation generator against a surrogate autoencoder), pgd
(per-image PGD on every target). IAP has no public code and is not included.
Without --weights the targets are RANDOM stand-ins of the --config size: the numbers then show
the machinery, not the paper's results (every table says so).

Writes to --out: table1.{md,csv} (per dataset and method: per target L2_face, ID sim, DSR),
details.{md,csv} (older criteria, misdirection, mask sources, PSNR/SSIM), table3.{md,csv} (DSR
per strategy, with several generators), robustness.{md,csv} (with --robustness),
grids/*.png (original, manipulated, protected, manipulated protected) and results.json (every
summary number and every per-image value).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL_TARGETS = ("stargan", "aggan", "fpgan", "relgan", "hisd")
CONFIG_SIZES = {"tiny": 32, "demo": 64}


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.baselines import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", action="append", default=[], metavar="[LABEL=]PATH",
                   help="an ID-Guard generator bundle (repeatable: one Table III row each)")
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
                   help="default: the generator's; else 256 with --weights, else the config's")
    p.add_argument("--limit", type=int, default=None, help="images per dataset (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--identity", default="auto", help="identity judge: auto (ArcFace if "
                   "converted in --weights, else dlib), arcface, dlib, ...")
    p.add_argument("--robustness", action="store_true", help="also the robustness table")
    p.add_argument("--ops", default=None, help="comma-separated robustness operations "
                   "(default: idguard_jax.robustness.DEFAULT_OPS), e.g. jpeg:75,resize:0.5+jpeg:90")
    p.add_argument("--grid", type=int, default=4, help="images per grid (0: no grids)")
    p.add_argument("--fit-data", default=None, help="images that cmua and pg learn from "
                   "(default: the first --dataset, noted in the tables)")
    p.add_argument("--cmua-batch", type=int, default=64, help="CMUA batch size (its 64)")
    p.add_argument("--cmua-epochs", type=int, default=1)
    p.add_argument("--pg-steps", type=int, default=500, help="PG generator training steps")
    p.add_argument("--pg-lr", type=float, default=1e-4, help="PG's Adam learning rate")
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


def _load_dataset(path: str, size: int, limit: int | None):
    """(name, images uint8 (N,S,S,3), labels (N,5), face masks (N,S,S,1) or None, notes)."""
    import numpy as np

    from idguard_jax.cache import open_cache
    from idguard_jax.data import load_folder

    name = os.path.basename(os.path.normpath(path))
    if os.path.exists(os.path.join(path, "meta.json")):
        data = open_cache(path)
        rows = data.rows if data.rows is not None else np.arange(len(data.images))
        rows = rows[:limit] if limit else rows
        if data.images.shape[1] != size:
            raise ValueError(f"--dataset {path}: cached at {data.images.shape[1]} px, the "
                             f"evaluation runs at {size} px")
        masks_path = os.path.join(path, "facemasks.u8.npy")
        masks = np.asarray(np.load(masks_path, mmap_mode="r")[rows]) if os.path.exists(
            masks_path) else None
        notes = [] if masks is not None else [
            f"{name}: no whole-face masks in the cache; found by dlib on the inputs"]
        return name, np.asarray(data.images[rows]), np.asarray(data.labels[rows]), masks, notes
    images, _ = load_folder(path, size, limit)
    return name, images, np.zeros((len(images), 5), np.float32), None, [
        f"{name}: a folder: StarGAN labels all zero (none given)"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    methods = list(dict.fromkeys(args.method or ["idguard"]))
    target_names = [t for t in args.targets.split(",") if t]
    problems = []
    unknown = sorted(set(target_names) - set(ALL_TARGETS))
    if unknown or not target_names:
        problems.append(f"--targets: unknown {unknown}; choose from {', '.join(ALL_TARGETS)}")
    generators = [_generator_arg(g) for g in args.generator]
    if "idguard" in methods and not generators:
        problems.append("--method idguard needs --generator PATH (a bundle written by "
                        "experiments/train.py or convert/convert.py generator)")
    for _, path in generators:
        if not os.path.isfile(os.path.join(path, "meta.json")):
            problems.append(f"--generator {path}: not a generator bundle")
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
    for name in ("batch_size", "grid", "limit", "pg_steps", "cmua_batch"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "grid" else 1):
            problems.append(f"--{name.replace('_', '-')} {v}: must be positive")
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

    from idguard_jax import baselines, evaluation, report, robustness
    from idguard_jax.generator import load_generator, perturb
    from idguard_jax.images import to_float

    t_start = time.perf_counter()
    ops = robustness.parse_all(args.ops.split(",") if args.ops else robustness.DEFAULT_OPS) \
        if args.robustness else {}
    loaded = []
    for label, path in generators:
        variables, delta_p, cfg = load_generator(path)
        from idguard_jax.checkpoint import read_meta
        meta = read_meta(path)
        label = label or meta.get("strategy") or os.path.basename(os.path.normpath(path))
        loaded.append((label, variables, delta_p, cfg))
    sizes = {cfg.image_size for *_, cfg in loaded}
    if len(sizes) > 1:
        raise ValueError(f"--generator: the generators work at different sizes {sorted(sizes)}")
    size = args.image_size or (sizes.pop() if sizes else 256 if args.weights
                               else CONFIG_SIZES[args.config])
    if loaded and size != loaded[0][3].image_size:
        raise ValueError(f"--image-size {size}: the generator works at {loaded[0][3].image_size}")
    notes = []
    models = evaluation.load_models(target_names, args.weights, image_size=size,
                                    size=args.config, seed=args.seed)
    if models.random:
        notes.append(f"TARGETS ARE RANDOM STAND-INS ({args.config} architectures, {size} px): "
                     "these numbers show the machinery, not the paper's results")
    judge = evaluation.make_judge(args.identity, args.weights, seed=args.seed)
    notes.append(f"identity destroyed: {judge.describe()}; DSR = L2_face > 0.05 and identity "
                 "destroyed")
    notes.append("IAP is not included: it has no public code")
    datasets = [_load_dataset(d, size, args.limit) for d in args.dataset]
    for *_, ds_notes in datasets:
        notes += ds_notes
    key = jax.random.key(args.seed)
    eps = 0.05

    # How each method protects a batch: (float images, labels, batch index) -> float images.
    protectors = {}
    for label, variables, delta_p, cfg in loaded:
        fn = jax.jit(lambda v, d, x, c=cfg: perturb(c.module(), v, d, x, c.eps, train=False)[0])
        protectors[f"idguard:{label}" if len(loaded) > 1 or label else "idguard"] = (
            lambda x, lab, i, fn=fn, v=variables, d=delta_p: fn(v, d, x))
        eps = loaded[0][3].eps
    fit_images = None
    if {"cmua", "pg"} & set(methods):
        fit_path = args.fit_data or args.dataset[0]
        fit_images = _load_dataset(fit_path, size, None)[1]
        if not args.fit_data:
            notes.append(f"cmua/pg were fitted on the evaluation images themselves ({fit_path}); "
                         "give --fit-data for a separate training set")
    tv = models.variables
    if "disrupting" in methods:
        st = next(t for t in models.targets if t.name == "stargan")
        protectors["disrupting"] = lambda x, lab, i: baselines.disrupting(
            st, tv["stargan"], x, lab, jax.random.fold_in(key, i), steps=args.pgd_steps)
        notes.append("disrupting: one perturbation per image for all of StarGAN's conditions")
    if "pgd" in methods:
        protectors["pgd"] = lambda x, lab, i: baselines.pgd_all(
            models.targets, tv, x, lab, jax.random.fold_in(key, 10_000 + i), steps=args.pgd_steps)
    if "cmua" in methods:
        t0 = time.perf_counter()
        up = baselines.cmua_fit(models.targets, tv, to_float(fit_images), None,
                                jax.random.fold_in(key, 1), batch_size=args.cmua_batch,
                                epochs=args.cmua_epochs)
        print(f"cmua: universal perturbation fitted in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        protectors["cmua"] = lambda x, lab, i: baselines.cmua_apply(up, x)
    if "pg" in methods:
        from idguard_jax import prior
        from idguard_jax.generator import GeneratorConfig
        t0 = time.perf_counter()
        if args.surrogate:
            smodel, svars, _ = prior.load_surrogate(args.surrogate)
        else:
            depth = 4 if size % 16 == 0 else 2
            smodel = prior.SurrogateAutoencoder(width=16, depth=depth)
            svars = prior.train_surrogate(fit_images, steps=args.surrogate_steps,
                                          batch_size=16, width=16, depth=depth, seed=args.seed)
            notes.append(f"pg: surrogate = a face-reconstruction autoencoder (width 16, depth "
                         f"{depth}) trained here for {args.surrogate_steps} steps")
        gcfg = GeneratorConfig(ngf=loaded[0][3].ngf if loaded else 16,
                               n_blocks=loaded[0][3].n_blocks if loaded else 2,
                               image_size=size, eps=eps)
        pg_vars = baselines.pg_train(smodel.apply, svars, to_float(fit_images),
                                     jax.random.fold_in(key, 2), config=gcfg,
                                     steps=args.pg_steps, batch_size=16,
                                     learning_rate=args.pg_lr)
        print(f"pg: generator trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        protectors["pg"] = lambda x, lab, i: baselines.pg_protect(pg_vars, x, config=gcfg)
    order = [k for k in protectors if k.startswith("idguard")] + [
        m for m in methods if m != "idguard"]

    os.makedirs(args.out, exist_ok=True)
    finder = evaluation.FaceFinder()
    summaries, per_image, robust_rows = [], {}, []
    for ds_name, images, labels, masks, _ in datasets:
        for method in order:
            parts, robust_parts = [], {op: [] for op in ops}
            for i, start in enumerate(range(0, len(images), args.batch_size)):
                sl = slice(start, start + args.batch_size)
                clean = images[sl]
                x = jnp.asarray(to_float(clean))
                prot = np.asarray(protectors[method](x, jnp.asarray(labels[sl]), i))
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
                robust_rows.append((op, method, evaluation.summarise(
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
                                  "to the clean photo or no face found\n")
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
            "# Robustness: protected AND clean images through each operation before manipulation"
            f" (dataset {datasets[0][0]}{' and others' if len(datasets) > 1 else ''})\n\n"
            + preamble)
    results = {"notes": notes, "image_size": size, "targets": target_names,
               "random_targets": models.random, "judge": judge.describe(),
               "summaries": [{"dataset": d, "method": m, **s} for d, m, s in summaries],
               "robustness": [{"operation": op, "method": m, **s} for op, m, s in robust_rows],
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
