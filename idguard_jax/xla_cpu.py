"""XLA:CPU's convolutions on its own (Eigen) kernels, not YNNPACK's.

jaxlib 0.10's XLA:CPU hands every large convolution to YNNPACK (its library fusion
'individual_convolution', on by default), which is slower here than the convolution it
replaces. 2-core Xeon (AVX-512, AMX-BF16), float32, a 256-channel 3x3 conv at 64 px, batch 4:

    padding in the conv op     YNNPACK 258 GFLOP/s    Eigen 332 GFLOP/s
    VALID on a padded input    YNNPACK  88 GFLOP/s    Eigen 315 GFLOP/s

Dots stay on YNNPACK (its bfloat16 products are the fast path of `protection.fast`).
`route_convolutions_to_eigen` removes that fusion type through XLA_FLAGS; it must run before
jax starts its CPU client (every command line does, `startup.command`). From Python call it
before the first jax operation. It changes nothing where the user's XLA_FLAGS already set the
YNN fusion types, where IDGUARD_XLA_CPU_CONV=ynn, or on a jaxlib this was not checked on: XLA
aborts the process on a flag it does not know.
"""
from __future__ import annotations

import os

__all__ = ["route_convolutions_to_eigen", "routed", "FLAG", "SETTING", "ENV", "CHECKED_JAXLIB"]

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SETTING = f"{FLAG}=-individual_convolution"
ENV = "IDGUARD_XLA_CPU_CONV"
CHECKED_JAXLIB = ((0, 10),)         # jaxlib (major, minor) whose XLA:CPU has this flag
_routed = False


def _jaxlib_checked() -> bool:
    import jaxlib
    major, minor = (int(part) for part in jaxlib.__version__.split(".")[:2])
    return (major, minor) in CHECKED_JAXLIB


def _jax_started() -> bool:
    """Whether jax has started a client (its flags are read then); jax 0.10's own check."""
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def route_convolutions_to_eigen() -> bool:
    """Append SETTING to XLA_FLAGS (see the module docstring). True if it applied."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get(ENV, "").lower() == "ynn" or FLAG in flags or not _jaxlib_checked()
            or _jax_started()):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {SETTING}".strip()
    global _routed
    _routed = True
    return True


def routed() -> bool:
    """Whether this process set SETTING (route_convolutions_to_eigen applied)."""
    return _routed
