"""The train step: its gradients, strategies, conditions, tracing, and that training disrupts.

All at the tiny configuration (32 px, narrow random networks) with STAND-IN masks, a uniform
heatmap, random labels and a random stand-in identity network.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax import config
from idguard_jax.data import datasets as data
from idguard_jax.data import loader
from idguard_jax.training import mgda
from idguard_jax.networks import targets
from idguard_jax.training import step as train
from idguard_jax.training.frozen import Frozen, init_frozen_random
from idguard_jax.generator import perturb
from idguard_jax.training.losses import branch_losses
from idguard_jax.training.strategies import weights_from_values


@pytest.fixture(scope="module")
def faces(shared_faces_dir):
    return data.folder_dataset(shared_faces_dir, 32, seed=0)


def _setup(**kw):
    cfg = config.tiny(**kw)
    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0),
                             delta_p=0.03 * jax.random.normal(jax.random.key(5), (32, 32, 3)))
    frozen = init_frozen_random(cfg, jax.random.key(1))
    return setup, state, frozen


def naive_losses(setup, state, batch, frozen, params, delta_p, channel=lambda a: a):
    """Per-target L_k written the plain way: separate forwards, no vjp tricks, no batching;
    every image the targets see passed through `channel` (tests/test_robust_step.py)."""
    cfg = setup.cfg
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    x_adv, x_pri, _ = perturb(setup.generator, {"params": params, "batch_stats": state.batch_stats},
                              delta_p, x, cfg.eps, train=True)
    idn, idv = setup.identity, frozen.identity
    out = []
    for t in setup.targets:
        tv = frozen.targets[t.name]
        c = t.select(t.conditions(batch["labels"]), state.step % t.num_conditions)
        o, f = jax.lax.stop_gradient(t.forward(tv, channel(x), c))
        ido = jax.lax.stop_gradient(idn.features(idv, o))
        total = 0.0
        for xb in (x_adv, x_pri):
            oa, fa = t.forward(tv, channel(xb), c)
            total += branch_losses(cfg.loss, o, f, ido, oa, fa, idn.features(idv, oa),
                                   batch["mask"].astype(jnp.float32), batch["heatmap"])["total"]
        out.append(total)
    return jnp.stack(out)


def _batch(faces, idx=(0, 1)):
    return loader.batch_at(faces, np.asarray(idx))


def _close(a, b, rtol=2e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        assert float(jnp.max(jnp.abs(x - y))) <= rtol * scale


@pytest.mark.parametrize("strategy", ["kpi", "mgda"])
def test_gradients_equal_plain_autodiff(faces, strategy):
    """The step's vjp plumbing gives exactly grad(sum_k lambda_k L_k) (and, for MGDA, lambda
    is the min-norm point of the plain per-target parameter gradients)."""
    setup, state, frozen = _setup(strategy=strategy, targets=("stargan", "aggan"))
    batch = _batch(faces)
    g = jax.jit(functools.partial(train.compute_gradients, setup))(state, batch, frozen)
    grads, w, metrics = g.grads, g.weights, g.metrics
    naive = functools.partial(naive_losses, setup, state, batch, frozen)
    L = jax.jit(naive)(state.params, state.delta_p)
    np.testing.assert_allclose([metrics["stargan/loss"], metrics["aggan/loss"]], L, rtol=1e-5)
    if strategy == "mgda":
        per_task = jax.jit(jax.jacrev(naive, argnums=0))(state.params, state.delta_p)
        w_ref = mgda.min_norm(mgda.gram_matrix(per_task), "reference")
        np.testing.assert_allclose(w, w_ref, atol=1e-4)
    else:
        w_ref, _ = weights_from_values("kpi", jnp.stack([metrics["stargan/kpi"],
                                       metrics["aggan/kpi"]]), setup.alpha, state.strategy_state)
        np.testing.assert_allclose(w, w_ref, rtol=1e-5)
    ref = jax.jit(jax.grad(lambda p, d: jnp.dot(w, naive(p, d)), argnums=(0, 1)))(
        state.params, state.delta_p)
    _close(grads["params"], ref[0])
    _close(grads["delta_p"], ref[1])


FIVE = ("stargan", "aggan", "fpgan", "relgan", "hisd")


@pytest.mark.parametrize("strategy", ["equal", "prior", "dtp", "hmm"])
def test_each_strategy_steps_with_all_five_targets(faces, strategy, fast_compile):
    setup, state, frozen = _setup(strategy=strategy, targets=FIVE)
    step = train.make_train_step(setup)
    for i in range(2):
        state, m = step(state, _batch(faces, (2 * i, 2 * i + 1)), frozen)
    lam = np.array([m[f"{t}/lambda"] for t in FIVE])
    kpi = np.array([m[f"{t}/kpi"] for t in FIVE])
    assert np.all(np.isfinite(list(m.values())))
    for t in FIVE:   # per-target metrics name each target
        assert {f"{t}/loss", f"{t}/mask_adv", f"{t}/id_pri", f"{t}/feat_adv"} <= set(m)
    if strategy == "equal":
        np.testing.assert_array_equal(lam, 1)
    elif strategy == "prior":
        np.testing.assert_array_equal(lam, [1, 10, 1, 10, 100])   # the reference's alphas
    elif strategy == "hmm":
        np.testing.assert_array_equal(lam, np.eye(5)[np.argmin(kpi)])
    elif strategy == "dtp":
        assert np.all(lam > 0)
        assert np.all(np.asarray(state.strategy_state["kpi_ema"]) > 0)
    assert int(state.step) == 2


def test_mgda_variants_step(faces):
    """MGDA-UB (gradients w.r.t. the generated images) and the exact solver run and give
    simplex weights."""
    setup, state, frozen = _setup(strategy="mgda", mgda_gradients="perturbation",
                                  mgda_solver="exact", targets=("stargan", "fpgan"))
    state, m = train.make_train_step(setup)(state, _batch(faces), frozen)
    lam = np.array([m["stargan/lambda"], m["fpgan/lambda"]])
    assert abs(lam.sum() - 1) < 1e-5 and np.all(lam >= 0)


def test_step_is_traced_once(faces):
    setup, state, frozen = _setup(targets=("stargan",))
    @chex.assert_max_traces(n=1)
    def step_fn(state, batch, frozen):
        return train.train_step(setup, state, batch, frozen)

    step = jax.jit(step_fn, donate_argnums=(0,))
    for i in range(3):   # new batches, new step counter (condition index), same program
        state, _ = step(state, _batch(faces, (i, i + 5)), frozen)
    assert int(state.step) == 3


def test_conditions_follow_the_reference():
    labels = jnp.array([[1, 0, 0, 1, 0], [0, 0, 1, 0, 1]], jnp.float32)
    c = np.asarray(targets.stargan_conditions(labels))
    assert c.shape == (5, 2, 5)
    np.testing.assert_array_equal(c[0], [[1, 0, 0, 1, 0], [1, 0, 0, 0, 1]])  # black hair
    np.testing.assert_array_equal(c[1], [[0, 1, 0, 1, 0], [0, 1, 0, 0, 1]])  # blond hair
    np.testing.assert_array_equal(c[2], [[0, 0, 1, 1, 0], [0, 0, 1, 0, 1]])  # brown hair
    np.testing.assert_array_equal(c[3], [[1, 0, 0, 0, 0], [0, 0, 1, 1, 1]])  # flip male
    np.testing.assert_array_equal(c[4], [[1, 0, 0, 1, 1], [0, 0, 1, 0, 0]])  # flip young


def test_condition_is_step_mod_count(faces):
    """Step s uses condition s mod 5; the all-conditions option averages over the five."""
    setup, state, frozen = _setup(targets=("stargan",))
    batch = _batch(faces)
    grads = jax.jit(functools.partial(train.compute_gradients, setup))
    per_cond = []
    for s in range(5):
        m = grads(state.replace(step=jnp.asarray(s + 5, jnp.int32)), batch, frozen).metrics
        per_cond.append(float(m["stargan/loss"]))
        naive = naive_losses(setup, state.replace(step=jnp.asarray(s, jnp.int32)), batch, frozen,
                              state.params, state.delta_p)
        np.testing.assert_allclose(per_cond[-1], naive[0], rtol=1e-5)
    assert len(set(np.round(per_cond, 6))) > 1
    setup_all = dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, all_conditions=True))
    m = jax.jit(functools.partial(train.compute_gradients, setup_all))(
        state, batch, frozen).metrics
    np.testing.assert_allclose(float(m["stargan/loss"]), np.mean(per_cond), rtol=1e-5)


@pytest.mark.parametrize("identity", ["standin", "dlib", "arcface"])
def test_bfloat16_reaches_every_network(identity):
    """Under dtype=bfloat16 the generator, every target and the identity network compute in
    bfloat16 (their modules' compute dtype; the parameters stay float32)."""
    cfg = config.tiny(dtype="bfloat16", targets=FIVE, identity=identity,
                      identity_config=(("width", 4),) if identity == "standin" else ())
    setup = train.create_setup(cfg)
    assert setup.generator.dtype == jnp.bfloat16
    assert [t.module.dtype for t in setup.targets] == [jnp.bfloat16] * len(FIVE)
    assert setup.identity.module.dtype == jnp.bfloat16


def test_bfloat16_step_runs(faces):
    setup, state, frozen = _setup(dtype="bfloat16", targets=("stargan",))
    state, m = train.make_train_step(setup)(state, _batch(faces), frozen)
    assert np.isfinite(float(m["objective"]))
    assert state.params["model0_1"]["kernel"].dtype == jnp.float32   # float32 master weights


@pytest.mark.parametrize("strategy", ["kpi", "mgda"])
def test_short_run_raises_every_targets_disruption(faces, strategy):
    """A few steps on the shared faces raise each of the five targets' loss L_k on held-out
    faces (tiny random targets, stand-in identity network and masks)."""
    setup, state, frozen = _setup(strategy=strategy, learning_rate=1e-2, batch_size=4, ngf=8,
                                  targets=FIVE)
    held_out = loader.batch_at(faces, np.arange(28, 36))
    evaluate = jax.jit(lambda st: train.compute_gradients(setup, st, held_out, frozen).metrics)
    before = evaluate(state)
    step = train.make_train_step(setup)
    sampler = loader.BatchSampler(28, 4, seed=0)
    for i in range(24):
        state, _ = step(state, loader.batch_at(faces, sampler.indices(i)), frozen)
    after = evaluate(state)
    for name in FIVE:   # margin far above float noise (~1e-7); rises seen: 4e-4 (relgan) to 4e-2
        assert float(after[f"{name}/loss"]) > float(before[f"{name}/loss"]) + 2e-4, name


def test_dlib_identity_loss_in_the_step(shared_faces_dir):
    """With the real offline dlib network the identity loss is minus the cosine of the
    descriptors of chips cut where the CLEAN faces' landmarks say, and it trains."""
    from idguard_jax.networks import dlib as dlib_face
    from idguard_jax.networks import identity
    faces = data.folder_dataset(shared_faces_dir, 64, limit=4, landmarks=True)
    cfg = config.tiny(image_size=64, targets=("stargan",), identity="dlib", identity_config=())
    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(0))
    net, ivars = identity.load("dlib", "no-such-weights-dir")       # the installed .dat
    tvars = targets.init_random("stargan", jax.random.key(1), image_size=64,
                                config=targets.size_config("stargan", "tiny"))[1]
    frozen = Frozen(targets={"stargan": tvars}, identity=ivars)
    batch = loader.batch_at(faces, np.arange(2))
    g = jax.jit(functools.partial(train.compute_gradients, setup))(state, batch, frozen)
    grads, m = g.grads, g.metrics
    x = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1
    warp = batch["chip_warp"]
    np.testing.assert_allclose(net.features(ivars, x, batch["chip_warp"]),
                               dlib_face.face_descriptors(ivars, x, warp), atol=1e-5)
    x_adv, _, _ = perturb(setup.generator, {"params": state.params,
                          "batch_stats": state.batch_stats}, state.delta_p, x, cfg.eps, train=True)
    c = setup.targets[0].select(setup.targets[0].conditions(batch["labels"]), 0)
    o, _ = setup.targets[0].forward(tvars, x, c)
    oa, _ = setup.targets[0].forward(tvars, x_adv, c)
    d, da = (dlib_face.face_descriptors(ivars, y, warp) for y in (o, oa))
    cos = jnp.sum(d * da, -1) / (jnp.linalg.norm(d, axis=-1) * jnp.linalg.norm(da, axis=-1))
    np.testing.assert_allclose(m["stargan/id_adv"], -jnp.mean(cos), rtol=1e-4)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["params"]["model0_1"]["kernel"]).max()) > 0


def test_demo_trains_against_the_stand_ins_evaluation_scores():
    """The demo's random targets are `evaluate.py --config demo`'s for the same seed, whichever
    targets either names and in whatever order; another seed draws other networks."""
    from idguard_jax.evaluation import measure
    from idguard_jax.training.frozen import init_frozen_demo

    cfg = config.tiny(seed=3)
    trained = init_frozen_demo(cfg).targets
    scored = measure.load_models(tuple(reversed(cfg.targets)), image_size=cfg.image_size,
                                 size=cfg.target_size, seed=3)
    chex.assert_trees_all_equal(trained, scored.variables)
    alone = measure.load_models(cfg.targets[-1:], image_size=cfg.image_size,
                                size=cfg.target_size, seed=3)
    chex.assert_trees_all_equal(trained[cfg.targets[-1]], alone.variables[cfg.targets[-1]])
    other = measure.load_models(cfg.targets[:1], image_size=cfg.image_size,
                                size=cfg.target_size, seed=4)
    leaf = lambda tree: jax.tree.leaves(tree)[0]
    assert not np.allclose(leaf(other.variables[cfg.targets[0]]), leaf(trained[cfg.targets[0]]))
