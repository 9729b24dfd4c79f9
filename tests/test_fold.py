"""The protection-only generator (protection/fast.py): BatchNorm folded into the convolutions gives
the eval forward's numbers to float32 rounding; each conv's matrix form equals the conv; the
bfloat16 path stays within 1 grey level; --dtype and --profile change no other output."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import save_bounded_generator
from idguard_jax.generator import Generator, GeneratorConfig, init_generator, protect_eval
from idguard_jax.protection import fast, precision
from idguard_jax.protection import faces as protect
from idguard_jax.protection.profile import StageTimer

CFG = GeneratorConfig(ngf=4, n_blocks=2, image_size=16)


def _random_stats(tree, rng):
    """BatchNorm running statistics far from (0, 1), so a wrong fold shows."""
    return {k: _random_stats(v, rng) if isinstance(v, dict) else
            (rng.normal(0, 0.5, v.shape) if k == "mean" else rng.uniform(0.3, 3, v.shape)
             ).astype(np.float32) for k, v in tree.items()}


@pytest.fixture(scope="module")
def gen():
    _, v = init_generator(CFG, jax.random.key(0))
    v = {"params": v["params"],
         "batch_stats": _random_stats(jax.tree.map(np.asarray, v["batch_stats"]),
                                      np.random.default_rng(0))}
    delta_p = 0.1 * jax.random.normal(jax.random.key(1), (16, 16, 3))
    return Generator(CFG, jax.tree.map(jnp.asarray, v), delta_p)


def _x(n=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 16, 16, 3)), jnp.float32)


def test_folded_float32_equals_the_eval_forward(gen):
    x = _x()
    g_in = jnp.concatenate([x, jnp.broadcast_to(jnp.clip(gen.delta_p, -0.05, 0.05), x.shape)], -1)
    module = CFG.module().apply(gen.variables, g_in, train=False)
    f32 = fast.prepare(gen, "float32")
    assert "winograd" in f32.layers["blocks"][0]["conv1"]   # on CPU, the blocks by Winograd
    assert "cells_taps" in f32.layers["out"]                # and the output conv a product
    folded = fast.generator_output(f32.layers, gen.delta_p, x, config=CFG, eps=0.05)
    assert float(jnp.abs(module).max()) > 0.05            # not a trivially small output
    np.testing.assert_allclose(folded, module, atol=1e-6, rtol=1e-5)
    ref = protect_eval(gen.variables, gen.delta_p, x, config=CFG, eps=0.05)
    np.testing.assert_allclose(f32(x, 0.05), ref, atol=1e-6)


def test_each_conv_as_a_matrix_product_equals_the_conv(gen, monkeypatch):
    """The bfloat16 path's layouts (patches, space_to_depth cell matrices), checked in
    float32 where they must agree to rounding."""
    monkeypatch.setattr(fast, "MIN_DOWN_CHANNELS", 1)      # the second stride-2 conv a product too
    folded = fast.fold_batchnorm(gen.variables, CFG)
    x, p = _x(), _x(n=1, seed=1)[0]
    convs = fast._forward(folded, x, p)
    layers = fast.matrix_layers(folded, "float32")
    assert "matrix" in layers["down2"]                                   # strided taps
    for key in ("in", "down1", "up1", "up2"):                           # space_to_depth cells
        assert "cells_matrix" in layers[key]
    assert "cells_taps" in layers["out"]                              # the 7x7 output conv too
    assert "prior_cells_matrix" in layers["in"]    # the prior's half, once per batch
    matrices = fast._forward(layers, x, p)
    np.testing.assert_allclose(matrices, convs, atol=2e-6, rtol=1e-5)


def test_bfloat16_within_one_grey_level_and_really_bfloat16(gen):
    faces = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    gen = precision.with_output_scale(gen, 0.3)     # values inside +-eps, ~4 grey levels
    bf16 = fast.prepare(gen, "bfloat16")
    assert bf16.layers["blocks"][0]["conv1"]["winograd"][0].dtype == jnp.bfloat16   # F(2x2, 3x3)
    assert bf16.layers["up1"]["cells_matrix"].dtype == jnp.bfloat16
    assert bf16.layers["in"]["cells_matrix"].dtype == jnp.bfloat16
    ref, test = protect.protect(gen, faces), protect.protect(bf16, faces)
    assert test.dtype == np.uint8 and np.abs(test.astype(int) - faces).max() <= 6
    agree = precision.merge_agreement([precision.grey_level_agreement(ref, test, faces)])
    assert agree["share_pixels_within_1"] >= 0.999
    # most values are not clamped at eps, so the agreement means something
    assert precision.clamped_share(fast.prepare(gen, "float32"), faces) < 0.5
    xf = protect.protect(gen, faces.astype(np.float32) / 127.5 - 1)
    yf = protect.protect(bf16, faces.astype(np.float32) / 127.5 - 1)
    assert 0 < np.abs(xf - yf).max() < 0.01
    assert np.abs(xf - (faces / 127.5 - 1)).mean() > 0.01   # a perturbation worth checking


def test_output_scale_and_agreement_counts(gen):
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 1] = 2
    b[1, 1] = 1
    r = precision.merge_agreement([precision.grey_level_agreement(a, b, a + (b > 0))])
    assert (r["pixels"], r["pixels_within_1"], r["values_within_1"], r["max_diff"]) == (4, 3, 11, 2)
    assert r["changed_pixels"] == 2 and r["changed_pixels_within_1"] == 1
    f32 = fast.prepare(gen, "float32")
    x = _x()
    big = fast.generator_output(f32.layers, gen.delta_p, x, config=CFG, eps=0.05)
    small = fast.prepare(precision.with_output_scale(gen, 0.5), "float32")
    half = fast.generator_output(small.layers, gen.delta_p, x, config=CFG, eps=0.05)
    np.testing.assert_allclose(jnp.arctanh(half), 0.5 * jnp.arctanh(big), atol=1e-5)


def test_prepare_refuses_an_unknown_dtype(gen):
    with pytest.raises(ValueError, match="float16"):
        fast.prepare(gen, "float16")


def test_stage_timer_table():
    t = StageTimer()
    t.add("protection", 3.0)
    t.add("compiling", 1.0)
    t.add("reading", 1.0)
    with t.stage("encoding"):
        pass
    table = t.table(photos=4, wall_seconds=2.0)
    lines = {line.split()[0]: line.split() for line in table.splitlines()}
    assert lines["protection"][1] == "2.00" and lines["protection"][3] == "2.00"   # 4 photos / 2 s
    assert lines["reading"][2] == "25.0%" and "2.00 photos/s" in table
    assert list(lines)[1:4] == ["reading", "compiling", "protection"]


def test_cli_dtype_and_profile(tmp_path, shared_photos_dir, capsys):
    pytest.importorskip("dlib")
    from experiments import protect as cli

    gdir = save_bounded_generator(tmp_path / "gen", 64)
    src = tmp_path / "in"
    src.mkdir()
    (src / "couple.jpg").write_bytes(open(os.path.join(shared_photos_dir, "couple.jpg"), "rb").read())
    outs = {}
    for tag, extra in (("plain", []), ("profile", ["--profile"]),
                       ("bf16", ["--dtype", "bfloat16"])):
        rc = cli.main([str(src), "--out", str(tmp_path / tag), "--generator", gdir, *extra])
        out = capsys.readouterr().out
        assert rc == 0, out
        outs[tag] = {n: (tmp_path / tag / n).read_bytes() for n in sorted(os.listdir(tmp_path / tag))}
        if tag == "profile":
            for stage in ("detection", "protection", "encoding", "wall clock"):
                assert stage in out
    assert outs["plain"] == outs["profile"]                # --profile changes no byte
    assert outs["bf16"].keys() == outs["plain"].keys()
