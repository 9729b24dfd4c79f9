"""One evaluation run: every method protects every dataset, the protected images are measured,
and the paper's tables are written (what experiments/evaluate.py runs).

    config = runner.EvaluationConfig(targets=("stargan",), datasets=("faces/",), out="eval/",
                                     generators=(("kpi", "runs/kpi/generator"),))
    results, written = runner.evaluate(config, log=print)

Every protector always sees the same batch size (a short last batch is padded with copies of its
first image, whose results are dropped), so each compiles once. Protected images are saved as
uint8 within the shared eps (`images.quantise_within`) before they are measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.evaluation import datasets as eval_data
from idguard_jax.evaluation import judge as judge_lib
from idguard_jax.evaluation import measure
from idguard_jax.evaluation import protectors as protectors_lib
from idguard_jax.evaluation import report
from idguard_jax.evaluation import robustness
from idguard_jax.evaluation.protectors import BaselineOptions, FitData
from idguard_jax.generator import load_generator
from idguard_jax.images import quantise_within, to_float

__all__ = ["EvaluationConfig", "CONFIG_SIZES", "evaluate", "write_tables", "write_results"]

# Image size of the random stand-in targets of each --config.
CONFIG_SIZES = {"tiny": 32, "demo": 64}
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate, on what, and how (experiments/evaluate.py's options)."""
    targets: tuple[str, ...]                  # target names, in table order
    datasets: tuple[str, ...]                 # caches or folders of aligned faces
    out: str                                  # output folder
    generators: tuple[tuple[str, str], ...] = ()   # (label, bundle path) of each ID-Guard run
    methods: tuple[str, ...] = ("idguard",)   # `baselines.METHODS`, each once
    weights: str | None = None                # converted targets; None: RANDOM stand-ins
    config: str = "tiny"                      # the stand-ins' size (CONFIG_SIZES)
    image_size: int | None = None             # None: the generators', else 256 / the config's
    limit: int | None = None                  # images per dataset (None: all)
    batch_size: int = 8
    identity: str = "auto"                    # the identity judge (`judge.make_judge`)
    identity_normalisation: str = "reference"
    robustness_ops: tuple[str, ...] = ()      # `robustness` specs; empty: no robustness table
    grid: int = 4                             # images per grid (0: no grids)
    fit_data: str | None = None               # what cmua and pg learn from (None: datasets[0])
    misdirection: bool = True                 # measure dlib's misdirection rate
    seed: int = 0
    pg_ngf: int | None = None                 # PG's generator width (None: `pg_generator_size`)
    pg_blocks: int | None = None
    baselines: BaselineOptions = BaselineOptions()


@dataclasses.dataclass
class _Setup:
    """What every dataset and method of one run share."""
    config: EvaluationConfig
    size: int
    generators: list          # (label, GeneratorConfig, variables, delta_p)
    models: measure.Models
    judge: judge_lib.Judge
    ops: dict                 # robustness spec -> uint8 images -> uint8 images
    datasets: list            # EvalSet per --dataset
    batch: int
    notes: list
    settings: dict
    finder: judge_lib.FaceFinder


@dataclasses.dataclass
class _Results:
    summaries: list = dataclasses.field(default_factory=list)     # (dataset, method, summary)
    per_image: dict = dataclasses.field(default_factory=dict)     # "dataset/method" -> values
    robust_rows: list = dataclasses.field(default_factory=list)   # (dataset, op, method, summary)


def _image_size(config: EvaluationConfig, generators: list) -> int:
    """--image-size, else the generators' (all alike), else 256 with weights, else the config's."""
    sizes = {cfg.image_size for _, cfg, *_ in generators}
    if len(sizes) > 1:
        raise ValueError(f"--generator: the generators work at different sizes {sorted(sizes)}")
    size = config.image_size or (sizes.pop() if sizes else 256 if config.weights
                                 else CONFIG_SIZES[config.config])
    if generators and size != generators[0][1].image_size:
        raise ValueError(f"--image-size {size}: the generator works at "
                         f"{generators[0][1].image_size}")
    return size


def _eps_notes(generators: list, eps: float, log: Log) -> list[str]:
    """A warning per generator trained at another eps than the shared one."""
    notes = []
    for label, cfg, *_ in generators:
        if not np.isclose(cfg.eps, eps):
            msg = (f"idguard:{label} was trained at eps {cfg.eps:g}, not at the shared --eps "
                   f"{eps:g}" + ("; its images are clipped to --eps" if cfg.eps > eps else ""))
            log(f"warning: {msg}")
            notes.append(msg)
    return notes


def _set_up(config: EvaluationConfig, log: Log) -> _Setup:
    """Load the generators, targets, judge and datasets; the notes every table starts with."""
    ops = robustness.parse_all(config.robustness_ops) if config.robustness_ops else {}
    generators = [(label, *load_generator(path)) for label, path in config.generators]
    size = _image_size(config, generators)
    eps = config.baselines.eps
    notes = []
    models = measure.load_models(config.targets, config.weights, image_size=size,
                                    size=config.config, seed=config.seed)
    if models.random:
        notes.append(f"TARGETS ARE RANDOM STAND-INS ({config.config} architectures, {size} px): "
                     "these numbers show the machinery, not the paper's results")
    judge = judge_lib.make_judge(config.identity, config.weights, seed=config.seed,
                                  normalisation=config.identity_normalisation)
    notes.append(f"identity destroyed: {judge.describe()}; DSR = L2_face > 0.05 and identity "
                 "destroyed")
    notes.append(f"budget: every method within eps {eps:g} (L-inf, [-1, 1] units); protected "
                 "images saved as uint8 within it")
    notes += _eps_notes(generators, eps, log)
    notes.append("IAP is not included: it has no public code")
    datasets = [eval_data.EvalSet._make(eval_data.load_dataset(d, size, config.limit))
                for d in config.datasets]
    for *_, ds_notes in datasets:
        notes += ds_notes
    # one batch shape for every protector call (no larger than the largest dataset)
    batch = min(config.batch_size, max(len(d[1]) for d in datasets))
    settings = {"eps": eps, "batch_size": batch, "seed": config.seed,
                "identity_normalisation": config.identity_normalisation}
    return _Setup(config, size, generators, models, judge, ops, datasets, batch, notes, settings,
                  judge_lib.FaceFinder())


def _fit_data(setup: _Setup) -> FitData:
    """What cmua and pg learn from: --fit-data, else the first dataset (noted)."""
    config = setup.config
    path = config.fit_data or config.datasets[0]
    limit = None if "pg" in config.methods else config.baselines.cmua_images
    _, images, labels, _, _ = eval_data.load_dataset(path, setup.size, limit)
    if not config.fit_data:
        setup.notes.append(f"cmua/pg were fitted on the evaluation images themselves ({path}); "
                           "give --fit-data for a separate training set")
    return FitData(path, images, labels)


def _protectors(setup: _Setup, keys: dict, log: Log) -> dict:
    """method -> protector: each generator as 'idguard:LABEL', then the baselines (fitted)."""
    config, opts = setup.config, setup.config.baselines
    protectors = {f"idguard:{label}": protectors_lib.idguard_protector(cfg, variables, delta_p)
                  for label, cfg, variables, delta_p in setup.generators}
    fit = _fit_data(setup) if {"cmua", "pg"} & set(config.methods) else None
    if {"disrupting", "pgd"} & set(config.methods):
        setup.settings["pgd_steps"] = opts.pgd_steps
    pg_size = protectors_lib.pg_generator_size(
        config.pg_ngf, config.pg_blocks,
        generator=setup.generators[0][1] if setup.generators else None,
        converted=config.weights is not None, config_name=config.config)
    for name in ("noise", "disrupting", "pgd", "cmua", "pg"):
        if name in config.methods:
            built = protectors_lib.make_protector(name, setup.models, opts, key=keys[name],
                                                  fit=fit, image_size=setup.size,
                                                  pg_size=pg_size, log=log)
            protectors[name] = built.protect
            setup.notes.append(built.note)
            if built.settings is not None:
                setup.settings[name] = built.settings
    return protectors


def _measure_batch(setup: _Setup, data, protect, key, start: int) -> tuple[dict, dict]:
    """Protect and measure the batch of `data` from `start`: (its measurements, with the
    protected uint8 images while in the grid; robustness op -> its measurements)."""
    config = setup.config
    idx, real = eval_data.batch_rows(start, len(data.images), setup.batch)
    rows = slice(start, start + real)
    clean, labels = data.images[rows], data.labels[rows]
    masks = None if data.face_masks is None else data.face_masks[rows]
    protected = np.asarray(protect(jnp.asarray(to_float(data.images[idx])),
                                   jnp.asarray(data.labels[idx]), key))[:real]
    protected_u8 = quantise_within(clean, protected, config.baselines.eps)
    part = measure.measure(
        setup.models, clean, protected_u8, setup.judge, labels=labels, input_face_masks=masks,
        finder=setup.finder, recognizer="auto" if config.misdirection else None,
        keep_images=start < config.grid)
    if start < config.grid:
        part["protected"] = protected_u8
    robust = {op: measure.measure(setup.models, fn(clean), fn(protected_u8), setup.judge,
                                     labels=labels, input_face_masks=masks, finder=setup.finder,
                                     recognizer=None, keep_images=False)
              for op, fn in setup.ops.items()}
    return part, robust


def _write_grids(setup: _Setup, data, method: str, parts: list, m: dict) -> None:
    """grids/DATASET_METHOD_TARGET.png: original, manipulated, protected, manipulated protected."""
    protected = np.concatenate([p["protected"] for p in parts if "protected" in p])
    n = min(setup.config.grid, len(data.images))
    for t, r in m["targets"].items():
        report.write_grid(
            os.path.join(setup.config.out, "grids",
                         f"{data.name}_{method.replace(':', '-')}_{t}.png"),
            [data.images[:n], r["manipulated_clean"][0, :n], protected[:n],
             r["manipulated_protected"][0, :n]])


def _evaluate_method(setup: _Setup, d_index: int, method: str, protect, keys: dict,
                     results: _Results) -> dict:
    """Every batch of dataset `d_index` through one method: its summary (also into results)."""
    data = setup.datasets[d_index]
    parts, robust_parts = [], {op: [] for op in setup.ops}
    for i, start in enumerate(range(0, len(data.images), setup.batch)):
        key = (jax.random.fold_in(jax.random.fold_in(keys[method], d_index), i)
               if method in keys else None)
        part, robust = _measure_batch(setup, data, protect, key, start)
        parts.append(part)
        for op, r in robust.items():
            robust_parts[op].append(r)
    m = measure.concatenate(parts, keep_images=setup.config.grid)
    s = measure.summarise(m)
    results.summaries.append((data.name, method, s))
    per_image = {k: v for k, v in m.items() if k in ("psnr", "ssim", "linf", "input_mask_source")}
    per_image["targets"] = {t: {k: v for k, v in r.items() if not k.startswith("manipulated")}
                            for t, r in m["targets"].items()}
    results.per_image[f"{data.name}/{method}"] = per_image
    for op in setup.ops:
        results.robust_rows.append((data.name, op, method, measure.summarise(
            measure.concatenate(robust_parts[op]))))
    if setup.config.grid:
        _write_grids(setup, data, method, parts, m)
    return s


def write_tables(out: str, notes: list, summaries: list, robust_rows: list,
                 targets, several_generators: bool) -> list[str]:
    """table1, details, table3 (several generators) and robustness (when measured), each as .md
    and .csv under `out`, every one headed by the run's notes: the paths written."""
    preamble = "".join(f"- {n}\n" for n in notes)
    h, rows = report.table_one(summaries, targets)
    written = list(report.write_table(os.path.join(out, "table1"), h, rows,
                                      "# Table I: L2_face, ID sim, DSR per target\n\n" + preamble))
    h, rows = report.details_table(summaries, targets)
    written += report.write_table(os.path.join(out, "details"), h, rows,
                                  "# Older criteria, misdirection, masks, visible cost\n\n"
                                  + preamble + "- misdirection: dlib recogniser, distance >= 0.6 "
                                  "to the clean photo or no face found, over the outputs whose "
                                  "photo had a face\n- L2_face NaN: an empty face mask; left out "
                                  "of the mean L2_face, counted as a failure in DSR\n")
    if several_generators:
        gen_rows = [(f"{ds}/{m.split(':', 1)[-1]}", s) for ds, m, s in summaries
                    if m.startswith("idguard")]
        h, rows = report.table_three(gen_rows, targets)
        written += report.write_table(os.path.join(out, "table3"), h, rows,
                                      "# Table III: DSR per strategy\n\n" + preamble)
    if robust_rows:
        h, rows = report.robustness_table(robust_rows, targets)
        written += report.write_table(
            os.path.join(out, "robustness"), h, rows,
            "# Robustness: protected AND clean images through each operation before "
            "manipulation\n\n" + preamble)
    return written


def write_results(path: str, setup: _Setup, results: _Results, elapsed_s: float) -> dict:
    """results.json: the notes, settings, every summary and every per-image value."""
    out = {"notes": setup.notes, "image_size": setup.size, "targets": list(setup.config.targets),
           "random_targets": setup.models.random, "judge": setup.judge.describe(),
           "settings": setup.settings,
           "summaries": [{"dataset": d, "method": m, **s} for d, m, s in results.summaries],
           "robustness": [{"dataset": d, "operation": op, "method": m, **s}
                          for d, op, m, s in results.robust_rows],
           "per_image": results.per_image, "elapsed_s": elapsed_s}
    with open(path, "w") as f:
        json.dump(measure.to_jsonable(out), f, indent=1)
    return out


def evaluate(config: EvaluationConfig, log: Log | None = None) -> tuple[dict, list[str]]:
    """Run the evaluation: (results.json's content, the table files written). `log` gets one
    line per warning, per fitted baseline and (JSON) per dataset and method."""
    log = log or (lambda line: None)
    t_start = time.perf_counter()
    setup = _set_up(config, log)
    keys = protectors_lib.method_keys(config.seed)
    protectors = _protectors(setup, keys, log)
    order = [k for k in protectors if k.startswith("idguard")] + [
        m for m in config.methods if m != "idguard"]
    os.makedirs(config.out, exist_ok=True)
    results = _Results()
    for d_index, data in enumerate(setup.datasets):
        for method in order:
            s = _evaluate_method(setup, d_index, method, protectors[method], keys, results)
            log(json.dumps({"dataset": data.name, "method": method,
                            "dsr": {t: s["targets"][t]["dsr"] for t in config.targets},
                            "elapsed_s": round(time.perf_counter() - t_start, 1)}))
    written = write_tables(config.out, setup.notes, results.summaries, results.robust_rows,
                           list(config.targets), len(setup.generators) > 1)
    out = write_results(os.path.join(config.out, "results.json"), setup, results,
                        time.perf_counter() - t_start)
    return out, written
