"""The adapter interface of `idguard_jax.networks`: every registered target and identity network
builds under one signature, returns (static, variables), and computes in the dtype it is given."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idguard_jax.networks import identity, targets

# Small architectures of each identity network (official widths would only be slower).
_IDENTITY_SMALL = {
    "standin": {"width": 4},
    "arcface": {"layers": (1, 1, 1, 1)},
    "irse50": {"units": (1, 1, 1, 1)},
    "iresnet50": {"layers": (1, 1, 1, 1)},
    "iresnet100": {"layers": (1, 1, 1, 1)},
    "vggface": {"widths": (4, 4, 8, 8, 8), "fc_width": 8, "num_classes": 4},
    "dlib": None,   # no architecture fields: the real network's shapes
}


def _convolutions(jaxpr) -> list:
    """Every convolution of a jaxpr, its sub-jaxprs included. (Matrix products are not asked:
    some heads compute their descriptor in float32 by design, e.g. dlib's fc.)"""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _convolutions(getattr(inner, "jaxpr", inner))
    return found


def _assert_bf16(fn, *args) -> None:
    convs = _convolutions(jax.make_jaxpr(fn)(*args).jaxpr)
    assert convs, "no convolution traced"
    wrong = {str(v.aval.dtype) for eqn in convs for v in eqn.invars} - {"bfloat16"}
    assert not wrong, f"{len(convs)} convolutions, some on {wrong}"


def test_every_network_has_the_one_interface():
    assert set(_IDENTITY_SMALL) == set(identity.IDENTITY_NETS)
    target, tvars = targets.init_random("stargan", jax.random.key(0), image_size=16,
                                        config=targets.size_config("stargan", "tiny"))
    assert isinstance(target, targets.Target) and set(tvars) == {"params"}
    net, ivars = identity.init_random("standin", jax.random.key(0), config={"width": 4},
                                      normalisation="trained")
    assert isinstance(net, identity.IdentityNet) and net.normalisation == "trained"
    assert jax.tree.map(np.shape, ivars) == jax.tree.map(
        lambda a: a.shape, identity.abstract_variables("standin", config={"width": 4}))
    with pytest.raises(TypeError):
        identity.build("standin", None, None)          # the options are keyword-only


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_targets_compute_in_bfloat16(name):
    config = targets.size_config(name, "tiny")
    target, variables = targets.init_random(name, jax.random.key(0), image_size=32,
                                            config=config, dtype=jnp.bfloat16)
    assert target.module.dtype == jnp.bfloat16
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    condition = target.select(target.conditions(jnp.zeros((1, 5))), 0)
    _assert_bf16(lambda v, a: target.module.apply(v, a, condition), variables, x)
    image, _ = jax.eval_shape(target.forward, variables, x, condition)   # float32 out
    assert image.shape == (1, 32, 32, 3) and image.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(identity.IDENTITY_NETS))
def test_identity_networks_compute_in_bfloat16(name):
    net, variables = identity.init_random(name, jax.random.key(0),
                                          config=_IDENTITY_SMALL[name], dtype=jnp.bfloat16)
    assert net.module.dtype == jnp.bfloat16
    s = net.input_size
    x = jnp.zeros((1, s, s, 3), jnp.float32)
    if net.chip_based:      # dlib: its input is the chip; the traced forward suffices
        _assert_bf16(lambda v, a: net.module.apply(v, a), variables, x)
        return
    _assert_bf16(lambda v, a: net.module.apply(v, a, method=net.feature_method), variables, x)
    emb = jax.eval_shape(net.embed, variables, jnp.zeros((1, 32, 32, 3), jnp.float32))
    assert emb.dtype == jnp.float32                                     # float32 out
