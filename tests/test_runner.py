"""The training loop: exact resume, refusals, the train command line, multi-device equality."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from idguard_jax import config
from idguard_jax.data import datasets as data
from idguard_jax.training.frozen import init_frozen_random
from idguard_jax.training.runner import fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_faces(shared_faces_dir):
    return data.folder_dataset(shared_faces_dir, 32, seed=0, limit=8)


def _run(cfg, faces, workdir, **kw):
    frozen = init_frozen_random(cfg, jax.random.key(1))
    return fit(cfg, faces, frozen, str(workdir), log=lambda line: None, progress=False, **kw)


def test_resume_gives_the_same_steps_as_not_stopping(small_faces, tmp_path):
    cfg = config.tiny(targets=("stargan",), strategy="dtp", num_steps=4, checkpoint_every=2)
    straight = _run(cfg, small_faces, tmp_path / "a")
    _run(config.tiny(targets=("stargan",), strategy="dtp", num_steps=2, checkpoint_every=2),
         small_faces, tmp_path / "b")
    resumed = _run(cfg, small_faces, tmp_path / "b", resume=True)
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert "stargan/lambda" in lines[-1] and "stargan/mask_adv" in lines[-1]
    # the exported generator protects with the trained weights
    from idguard_jax.protection import faces as protect
    gen = protect.load(tmp_path / "b" / "generator")
    np.testing.assert_array_equal(np.asarray(gen.delta_p), np.asarray(resumed.delta_p))


def test_refuses_to_train_over_an_existing_run(small_faces, tmp_path):
    cfg = config.tiny(targets=("stargan",), num_steps=1)
    _run(cfg, small_faces, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(cfg, small_faces, tmp_path)
    with pytest.raises(ValueError, match="strategy"):
        _run(config.tiny(targets=("stargan",), num_steps=2, strategy="equal"), small_faces,
             tmp_path, resume=True)
    with pytest.raises(ValueError, match="robust"):     # another lossy-channel spec
        _run(config.tiny(targets=("stargan",), num_steps=2, robust="jpeg:75"), small_faces,
             tmp_path, resume=True)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "experiments/train.py", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_paper_config_says_what_is_missing(tmp_path):
    r = _cli("--strategy=kpi", "--weights", str(tmp_path), "--data", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "no such folder" in r.stderr
    for t in ("stargan", "aggan", "fpgan"):
        assert f"python convert/convert.py {t} CHECKPOINT" in r.stderr
    r = _cli("--set", "batch_size=x")
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_demo_command_runs(tmp_path, shared_faces_dir):
    """The demo with its real parts, dlib's identity network and landmark masks (one target,
    to stay cheap); the landmarks are cached in the run's workdir, not beside the faces."""
    before = sorted(os.listdir(shared_faces_dir))
    r = _cli("--config=demo", "--workdir", str(tmp_path / "run"), "--steps", "2",
             "--set", "image_size=32", "--set", "checkpoint_every=1", "--set", "targets=stargan")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["stargan/id_adv"]) for x in lines)
    assert "DEMO: only the targets are RANDOM" in r.stderr
    assert "dlib's real face recognition network" in r.stderr
    assert "masks: filled, dilated hulls of dlib's 68 landmarks" in r.stderr
    assert os.path.isfile(tmp_path / "run" / "face_landmarks.npz")
    assert sorted(os.listdir(shared_faces_dir)) == before
    assert os.path.isdir(tmp_path / "run" / "generator")


MULTI_DEVICE = textwrap.dedent("""
    import functools, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from idguard_jax import config
    from idguard_jax.data import datasets as data
    from idguard_jax.data import loader
    from idguard_jax.training import step as train
    from idguard_jax.training.frozen import init_frozen_random
    from idguard_jax.training.runner import data_mesh, replicate, shard_batch
    assert len(jax.devices()) == 2
    cfg = config.tiny(targets=("stargan", "fpgan"), batch_size=4, strategy="STRATEGY")
    setup = train.create_setup(cfg)
    state0 = train.init_state(setup, jax.random.key(0),
                              delta_p=0.03 * jax.random.normal(jax.random.key(2), (32, 32, 3)))
    frozen = init_frozen_random(cfg, jax.random.key(1))
    faces = data.folder_dataset(FACES, 32, limit=8)
    grads, states, metrics = [], [], []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = data_mesh(devices)
        state, fr = replicate(mesh, state0), replicate(mesh, frozen)
        batches = [shard_batch(mesh, loader.batch_at(faces, np.arange(4 * i, 4 * i + 4)))
                   for i in range(2)]
        assert len(batches[0]["image"].sharding.device_set) == len(devices)
        grads.append(jax.device_get(jax.jit(functools.partial(train.compute_gradients, setup))(
            state, batches[0], fr).grads))
        step = train.make_train_step(setup, donate=False)
        for b in batches:
            state, m = step(state, b, fr)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))

    def worst(a, b, relative):
        out = 0.0
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            d = float(np.max(np.abs(x - y)))
            out = max(out, d / (np.max(np.abs(x)) + 1e-30) if relative else d)
        return out
    print("GRAD", worst(grads[0], grads[1], True))
    print("PARAMS", worst(states[0].params, states[1].params, False))
    print("LOSS", max(abs(metrics[0][k] / metrics[1][k] - 1) for k in metrics[0]
                      if k.endswith("/loss")))
""")


@pytest.mark.parametrize("strategy", ["kpi", "mgda"])
def test_two_devices_match_one(strategy, shared_faces_dir):
    script = MULTI_DEVICE.replace("STRATEGY", strategy).replace("FACES", repr(shared_faces_dir))
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr[-3000:]
    found = dict(line.split() for line in r.stdout.splitlines() if line[:4] in ("GRAD", "PARA", "LOSS"))
    # Gradients agree to float32 reduction-order noise; parameters after two Adam steps to well
    # under one step size (Adam normalises away the scale of a gradient, so sign flips of
    # near-zero gradient entries can move a weight by up to ~lr).
    assert float(found["GRAD"]) < 1e-4, found
    assert float(found["PARAMS"]) < 2e-4, found
    assert float(found["LOSS"]) < 1e-5, found
