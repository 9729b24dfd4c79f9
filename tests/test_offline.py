"""The offline experiment: a face model trained here as the target (networks.learned), the
split by identity, its registration, and one --config=offline train step against it.

At a tiny size (32 px, a width-4 autoencoder, a few steps, the stand-in identity network and box
masks): seconds. The real figures come from experiments/offline.py at 64 px (README)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax import config
from idguard_jax.data.datasets import load_folder
from idguard_jax.evaluation import baselines
from idguard_jax.image_files import list_images
from idguard_jax.networks import learned, targets
from idguard_jax.training.frozen import load_frozen

TINY = targets.size_config("face_ae", "tiny")


def test_split_holds_out_whole_identities(shared_faces_dir, tmp_path):
    paths = list_images(shared_faces_dir)
    train, held = learned.split_by_identity(paths)
    ids_train = {learned.identity_of(p) for p in train}
    ids_held = {learned.identity_of(p) for p in held}
    assert not ids_train & ids_held and sorted(train + held) == sorted(paths)
    assert len(ids_held) == len(ids_train | ids_held) // 3 and len(held) == len(ids_held)
    assert learned.identity_of("x/ref_female_015248.png") == "015248"
    # two files of one person stay on one side
    pair = ["a/src_male_1.png", "b/ref_male_1.png", "c/src_male_2.png", "d/src_male_3.png"]
    train, held = learned.split_by_identity(pair, held_out_every=2)
    assert {learned.identity_of(p) for p in held} == {"1", "3"} and len(held) == 3
    with pytest.raises(ValueError, match="too few"):
        learned.split_by_identity(pair[:1])
    # the split is links to the faces (never copies); another folder's content is refused
    folder = learned.link_split(paths[:2], tmp_path / "held")
    assert all(os.path.islink(os.path.join(folder, n)) for n in os.listdir(folder))
    assert learned.link_split(paths[:2], tmp_path / "held") == folder       # kept as it is
    with pytest.raises(FileExistsError, match="other files"):
        learned.link_split(paths[:3], tmp_path / "held")


def test_the_autoencoder_learns_to_reconstruct_faces(shared_faces_dir):
    images, _ = load_folder(shared_faces_dir, 32, limit=8)
    target = targets.build("face_ae", TINY)
    before = learned.train_autoencoder(images, steps=0, config=TINY)
    after = learned.train_autoencoder(images, steps=60, batch_size=8, learning_rate=3e-3,
                                      config=TINY)
    q0 = learned.reconstruction_quality(target, before, images)
    q1 = learned.reconstruction_quality(target, after, images)
    # measured: L1 0.54 -> 0.28, PSNR 10.4 -> 14.6 dB
    assert q1["l1_mean"] < 0.7 * q0["l1_mean"] and q1["psnr_mean"] > q0["psnr_mean"] + 2
    y, features = target.forward(after, jnp.asarray(images[:2] / 127.5 - 1, jnp.float32),
                                 target.select(target.conditions(jnp.zeros((2, 5))), 0))
    assert y.shape == (2, 32, 32, 3) and features.shape == (2, 8, 8, 4 * 4)


def _run_target_command(faces, workdir, *extra):
    from experiments import offline

    return offline.main(["target", "--faces", faces, "--workdir", str(workdir), "--size", "tiny",
                         "--image-size", "32", "--steps", "3", "--batch-size", "4",
                         "--log-every", "3", "--no-judge", *extra])


def _train_args(workdir, *extra):
    return ["--config=offline", "--data", str(workdir / "faces" / "train"),
            "--weights", str(workdir / "targets"), "--workdir", str(workdir / "run"),
            "--steps", "1", "--set", "image_size=32", "--set", "batch_size=2", "--set", "ngf=4",
            "--set", "n_blocks=1", "--set", "identity=standin", "--set", "folder_masks=box",
            *extra]


def test_target_trains_registers_and_an_offline_step_runs(shared_faces_dir, tmp_path, capsys):
    from experiments import train

    assert _run_target_command(shared_faces_dir, tmp_path) == 0
    saved = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert saved["config"] == TINY and np.isfinite(saved["heldout_psnr"])
    assert len(os.listdir(tmp_path / "faces" / "heldout")) == 12
    # a target bundle like a converted GAN's: targets.load reads it, as the run does
    target, variables = targets.load("face_ae", tmp_path / "targets")
    assert target.num_conditions == 1 and target.module.width == TINY["width"]
    assert jax.tree.map(np.shape, variables) == jax.tree.map(
        lambda a: a.shape, targets.abstract_variables("face_ae", config=TINY))
    # the command refuses to replace it
    assert _run_target_command(shared_faces_dir, tmp_path) == 2
    assert "already there" in capsys.readouterr().err
    # the offline preset's architecture is not the tiny one: refused by name, before any work
    assert train.main(_train_args(tmp_path)) == 2
    assert "target_size='official' builds" in capsys.readouterr().err
    # one offline train step against the learned target
    assert train.main(_train_args(tmp_path, "--set", "target_size=tiny")) == 0
    err = capsys.readouterr().err
    assert "OFFLINE" in err and "TRAINED HERE" in err
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 1 and np.isfinite(lines[0]["objective"])
    assert any(k.startswith("face_ae/") for k in lines[0])
    assert os.path.isfile(tmp_path / "run" / "generator" / "meta.json")


def test_offline_preset_and_missing_target(tmp_path, capsys):
    from experiments import train

    cfg = config.offline()
    demo = config.demo()
    assert cfg.targets == learned.LEARNED_TARGETS and cfg.identity == "dlib"
    assert (cfg.image_size, cfg.batch_size, cfg.folder_masks) == (
        demo.image_size, demo.batch_size, demo.folder_masks)
    (tmp_path / "faces").mkdir()
    assert train.main(["--config=offline", "--data", str(tmp_path / "faces"),
                       "--weights", str(tmp_path / "none")]) == 2
    assert "experiments/offline.py target" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no trained weights.*offline.py target"):
        targets.load("face_ae", tmp_path)
    with pytest.raises(FileNotFoundError, match="face_ae"):
        load_frozen(cfg, tmp_path)


def test_uniform_noise_stays_within_eps():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    y = baselines.uniform_noise(x, jax.random.key(0), eps=0.05)
    assert float(jnp.max(jnp.abs(y - x))) <= 0.05 + 1e-6
    assert float(jnp.max(jnp.abs(y))) <= 1.0
    assert float(jnp.mean(jnp.abs(y - x))) > 0.01                  # it is noise, not nothing
    assert not np.array_equal(y, baselines.uniform_noise(x, jax.random.key(1), eps=0.05))
