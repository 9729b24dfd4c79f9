"""Benchmarks of the train step, batch protection and the targets; a memory report; ablations.

    # CI / CPU smoke test (32 px, tiny random networks; about a minute on 2 cores):
    python experiments/bench.py --tiny --targets stargan --json bench_tiny.json
    # CPU at the demo size (64 px, batch 4, the five demo-width targets), with the saving of each
    # optimisation (experiments/ablations.py) and the memory report:
    python experiments/bench.py --size demo --strategies kpi --ablations --json bench_demo.json
    # GPU, the paper's size: 256 px, batch 32, official StarGAN, AttentionGAN, Fixed-Point GAN,
    # RelGAN and HiSD, bfloat16 compute (float32 master weights), ArcFace-sized identity network;
    # the compilation cache makes a second run skip compiling:
    JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache python experiments/bench.py --size paper \
        --dtypes bfloat16 --strategies kpi,mgda --protect-batches 32,256,1024 \
        --memory-batches 8,16 --json bench_gpu.json
    # ... and the savings of each optimisation there (slow: eight step compilations):
    JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache python experiments/bench.py --size paper \
        --dtypes bfloat16 --strategies kpi --ablations --skip train,protect,target,memory
    # Against the PyTorch reference (needs torch and the checkout's tests/torch_reference):
    # its eager step and protection on the same random weights, in this process; CPU, 64 px,
    # batch 4, five official-width targets + ArcFace, with the per-component table:
    python experiments/bench.py --size paper --identity arcface --image-size 64 \
        --batch-size 4 --against torch --components --dtypes float32,bfloat16 \
        --protect-batches 4 --json anchor_64.json

Every timing is the median (and the minimum, step_s_min) over --repeats calls after --warmup
calls, each call synchronised with jax.block_until_ready. Per measurement (JSON records, key
'bench'):

  train_step  per (dtype, strategy): lower_s and compile_s (tracing+lowering, XLA compilation),
              step_s, images_per_s, flops_per_step (XLA's cost analysis of the lowered program:
              the model's FLOPs), flops_per_s (achieved), compiled_flops_per_step (of the
              optimised program; misses library-call convolutions on GPU), peak_memory_bytes
              (the device allocator's peak so far; null where the backend keeps no statistics,
              e.g. CPU), program_memory (the compiled program's memory analysis: argument,
              output, alias, temp, generated-code bytes)
  protect     per batch size: the same fields for one protection call (eval-mode generator)
  target      per target: one forward + backward (gradient w.r.t. the input image) of that target
              alone at the step's batch of 2B images ([x_adv; x_pri]), condition 0
  memory      the step compiled (not run) at each of --memory-batches: bytes = a + b * batch
              fitted by least squares to argument + output - alias + temp + code bytes, and the
              largest batch that fits each of --memory-gib, using --mem-fraction of the card
              (JAX's default preallocation is 75%: XLA_PYTHON_CLIENT_MEM_FRACTION) less a
              --margin safety margin. On CPU the figures are XLA:CPU's buffer assignment; run
              on the GPU for the GPU's.
  anchor_step     with --against torch, per strategy: our jitted step (the library's
              make_train_step) and the reference's eager PyTorch step (tests/torch_reference/
              solver.py: each target run twice per branch, the identity network on the clean
              output per branch, Grad-CAM++ every step, MGDA by one autograd.grad per target;
              float32 on the CPU, fp16 autocast on CUDA) on the same weights and batch, one call
              of each per round after >= 2 warm-up rounds: ours_step_s, torch_step_s,
              speedup = torch / ours (median; and of the minima), each side's median system
              seconds and fresh page faults per call (ours_sys_s, ours_page_faults, ...;
              warned about when the shared heap was still growing), first_step_rel_err (both
              sides' first losses and weights), ours_repeat_rel_err (our first step again on
              the same state and batch: 0 where XLA:CPU's run is deterministic; warned about)
  anchor_protect  with --against torch, per --protect-batches: ours per --dtypes
              (anchor.OUR_PROTECTION) and the torch generator's eval forward (float32 and, with
              bfloat16, its autocast and cast variants), s_per_image, torch_float32_over_this,
              best_torch_same_dtype_over_this, max_abs_diff_vs_torch_float32
  components  with --against torch --components: each piece of our step jitted alone at the
              step's shapes and the reference step's sections (perf_counter), side by side
  robust_step with --robust SPEC, per (dtype, strategy): the step plain and with robust=SPEC
              (the EOT channels of idguard_jax.channels), compiled, then timed round-robin:
              'plain' and 'robust_run' (each train_step's fields), time_vs_plain (median) and
              min_time_vs_plain; the train_step record of that strategy is its plain run
  ablation    with --ablations: the step with each waste of the reference put back
              (experiments/ablations.py; same losses and gradients), its step_s and the ratio to
              ours (median and minimum), timed in the same process round-robin (one call of
              each variant per round) so that a shared machine's load falls on all alike.

The device record names the host allocator: 'retained' (idguard_jax.host_memory, what every
command line sets) or 'system' (IDGUARD_HOST_MALLOC=system); under --against torch it holds for
both sides. Its 'xla_cpu_convolutions' is 'eigen' (idguard_jax.xla_cpu, what every command line
sets) or 'xla default' (IDGUARD_XLA_CPU_CONV=ynn, the user's own XLA_FLAGS, an unchecked jaxlib);
'xla_cpu_dots' is 'eigen' under IDGUARD_XLA_CPU_DOTS=eigen (a reproducible, 10-26% slower step).

Targets, the generator and the identity network carry RANDOM weights (speed does not depend on
the values; 'auto' identity becomes an ArcFace-sized random network). Nothing is asserted. Only
--against torch imports torch (experiments/anchor.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

from idguard_jax import host_memory, startup, xla_cpu

MEMORY_GIB = (16, 24, 40, 80, 141)


def _flops(lowered) -> float | None:
    """Model FLOPs of one call from the LOWERED (pre-optimisation) HLO.

    The compiled program's cost analysis on GPU omits convolutions that became cuDNN custom
    calls (it reported ~0.2 TFLOP for a ~50 TFLOP step on an H200), so count before lowering
    to the backend's kernels."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) or None


def _compiled_flops(compiled) -> float | None:
    """FLOPs of the optimised program (after XLA's CSE and dead-code elimination). Reliable on
    CPU; on GPU it misses convolutions lowered to library calls (see _flops)."""
    return _flops(compiled)


def program_memory(compiled) -> dict | None:
    """The compiled program's memory analysis in bytes, plus 'total' = what it needs resident:
    arguments + outputs - aliased (donated) + temporaries + generated code. None if the backend
    gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                    + out["generated_code"])
    return out


def _peak_memory(device) -> int | None:
    stats = getattr(device, "memory_stats", lambda: None)()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def prepare(jitted, args: tuple, carry_first: bool = False) -> tuple[dict, object]:
    """Lower and compile `jitted(*args)`: (compile record, a synchronised call).

    carry_first: the call returns (new first argument, rest) and donates its first argument
    (the train step): each call feeds the next. The call returns the outputs.
    """
    import jax

    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    holder = list(args)

    def call(*other_args):
        """One synchronised call; other_args: call on these instead (nothing carried)."""
        out = compiled(*(other_args or holder))
        if carry_first and not other_args:
            holder[0] = out[0]
        return jax.block_until_ready(out)

    return {"lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
            "flops_per_step": _flops(lowered), "compiled_flops_per_step": _compiled_flops(compiled),
            "program_memory": program_memory(compiled)}, call


def _timed(record: dict, times: list[float], images: int) -> dict:
    import jax

    step_s = statistics.median(times)
    flops = record["flops_per_step"]
    return {**record, "step_s": round(step_s, 6), "step_s_min": round(min(times), 6),
            "images_per_s": round(images / step_s, 2),
            "flops_per_s": flops / step_s if flops else None,
            "peak_memory_bytes": _peak_memory(jax.devices()[0])}


def measure(jitted, args: tuple, images: int, repeats: int, warmup: int,
            carry_first: bool = False) -> dict:
    """Lower, compile and time `jitted(*args)` (see prepare); images: images per call."""
    record, call = prepare(jitted, args, carry_first)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return _timed(record, times, images)


def round_robin(calls: list, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of each of `calls` per round, after `warmup` calls of each: one call of every
    one per round, so that a shared machine's load falls on all alike."""
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(max(repeats, 1)):
        for call, ts in zip(calls, times):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
    return times


def random_batch(cfg, batch_size: int | None = None, seed: int = 0) -> dict:
    """A host batch of random images, masks, heatmaps and labels at cfg's size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s, b = cfg.image_size, batch_size or cfg.batch_size
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
            "mask": (rng.random((b, s, s, 1)) > 0.5).astype(np.uint8),
            "heatmap": rng.random((b, s, s, 1)).astype(np.float32),
            "labels": rng.integers(0, 2, (b, 5)).astype(np.float32)}


def _train_inputs(cfg):
    import jax

    from idguard_jax.training import step as train
    from idguard_jax.training.frozen import init_frozen_random

    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0))
    frozen = init_frozen_random(cfg, jax.random.key(1))
    return setup, state, frozen


def bench_train(cfg, repeats: int, warmup: int, setup_state_frozen=None) -> dict:
    import jax

    from idguard_jax.training import step as train

    setup, state, frozen = setup_state_frozen or _train_inputs(cfg)
    batch = jax.device_put(random_batch(cfg))
    r = measure(train.make_train_step(setup), (state, batch, frozen), cfg.batch_size,
                repeats, warmup, carry_first=True)
    return _train_record(cfg, r)


def _train_record(cfg, timed: dict) -> dict:
    """A train_step record: cfg's description and a step's `_timed` figures."""
    return {"bench": "train_step", "strategy": cfg.strategy, "dtype": cfg.dtype,
            "image_size": cfg.image_size, "batch_size": cfg.batch_size,
            "targets": list(cfg.targets), **timed}


def bench_protect(cfg, batch: int, repeats: int, warmup: int) -> dict:
    """One protection call: the library's eval-mode generator call (`generator.protect_eval`),
    with a bfloat16 generator under a bfloat16 compute dtype."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from idguard_jax.generator import init_generator, protect_eval
    from idguard_jax.training.step import compute_dtype

    gcfg = cfg.generator
    _, variables = init_generator(gcfg, jax.random.key(0))
    delta_p = jnp.zeros((gcfg.image_size, gcfg.image_size, 3), jnp.float32)
    x = jax.device_put(np.random.default_rng(0).uniform(
        -1, 1, (batch, gcfg.image_size, gcfg.image_size, 3)).astype(np.float32))
    dtype = None if cfg.dtype == "float32" else compute_dtype(cfg.dtype)
    fn = jax.jit(functools.partial(protect_eval, config=gcfg, eps=gcfg.eps, dtype=dtype))
    r = measure(fn, (variables, delta_p, x), batch, repeats, warmup)
    return {"bench": "protect", "dtype": cfg.dtype, "image_size": gcfg.image_size,
            "batch_size": batch, **r}


def bench_target(cfg, name: str, repeats: int, warmup: int) -> dict:
    """Forward + backward (gradient w.r.t. the images) of one target alone, 2B images."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from idguard_jax.networks import targets
    from idguard_jax.training.step import compute_dtype

    size_cfg = targets.size_config(name, cfg.target_size)
    target, tvars = targets.init_random(name, jax.random.key(1), image_size=cfg.image_size,
                                        config=size_cfg, dtype=compute_dtype(cfg.dtype))
    b = 2 * cfg.batch_size
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.uniform(-1, 1, (b, cfg.image_size, cfg.image_size, 3))
                       .astype(np.float32))
    cond = target.select(target.conditions(jnp.asarray(rng.integers(0, 2, (b, 5)), jnp.float32)), 0)

    def loss(tv, xs, c):
        out, feat = target.forward(tv, xs, c)
        return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(feat))

    fn = jax.jit(jax.value_and_grad(loss, argnums=1))
    r = measure(fn, (tvars, x, cond), b, repeats, warmup)
    return {"bench": "target", "target": name, "dtype": cfg.dtype, "target_size": cfg.target_size,
            "image_size": cfg.image_size, "batch_size": b, **r}


def fit_memory(batches, totals) -> tuple[float, float]:
    """Least-squares a, b of bytes = a + b * batch over two or more (batch, bytes) points."""
    n = len(batches)
    if n < 2 or len(set(batches)) < 2:
        raise ValueError("fit_memory: need two or more distinct batch sizes")
    mx, my = sum(batches) / n, sum(totals) / n
    b = (sum((x - mx) * (y - my) for x, y in zip(batches, totals))
         / sum((x - mx) ** 2 for x in batches))
    return my - b * mx, b


def largest_batch(a: float, b: float, gib: float, fraction: float, margin: float) -> int:
    """The largest batch with a + b * batch <= gib GiB * fraction * (1 - margin); 0 if none."""
    usable = gib * 2**30 * fraction * (1.0 - margin)
    if b <= 0:
        return 0 if a > usable else -1   # -1: memory does not grow with the batch
    return max(0, math.floor((usable - a) / b))


def bench_memory(cfg, batches, gib_sizes, fraction: float, margin: float) -> dict:
    """Compile the step at each batch size (nothing runs) and fit bytes = a + b * batch."""
    import jax

    from idguard_jax.training import step as train

    setup, state, frozen = _train_inputs(cfg)
    step = train.make_train_step(setup)
    points = []
    for b in batches:
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             random_batch(cfg, b))
        t = time.perf_counter()
        mem = program_memory(step.lower(state, batch, frozen).compile())
        points.append({"batch_size": b, "compile_s": round(time.perf_counter() - t, 3),
                       "program_memory": mem})
    out = {"bench": "memory", "strategy": cfg.strategy, "dtype": cfg.dtype,
           "image_size": cfg.image_size, "targets": list(cfg.targets), "points": points,
           "mem_fraction": fraction, "margin": margin, "a_bytes": None, "b_bytes_per_image": None,
           "largest_batch": None}
    if all(p["program_memory"] for p in points) and len(points) >= 2:
        a, b = fit_memory([p["batch_size"] for p in points],
                          [p["program_memory"]["total"] for p in points])
        out.update(a_bytes=a, b_bytes_per_image=b,
                   largest_batch={str(g): largest_batch(a, b, float(g), fraction, margin)
                                  for g in gib_sizes})
    return out


def bench_ablations(cfg, repeats: int, warmup: int, vgg_widths: str,
                    only: list[str] | None = None) -> list[dict]:
    """Our step (the library's) and, in the same process, each reference waste put back
    (ablations.py), then all of them at once ('reference'); `only`: just these wastes."""
    import jax
    import jax.numpy as jnp

    from experiments import ablations
    from idguard_jax.networks import identity
    from idguard_jax.training import step as train
    from idguard_jax.networks.random_init import random_variables
    from ports.vggface import VGGFace

    setup, state0, frozen = _train_inputs(cfg)
    vgg_cfg = (identity.IDENTITY_NETS["vggface"].default_config if vgg_widths == "official"
               else {"widths": (4, 4, 8, 8, 8), "fc_width": 16, "num_classes": 10})
    vgg = VGGFace(**vgg_cfg)
    vvars = random_variables(jax.eval_shape(vgg.init, jax.random.key(0), jax.ShapeDtypeStruct(
        (1, 224, 224, 3), jnp.float32)), jax.random.key(3))
    frozen = ablations.FrozenWithVGG(frozen.targets, frozen.identity, vvars)
    batch = jax.device_put(random_batch(cfg))
    wastes_here = ablations.applicable(cfg.strategy, cfg.mgda_gradients)
    unknown = set(only or ()) - set(wastes_here)
    if unknown:
        raise ValueError(f"--ablations: {sorted(unknown)} not among {', '.join(wastes_here)}")
    variants = [("ours", frozenset())]
    variants += [(w, frozenset([w])) for w in (only or wastes_here)]
    if not only:
        variants.append(("reference", frozenset(wastes_here)))
    # Compile every variant, then time them round-robin.
    prepared = []
    for name, wastes in variants:
        state = jax.tree.map(lambda a: a.copy(), state0)   # donated by the step
        step = ablations.make_step(setup, wastes, vgg) if wastes else train.make_train_step(setup)
        record, call = prepare(step, (state, batch, frozen), carry_first=True)
        prepared.append((name, wastes, record, call))
    times = round_robin([call for *_, call in prepared], repeats, warmup)
    out = []
    for (name, wastes, record, _), times in zip(prepared, times):
        r = _timed(record, times, cfg.batch_size)
        if not out:
            ours = r
        out.append({"bench": "ablation", "variant": name, "wastes": sorted(wastes),
                    "strategy": cfg.strategy, "dtype": cfg.dtype, "image_size": cfg.image_size,
                    "batch_size": cfg.batch_size, "targets": list(cfg.targets),
                    "vggface": vgg_widths, **r,
                    "time_vs_ours": round(r["step_s"] / ours["step_s"], 3),
                    "min_time_vs_ours": round(r["step_s_min"] / ours["step_s_min"], 3)})
    return out


def bench_robust(cfg, spec: str, repeats: int, warmup: int) -> dict:
    """The step plain and with `robust=spec` (its images through the differentiable channels,
    idguard_jax.channels), both the library's, compiled first and timed round-robin: each
    one's figures and robust time / plain time (median and minimum)."""
    import jax

    from idguard_jax.training import step as train

    batch = jax.device_put(random_batch(cfg))
    records, calls = [], []
    for robust in ("", spec):
        setup, state, frozen = _train_inputs(dataclasses.replace(cfg, robust=robust))
        record, call = prepare(train.make_train_step(setup), (state, batch, frozen),
                               carry_first=True)
        records.append(record)
        calls.append(call)
    plain, robust = (_timed(r, t, cfg.batch_size)
                     for r, t in zip(records, round_robin(calls, repeats, warmup)))
    return {"bench": "robust_step", "robust": spec, "strategy": cfg.strategy,
            "dtype": cfg.dtype, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
            "targets": list(cfg.targets), "plain": plain, "robust_run": robust,
            "time_vs_plain": round(robust["step_s"] / plain["step_s"], 3),
            "min_time_vs_plain": round(robust["step_s_min"] / plain["step_s_min"], 3)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="train-step, protection and target benchmarks",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "demo", "paper"), default="paper",
                   help="tiny: 32 px, batch 2, tiny targets (CI); demo: 64 px, batch 4, demo "
                   "targets (CPU); paper: 256 px, batch 32, official targets (GPU)")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size",
                   help="the same as --size tiny")
    p.add_argument("--strategies", default="kpi,mgda")
    p.add_argument("--dtypes", default="float32", help="compute dtypes, e.g. float32,bfloat16")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--targets", default=None, help="comma-separated (default: the five)")
    p.add_argument("--identity", default=None,
                   help="identity network of the loss, random weights (default: the size's; "
                   "'arcface' at --size paper)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--protect-batches", default=None,
                   help="comma-separated batch sizes (default: the train batch and 8x it)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train, "
                   "protect, target, memory (e.g. --skip train,protect,target for the memory "
                   "report alone: it compiles and never runs the step)")
    p.add_argument("--memory-batches", default=None,
                   help="batch sizes to compile for the memory fit (default: B/2 and B; '' skips)")
    p.add_argument("--memory-gib", default=",".join(map(str, MEMORY_GIB)))
    p.add_argument("--mem-fraction", type=float,
                   default=float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)),
                   help="part of the card JAX may allocate (default: its 0.75 preallocation)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="safety margin taken off the usable memory (fragmentation, workspaces)")
    p.add_argument("--ablations", nargs="?", const="all", default=None, metavar="WASTES",
                   help="also time each reference waste put back (experiments/ablations.py), "
                   "and all of them at once; or only the comma-separated WASTES")
    p.add_argument("--ablation-vggface", choices=("official", "tiny"), default=None,
                   help="VGGFace of the gradcam ablation and of the torch anchor's Grad-CAM++ "
                   "(default: tiny at --size tiny)")
    p.add_argument("--against", choices=("torch",), default=None,
                   help="instead of the sections above: our step (each of --strategies, "
                   "float32) and protection (each of --dtypes, at --protect-batches, default the "
                   "train batch) against the PyTorch reference's (tests/torch_reference) on "
                   "the same random weights, in this process, round-robin; prints reference "
                   "time / our time (experiments/anchor.py)")
    p.add_argument("--robust", default=None, metavar="SPEC",
                   help="also time the step with --set robust=SPEC (e.g. "
                        "jpeg:70-95,resize:0.5-1,blur:0-1) against the plain one, round-robin, "
                        "per strategy and dtype")
    p.add_argument("--components", action="store_true",
                   help="with --against torch: also each piece of our step jitted alone and "
                   "the reference step's sections, side by side")
    p.add_argument("--loader", default=None, metavar="CACHE",
                   help="also time the data loader on this cache (experiments/prepare.py)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    return p


def bench_loader(cache: str, batch: int, steps: int) -> dict:
    """Images/s the prefetching loader delivers from a cache (host arrays, no device copy)."""
    from idguard_jax.data.cache import open_cache
    from idguard_jax.data.loader import prefetch
    from idguard_jax.data.loader import BatchSampler

    data = open_cache(cache)
    sampler = BatchSampler(len(data), min(batch, len(data)), seed=0)
    t = time.perf_counter()
    n = sum(len(b["image"]) for b in prefetch(data, sampler, 0, steps))
    dt = time.perf_counter() - t
    return {"bench": "loader", "cache": cache, "image_size": int(data.images.shape[1]),
            "batch_size": sampler.batch_size, "images_per_s": round(n / dt, 1)}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _base_config(args):
    """The configuration every section measures: --size's preset with the flags applied."""
    from idguard_jax import config

    base = {"tiny": config.tiny, "demo": config.demo, "paper": config.paper}[args.size]()
    over = {}
    if args.targets:
        over["targets"] = tuple(args.targets.split(","))
    if args.identity:
        over["identity"], over["identity_config"] = args.identity, ()
    elif args.size == "demo":   # the demo trains with dlib; its figures stay the stand-in's
        over["identity"], over["identity_config"] = "standin", (("width", 8),)
    elif base.identity == "auto":     # speed only: a random ArcFace-sized identity network
        over["identity"] = "arcface"
    if args.batch_size:
        over["batch_size"] = args.batch_size
    if args.image_size:
        over["image_size"] = args.image_size
    return dataclasses.replace(base, **over)


def _device_record(size: str) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"bench": "device", "device": str(dev), "kind": dev.device_kind,
            "platform": dev.platform, "count": len(jax.devices()), "jax": jax.__version__,
            "size": size, "host_malloc": "retained" if host_memory.retained() else "system",
            **_xla_cpu_routing(os.environ.get("XLA_FLAGS", ""))}


def _xla_cpu_routing(flags: str) -> dict:
    """Where XLA:CPU's convolutions and dots run in this process: 'eigen' where XLA_FLAGS
    removes YNNPACK's fusion of them (idguard_jax.xla_cpu), else 'xla default'."""
    return {f"xla_cpu_{kind}": "eigen" if f"-individual_{op}" in flags else "xla default"
            for kind, op in (("convolutions", "convolution"), ("dots", "dot"))}


def _per_dtype_sections(args, base, skip: set, emit) -> None:
    """train (each strategy), protect (each batch) and target (each target), per dtype."""
    b = base.batch_size
    protect_batches = (_ints(args.protect_batches) if args.protect_batches is not None
                       else [b, 8 * b])
    for dtype in args.dtypes.split(","):
        if "train" not in skip:
            for strategy in args.strategies.split(","):
                cfg = dataclasses.replace(base, strategy=strategy, dtype=dtype)
                if not args.robust:
                    emit(bench_train(cfg, args.repeats, args.warmup))
                    continue
                robust = bench_robust(cfg, args.robust, args.repeats, args.warmup)
                emit(_train_record(cfg, robust["plain"]))   # its plain step, not compiled again
                emit(robust)
        cfg = dataclasses.replace(base, dtype=dtype)
        if "protect" not in skip:
            for pb in protect_batches:
                emit(bench_protect(cfg, pb, args.repeats, args.warmup))
        if "target" not in skip:
            for name in base.targets:
                emit(bench_target(cfg, name, args.repeats, args.warmup))


def _once_sections(args, base, skip: set, emit) -> None:
    """memory, ablations and the loader, at the first strategy and dtype."""
    first = dataclasses.replace(base, strategy=args.strategies.split(",")[0],
                                dtype=args.dtypes.split(",")[0])
    memory_batches = (_ints(args.memory_batches) if args.memory_batches is not None
                      else sorted({max(1, base.batch_size // 2), base.batch_size}))
    if "memory" not in skip and len(memory_batches) >= 2:
        emit(bench_memory(first, memory_batches, [g.strip() for g in args.memory_gib.split(",")],
                          args.mem_fraction, args.margin))
    if args.ablations:
        vgg = args.ablation_vggface or ("tiny" if args.size == "tiny" else "official")
        only = None if args.ablations == "all" else args.ablations.split(",")
        for r in bench_ablations(first, args.repeats, args.warmup, vgg, only):
            emit(r)
    if args.loader:
        emit(bench_loader(args.loader, base.batch_size, 200))


def _print_memory_summary(results: list[dict]) -> None:
    for r in results:
        if r["bench"] == "memory" and r["largest_batch"]:
            print(f"memory ({r['strategy']}, {r['dtype']}, {r['image_size']} px): "
                  f"{r['a_bytes'] / 2**30:.3f} GiB + {r['b_bytes_per_image'] / 2**20:.2f} MiB "
                  f"per image; largest batch at {r['mem_fraction']:.0%} of the card less "
                  f"{r['margin']:.0%}: " + ", ".join(f"{g} GiB: {n}" for g, n in
                                                      r["largest_batch"].items()),
                  file=sys.stderr)


def _torch_anchor_sections(args, base, skip: set, emit) -> None:
    """--against torch: the step per strategy (float32; with --components the per-component
    table) and protection per dtype, ours against the PyTorch reference's (anchor.py)."""
    from experiments import anchor   # imports torch: only under --against torch

    vgg = args.ablation_vggface or ("tiny" if args.size == "tiny" else "official")
    if "train" not in skip:
        for strategy in args.strategies.split(","):
            cfg = dataclasses.replace(base, strategy=strategy, dtype="float32")
            pair = anchor.build(cfg, vggface=vgg)
            record, sections = anchor.bench_step(pair, args.repeats, args.warmup)
            emit(record)
            if args.components:
                theirs = anchor.torch_components(sections)
                ours = anchor.our_components(pair, args.repeats, args.warmup)
                emit({"bench": "components", "strategy": strategy,
                      "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                      "targets": list(cfg.targets), "ours": ours, "torch": theirs,
                      "table": anchor.component_table(
                          ours, theirs, cfg.targets, strategy, record["ours_step_s"],
                          record["torch_step_s"])})
            del pair
    if "protect" not in skip:
        batches = (_ints(args.protect_batches) if args.protect_batches is not None
                   else [base.batch_size])
        for pb in batches:
            for r in anchor.bench_protect(base, pb, args.dtypes.split(","), args.repeats,
                                          args.warmup):
                emit(r)


def _print_anchor_summary(results: list[dict]) -> None:
    """The anchor's figures as a table: reference time, ours, reference time / ours."""
    lines = ["| work | PyTorch reference | ours | ratio (reference time / ours) |",
             "|---|---|---|---|"]
    for r in results:
        if r["bench"] == "anchor_step":
            lines.append(f"| train step, {r['image_size']} px, batch {r['batch_size']}, "
                         f"{len(r['targets'])} targets + {r['identity']}, {r['strategy']} | "
                         f"{r['torch_step_s']:.3f} s | {r['ours_step_s']:.3f} s | "
                         f"{r['speedup']:.2f}x |")
    protect = [r for r in results if r["bench"] == "anchor_protect"]
    for r in protect:
        if r["side"] != "ours":
            continue
        for t in protect:
            if t["side"] == "torch" and t["batch_size"] == r["batch_size"] and (
                    t["variant"] == "float32" or t["dtype"] == r["dtype"]):
                lines.append(f"| protection, ngf {r['ngf']}, {r['image_size']} px, batch "
                             f"{r['batch_size']}: ours {r['variant']} vs torch {t['variant']} | "
                             f"{t['s_per_image']:.4f} s/img | {r['s_per_image']:.4f} s/img | "
                             f"{t['s_per_image'] / r['s_per_image']:.2f}x |")
    for r in results:
        if r["bench"] == "components":
            lines.append("")
            lines.append(r["table"])
        if r["bench"] == "device":
            lines.insert(0, f"both sides in one process, host malloc {r['host_malloc']} "
                            f"(idguard_jax.host_memory; {host_memory.ENV}=system for glibc's "
                            "default); XLA:CPU convolutions "
                            f"{r['xla_cpu_convolutions']}, dots {r['xla_cpu_dots']} "
                            f"(idguard_jax.xla_cpu; {xla_cpu.ENV}=ynn, {xla_cpu.DOTS_ENV}=eigen)")
    if len(lines) > 3:
        print("\n".join(lines), file=sys.stderr)


@startup.command
def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    skip = set(args.skip.split(",")) - {""}
    unknown = skip - {"train", "protect", "target", "memory"}
    if unknown:
        p.error(f"--skip: unknown sections {sorted(unknown)}")
    base = _base_config(args)
    results = []

    def emit(r):   # one JSON line per figure, as soon as it is measured
        results.append(r)
        print(json.dumps(r), flush=True)

    if args.components and args.against != "torch":
        p.error("--components needs --against torch")
    if args.robust is not None:
        if args.against or "train" in skip:
            p.error("--robust times our train step: not with --against or --skip train")
        try:
            dataclasses.replace(base, robust=args.robust)
        except ValueError as e:          # names robust= and the part at fault
            p.error(f"--robust: {e}")
    emit(_device_record(args.size))
    if args.against == "torch":
        _torch_anchor_sections(args, base, skip, emit)
        _print_anchor_summary(results)
    else:
        _per_dtype_sections(args, base, skip, emit)
        _once_sections(args, base, skip, emit)
        _print_memory_summary(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
