"""The StarGAN family port + converter reproduce the official torch generators exactly.

Official widths (so every real key name and shape goes through the converter), small images.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.convert import main as convert_main
from idguard_jax.networks import targets
from idguard_jax.checkpoint import load_bundle
from ports.stargan import AttentionGAN, FixedPointGAN, StarGAN, StarGANFamilyGenerator
from torch_reference import assert_matches, randomize_norms_
from torch_reference.stargan import Generator, manipulate

IMAGE_SIZE = 32


def _param_count(module) -> int:
    x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 5), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x, c)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("module, count", [(StarGAN(), 8_430_528), (AttentionGAN(), 8_433_664),
                                           (FixedPointGAN(), 8_430_528)])
def test_official_parameter_counts(module, count):
    assert _param_count(module) == count


@pytest.mark.parametrize("variant", ["stargan", "aggan", "fpgan"])
def test_converted_generator_matches_torch(variant, tmp_path):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = randomize_norms_(Generator(variant=variant), gen)
    checkpoint = tmp_path / "200000-G.ckpt"
    state = reference.state_dict()
    if variant == "stargan":
        # As the 2018 release was written (PyTorch 0.4): legacy file format, no step counters.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        torch.save(state, checkpoint, _use_new_zipfile_serialization=False)
    else:
        torch.save(state, checkpoint)

    assert convert_main([variant, str(checkpoint), str(tmp_path / "out")]) == 0
    variables, meta = load_bundle(tmp_path / "out" / variant)
    assert meta["kind"] == "target" and meta["model"] == variant
    assert set(variables) == {"params"}  # IN running buffers are dropped, not converted

    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
    c = torch.randint(0, 2, (2, 5), generator=gen).float()
    with torch.no_grad():  # train mode, as the reference runs it: per-image IN statistics
        want_image = manipulate(reference, x, c)
        want_mid = reference.mid_features(x, c)

    # through the library's loader, as training loads it
    target, variables = targets.load(variant, tmp_path / "out")
    image, mid = jax.jit(target.forward)(variables, x.permute(0, 2, 3, 1).numpy(), c.numpy())
    assert_matches(image, want_image, f"{variant} image")
    assert_matches(mid, want_mid, f"{variant} mid features")
    assert mid.shape == (2, IMAGE_SIZE // 4, IMAGE_SIZE // 4, 256)


def test_bfloat16_compute_stays_close():
    module = StarGANFamilyGenerator(conv_dim=8, repeat_num=3, variant="aggan")
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    c = jnp.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]], jnp.float32)
    # Random values from numpy: compiling flax's initialisers would take longer than the test.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.normal(0.0, 0.1, leaf.shape).astype(np.float32),
                             jax.eval_shape(module.init, jax.random.key(0), x, c))
    image32, _ = jax.jit(module.apply)(variables, x, c)
    image16, mid16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x, c)
    assert image16.dtype == jnp.float32 and mid16.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(image16 - image32))) < 0.02  # measured 1.5e-3
