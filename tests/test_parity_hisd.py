"""The HiSD port + converter reproduce the torch generator, reference- and latent-guided.

A reduced configuration of the official form (every key name of `gen_test`; translator blocks
with different in/out widths, so the AdaIN slicing is checked), 32 px images, real faces as
references. The official size is checked by shapes only.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from convert.convert import main as convert_main
from convert.torch_io import to_flax
from idguard_jax.networks import targets
from idguard_jax.checkpoint import load_bundle
from idguard_jax.image_files import list_images, read_rgb
from idguard_jax.images import to_float
from idguard_jax.networks.summary import network_sizes
from idguard_jax.networks import hisd as hisd_target
from ports import hisd
from torch_reference import assert_matches
from torch_reference.hisd import Gen, randomize_norms_

SIZE = 32
SMALL = {**hisd.CELEBA_HQ_256, "style_dim": 16, "noise_dim": 8,
         "encoder_channels": [8, 16, 32], "decoder_channels": [32, 16, 8],
         "extractor_channels": [8, 16, 16, 32], "translator_channels": [16, 12, 20],
         "mapper_pre_channels": [24, 32], "mapper_post_channels": [32, 32, 32]}


def _hisd_yaml(cfg: dict, new_size: int) -> dict:
    """`cfg` in HiSD's own YAML layout (as configs/celeba-hq_256.yaml)."""
    return {
        "style_dim": cfg["style_dim"], "noise_dim": cfg["noise_dim"],
        "input_dim": cfg["input_dim"], "new_size": new_size, "total_iterations": 600000,
        "encoder": {"channels": cfg["encoder_channels"]},
        "decoder": {"channels": cfg["decoder_channels"]},
        "extractors": {"channels": cfg["extractor_channels"]},
        "discriminators": {"channels": cfg["extractor_channels"]},
        "translators": {"channels": cfg["translator_channels"]},
        "mappers": {"pre_channels": cfg["mapper_pre_channels"],
                    "post_channels": cfg["mapper_post_channels"]},
        "tags": [{"name": name, "tag_irrelevant_conditions_dim": 2,
                  "attributes": [{"name": a, "filename": f"datasets/{name}_{a}.txt"}
                                 for a in attrs]} for name, attrs in cfg["tags"]],
    }


def _random_gen(seed: int) -> Gen:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_norms_(Gen(SMALL), gen)
    with torch.no_grad():  # AdaIN weight/bias = p + 1 / p: make p clearly non-zero
        for translator in model.translators:
            translator.style_to_params.weight.mul_(4.0)
            translator.style_to_params.bias.normal_(0.0, 0.5, generator=gen)
    return model


def test_official_parameter_counts():
    assert network_sizes()["hisd"] == 19_043_939
    variables = targets.abstract_variables("hisd", image_size=256)
    params = variables["params"]

    def count(prefix):
        return sum(math.prod(leaf.shape) for name, tree in params.items()
                   if name.startswith(prefix) for leaf in jax.tree.leaves(tree))

    assert count("encoder") == 595_520 and count("decoder") == 595_651
    assert count("extractors") == 12_883_232 and count("mappers") == 1_801_728
    assert all(count(f"translators_{t}") == 1_055_936 for t in range(3))
    # the official conditions: 4 zero references made by init, at the image size
    assert variables["references"]["images"].shape == (4, 256, 256, 3)
    target = targets.build("hisd")
    assert target.num_conditions == targets.TARGETS["hisd"].num_conditions == 4
    condition = target.select(target.conditions(np.zeros((2, 5), np.float32)), 0)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    image, mid = jax.eval_shape(target.forward, variables, x, condition)
    assert image.shape == (2, 256, 256, 3) and mid.shape == (2, 64, 64, 256)


def test_official_keys_map_onto_the_port():
    state = {k: v.numpy() for k, v in Gen(hisd.CELEBA_HQ_256).state_dict().items()}
    assert state["encoder.1.in1.weight"].shape == (1, 64, 1)
    assert state["extractors.model.8.weight"].shape == (768, 512, 1, 1)
    assert state["translators.2.style_to_params.weight"].shape == (1792, 256)
    assert state["mappers.2.post_models.2.2.weight"].shape == (256, 256)
    assert "encoder.1.sc.bias" not in state and "translators.0.masks.0.bias" in state
    abstract = targets.abstract_variables("hisd", image_size=256)
    variables = to_flax(state, {"params": abstract["params"]})  # raises on any key or shape
    assert variables["params"]["encoder_1"]["in1"]["scale"].shape == (64,)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_faces_dir):
    """(torch reference, out dir, reference files, reference images (4, 3, S, S))."""
    tmp = tmp_path_factory.mktemp("hisd")
    reference = _random_gen(0)
    checkpoint = tmp / "gen_00600000.pt"
    # `gen` (the raw generator) differs from `gen_test` (EMA): converting the wrong one fails
    torch.save({"gen": _random_gen(1).state_dict(), "gen_test": reference.state_dict()},
               checkpoint)
    config_file = tmp / "small.yaml"
    config_file.write_text(yaml.safe_dump(_hisd_yaml(SMALL, SIZE)))
    assert convert_main(["hisd", str(checkpoint), str(tmp / "out"), "--config", str(config_file),
                         "--image-size", str(SIZE)]) == 0
    files = [p for p in list_images(shared_faces_dir) if os.path.basename(p).startswith("ref_")]
    files = files[:4]
    refs = torch.from_numpy(np.stack([to_float(read_rgb(p, SIZE)) for p in files]))
    return reference, tmp / "out", files, refs.permute(0, 3, 1, 2)


def test_bundle_holds_the_ema_generator_and_config(converted):
    _, out, _, _ = converted
    variables, meta = load_bundle(out / "hisd")
    assert set(variables) == {"params"}  # references are data added at load time
    assert meta["model"] == "hisd" and meta["config"]["reference_size"] == SIZE
    assert {k: meta["config"][k] for k in SMALL} == SMALL
    assert meta["config"]["conditions"] == [dict(c) for c in hisd_target.DEFAULT_CONDITIONS]


def test_reference_guided_matches_torch(converted):
    reference, out, files, refs = converted
    target, variables = targets.load("hisd", out, references=files)
    assert target.num_conditions == 4
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, SIZE, SIZE, generator=gen) * 2 - 1
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    table = target.conditions(np.zeros((2, 5), np.float32))

    # as the train step selects: step mod 4, a traced index inside jit
    step = jax.jit(lambda v, x, t, i: target.forward(v, x, target.select(t, i)))
    # as with all_conditions: vmap over the condition axis
    every = jax.jit(jax.vmap(lambda c, v, x: target.forward(v, x, c), in_axes=(0, None, None)))
    images_every, mids_every = every(table, variables, x_nhwc)
    with torch.no_grad():
        want_mid = reference.encode(x)
        for i, cond in enumerate(hisd_target.DEFAULT_CONDITIONS):
            want = reference.reference_guided(x, refs[cond["reference"]][None], cond["tag"])
            image, mid = step(variables, x_nhwc, table, jnp.int32(i))
            assert_matches(image, want, f"reference-guided condition {i}")
            assert_matches(images_every[i], want, f"reference-guided condition {i} (vmap)")
            assert_matches(mid, want_mid, f"mid features, condition {i}")
            assert_matches(mids_every[i], want_mid, f"mid features, condition {i} (vmap)")
    assert mid.shape == (2, SIZE // 4, SIZE // 4, 32)


def test_latent_guided_matches_torch(converted):
    reference, out, files, _ = converted
    target, variables = targets.load("hisd", out, references=files)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, SIZE, SIZE, generator=gen) * 2 - 1
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    forward = jax.jit(target.forward)
    with torch.no_grad():
        # noise per batch element; every (tag, attribute) branch through one compiled function
        for tag, (_, attrs) in enumerate(SMALL["tags"]):
            for attr in range(len(attrs)):
                z = torch.randn(2, SMALL["noise_dim"], generator=gen)
                condition = {"noise": z.numpy(), "tag": np.full(2, tag, np.int32),
                             "attribute": np.full(2, attr, np.int32)}
                image, _ = forward(variables, x_nhwc, condition)
                assert_matches(image, reference.latent_guided(x, z, tag, attr),
                               f"latent-guided tag {tag} attribute {attr}")

        # the paper's five, from seeds (one noise for the batch), selected by a traced index
        table = hisd_target.ConditionTable(hisd_target.PAPER_CONDITIONS)(np.zeros((2, 5), np.float32))
        step = jax.jit(lambda v, x, t, i: target.forward(v, x, target.select(t, i)))
        for i, cond in enumerate(hisd_target.PAPER_CONDITIONS):
            z = torch.from_numpy(np.array(hisd.latent_noise(cond["seed"], SMALL["noise_dim"])))
            image, _ = step(variables, x_nhwc, table, jnp.int32(i))
            assert_matches(image, reference.latent_guided(x, z, cond["tag"], cond["attribute"]),
                           f"paper condition {i}")


def test_refusals(converted, tmp_path, capsys):
    _, out, files, _ = converted
    # a file without the EMA entry: named, with what it holds instead
    plain = tmp_path / "plain.pt"
    torch.save(_random_gen(0).state_dict(), plain)
    assert convert_main(["hisd", str(plain), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(plain) in err and "'gen_test'" in err and "encoder.0.weight" in err
    # --config is HiSD's alone
    assert convert_main(["stargan", str(plain), str(tmp_path / "out"), "--config", "x.yaml"]) == 2
    # references: the configured files must be there, and as many as the conditions name
    with pytest.raises(FileNotFoundError, match="reference_glasses_0.jpg"):
        targets.load("hisd", out)
    with pytest.raises(ValueError, match="3 reference images"):
        targets.load("hisd", out, references=files[:3])
    with pytest.raises(ValueError, match="cannot be mixed"):
        targets.build("hisd", {"conditions": [hisd_target.DEFAULT_CONDITIONS[0],
                                              hisd_target.PAPER_CONDITIONS[0]]})


def test_bfloat16_compute_stays_close():
    target = targets.build("hisd", SMALL)
    abstract = targets.abstract_variables("hisd", image_size=SIZE, config=SMALL)
    # Random values from numpy: compiling flax's initialisers would take longer than the test.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(np.float32),
                             abstract)
    x = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
    condition = target.select(target.conditions(np.zeros((2, 5))), 1)
    image32, _ = jax.jit(target.forward)(variables, x, condition)
    target16 = targets.build("hisd", SMALL, dtype=jnp.bfloat16)
    image16, mid16 = jax.jit(target16.forward)(variables, x, condition)
    assert image16.dtype == jnp.float32 and mid16.dtype == jnp.float32  # Target casts both
    err = float(jnp.max(jnp.abs(image16 - image32)))
    scale = max(1.0, float(jnp.max(jnp.abs(image32))))
    print(f"bfloat16 vs float32: max abs error {err:.3g} (output scale {scale:.3g})")
    assert err < 0.05 * scale  # measured 0.046 at scale 2.05


def test_standardize_closed_form_gradient_equals_autodiff():
    """HiSD's IN statistics (unbiased std, eps on the std): the same forward to the bit as the
    plain formula, and its gradient."""
    def plain(x):
        n = x.shape[1] * x.shape[2]
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.sum(jnp.square(x - mean), axis=(1, 2), keepdims=True) / (n - 1)
        return (x - mean) / (jnp.sqrt(var) + hisd._EPS)

    kx, kg = jax.random.split(jax.random.key(5))
    x = 2.0 * jax.random.normal(kx, (2, 5, 6, 3)) - 0.7
    weights = jax.random.normal(kg, x.shape)
    np.testing.assert_array_equal(hisd._standardize(x), plain(x))
    got, want = (jax.grad(lambda x: jnp.sum(jnp.sin(f(x)) * weights))(x)
                 for f in (hisd._standardize, plain))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    bf16 = x.astype(jnp.bfloat16)
    assert jax.grad(lambda x: jnp.sum(hisd._standardize(x)[..., 0]))(bf16).dtype == jnp.bfloat16
