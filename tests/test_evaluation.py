"""Evaluation: metrics on constructed inputs, `measure` on constructed targets and judges, and
experiments/evaluate.py end to end at a tiny size on the shared faces."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idguard_jax import images
from idguard_jax.evaluation import judge as judge_lib
from idguard_jax.evaluation import measure as evaluation
from idguard_jax.networks import identity
from idguard_jax.evaluation import metrics
from idguard_jax.evaluation import report
from idguard_jax.networks import targets
from idguard_jax.data.datasets import load_folder
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


def _colour_judge() -> judge_lib.Judge:
    net = identity.IdentityNet(name="meancolour", module=_MeanColour(), input_size=S,
                               normalisation="reference", prepare_fn=lambda x: x,
                               feature_method=None, embed_method=None)
    return judge_lib.Judge(net, {}, "cosine", metrics.ID_SIM_SUCCESS)


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
    q = images.quantise_within(orig, prot, 0.05)
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
    judge = judge_lib.make_judge("dlib")
    assert "distance >= 0.6" in judge.describe() and "face chips" in judge.describe()
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


def _make_generator(path, size, seed, eps=0.05):
    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=size, eps=eps)
    _, v = init_generator(cfg, jax.random.key(seed))
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
    g2 = _make_generator(tmp_path / "g2", S, 5, eps=0.06)    # above the shared budget
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
    mismatch = "idguard:s5 was trained at eps 0.06, not at the shared --eps 0.05"
    assert mismatch in p.stderr and mismatch in (out / "table1.md").read_text()
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
    assert res["summaries"][1]["linf_max"] <= 0.05 + 1e-6       # clipped to the shared budget
    assert res["robustness"][0]["dataset"] == "celebahq"
    from PIL import Image
    grid = np.asarray(Image.open(out / "grids/celebahq_idguard-s0_stargan.png"))
    assert grid.shape == (2 * S + 2, 4 * S + 3 * 2, 3)


def test_evaluate_command_refuses_bad_input(shared_faces_dir, tmp_path):
    p = _evaluate("--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                  "--targets", "stargan,nosuchgan")
    assert p.returncode == 2
    assert "nowhere: no such folder" in p.stderr and "nosuchgan" in p.stderr
    assert "--method idguard needs --generator" in p.stderr


_TRACES = []


class _CountingOffset(nn.Module):
    """x + 0.1; records the shape of each trace (under jit the body runs once per compile)."""

    def __call__(self, x, condition):
        _TRACES.append(x.shape)
        return x + 0.1, x


def test_a_short_last_batch_does_not_compile_the_target_again():
    counting = _CountingOffset()
    target = targets.Target(name="counting", module=counting, num_conditions=1,
                            make_conditions=_one_condition)
    models = evaluation.Models((target,), {"counting": {}})
    rng = np.random.default_rng(0)
    for b in (3, 1, judge_lib.CHUNK + 2):       # a full batch, a short one, two chunks
        x = rng.uniform(-0.5, 0.5, (b, S, S, 3)).astype(np.float32)
        r = evaluation.measure(models, x, x + 0.01, _colour_judge(), finder=None,
                               recognizer=None)["targets"]["counting"]
        assert r["l2_face"].shape == (1, b)
        np.testing.assert_allclose(r["l2_face"], 1e-4, rtol=1e-3)
    # vmap over the conditions traces the module once per compilation: one shape, one trace
    assert len(_TRACES) == 1 and _TRACES[0][0] == judge_lib.CHUNK


def test_summarise_counts_undefined_values_and_misdirection_over_photos_with_a_face():
    nan = np.nan
    r = {"l2_face": np.array([[0.1, nan, 0.2]]), "id_sim": np.array([[0.1, 0.9, nan]]),
         "id_distance": np.full((1, 3), nan), "id_destroyed": np.array([[True, False, False]]),
         "dsr": np.array([[True, False, False]]), "mse": np.zeros((1, 3)),
         "mse_success": np.zeros((1, 3), bool), "cmua_l2": np.zeros((1, 3)),
         "cmua_success": np.zeros((1, 3), bool),
         # photo 2 had no face: not measured, although no face is found on its output either
         "misdirected": np.array([[1.0, 0.0, nan]]), "no_face": np.array([[True, False, True]]),
         "mask_source": np.array([["output", "input", "template"]])}
    m = {"judge": "j", "random_targets": False, "psnr": np.array([40.0, 41.0, 42.0]),
         "ssim": np.ones(3), "linf": np.full(3, 0.05), "targets": {"t": r}}
    row = evaluation.summarise(m)["targets"]["t"]
    assert row["outputs"] == 3 and row["l2_face_nan"] == 1 and row["id_sim_nan"] == 1
    assert row["l2_face"] == pytest.approx(0.15) and row["dsr"] == pytest.approx(1 / 3)
    assert row["misdirection_measured"] == 2
    assert row["misdirection"] == pytest.approx(0.5)
    assert row["misdirection_no_face"] == pytest.approx(0.5)    # 1 of the 2 measured, not 2/3
    assert row["mask_source"] == {"output": 1, "input": 1, "template": 1}


def test_robustness_table_cells_match_its_header():
    def summary(dsr):
        t = {"l2_face": 0.1, "id_sim": 0.3, "dsr": dsr}
        return {"targets": {"stargan": t}, "average": {"dsr": dsr}}
    header, rows = report.robustness_table(
        [("celebahq", "jpeg:75", "cmua", summary(0.25)),
         ("lfw", "resize:0.5", "idguard:kpi", summary(0.5))], ["stargan"])
    assert header[:3] == ["dataset", "operation", "method"]
    first, second = (dict(zip(header, r)) for r in rows)
    assert (first["dataset"], first["operation"], first["method"]) == (
        "celebahq", "jpeg:75", "cmua")
    assert (second["dataset"], second["operation"], second["method"]) == (
        "lfw", "resize:0.5", "idguard:kpi")
    assert first["stargan DSR"] == 0.25 and second["avg DSR"] == 0.5


def test_judge_normalisation_is_explicit_and_described():
    ref = judge_lib.make_judge("standin")
    trained = judge_lib.make_judge("standin", normalisation="trained")
    assert ref.normalisation == "reference" and trained.normalisation == "trained"
    assert "'reference' input normalisation" in ref.describe()
    assert "'trained' input normalisation" in trained.describe()
    with pytest.raises(ValueError, match="normalisation 'imagenet'"):
        judge_lib.make_judge("standin", normalisation="imagenet")


def test_as_float_takes_uint8_and_float_images():
    u8 = np.array([0, 255, 128], np.uint8).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(images.as_float_images(u8).ravel(), [-1.0, 1.0, 1 / 255],
                               atol=1e-6)
    assert images.as_float_images(np.zeros((1, 2, 2, 3), np.float64)).dtype == np.float32
    with pytest.raises(ValueError, match="B, S, S, 3"):
        evaluation.measure(None, np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8),
                           None)


def test_evaluate_refuses_duplicate_labels_and_bad_options(shared_faces_dir, tmp_path, capsys):
    from experiments import evaluate

    g1 = _make_generator(tmp_path / "g1", S, 0)
    g2 = _make_generator(tmp_path / "g2", S, 0)       # the same strategy, 's0'
    rc = evaluate.main(["--generator", g1, "--generator", g2, "--dataset", shared_faces_dir,
                        "--out", str(tmp_path / "o"), "--cmua-epochs", "0", "--surrogate-steps",
                        "0", "--pgd-steps", "-1", "--image-size", "30", "--eps", "0",
                        "--cmua-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--generator {g2}: label 's0' is also {g1}'s" in err and "LABEL=PATH" in err
    for bad in ("--cmua-epochs 0", "--surrogate-steps 0", "--pgd-steps -1", "--image-size 30",
                "--eps 0", "--cmua-images 0"):
        assert bad in err, bad
    assert evaluate._generator_label("", g1) == "s0" and evaluate._generator_label("a", g1) == "a"


def test_evaluate_baselines_end_to_end(shared_faces_dir, tmp_path, monkeypatch, capsys):
    """disrupting, cmua, pgd and pg through experiments/evaluate.py on two datasets at 32 px:
    every jitted call sees one batch shape, CMUA learns from --cmua-images images with their
    labels, every random use has its own key, and the tables carry the dataset."""
    from experiments import evaluate
    from idguard_jax.evaluation import baselines
    from idguard_jax.evaluation import datasets as eval_data

    names = sorted(os.listdir(shared_faces_dir))
    for folder, picked in (("second", names[3:5]), ("fit", names[5:8])):
        os.makedirs(tmp_path / folder)
        for n in picked:
            shutil.copy(os.path.join(shared_faces_dir, n), tmp_path / folder)
    fit_labels = np.tile(np.array([[1, 0, 0, 1, 0]], np.float32), (3, 1))
    fit_labels[:, 4] = [0, 1, 1]
    load = eval_data.load_dataset

    def load_with_labels(path, size, limit):          # the fit set gets labels of its own
        name, images, labels, masks, notes = load(path, size, limit)
        if path == str(tmp_path / "fit"):
            labels = fit_labels[:len(images)]
        return name, images, labels, masks, notes
    monkeypatch.setattr(eval_data, "load_dataset", load_with_labels)
    seen = {"batch": [], "chunk": set(), "keys": []}

    def key_of(k):
        return tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())

    def spy(name, x_at, key_at=None):
        real = getattr(baselines, name)

        def wrapped(*a, **kw):
            seen["batch"].append((name, a[x_at].shape[0]))
            if key_at is not None:
                seen["keys"].append((name, key_of(a[key_at])))
            return real(*a, **kw)
        monkeypatch.setattr(baselines, name, wrapped)
    spy("disrupting", 2, 4)
    spy("pgd_all", 2, 4)
    spy("cmua_apply", 1)
    spy("pg_protect", 1)
    cmua_fit, pg_train, manipulate = baselines.cmua_fit, baselines.pg_train, evaluation._manipulate

    def fit_spy(targets_, variables, images, labels, key, **kw):
        seen["cmua_fit"] = (np.asarray(images).shape, np.asarray(labels), kw)
        seen["keys"].append(("cmua_fit", key_of(key)))
        return cmua_fit(targets_, variables, images, labels, key, **kw)

    def pg_spy(apply_fn, svars, images, key, **kw):
        seen["keys"].append(("pg_train", key_of(key)))
        return pg_train(apply_fn, svars, images, key, **kw)

    def manipulate_spy(target, variables, x, table):
        seen["chunk"].add(x.shape[0])
        return manipulate(target, variables, x, table)
    monkeypatch.setattr(baselines, "cmua_fit", fit_spy)
    monkeypatch.setattr(baselines, "pg_train", pg_spy)
    monkeypatch.setattr(evaluation, "_manipulate", manipulate_spy)

    out = tmp_path / "out"
    rc = evaluate.main([
        "--method", "disrupting", "--method", "cmua", "--method", "pgd", "--method", "pg",
        "--targets", "stargan", "--dataset", shared_faces_dir, "--dataset",
        str(tmp_path / "second"), "--fit-data", str(tmp_path / "fit"), "--limit", "3",
        "--batch-size", "2", "--out", str(out), "--identity", "standin",
        "--identity-normalisation", "trained", "--no-misdirection",
        "--grid", "2", "--robustness", "--ops", "jpeg:75", "--pgd-steps", "1", "--cmua-images",
        "2", "--cmua-batch", "2", "--pg-steps", "1", "--pg-batch", "2", "--surrogate-steps", "1"])
    assert rc == 0, capsys.readouterr().err
    methods = ["disrupting", "cmua", "pgd", "pg"]
    # 3 images in batches of 2: the short last batch is padded to 2; the targets see CHUNK
    assert {b for _, b in seen["batch"]} == {2}
    assert sorted({n for n, _ in seen["batch"]}) == ["cmua_apply", "disrupting", "pg_protect",
                                                     "pgd_all"]
    assert seen["chunk"] == {judge_lib.CHUNK}
    shape, labels, kw = seen["cmua_fit"]
    assert shape == (2, S, S, 3) and kw["batch_size"] == 2
    np.testing.assert_array_equal(labels, fit_labels[:2])
    # disrupting and pgd: 2 batches of celebahq + 1 of second each; plus CMUA's and PG's keys
    assert len(seen["keys"]) == 8 and len({k for _, k in seen["keys"]}) == 8
    res = json.loads((out / "results.json").read_text())
    assert [(s["dataset"], s["method"]) for s in res["summaries"]] == [
        (d, m) for d in ("celebahq", "second") for m in methods]
    assert all(s["linf_max"] <= 0.05 + 1e-6 for s in res["summaries"])
    assert res["settings"]["cmua"] == {"images": 2, "batch": 2, "batches": 1, "epochs": 1,
                                       "fit_data": str(tmp_path / "fit")}
    assert (res["settings"]["pg"]["ngf"], res["settings"]["pg"]["n_blocks"],
            res["settings"]["pg"]["batch"]) == (4, 1, 2)        # the tiny config's generator
    assert res["settings"]["eps"] == 0.05
    assert "'trained' input normalisation" in res["judge"]
    assert any(n.startswith("cmua: one universal perturbation fitted on the first 2 images")
               for n in res["notes"])
    assert [(r["dataset"], r["operation"], r["method"]) for r in res["robustness"]] == [
        (d, "jpeg:75", m) for d in ("celebahq", "second") for m in methods]
    rows = list(csv.DictReader(open(out / "robustness.csv")))
    assert (rows[-1]["dataset"], rows[-1]["operation"], rows[-1]["method"]) == (
        "second", "jpeg:75", "pg")
    assert float(rows[-1]["stargan DSR"]) == pytest.approx(
        res["robustness"][-1]["targets"]["stargan"]["dsr"], abs=1e-5)
