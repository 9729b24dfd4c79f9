"""Evaluation: metrics on constructed inputs, `measure` on constructed targets and judges, and
experiments/evaluate.py end to end at a tiny size on the shared faces."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idguard_jax import evaluation, identity, metrics, targets
from idguard_jax.data import load_folder
from idguard_jax.generator import GeneratorConfig, init_generator, save_generator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32


class _AddOffset(nn.Module):
    """A constructed 'manipulation': x + offset (a fixed image), features = x."""
    offset: tuple

    def __call__(self, x, condition):
        return x + jnp.asarray(self.offset, jnp.float32), x


def _offset_target(offset: np.ndarray) -> targets.Target:
    off = tuple(map(tuple, map(lambda r: tuple(map(tuple, r)), offset)))
    return targets.Target(name="offset", module=_AddOffset(off), num_conditions=1,
                          make_conditions=_one_condition)


def _one_condition(labels):
    return labels[None]


class _MeanColour(nn.Module):
    """A constructed identity network: the embedding is the image's mean colour."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


def _colour_judge() -> evaluation.Judge:
    net = identity.IdentityNet(name="meancolour", module=_MeanColour(), input_size=S,
                               normalisation="reference", prepare_fn=lambda x: x,
                               feature_method=None, embed_method=None)
    return evaluation.Judge(net, {}, "cosine", metrics.ID_SIM_SUCCESS)


def test_measure_matches_hand_computed_metrics():
    # clean image: colour (0.5, 0.2, -0.3); protected: +0.2 on every channel in rows 4-11,
    # cols 8-19 (96 px). The target adds 0.3 to every channel in rows 0-15 (the CMUA mask).
    x = np.broadcast_to(np.array([0.5, 0.2, -0.3], np.float32), (1, S, S, 3)).copy()
    xp = x.copy()
    xp[0, 4:12, 8:20] += 0.2
    offset = np.zeros((S, S, 3), np.float32)
    offset[:16] = 0.3
    face = np.zeros((1, S, S, 1), np.uint8)
    face[0, 8:24, 8:24] = 1                       # 16 x 16 = 256 px; overlap rows 8-11 x 12 cols
    models = evaluation.Models((_offset_target(offset),), {"offset": {}})
    m = evaluation.measure(models, x, xp, _colour_judge(), input_face_masks=face, finder=None,
                           recognizer=None)
    r = m["targets"]["offset"]
    assert r["l2_face"].shape == (1, 1)
    np.testing.assert_allclose(r["l2_face"][0, 0], 48 * 3 * 0.04 / (256 * 3), rtol=1e-5)
    np.testing.assert_allclose(r["mse"][0, 0], 96 * 3 * 0.04 / (S * S * 3), rtol=1e-5)
    # CMUA's mask: rows 0-15 changed by 0.9 summed over channels; overlap 8 rows x 12 cols
    np.testing.assert_allclose(r["cmua_l2"][0, 0], 96 * 3 * 0.04 / (16 * S * 3), rtol=1e-5)
    # ID sim: cosine of the mean colours of the two outputs
    y = x[0] + offset
    yp = xp[0] + offset
    a, b = y.mean((0, 1)), yp.mean((0, 1))
    np.testing.assert_allclose(r["id_sim"][0, 0], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               rtol=1e-5)
    assert np.isnan(r["misdirected"]).all() and r["mask_source"][0, 0] == "input"
    assert not r["dsr"][0, 0]                     # L2_face 0.0075 and the colours barely move
    np.testing.assert_allclose(m["psnr"][0], 10 * np.log10(1 / (96 * 3 * 0.01 / (S * S * 3))),
                               rtol=1e-5)
    np.testing.assert_allclose(m["linf"][0], 0.2, rtol=1e-6)
    assert m["ssim"][0] < 1


def test_dsr_needs_both_a_large_face_error_and_a_destroyed_identity():
    x = np.zeros((1, S, S, 3), np.float32)
    x[..., 0] = 0.5
    flip = x.copy()
    flip[..., 0], flip[..., 1] = 0.0, 0.5         # other colour: cosine 0 (destroyed), L2 0.1667
    dark = x * 0.2                               # same direction: cosine 1, L2 0.04 * 0.64 / 3
    models = evaluation.Models((_offset_target(np.zeros((S, S, 3), np.float32)),),
                               {"offset": {}})
    face = np.ones((1, S, S, 1), np.uint8)
    got = {}
    for name, xp in (("flip", flip), ("dark", dark), ("same", x)):
        r = evaluation.measure(models, x, xp, _colour_judge(), input_face_masks=face,
                               finder=None, recognizer=None)["targets"]["offset"]
        got[name] = (float(r["l2_face"][0, 0]), float(r["id_sim"][0, 0]), bool(r["dsr"][0, 0]))
    np.testing.assert_allclose(got["flip"][:2], [2 * 0.25 / 3, 0.0], atol=1e-6)
    assert got["flip"][2] is True
    np.testing.assert_allclose(got["dark"][:2], [0.16 / 3, 1.0], rtol=1e-5)
    assert got["dark"][2] is False               # L2_face > 0.05 but identity kept
    assert got["same"] == (0.0, pytest.approx(1.0), False)


def test_success_criteria_on_constructed_values():
    np.testing.assert_array_equal(metrics.identity_destroyed([0.39, 0.4, np.nan], "cosine"),
                                  [True, False, False])
    np.testing.assert_array_equal(metrics.identity_destroyed([0.59, 0.6, 0.9], "distance"),
                                  [False, True, True])
    np.testing.assert_array_equal(
        metrics.defense_success([0.06, 0.06, 0.05, np.nan], [True, False, True, True]),
        [True, False, False, False])
    np.testing.assert_allclose(metrics.euclidean([[0, 3]], [[4, 0]]), [5.0])
    with pytest.raises(ValueError, match="criterion"):
        metrics.identity_destroyed([0.1], "angle")


def test_quantised_protection_stays_in_the_budget():
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    prot = np.clip(orig / 127.5 - 1 + rng.uniform(-0.05, 0.05, orig.shape), -1, 1)
    q = evaluation.quantise_within(orig, prot, 0.05)
    assert np.abs(q.astype(int) - orig.astype(int)).max() <= int(0.05 * 127.5)
    assert np.abs(q / 127.5 - 1 - prot).max() <= 1 / 127.5 + 1e-6


@pytest.fixture(scope="module")
def faces64(shared_faces_dir):
    return load_folder(shared_faces_dir, 64, limit=2)[0]


def test_dlib_masks_descriptors_and_misdirection_on_real_faces(faces64):
    """A pass-through target at 64 px: dlib finds the face on the output (mask_source
    'output'); an unchanged image keeps its identity (distance 0, not misdirected); a black
    image is misdirected (no face on it)."""
    models = evaluation.Models((_offset_target(np.zeros((64, 64, 3), np.float32)),),
                               {"offset": {}})
    judge = evaluation.make_judge("dlib")
    assert "distance >= 0.6" in judge.describe()
    m = evaluation.measure(models, faces64, faces64, judge)
    r = m["targets"]["offset"]
    assert (r["mask_source"] == "output").all()
    np.testing.assert_allclose(r["id_distance"], 0.0, atol=1e-5)
    np.testing.assert_array_equal(r["misdirected"], 0.0)
    assert not r["dsr"].any() and (r["l2_face"] == 0).all()
    black = np.zeros_like(faces64)
    r = evaluation.measure(models, faces64, black, judge)["targets"]["offset"]
    np.testing.assert_array_equal(r["misdirected"], 1.0)
    assert r["no_face"].all() and (r["l2_face"] > 0.05).all()


def _make_generator(path, size, seed):
    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=size)
    v = init_generator(jax.random.key(seed), cfg)
    last = max(v["params"], key=lambda k: int(k.split("_")[1]))
    v["params"][last]["kernel"] = v["params"][last]["kernel"] * 1e3   # reach the eps bound
    save_generator(path, v, 0.04 * jax.random.normal(jax.random.key(seed + 1), (size, size, 3)),
                   cfg, extra_meta={"strategy": f"s{seed}"})
    return str(path)


def _evaluate(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_evaluate_command_end_to_end(shared_faces_dir, tmp_path):
    g1 = _make_generator(tmp_path / "g1", S, 0)
    g2 = _make_generator(tmp_path / "g2", S, 5)
    out = tmp_path / "out"
    p = _evaluate("--generator", g1, "--generator", g2, "--targets", "stargan,hisd",
                  "--dataset", shared_faces_dir, "--limit", "3", "--out", str(out),
                  "--robustness", "--ops", "jpeg:75,resize:0.5+jpeg:90", "--grid", "2",
                  "--batch-size", "2", "--config", "tiny")
    assert p.returncode == 0, p.stderr
    for name in ("table1.md", "table1.csv", "details.md", "table3.md", "table3.csv",
                 "robustness.md", "robustness.csv", "results.json",
                 "grids/celebahq_idguard-s0_stargan.png", "grids/celebahq_idguard-s5_hisd.png"):
        assert (out / name).is_file(), name
    assert "RANDOM STAND-INS" in (out / "table1.md").read_text()
    assert "dlib descriptor distance >= 0.6" in (out / "table1.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["random_targets"] is True
    assert [s["method"] for s in res["summaries"]] == ["idguard:s0", "idguard:s5"]
    assert len(res["robustness"]) == 4
    # the CSV's numbers are the JSON's summaries, and those are means of the per-image values
    rows = list(csv.DictReader(open(out / "table1.csv")))
    s0 = res["summaries"][0]
    for t in ("stargan", "hisd"):
        assert float(rows[0][f"{t} L2_face"]) == pytest.approx(s0["targets"][t]["l2_face"],
                                                               rel=1e-5)
        per = res["per_image"]["celebahq/idguard:s0"]["targets"][t]
        assert np.asarray(per["l2_face"]).shape[1] == 3
        assert s0["targets"][t]["l2_face"] == pytest.approx(np.mean(per["l2_face"]))
        assert s0["targets"][t]["dsr"] == pytest.approx(np.mean(per["dsr"]))
    assert 0 < s0["linf_max"] <= 0.05 + 1e-6
    from PIL import Image
    grid = np.asarray(Image.open(out / "grids/celebahq_idguard-s0_stargan.png"))
    assert grid.shape == (2 * S + 2, 4 * S + 3 * 2, 3)


def test_evaluate_command_refuses_bad_input(shared_faces_dir, tmp_path):
    p = _evaluate("--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                  "--targets", "stargan,nosuchgan")
    assert p.returncode == 2
    assert "nowhere: no such folder" in p.stderr and "nosuchgan" in p.stderr
    assert "--method idguard needs --generator" in p.stderr
