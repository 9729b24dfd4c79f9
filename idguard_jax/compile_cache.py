"""A persistent XLA compilation cache for the command lines.

The paper's train step takes minutes to compile (on a 2-core CPU: ~220 s at 64 px, ~360 s at
256 px), and so does every `--resume`, `evaluate` or `protect` run that builds the same
program again. JAX can keep compiled executables on disk, keyed by the program, the device and
the jax/XLA versions and flags, so a second run with the same shapes loads them instead.

`enable` turns it on for this process, in (first that applies):
  1. its `directory` argument;
  2. $IDGUARD_COMPILE_CACHE (`off` turns the cache off);
  3. $JAX_COMPILATION_CACHE_DIR, JAX's own setting, left as it is;
  4. $XDG_CACHE_HOME/idguard-jax/xla (default ~/.cache/idguard-jax/xla).
Only programs that took at least `min_compile_secs` to compile are written (default: JAX's
setting, 1 s unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise).
The command lines call it through `command`; `bench.py` never does (it measures compile time).

    @compile_cache.command        # on a command line's main(argv=None)
    def main(argv=None): ...
"""
from __future__ import annotations

import functools
import os

__all__ = ["enable", "command", "default_directory", "ENV"]

ENV = "IDGUARD_COMPILE_CACHE"
_OFF = "off"


def default_directory() -> str:
    """$XDG_CACHE_HOME/idguard-jax/xla, or ~/.cache/idguard-jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idguard-jax", "xla")


def enable(directory: str | None = None, min_compile_secs: float | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on (see the module docstring) before the first
    compilation of this process. Returns its folder, or None where $IDGUARD_COMPILE_CACHE=off."""
    import jax

    setting = os.environ.get(ENV)
    if directory is None and setting is not None and setting.lower() == _OFF:
        return None
    chosen = directory or setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    chosen = os.path.abspath(os.path.expanduser(chosen or default_directory()))
    jax.config.update("jax_compilation_cache_dir", chosen)
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return chosen


def command(main):
    """Decorate a command line's `main(argv=None)`: called as the command (argv None), it first
    calls `enable`; called from Python with an argv (tests, the `idguard` dispatcher, which
    enables it itself for the commands that carry this mark) it changes nothing."""
    @functools.wraps(main)
    def wrapped(argv=None):
        if argv is None:
            enable()
        return main(argv)
    wrapped.compile_cached = True
    return wrapped
