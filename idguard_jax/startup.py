"""What every command line sets before jax starts its CPU client: glibc keeps freed memory
(`host_memory`) and XLA:CPU computes convolutions with its own kernels (`xla_cpu`).

    @startup.command              # on each command line's main(argv=None)
    def main(argv=None): ...
"""
from __future__ import annotations

import functools

from idguard_jax import host_memory, xla_cpu

__all__ = ["command"]


def command(main):
    """Decorate a command line's `main(argv=None)`: called as the command (argv None: the
    console script or `python experiments/X.py`), it first calls
    `host_memory.retain_freed_memory` and `xla_cpu.route_convolutions_to_eigen`; called from
    Python with an argv (tests, the `idguard` dispatcher) it changes nothing."""
    @functools.wraps(main)
    def wrapped(argv=None):
        if argv is None:
            host_memory.retain_freed_memory()
            xla_cpu.route_convolutions_to_eigen()
        return main(argv)
    return wrapped
