"""The RelGAN port + converter reproduce the official torch generator in eval mode exactly.

Official widths and n_repeat (every real key name and shape goes through the converter), small
images; SwitchNorm statistics, mixing weights and affine parameters away from their defaults.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.convert import main as convert_main
from convert.torch_io import ConversionError
from idguard_jax.networks import targets
from idguard_jax.checkpoint import load_bundle
from idguard_jax.networks.summary import network_sizes
from torch_reference import assert_matches
from torch_reference.relgan import G, randomize_switch_norms_

IMAGE_SIZE = 32
BATCH = 2


@pytest.fixture(scope="module")
def reference():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return randomize_switch_norms_(G(), gen).eval()


@pytest.fixture(scope="module")
def plain_file(reference, tmp_path_factory):
    """ID-Guard's form: G's plain state_dict."""
    path = tmp_path_factory.mktemp("relgan") / "G_15000_sn_wb.pth"
    torch.save(reference.state_dict(), path)
    return path


def test_official_parameter_count(reference):
    assert sum(p.numel() for p in reference.parameters()) == 8_434_345
    assert network_sizes()["relgan"] == 8_434_345


def test_conditions_table():
    target = targets.build("relgan")
    table = target.conditions(jnp.zeros((BATCH, 5)))
    assert table.shape == (5, BATCH, 5) and target.num_conditions == 5
    want = np.array([[0, 0, 0, 1, 0], [0, -1, 0, 0, 0], [-1, 0, 0, 0, 0], [0, 0, 0, -1, 0],
                     [0, 0, 0, 0, -1]], np.float32)
    np.testing.assert_array_equal(table, np.broadcast_to(want[:, None], (5, BATCH, 5)))

    other = targets.build("relgan", {"vectors": [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]})
    assert other.num_conditions == 2
    np.testing.assert_array_equal(other.conditions(jnp.zeros((3, 5)))[1, 2], [0, 0, 1, 0, 0])
    # static description: equal by value however the vectors were spelled
    assert hash(targets.build("relgan", {"vectors": [list(v) for v in targets.RELGAN_VECTORS]})) \
        == hash(target)


def test_converted_generator_matches_torch(reference, plain_file, tmp_path):
    out = tmp_path / "out"
    assert convert_main(["relgan", str(plain_file), str(out)]) == 0
    variables, meta = load_bundle(out / "relgan")
    assert meta["kind"] == "target" and meta["model"] == "relgan"
    assert set(variables) == {"params", "batch_stats"}  # eval mode: running statistics are used

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1

    # through the library's loader, with the condition picked by a traced index, as in training
    target, variables = targets.load("relgan", out)
    table = target.conditions(jnp.zeros((BATCH, 5)))
    step = jax.jit(lambda v, x, i: target.forward(v, x, target.select(table, i)))
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    for i, vector in enumerate(targets.RELGAN_VECTORS):
        z = torch.tensor(vector, dtype=torch.float32).repeat(BATCH, 1)  # as ID-Guard calls G
        with torch.no_grad():
            want_image, want_mid = reference(x, z), reference.mid_features(x, z)
        image, mid = step(variables, x_nhwc, jnp.int32(i))
        assert_matches(image, want_image, f"relgan image, condition {i}")
        assert_matches(mid, want_mid, f"relgan mid features, condition {i}")
    assert mid.shape == (BATCH, IMAGE_SIZE // 4, IMAGE_SIZE // 4, 256)


def test_upstream_training_file_converts_to_the_same_bundle(reference, plain_file, tmp_path):
    upstream = tmp_path / "weights.pth"
    optim = {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}
    torch.save({"G": reference.state_dict(), "D": {"conv.0.weight": torch.zeros(1)},
                "optimG": optim, "optimD": optim}, upstream)
    assert convert_main(["relgan", str(upstream), str(tmp_path / "a")]) == 0
    assert convert_main(["relgan", str(plain_file), str(tmp_path / "b")]) == 0
    from_upstream, _ = load_bundle(tmp_path / "a" / "relgan")
    from_plain, _ = load_bundle(tmp_path / "b" / "relgan")
    assert jax.tree.structure(from_upstream) == jax.tree.structure(from_plain)
    jax.tree.map(np.testing.assert_array_equal, from_upstream, from_plain)


def test_wrong_shape_and_wrong_file_are_named(reference, tmp_path, capsys):
    state = reference.state_dict()
    state["resb.3.f.4.running_var"] = torch.zeros(1, 255, 1)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(state, bad_shape)
    assert convert_main(["relgan", str(bad_shape), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad_shape) in err and "resb.3.f.4.running_var: (1, 255, 1)" in err

    no_generator = tmp_path / "only_d.pth"
    torch.save({"D": {"conv.0.weight": torch.zeros(1)}, "optimD": {"state": {}}}, no_generator)
    assert convert_main(["relgan", str(no_generator), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(no_generator) in err and "'G' entry" in err and "'optimD'" in err
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_bare_tensor():
    from convert.convert import TARGETS

    with pytest.raises(ConversionError, match="x.pth: expected RelGAN's generator state_dict"):
        TARGETS["relgan"].extract(torch.zeros(3), "x.pth")


def test_bfloat16_compute_stays_close():
    module = targets.build("relgan", {"n_repeat": 3}).module
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    z = jnp.array([[0, 0, 0, 1, 0], [-1, 0, 0, 0, 0]], jnp.float32)
    # Random values from numpy: compiling flax's initialisers would take longer than the test.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.normal(0.0, 0.05, leaf.shape).astype(np.float32),
                             jax.eval_shape(module.init, jax.random.key(0), x, z))
    variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
    image32, _ = jax.jit(module.apply)(variables, x, z)
    image16, mid16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x, z)
    assert image16.dtype == jnp.float32 and mid16.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(image16 - image32))) < 0.02  # measured 1.3e-3
