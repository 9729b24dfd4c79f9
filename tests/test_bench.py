"""experiments/bench.py at the tiny size (every field of its JSON; no timing asserted), the memory
fit's arithmetic, and that every reference-style ablation step computes the library's losses
and gradients (what makes its timing comparison honest)."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ablations, bench
from idguard_jax import config
from idguard_jax.networks import gradcam
from idguard_jax.training import step as train
from idguard_jax.training.frozen import init_frozen_random
from idguard_jax.networks.random_init import random_variables
from ports.vggface import VGGFace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMED = ("lower_s", "compile_s", "step_s", "images_per_s", "flops_per_step", "flops_per_s",
         "compiled_flops_per_step", "peak_memory_bytes", "program_memory")


def _check_timed(r):
    for key in TIMED:
        assert key in r, (r["bench"], key)
    assert r["step_s"] > 0 and r["compile_s"] > 0
    np.testing.assert_allclose(r["images_per_s"], r["batch_size"] / r["step_s"], rtol=1e-2)
    assert r["flops_per_step"] > 0       # XLA:CPU's cost analysis counts every op
    np.testing.assert_allclose(r["flops_per_s"], r["flops_per_step"] / r["step_s"], rtol=1e-3)
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    mem = r["program_memory"]
    assert mem["argument"] > 0 and mem["output"] > 0
    assert mem["total"] == (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                            + mem["generated_code"])


@pytest.mark.slow
def test_bench_tiny_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "experiments/bench.py", "--tiny", "--targets", "stargan,fpgan",
         "--strategies", "kpi,mgda", "--repeats", "1", "--warmup", "0", "--protect-batches", "2,4",
         "--memory-batches", "1,2", "--ablations", "features_twice", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    by = {}
    for rec in results:
        by.setdefault(rec["bench"], []).append(rec)
    assert by["device"][0]["platform"] == "cpu"
    assert {"xla_cpu_convolutions", "xla_cpu_dots"} <= set(by["device"][0])
    steps = {rec["strategy"]: rec for rec in by["train_step"]}
    assert set(steps) == {"kpi", "mgda"}
    for rec in steps.values():
        _check_timed(rec)
        assert rec["image_size"] == 32 and rec["batch_size"] == 2
        assert rec["program_memory"]["alias"] > 0     # the state is donated
    assert sorted(rec["batch_size"] for rec in by["protect"]) == [2, 4]
    for rec in by["protect"] + by["target"]:
        _check_timed(rec)
    assert [rec["target"] for rec in by["target"]] == ["stargan", "fpgan"]
    assert all(rec["batch_size"] == 4 for rec in by["target"])   # [x_adv; x_pri]
    (mem,) = by["memory"]
    totals = [p["program_memory"]["total"] for p in mem["points"]]
    assert [p["batch_size"] for p in mem["points"]] == [1, 2]
    assert mem["b_bytes_per_image"] > 0
    np.testing.assert_allclose([mem["a_bytes"] + mem["b_bytes_per_image"] * b for b in (1, 2)],
                               totals, rtol=1e-9)
    fits = [mem["largest_batch"][g] for g in ("16", "24", "40", "80", "141")]
    assert fits == sorted(fits) and fits[0] > 0
    variants = {rec["variant"]: rec for rec in by["ablation"]}
    assert set(variants) == {"ours", "features_twice"}
    for rec in variants.values():
        _check_timed(rec)
    # The second target call for the features is real work in the optimised program.
    assert (variants["features_twice"]["compiled_flops_per_step"]
            > variants["ours"]["compiled_flops_per_step"])
    assert "largest batch" in r.stderr


def test_device_record_names_where_convolutions_and_dots_run():
    flag = "--xla_cpu_experimental_ynn_fusion_type"
    assert bench._xla_cpu_routing("") == {"xla_cpu_convolutions": "xla default",
                                          "xla_cpu_dots": "xla default"}
    assert bench._xla_cpu_routing(f"{flag}=-individual_convolution,-individual_dot") == {
        "xla_cpu_convolutions": "eigen", "xla_cpu_dots": "eigen"}


def test_memory_fit_and_largest_batch():
    gib, mib = 2**30, 2**20
    a, b = bench.fit_memory([4, 8, 16], [gib + 4 * 100 * mib, gib + 8 * 100 * mib,
                                         gib + 16 * 100 * mib])
    np.testing.assert_allclose([a, b], [gib, 100 * mib])
    # 16 GiB, all usable: (16 - 1) GiB / 100 MiB = 153.6 images
    assert bench.largest_batch(a, b, 16, fraction=1.0, margin=0.0) == 153
    # 75% of 16 GiB less 10%: 10.8 GiB; (10.8 - 1) GiB / 100 MiB = 100.35
    assert bench.largest_batch(a, b, 16, fraction=0.75, margin=0.1) == 100
    assert bench.largest_batch(20 * gib, b, 16, fraction=1.0, margin=0.0) == 0
    with pytest.raises(ValueError):
        bench.fit_memory([4, 4], [1, 2])


def _tiny_vggface():
    vgg = VGGFace(widths=(4, 4, 8, 8, 8), fc_width=16, num_classes=10)
    shapes = jax.eval_shape(vgg.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    return vgg, random_variables(shapes, jax.random.key(3))


def _rel_err(a, b):
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(y))) + 1e-30
        worst = max(worst, float(jnp.max(jnp.abs(x - y))) / scale)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["kpi", "mgda"])
def test_ablation_steps_compute_the_library_step(strategy, fast_compile):
    """Each waste put back alone, and all together, gives the library's losses, weights and
    gradients; the batch's heatmap is the Grad-CAM++ the gradcam waste recomputes."""
    cfg = config.tiny(strategy=strategy, targets=("stargan", "aggan"))
    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0),
                             delta_p=0.03 * jax.random.normal(jax.random.key(5), (32, 32, 3)))
    vgg, vvars = _tiny_vggface()
    frozen = init_frozen_random(cfg, jax.random.key(1))
    frozen = ablations.FrozenWithVGG(frozen.targets, frozen.identity, vvars)
    batch = bench.random_batch(cfg)
    x = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
    batch["heatmap"] = gradcam.heatmaps(vgg, vvars, x)
    ours = jax.jit(functools.partial(train.compute_gradients, setup))(state, batch, frozen)
    wasted = ablations.applicable(strategy)
    assert ("mgda_final_backward" in wasted) == (strategy == "mgda")
    variants = [frozenset(wasted)] if strategy == "kpi" else [frozenset([w]) for w in wasted]
    for wastes in variants:
        theirs = jax.jit(functools.partial(ablations.compute_gradients, setup, wastes=wastes,
                                           vgg=vgg))(state, batch, frozen)
        assert _rel_err(theirs.grads, ours.grads) < 1e-4, wastes
        np.testing.assert_allclose(theirs.weights, ours.weights, rtol=1e-5, atol=1e-7)
        assert set(theirs.metrics) == set(ours.metrics)
        for k in ours.metrics:
            np.testing.assert_allclose(theirs.metrics[k], ours.metrics[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{sorted(wastes)} {k}")
    if strategy == "kpi":   # the whole step, Adam included, with every waste
        new_ours, _ = train.make_train_step(setup, donate=False)(state, batch, frozen)
        new_ref, _ = ablations.make_step(setup, ablations.REFERENCE, vgg)(
            jax.tree.map(jnp.copy, state), batch, frozen)
        # Adam's first update is +-lr per element whatever the gradient, so the parameters
        # cannot tell two gradients apart: compare what carries the gradient's values, Adam's
        # moments (mu = (1 - b1) g, nu = (1 - b2) g^2), and the new BatchNorm statistics,
        # each leaf relative to its largest entry
        adam_ref, adam_ours = new_ref.opt_state[0], new_ours.opt_state[0]
        assert int(adam_ref.count) == int(adam_ours.count) == 1
        assert _rel_err(adam_ref.mu, adam_ours.mu) < 1e-4
        assert _rel_err(adam_ref.nu, adam_ours.nu) < 2e-4
        assert _rel_err(new_ref.batch_stats, new_ours.batch_stats) < 1e-5
        assert int(new_ref.step) == int(new_ours.step) == 1


def test_unknown_waste_is_refused():
    cfg = config.tiny(targets=("stargan",))
    setup = train.create_setup(cfg)
    with pytest.raises(ValueError, match="unknown wastes"):
        ablations.compute_gradients(setup, None, {}, {}, frozenset(["nope"]))


def test_robust_section_times_both_steps(fast_compile):
    """--robust SPEC: the plain and the robust step, each compiled and timed in one run; the
    robust one does more work (the channels are in its program)."""
    cfg = config.tiny(targets=("stargan",))
    r = bench.bench_robust(cfg, "jpeg:70-95,blur:0-1", repeats=1, warmup=0)
    assert r["bench"] == "robust_step" and r["robust"] == "jpeg:70-95,blur:0-1"
    for run in (r["plain"], r["robust_run"]):
        assert run["step_s"] > 0 and run["compile_s"] > 0
    np.testing.assert_allclose(r["time_vs_plain"],
                               r["robust_run"]["step_s"] / r["plain"]["step_s"], rtol=1e-2)
    assert r["robust_run"]["flops_per_step"] > r["plain"]["flops_per_step"]


@pytest.mark.parametrize("argv", [["--robust", "jpeg:200"],
                                  ["--robust", "jpeg:75", "--skip", "train"]])
def test_robust_option_is_checked_first(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", *argv])
    assert e.value.code == 2 and "--robust" in capsys.readouterr().err
