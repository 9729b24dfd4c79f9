"""idguard_jax.startup and xla_cpu: a command line run (and only it) keeps freed memory and routes
XLA:CPU's convolutions to its own kernels (and with IDGUARD_XLA_CPU_DOTS=eigen its dots); the
user's XLA_FLAGS and IDGUARD_XLA_CPU_CONV win."""
import os
import subprocess
import sys

import pytest

from idguard_jax import host_memory, startup, xla_cpu


def test_command_sets_up_only_a_command_line_run(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(xla_cpu, "route_convolutions_to_eigen", lambda: calls.append("conv"))
    main = startup.command(lambda argv=None: argv)
    assert main(["--x"]) == ["--x"] and calls == []
    assert main() is None and calls == ["malloc", "conv"]


@pytest.fixture
def fresh_backend(monkeypatch):
    """The routing as if jax had not started its client yet, on a checked jaxlib."""
    monkeypatch.setattr(xla_cpu, "_jax_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_checked", lambda: True)
    monkeypatch.setattr(xla_cpu, "_routed", False)
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
    monkeypatch.delenv(xla_cpu.DOTS_ENV, raising=False)


@pytest.mark.parametrize("conv, dots, wanted", [
    (None, None, "=-individual_convolution"), ("ynn", None, None),
    (None, "eigen", "=-individual_convolution,-individual_dot"),
    ("ynn", "EIGEN", "=-individual_dot")])
def test_the_setting_follows_both_variables(fresh_backend, monkeypatch, conv, dots, wanted):
    for name, value in ((xla_cpu.ENV, conv), (xla_cpu.DOTS_ENV, dots)):
        if value is not None:
            monkeypatch.setenv(name, value)
    assert xla_cpu.setting() == (None if wanted is None else xla_cpu.FLAG + wanted)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.route_convolutions_to_eigen() == (wanted is not None)
    assert os.environ["XLA_FLAGS"] == ("" if wanted is None else xla_cpu.FLAG + wanted)


def test_routing_appends_to_the_users_flags(fresh_backend, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_cpu.route_convolutions_to_eigen() and xla_cpu.routed()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.SETTING}"


@pytest.mark.parametrize("env, flags", [({xla_cpu.ENV: "ynn"}, ""),
                                        ({}, f"{xla_cpu.FLAG}=individual_dot")])
def test_routing_leaves_the_users_choice(fresh_backend, monkeypatch, env, flags):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert not xla_cpu.route_convolutions_to_eigen() and not xla_cpu.routed()
    assert os.environ["XLA_FLAGS"] == flags


@pytest.mark.skipif(not xla_cpu._jaxlib_checked(), reason="the flag is checked on jaxlib 0.10")
def test_routing_is_too_late_once_jax_started(monkeypatch):
    import jax
    jax.devices()
    assert xla_cpu._jax_started()
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setattr(xla_cpu, "_jaxlib_checked", lambda: True)
    assert not xla_cpu.route_convolutions_to_eigen()
    assert os.environ.get("XLA_FLAGS", "") == flags


# Compiles (does not run) a 256-channel 3x3 conv in a fresh process: whether XLA:CPU gave it to
# YNNPACK (a library fusion) or kept it.
_CONV = """
import sys
from idguard_jax import xla_cpu
print(xla_cpu.route_convolutions_to_eigen(), file=sys.stderr)
import jax, jax.numpy as jnp
x = jax.ShapeDtypeStruct((4, 66, 66, 256), jnp.float32)
w = jax.ShapeDtypeStruct((3, 3, 256, 256), jnp.float32)
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print("ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text(), file=sys.stderr)
"""


def _conv_in_fresh_process(env_value):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", xla_cpu.ENV, xla_cpu.DOTS_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    if env_value is not None:
        env[xla_cpu.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _CONV], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return [line for line in out.stderr.splitlines() if line in ("True", "False")]


@pytest.mark.skipif(not xla_cpu._jaxlib_checked(), reason="the flag is checked on jaxlib 0.10")
def test_a_routed_process_keeps_convolutions_off_ynnpack():
    assert _conv_in_fresh_process(None) == ["True", "False"]
    assert _conv_in_fresh_process("ynn") == ["False", "True"]
