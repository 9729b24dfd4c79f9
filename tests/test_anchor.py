"""Our whole train step against the reference's, in PyTorch (torch_reference.solver, the
reference's `solver.py::train_batch`): one step from the same random weights (official layouts,
converted), the same batch and the heatmap the torch side's Grad-CAM++ computes. Losses, task
weights, gradients of G and delta_p, the BatchNorm statistics and Adam's state agree to float32
rounding. Also the protection forward and the reference's min-norm solver and labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments import anchor
from idguard_jax import config
from idguard_jax.generator import protect_eval
from idguard_jax.networks.targets import stargan_conditions
from idguard_jax.training import mgda
from torch_reference import solver

TOLERANCE = 1e-4   # relative, float32


@pytest.mark.slow
@pytest.mark.parametrize("strategy, targets", [("kpi", ("fpgan", "relgan")),
                                               ("mgda", ("aggan", "hisd"))])
def test_one_step_matches_the_reference(strategy, targets, fast_compile):
    """kpi: prior weights 1 and 10; mgda: interior min-norm weights (~0.2 / 0.8). eps 0.3: the
    loss gradients are proportional to o_adv - o, a difference of two forward passes, and at
    eps 0.05 the tiny random targets barely move, so the forwards' float32 rounding (torch's and
    XLA's convolutions sum in other orders) would be a visible part of that difference."""
    cfg = config.tiny(strategy=strategy, targets=targets, eps=0.3)
    # BatchNorm's running statistics and affine parameters off their defaults, and the last conv
    # scaled so that some of the perturbation sits at +-eps (the clamps pass no gradient there)
    pair = anchor.build(cfg, vggface="tiny", randomize_generator_norms=True,
                        generator_last_scale=0.3)
    diffs = anchor.compare_one_step(pair)
    print({k: f"{v:.2g}" for k, v in diffs.items()})
    assert set(diffs) >= {"loss", "loss terms", "kpi", "weights", "objective", "heatmap",
                          "grad G", "grad delta_p", "batch stats", "adam nu G",
                          "Adam rule", "params after Adam"}
    bad = {k: v for k, v in diffs.items() if not v < TOLERANCE}
    assert not bad, bad
    alpha = pair.torch_step.prior_weights
    if strategy == "kpi":   # the reference's prior weights reached the torch side
        assert [alpha[n] for n in targets] == [1.0, 10.0]
    else:
        assert all(v == 1.0 for v in alpha.values())


def test_protection_matches_the_reference():
    cfg = config.tiny(ngf=8, n_blocks=2)
    gen = torch.Generator().manual_seed(0)
    generator, prior, variables, delta_p = anchor._generator_pair(cfg, gen, True, 1.0)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    ours = protect_eval(variables, jnp.asarray(delta_p), jnp.asarray(x), config=cfg.generator,
                        eps=cfg.eps)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    want = solver.TorchProtector(generator, prior, cfg.eps)(x_t).permute(0, 2, 3, 1).numpy()
    assert np.max(np.abs(np.asarray(ours) - want)) < 1e-5
    assert 0.1 < np.mean(np.abs(np.abs(want - x) - cfg.eps) < 1e-6) < 0.99   # clamps exercised
    for variant in ("bfloat16-autocast", "bfloat16-cast"):
        got = solver.TorchProtector(generator, prior, cfg.eps, variant)(x_t)
        assert got.dtype == torch.float32
        assert float(torch.max(torch.abs(got.permute(0, 2, 3, 1) - torch.from_numpy(want)))) \
            < 0.02


def test_min_norm_and_labels_match_ours():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        g = rng.normal(size=(n, 40)) + rng.normal(size=(1, 40))
        gram = g @ g.T
        theirs = solver.min_norm_weights(gram)
        ours = np.asarray(jax.jit(mgda.min_norm_reference)(jnp.asarray(gram, jnp.float32)))
        np.testing.assert_allclose(ours, theirs, atol=2e-4)
        assert abs(theirs.sum() - 1) < 1e-9 and theirs.min() >= 0
    grads = [[torch.from_numpy(g[i, :30].reshape(5, 6)), torch.from_numpy(g[i, 30:])]
             for i in range(len(g))]
    np.testing.assert_allclose(solver.gram_matrix(grads), g @ g.T, rtol=1e-6)
    labels = rng.integers(0, 2, (4, 5)).astype(np.float32)
    np.testing.assert_array_equal(
        np.stack([c.numpy() for c in solver.create_labels(torch.from_numpy(labels))]),
        np.asarray(stargan_conditions(labels)))
    np.testing.assert_allclose(
        list(solver.kpi_weights({"a": 0.5, "b": 3.0, "c": 0.0}).values()),
        [0.5 * np.log(2), 0.0, -(1 - 1e-13) * np.log(1e-13)])


def test_component_table_and_summary(capsys):
    from experiments import bench

    ours = [{"piece": p, "step_s": v, "kind": k} for p, v, k in (
        ("clean_pass", 1.0, "partition"), ("generator_pass", 0.5, "partition"),
        ("target stargan", 2.0, "partition"), ("target_gradients (all, chained)", 2.5, "inside"),
        ("identity fwd+bwd (4 outputs, per target)", 0.25, "inside"),
        ("weigh_tasks", 0.75, "partition"), ("solver (kpi weights)", 0.0, "inside"),
        ("apply_gradients", 0.125, "partition"),
        ("Grad-CAM++ heatmap (not in our step: from the data cache)", 3.0, "extra"))]
    theirs = [{"section": s, "step_s": v} for s, v in (
        ("gradcam", 4.0), ("generator forward", 1.0), ("clean stargan", 2.0),
        ("forward stargan", 3.0), ("identity + resizes", 1.0), ("backward", 8.0),
        ("optimizer", 0.5))]
    table = anchor.component_table(ours, theirs, ["stargan"], "kpi", 4.5, 20.0)
    rows = {line[:52].strip(): line[52:].split() for line in table.splitlines()[2:]}
    assert rows["target stargan"] == ["2.0000", "3.0000"]
    assert rows["Grad-CAM++ heatmap"] == ["3.0000", "(x)", "4.0000"]
    assert rows["identity network + resizes"] == ["0.2500", "(in)", "1.0000"]
    assert rows["losses"] == ["-", "-"]
    assert rows["sum of our partition / of all torch sections"] == ["4.3750", "19.5000"]
    bench._print_anchor_summary([
        {"bench": "anchor_step", "image_size": 64, "batch_size": 4, "targets": ["a"] * 5,
         "identity": "arcface", "strategy": "kpi", "torch_step_s": 15.0, "ours_step_s": 5.0,
         "speedup": 3.0},
        {"bench": "anchor_protect", "side": "ours", "dtype": "float32", "variant": "float32",
         "ngf": 64, "image_size": 256, "batch_size": 4, "s_per_image": 0.2},
        {"bench": "anchor_protect", "side": "torch", "dtype": "float32", "variant": "float32",
         "batch_size": 4, "s_per_image": 0.3}])
    err = capsys.readouterr().err
    assert "| train step, 64 px, batch 4, 5 targets + arcface, kpi | 15.000 s | 5.000 s | " \
           "3.00x |" in err
    assert "ours float32 vs torch float32 | 0.3000 s/img | 0.2000 s/img | 1.50x |" in err


def test_repeat_check_and_its_warning(capsys):
    """Our first step called twice on the same state: 0 where the calls agree, the largest
    relative difference per quantity where not, and a warning naming the cause."""
    names = ("stargan", "hisd")
    first = {"stargan/loss": -0.2, "stargan/lambda": 6.5, "hisd/loss": -0.1, "hisd/lambda": 740.0}
    assert anchor._repeat_check(first, dict(first), names) == {"loss": 0.0, "weights": 0.0}
    anchor._warn_repeat({"loss": 0.0, "weights": 0.0})
    assert capsys.readouterr().err == ""
    again = {**first, "stargan/loss": -0.2002, "hisd/lambda": 740.74}
    repeat = anchor._repeat_check(first, again, names)
    assert repeat["loss"] == pytest.approx(1e-3) and repeat["weights"] == pytest.approx(1e-3)
    anchor._warn_repeat(repeat)
    assert "not deterministic" in capsys.readouterr().err
