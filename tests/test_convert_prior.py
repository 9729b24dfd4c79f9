"""`convert.py prior`: the released prior perturbation (the reference's pri_pert.pt) becomes the
prior bundle train.py --prior reads, clamped to +-eps; bad files are refused naming them."""
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert.convert import main as convert_main
from idguard_jax import config
from idguard_jax.checkpoint import read_meta
from idguard_jax.training import step as train
from idguard_jax.training.prior import load_prior
from idguard_jax.training.runner import missing_inputs

REPO = Path(__file__).resolve().parents[1]
EPS = 0.05


def _hwc(h=8, w=12, beyond=0, seed=0):
    """(h, w, 3) values within +-0.04, `beyond` of them set to +-0.2 (beyond eps)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(-0.04, 0.04, (h, w, 3)).astype(np.float32)
    flat = d.reshape(-1)
    flat[rng.choice(flat.size, beyond, replace=False)] = rng.choice([-0.2, 0.2], beyond)
    return d


def _save(path, hwc, layout):
    t = torch.from_numpy(np.ascontiguousarray(hwc))
    t = {"1chw": t.permute(2, 0, 1)[None], "chw": t.permute(2, 0, 1), "hwc": t}[layout]
    torch.save(t.contiguous(), path)
    return str(path)


@pytest.mark.parametrize("layout", ["1chw", "chw", "hwc"])
def test_each_layout_converts_to_the_same_bundle(tmp_path, capsys, layout):
    d = _hwc()
    src = _save(tmp_path / "pri_pert.pt", d, layout)
    assert convert_main(["prior", src, str(tmp_path / "weights")]) == 0
    out = tmp_path / "weights" / "prior"
    assert f"wrote {out}" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(load_prior(out)), d)   # stored size kept
    meta = read_meta(out)
    assert meta["kind"] == "idguard-prior" and meta["image_size"] == [8, 12]
    assert meta["clamped_values"] == 0 and meta["eps"] == EPS
    assert meta["source"] == "pri_pert.pt" and (out / "delta_p.png").is_file()


def test_values_beyond_eps_are_clamped_and_counted(tmp_path):
    d = _hwc(16, 16, beyond=7)
    src = _save(tmp_path / "pri_pert.pt", d, "1chw")
    assert convert_main(["prior", src, str(tmp_path / "w")]) == 0
    got = np.asarray(load_prior(tmp_path / "w" / "prior"))
    np.testing.assert_array_equal(got, np.clip(d, -EPS, EPS))
    assert np.abs(got).max() == np.float32(EPS)
    assert read_meta(tmp_path / "w" / "prior")["clamped_values"] == 7
    # --eps: another budget clamps more
    assert convert_main(["prior", src, str(tmp_path / "w2"), "--eps", "0.01"]) == 0
    meta = read_meta(tmp_path / "w2" / "prior")
    assert meta["eps"] == 0.01 and meta["clamped_values"] == int(np.sum(np.abs(d) > 0.01))


def test_another_size_is_resized_with_a_warning(tmp_path):
    src = _save(tmp_path / "pri_pert.pt", _hwc(16, 16), "1chw")
    with pytest.warns(UserWarning, match="resizing it to 32x32"):
        assert convert_main(["prior", src, str(tmp_path / "w"), "--image-size", "32"]) == 0
    assert read_meta(tmp_path / "w" / "prior")["image_size"] == [32, 32]
    assert convert_main(["prior", src, str(tmp_path / "v")]) == 0
    with pytest.warns(UserWarning, match="resizing it to 24x24"):   # at load time
        assert load_prior(tmp_path / "v" / "prior", 24).shape == (24, 24, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_refused_naming_the_file(tmp_path, capsys, bad):
    d = _hwc()
    d[3, 4, 1] = bad
    src = _save(tmp_path / "pri_pert.pt", d, "1chw")
    assert convert_main(["prior", src, str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert src in err and "NaN or infinite" in err
    assert not (tmp_path / "w" / "prior").exists()


@pytest.mark.parametrize("shape", [(8, 8), (2, 3, 8, 8), (4, 8, 8), (1, 8, 8)])
def test_not_image_shaped_is_refused_naming_the_file(tmp_path, capsys, shape):
    src = str(tmp_path / "pri_pert.pt")
    torch.save(torch.zeros(shape), src)
    assert convert_main(["prior", src, str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert src in err and "image-shaped" in err and str(shape) in err
    assert not (tmp_path / "w" / "prior").exists()


def test_eps_option_is_only_for_the_prior(tmp_path, capsys):
    src = _save(tmp_path / "pri_pert.pt", _hwc(), "1chw")
    assert convert_main(["stargan", src, str(tmp_path / "w"), "--eps", "0.05"]) == 2
    assert "--eps applies only to MODEL 'prior'" in capsys.readouterr().err
    assert convert_main(["prior", src, str(tmp_path / "w"), "--eps", "0"]) == 2
    assert "--eps 0.0" in capsys.readouterr().err


def test_train_accepts_the_converted_prior(tmp_path, shared_faces_dir):
    src = _save(tmp_path / "pri_pert.pt", _hwc(16, 16, beyond=3), "1chw")
    run = subprocess.run([sys.executable, "convert/convert.py", "prior", src,
                          str(tmp_path / "weights")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    prior_dir = str(tmp_path / "weights" / "prior")
    assert f"--prior {prior_dir}" in run.stdout
    cfg = config.tiny(image_size=16)
    assert missing_inputs(cfg, data=shared_faces_dir, weights=None, prior=prior_dir,
                          converted=False) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # stored at the config's size: no resize
        delta_p = load_prior(prior_dir, cfg.image_size)
    assert delta_p.shape == (16, 16, 3) and np.abs(delta_p).max() == np.float32(EPS)


def test_init_state_clamps_any_prior_to_the_configs_eps():
    cfg = config.tiny(targets=("stargan",), eps=0.03)
    d = np.full((32, 32, 3), 0.2, np.float32)
    d[0, 0] = [-0.5, 0.01, -0.02]
    state = train.init_state(train.create_setup(cfg), jax.random.key(0), delta_p=d)
    np.testing.assert_allclose(np.asarray(state.delta_p), np.clip(d, -0.03, 0.03))
