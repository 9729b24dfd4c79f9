"""Shared fixtures. Real faces are read from ../shared/data/faces (never copied into the repo)."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data/faces beside the checkout (as on developer machines and in CI); IDGUARD_FACES
# names another copy of the same folder.
SHARED_FACES = os.environ.get("IDGUARD_FACES") or os.path.normpath(
    os.path.join(REPO, "..", "shared", "data", "faces"))


@pytest.fixture
def fast_compile():
    """Fewer XLA optimisations: a big step (five targets, the ablation variants) compiles faster
    and runs slower; its values are unchanged."""
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _shared(sub: str, what: str) -> str:
    path = os.path.join(SHARED_FACES, sub)
    if not os.path.isdir(path):
        pytest.fail(f"{path}: the shared test {what} are missing (expected beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_faces_dir():
    return _shared("celebahq", "faces")


@pytest.fixture(scope="session")
def shared_photos_dir():
    return _shared("photos", "photos")


def save_bounded_generator(path, image_size: int, eps: float = 0.05) -> str:
    """A tiny generator (ngf 4, 1 block) saved at `path` whose perturbation reaches the eps
    bound: an untrained generator's output is ~1e-4, so its last conv is scaled by 1e3, and its
    delta_p (0.1 x N(0, 1)) lies beyond eps, so the clamping is exercised."""
    import jax

    from idguard_jax.generator import GeneratorConfig, init_generator, save_generator

    cfg = GeneratorConfig(ngf=4, n_blocks=1, image_size=image_size, eps=eps)
    _, variables = init_generator(cfg, jax.random.key(0))
    last = max(variables["params"], key=lambda k: int(k.split("_")[1]))
    variables["params"][last]["kernel"] = variables["params"][last]["kernel"] * 1e3
    delta_p = 0.1 * jax.random.normal(jax.random.key(1), (image_size, image_size, 3))
    save_generator(path, variables, delta_p, cfg)
    return str(path)
