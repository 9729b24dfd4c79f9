"""XLA:CPU's convolutions on its own (Eigen) kernels, not YNNPACK's.

jaxlib 0.10's XLA:CPU hands every large convolution to YNNPACK (its library fusion
'individual_convolution', on by default), which is slower here than the convolution it
replaces. 2-core Xeon (AVX-512, AMX-BF16), float32, a 256-channel 3x3 conv at 64 px, batch 4:

    padding in the conv op     YNNPACK 258 GFLOP/s    Eigen 332 GFLOP/s
    VALID on a padded input    YNNPACK  88 GFLOP/s    Eigen 315 GFLOP/s

Dots stay on YNNPACK (its bfloat16 products are the fast path of `protection.fast`), unless
IDGUARD_XLA_CPU_DOTS=eigen: YNNPACK's dots make the train step NOT reproducible. On the Xeon at
256 px, batch 2 (StarGAN + RelGAN + ArcFace, kpi), 2 of 10 calls of one compiled step on the
same state and batch gave a RelGAN loss 2e-5 (relative) off the other 8 (with the five
targets, one of two fresh processes gave a first step 4e-3 off); with dots on Eigen 10 of 10
were bit for bit equal, at +10% step time there (10.6 -> 11.7 s) and +26% for the five
targets (the anchor, 19.7 -> 24.9 s). jax-ml/jax#39741 reports the same on 2+ threads.
Protection (eval forward, on YNNPACK's products) gave one output in 30 calls. So reproducible
training runs set IDGUARD_XLA_CPU_DOTS=eigen; the default is the faster step.

`route_convolutions_to_eigen` removes those fusion types through XLA_FLAGS; it must run before
jax starts its CPU client (every command line does, `startup.command`). From Python call it
before the first jax operation. It changes nothing where the user's XLA_FLAGS already set the
YNN fusion types, or on a jaxlib this was not checked on: XLA aborts the process on a flag it
does not know. IDGUARD_XLA_CPU_CONV=ynn leaves convolutions on YNNPACK.
"""
from __future__ import annotations

import os

__all__ = ["route_convolutions_to_eigen", "routed", "setting", "FLAG", "SETTING", "ENV",
           "DOTS_ENV", "CHECKED_JAXLIB"]

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SETTING = f"{FLAG}=-individual_convolution"
ENV = "IDGUARD_XLA_CPU_CONV"          # 'ynn': convolutions stay on YNNPACK
DOTS_ENV = "IDGUARD_XLA_CPU_DOTS"     # 'eigen': dots on XLA's own kernels too (reproducible)
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


def setting() -> str | None:
    """The XLA flag this process's IDGUARD_XLA_CPU_CONV and IDGUARD_XLA_CPU_DOTS ask for
    (SETTING by default), None for XLA's default."""
    removed = [] if os.environ.get(ENV, "").lower() == "ynn" else ["-individual_convolution"]
    if os.environ.get(DOTS_ENV, "").lower() == "eigen":
        removed.append("-individual_dot")
    return f"{FLAG}={','.join(removed)}" if removed else None


def route_convolutions_to_eigen() -> bool:
    """Append `setting()` to XLA_FLAGS (see the module docstring). True if it applied."""
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = setting()
    if wanted is None or FLAG in flags or not _jaxlib_checked() or _jax_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {wanted}".strip()
    global _routed
    _routed = True
    return True


def routed() -> bool:
    """Whether this process set its setting() (route_convolutions_to_eigen applied)."""
    return _routed
