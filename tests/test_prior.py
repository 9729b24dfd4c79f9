"""Gradient prior perturbation: surrogate training, PGD, averaging, bundles and the CLI.

Runs at 32 px with a 4-channel, 2-level surrogate on the shared CelebA-HQ faces (read in place
from ../shared/data/faces/celebahq (tests/conftest.py); never copied into the repository).
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax.training import prior
from idguard_jax.training import surrogate as surrogate_lib
from idguard_jax.checkpoint import read_meta
from idguard_jax.data.datasets import load_folder
from idguard_jax.images import resize_align_corners, to_float
from ports.layers import clamp

from conftest import SHARED_FACES

REPO = Path(__file__).resolve().parents[1]
FACES = Path(SHARED_FACES) / "celebahq"
CLI = REPO / "experiments" / "prior.py"

SIZE, WIDTH, DEPTH = 32, 4, 2
EPS, STEPS, STEP = 0.05, 10, 0.01


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    if not FACES.is_dir():
        pytest.fail(f"{FACES}: the shared test faces are missing (expected beside the repo)")
    images, _ = load_folder(FACES, SIZE)
    assert images.shape == (36, SIZE, SIZE, 3)
    return images


@pytest.fixture(scope="module")
def surrogate(faces):
    """A surrogate trained for 60 steps, its step wrapped so that a second trace fails."""
    model = surrogate_lib.SurrogateAutoencoder(width=WIDTH, depth=DEPTH)
    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(surrogate_lib, "_train_step",
                   chex.assert_max_traces(surrogate_lib._train_step, n=1))
        variables = surrogate_lib.train_surrogate(faces, steps=60, batch_size=8, learning_rate=3e-3,
                                          seed=0, width=WIDTH, depth=DEPTH, log_every=20,
                                          callback=logs.append)
    initial = surrogate_lib.train_surrogate(faces, steps=0, seed=0, width=WIDTH, depth=DEPTH)
    return model, variables, initial, logs


@pytest.fixture(scope="module")
def pgd_batch(faces, surrogate):
    """PGD perturbations of 8 images, two of them saturated at +1 / -1 (tests the [-1,1] clamp)."""
    model, variables, _, _ = surrogate
    x = np.asarray(to_float(faces[:8]))
    x[6] = 1.0
    x[7] = -1.0
    keys = prior.image_keys(jax.random.key(7), 0, 8)
    d = prior.pgd_perturbations(model.apply, variables, x, keys=keys, eps=EPS, steps=STEPS,
                                step_size=STEP)
    return x, np.asarray(d)


def test_train_surrogate_lowers_loss_and_traces_once(faces, surrogate):
    model, variables, initial, logs = surrogate
    before = surrogate_lib.reconstruction_loss(model.apply, initial, faces)
    after = surrogate_lib.reconstruction_loss(model.apply, variables, faces)
    assert after < 0.5 * before, (before, after)
    assert [m["step"] for m in logs] == [20, 40, 60]
    assert logs[-1]["loss"] < logs[0]["loss"]
    # The same seed gives the same initialisation; init has the right structure.
    again = surrogate_lib.init_surrogate(0, model, SIZE)
    chex.assert_trees_all_equal(again, initial)
    assert set(initial["params"]) == {"enc_in", "enc_1", "enc_2", "dec_2", "dec_1", "dec_out"}


def test_pgd_bounded_by_eps(pgd_batch):
    x, d = pgd_batch
    assert d.shape == x.shape
    assert np.abs(d).max() <= EPS + 1e-6
    assert (x + d).min() >= -1.0 - 1e-6 and (x + d).max() <= 1.0 + 1e-6
    # Saturated images can only move inwards; the others are pushed to the bound almost everywhere.
    assert d[6].max() <= 1e-6 and d[7].min() >= -1e-6
    assert np.mean(np.abs(d[:6]) > 0.9 * EPS) > 0.5


def test_pgd_disrupts_more_than_zero_and_random_noise(surrogate, pgd_batch):
    model, variables, _, _ = surrogate
    x, d = pgd_batch
    x, d = x[:6], d[:6]  # the real faces
    uniform = jax.random.uniform(jax.random.key(3), x.shape, jnp.float32, -EPS, EPS)
    signs = EPS * jnp.sign(jax.random.normal(jax.random.key(4), x.shape))  # corners of the box
    dis = lambda p: np.asarray(prior.reconstruction_disruption(model.apply, variables, x, p))
    d_pgd, d_zero = dis(d), dis(np.zeros_like(d))
    d_unif, d_sign = dis(uniform), dis(signs)
    np.testing.assert_array_equal(d_zero, 0.0)
    assert np.all(d_pgd > 1e-4), d_pgd
    assert np.all(d_pgd > 5 * d_unif), (d_pgd, d_unif)
    assert np.all(d_pgd > 5 * d_sign), (d_pgd, d_sign)


def _reference_pgd_one(apply_fn, variables, x, key):
    """disrupting-deepfakes LinfPGDAttack.perturb on ONE image (1, H, W, 3), written out."""
    y = apply_fn(variables, x)
    xa = x + jax.random.uniform(key, x.shape[1:], jnp.float32, -EPS, EPS)[None]
    loss = lambda z: jnp.mean((apply_fn(variables, z) - y) ** 2)
    for _ in range(STEPS):
        xa = xa + STEP * jnp.sign(jax.grad(loss)(xa))
        eta = clamp(xa - x, -EPS, EPS)
        xa = clamp(x + eta, -1.0, 1.0)
    return xa - x


def test_prior_is_mean_of_per_image_pgd(faces, surrogate):
    model, variables, _, _ = surrogate
    n, key = 5, jax.random.key(11)
    images = faces[10:10 + n]  # uint8: converted batch by batch
    logs = []
    delta_p = prior.pgd_prior(model.apply, variables, images, key=key, batch_size=4,
                              callback=logs.append)  # 2 batches, the last one padded
    assert delta_p.shape == (SIZE, SIZE, 3) and delta_p.dtype == jnp.float32
    one = jax.jit(lambda x, k: _reference_pgd_one(model.apply, variables, x, k))
    per_image = [np.asarray(one(jnp.asarray(to_float(images[i:i + 1])),
                                jax.random.fold_in(key, i)))[0] for i in range(n)]
    np.testing.assert_allclose(np.asarray(delta_p), np.mean(per_image, axis=0), atol=1e-6)
    assert np.abs(np.asarray(delta_p)).max() <= EPS + 1e-6
    assert [m["images_done"] for m in logs] == [4, 5]
    x = to_float(images)
    dis = prior.reconstruction_disruption(model.apply, variables, x, np.stack(per_image))
    np.testing.assert_allclose(logs[-1]["disruption"], float(np.mean(dis)), rtol=1e-4)


def test_prior_bundle_roundtrip_and_resize(tmp_path):
    d16 = np.asarray(jax.random.uniform(jax.random.key(0), (16, 16, 3), jnp.float32, -EPS, EPS))
    path = prior.save_prior(tmp_path / "p", d16, {"eps": EPS})
    meta = read_meta(path)
    assert meta["kind"] == "idguard-prior" and meta["image_size"] == [16, 16] and meta["eps"] == EPS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(prior.load_prior(path, 16)), d16)
    with pytest.warns(UserWarning, match="resizing it to 32x32"):
        d32 = prior.load_prior(path, 32)
    assert d32.shape == (32, 32, 3)
    np.testing.assert_allclose(np.asarray(d32),
                               np.asarray(resize_align_corners(jnp.asarray(d16)[None], 32)[0]),
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(d32)[[0, -1]][:, [0, -1]], d16[[0, -1]][:, [0, -1]],
                               atol=1e-7)  # align_corners keeps the corners
    with pytest.raises(FileExistsError):
        prior.save_prior(path, d16, {})
    prior.save_prior(path, d16 * 0, {}, overwrite=True)
    assert np.all(np.asarray(prior.load_prior(path)) == 0)


def test_surrogate_bundle_roundtrip_and_kind_checks(tmp_path, surrogate, faces):
    model, variables, _, _ = surrogate
    spath = surrogate_lib.save_surrogate(tmp_path / "s", model, variables, {"image_size": SIZE})
    model2, variables2, meta = surrogate_lib.load_surrogate(spath)
    assert model2 == model and meta["kind"] == "idguard-surrogate" and meta["image_size"] == SIZE
    x = to_float(faces[:2])
    np.testing.assert_array_equal(np.asarray(model2.apply(variables2, x)),
                                  np.asarray(model.apply(variables, x)))
    with pytest.raises(ValueError, match="not a prior bundle"):
        prior.load_prior(spath, SIZE)
    ppath = prior.save_prior(tmp_path / "p", np.zeros((SIZE, SIZE, 3)), {})
    with pytest.raises(ValueError, match="not a surrogate bundle"):
        surrogate_lib.load_surrogate(ppath)


def _run(capsys, *argv):
    from experiments.prior import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return rc, lines, err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_end_to_end(tmp_path, capsys):
    s_dir, p_dir = tmp_path / "surrogate", tmp_path / "prior"
    rc, lines, err = _run(capsys, "train-surrogate", FACES, s_dir, "--size", SIZE, "--steps", 20,
                          "--batch-size", 8, "--width", WIDTH, "--depth", DEPTH,
                          "--max-images", 8, "--log-every", 10, "--learning-rate", 3e-3)
    assert rc == 0, err
    assert [m["step"] for m in lines if m["event"] == "train"] == [10, 20]
    assert lines[0]["num_images"] == 8 and lines[-1]["event"] == "done"
    assert read_meta(s_dir)["kind"] == "idguard-surrogate"

    rc, lines, err = _run(capsys, "compute", FACES, p_dir, "--surrogate", s_dir,
                          "--num-images", 100, "--batch-size", 16, "--seed", 3)
    assert rc == 0, err
    assert "capped at the 36 images" in err
    assert any(m["event"] == "note" and m["num_images"] == 36 for m in lines)
    assert [m["images_done"] for m in lines if m["event"] == "pgd"] == [36]
    done = lines[-1]
    assert done["event"] == "done" and done["num_images"] == 36 and done["size"] == SIZE
    assert done["prior_linf"] <= EPS + 1e-6 and done["pgd_disruption"] > done["noise_disruption"]
    meta = read_meta(p_dir)
    assert meta["kind"] == "idguard-prior" and len(meta["images"]) == 36
    assert meta["steps"] == STEPS and meta["step_size"] == STEP and meta["eps"] == EPS
    delta_p = prior.load_prior(p_dir, SIZE)
    assert delta_p.shape == (SIZE, SIZE, 3) and float(jnp.abs(delta_p).max()) <= EPS + 1e-6
    assert (p_dir / "delta_p.png").is_file()

    # Existing outputs are refused (exit 2, nothing touched) unless --overwrite.
    before_p, before_s = _snapshot(p_dir), _snapshot(s_dir)
    rc, _, err = _run(capsys, "compute", FACES, p_dir, "--surrogate", s_dir)
    assert rc == 2 and str(p_dir) in err and "--overwrite" in err
    rc, _, err = _run(capsys, "train-surrogate", FACES, s_dir, "--size", SIZE, "--steps", 1)
    assert rc == 2 and str(s_dir) in err and "--overwrite" in err
    assert _snapshot(p_dir) == before_p and _snapshot(s_dir) == before_s

    # Clear errors naming the folder or option.
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, "compute", tmp_path / "nope", tmp_path / "o1", "--surrogate", s_dir)
    assert rc == 2 and "nope" in err and "no such folder" in err
    rc, _, err = _run(capsys, "compute", empty, tmp_path / "o2", "--surrogate", s_dir)
    assert rc == 2 and "no images" in err and str(empty) in err
    rc, _, err = _run(capsys, "compute", FACES, tmp_path / "o3", "--surrogate", p_dir)
    assert rc == 2 and "--surrogate" in err and "not a surrogate bundle" in err
    rc, _, err = _run(capsys, "train-surrogate", empty, tmp_path / "o4", "--size", SIZE)
    assert rc == 2 and "no images" in err
    rc, _, err = _run(capsys, "train-surrogate", FACES, tmp_path / "o5", "--size", 30)
    assert rc == 2 and "--size" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_runs_as_a_file(tmp_path):
    """`python experiments/prior.py ...` from another folder: imports work, errors exit 2."""
    r = subprocess.run([sys.executable, str(CLI), "compute", str(tmp_path / "nope"),
                        str(tmp_path / "out"), "--surrogate", str(tmp_path / "nope_s")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--surrogate" in r.stderr and "no such folder" in r.stderr
