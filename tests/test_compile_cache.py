"""idguard_jax.compile_cache: compiled programs are kept on disk and found again; `off` and the
bench leave it off. Each case runs in a fresh process (JAX reads the setting at its first
compilation)."""
import os
import subprocess
import sys

import pytest

from idguard_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = """
import jax, jax.numpy as jnp
from idguard_jax import compile_cache
print(compile_cache.enable(min_compile_secs=0))
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))
print(sum(e.endswith("/cache_hits") for e in events), sum(e.endswith("/cache_misses") for e in events))
"""


def _run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(env_extra, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                          text=True, timeout=120, check=True)


def _files(folder) -> list:
    return sorted(p for _, _, names in os.walk(folder) for p in names)


def test_programs_are_written_then_found_again(tmp_path):
    folder = tmp_path / "xla"
    first = _run({compile_cache.ENV: str(folder)})
    assert first.stdout.splitlines()[0] == str(folder)
    written = _files(folder)
    hits, misses = map(int, first.stdout.splitlines()[2].split())
    assert written and hits == 0 and misses > 0
    second = _run({compile_cache.ENV: str(folder)})
    assert second.stdout.splitlines()[1] == first.stdout.splitlines()[1]
    assert second.stdout.splitlines()[2] == f"{misses} 0"     # every program found again
    assert _files(folder) == written


def test_default_folder_and_off(tmp_path):
    default = _run({"XDG_CACHE_HOME": str(tmp_path)})
    assert default.stdout.splitlines()[0] == str(tmp_path / "idguard-jax" / "xla")
    assert _files(tmp_path / "idguard-jax" / "xla")
    off = _run({"XDG_CACHE_HOME": str(tmp_path / "other"), compile_cache.ENV: "off"})
    assert off.stdout.splitlines()[0] == "None" and not (tmp_path / "other").exists()


@pytest.mark.parametrize("command, cached", [("train", True), ("protect", True),
                                             ("evaluate", True), ("bench", False)])
def test_the_dispatcher_enables_it_for_marked_commands(command, cached, monkeypatch):
    """`idguard COMMAND` (argv from sys.argv) enables the cache before a marked command runs;
    the bench (it times compiles) carries no mark."""
    from experiments import cli
    from idguard_jax import host_memory, xla_cpu

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: True)
    monkeypatch.setattr(xla_cpu, "route_convolutions_to_eigen", lambda: True)
    monkeypatch.setattr(compile_cache, "enable", lambda *a, **k: calls.append(command))
    monkeypatch.setattr(sys, "argv", ["idguard", command, "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == ([command] if cached else [])
