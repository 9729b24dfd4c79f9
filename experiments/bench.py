"""Time the train step and batch protection; print figures, assert nothing.

    python experiments/bench.py --tiny                       # CPU, seconds
    python experiments/bench.py --strategies kpi,mgda --dtypes float32,bfloat16   # GPU, 256 px

For each (strategy, dtype): compile time, median step time over repeats after warm-up
(device-synchronised), images/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s, and
peak device memory where the backend reports it. Targets are the official architectures with
RANDOM weights (speed does not depend on the values). One JSON line per measurement, also
written to --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flops(lowered) -> float | None:
    """Model FLOPs of one step from the LOWERED (pre-optimisation) HLO.

    The compiled program's cost analysis on GPU omits convolutions that became cuDNN custom
    calls (it reported ~0.2 TFLOP for a ~50 TFLOP step on an H200), so count before lowering
    to the backend's kernels."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def _peak_memory(device) -> int | None:
    stats = getattr(device, "memory_stats", lambda: None)()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_train(cfg, repeats: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from idguard_jax import train

    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0))
    frozen = train.init_frozen_random(setup, jax.random.key(1))
    rng = np.random.default_rng(0)
    s, b = cfg.image_size, cfg.batch_size
    batch = jax.device_put({
        "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
        "mask": (rng.random((b, s, s, 1)) > 0.5).astype(np.uint8),
        "heatmap": rng.random((b, s, s, 1)).astype(np.float32),
        "labels": rng.integers(0, 2, (b, 5)).astype(np.float32)})
    step = train.make_train_step(setup)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, frozen)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(lowered)
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], batch, frozen)
        jax.block_until_ready(m)

    for _ in range(warmup):
        run()
    step_s = _time(run, repeats)
    out = {"bench": "train_step", "strategy": cfg.strategy, "dtype": cfg.dtype,
           "image_size": s, "batch_size": b, "targets": list(cfg.targets),
           "compile_s": round(compile_s, 2), "step_s": round(step_s, 5),
           "images_per_s": round(b / step_s, 2), "flops_per_step": flops,
           "tflops_per_s": round(flops / step_s / 1e12, 2) if flops else None,
           "peak_memory_gb": None}
    peak = _peak_memory(jax.devices()[0])
    if peak:
        out["peak_memory_gb"] = round(peak / 2**30, 2)
    return out


def bench_protect(image_size: int, ngf: int, n_blocks: int, batch: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from idguard_jax import protect
    from idguard_jax.generator import GeneratorConfig, init_generator

    cfg = GeneratorConfig(ngf=ngf, n_blocks=n_blocks, image_size=image_size)
    gen = protect.Generator(init_generator(jax.random.key(0), cfg),
                            jax.numpy.zeros((image_size, image_size, 3)), cfg)
    x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3))
                       .astype(np.float32))

    def run():
        jax.block_until_ready(protect.protect_float(gen.variables, gen.delta_p, x,
                                                    config=cfg, eps=cfg.eps))
    run()
    t = _time(run, repeats)
    return {"bench": "protect", "image_size": image_size, "batch_size": batch,
            "batch_s": round(t, 5), "images_per_s": round(batch / t, 1)}


def bench_loader(cache: str, batch: int, steps: int) -> dict:
    """Images/s the prefetching loader delivers from a cache (host arrays, no device copy)."""
    from idguard_jax.cache import open_cache, prefetch
    from idguard_jax.data import BatchSampler

    data = open_cache(cache)
    sampler = BatchSampler(len(data), min(batch, len(data)), seed=0)
    t = time.perf_counter()
    n = sum(len(b["image"]) for b in prefetch(data, sampler, 0, steps))
    dt = time.perf_counter() - t
    return {"bench": "loader", "cache": cache, "image_size": int(data.images.shape[1]),
            "batch_size": sampler.batch_size, "images_per_s": round(n / dt, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train-step and protection benchmarks")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: demo widths at 64 px, batch 4")
    p.add_argument("--strategies", default="kpi,mgda")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--targets", default="stargan,aggan,fpgan")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--protect-batches", default="32,256")
    p.add_argument("--loader", default=None, metavar="CACHE",
                   help="also time the data loader on this cache (experiments/prepare.py)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    args = p.parse_args(argv)

    import jax

    from idguard_jax import config

    base = config.demo() if args.tiny else config.paper()
    over = {"targets": tuple(args.targets.split(","))}
    if base.identity == "auto":       # speed only: a random ArcFace-sized identity network
        over["identity"] = "arcface"
    if args.batch_size:
        over["batch_size"] = args.batch_size
    if args.image_size:
        over["image_size"] = args.image_size
    base = dataclasses.replace(base, **over)
    results = [{"bench": "device", "device": str(jax.devices()[0]),
                "kind": jax.devices()[0].device_kind, "count": len(jax.devices())}]
    print(json.dumps(results[0]), flush=True)
    for dtype in args.dtypes.split(","):
        for strategy in args.strategies.split(","):
            cfg = dataclasses.replace(base, strategy=strategy, dtype=dtype)
            r = bench_train(cfg, args.repeats, args.warmup)
            results.append(r)
            print(json.dumps(r), flush=True)
    for b in (int(x) for x in args.protect_batches.split(",") if x):
        r = bench_protect(base.image_size, base.ngf, base.n_blocks, b, args.repeats)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.loader:
        r = bench_loader(args.loader, base.batch_size, 200)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
