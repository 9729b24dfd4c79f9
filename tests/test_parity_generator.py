"""An official AdvG.pth + prior converts to a generator bundle that reproduces torch exactly:
BatchNorm in eval mode (running statistics), in train mode (batch statistics) and the running
statistics torch leaves after one training forward (unbiased variance)."""
import jax
import numpy as np
import pytest
import torch

from convert.convert import main as convert_main
from convert.torch_io import state_dict_to_numpy, to_flax
from idguard_jax.generator import load_generator, perturb
from torch_reference import assert_matches, randomize_norms_
from torch_reference.advgen import ResnetGenerator

IMAGE_SIZE = 32
EPS = 0.05


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch reference, its prior (1, 3, S, S), the loaded bundle) at the official width."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = randomize_norms_(ResnetGenerator(), gen)
    folder = tmp_path_factory.mktemp("MGDA_Arc")
    torch.save(reference.state_dict(), folder / "AdvG.pth")
    prior = 0.08 * torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)  # some beyond +-eps
    torch.save(prior, folder / "optimized_pri_pert.pt")
    out = folder / "out"
    assert convert_main(["generator", str(folder / "AdvG.pth"), str(out),
                         "--image-size", str(IMAGE_SIZE)]) == 0
    return reference, prior, load_generator(out / "generator")


def _input(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 6, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1


def test_prior_and_config(converted):
    _, prior, (cfg, _, delta_p) = converted
    assert cfg.image_size == IMAGE_SIZE and cfg.ngf == 64 and cfg.n_blocks == 6
    np.testing.assert_array_equal(np.asarray(delta_p), prior[0].permute(1, 2, 0).numpy())


def test_eval_mode_and_protected_image_match_torch(converted):
    reference, prior, (cfg, variables, delta_p) = converted
    module = cfg.module()
    reference.eval()
    x = _input(1)
    with torch.no_grad():
        want = reference(x)
        image = x[:, :3]
        p = prior.clamp(-EPS, EPS)
        want_adv = (image + reference(torch.cat([image, p.repeat(2, 1, 1, 1)], 1))
                    .clamp(-EPS, EPS)).clamp(-1, 1)
    got = jax.jit(lambda v, a: module.apply(v, a, train=False))(
        variables, x.permute(0, 2, 3, 1).numpy())
    assert_matches(got, want, "generator eval")
    x_adv, _, _ = jax.jit(lambda v, d, a: perturb(module, v, d, a, EPS, train=False))(
        variables, delta_p, image.permute(0, 2, 3, 1).numpy())
    assert_matches(x_adv, want_adv, "protected image (eval)")


def test_train_mode_and_running_statistics_match_torch(converted):
    reference, _, (cfg, variables, _) = converted
    module = cfg.module()
    reference.train()
    x = _input(2)
    with torch.no_grad():
        want = reference(x)  # also updates reference's running statistics
    got, updates = jax.jit(lambda v, a: module.apply(v, a, train=True, mutable=["batch_stats"]))(
        variables, x.permute(0, 2, 3, 1).numpy())
    assert_matches(got, want, "generator train")

    # torch's updated buffers, mapped with the converter's own rule, compared leaf for leaf.
    abstract = jax.eval_shape(lambda: variables)
    want_stats = to_flax(state_dict_to_numpy(reference.state_dict(), "<updated>"),
                         abstract)["batch_stats"]
    assert jax.tree.structure(want_stats) == jax.tree.structure(updates["batch_stats"])

    def flat(tree):
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])

    assert_matches(flat(updates["batch_stats"]), torch.from_numpy(flat(want_stats)),
                   "running statistics after one train forward")
