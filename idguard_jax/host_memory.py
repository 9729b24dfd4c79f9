"""Host memory on CPU: keep the memory XLA:CPU frees after a step, for the next step.

XLA:CPU mallocs each execution's buffers and frees them when it ends. glibc gives large blocks
back to the kernel at once: blocks served by mmap, and whole heaps of the per-thread arenas. So
every step writes to fresh pages, and the kernel faults them in and zeroes them. At 256 px, batch
2, that is about 7 GB and 5 s of system time per 20 s train step on a 2-core CPU.

`retain_freed_memory` sets glibc's malloc (mallopt) to serve every thread from one arena grown
with brk, never by mmap, and never trimmed: the process keeps its peak footprint instead of
returning it between steps. Call it at the start of a command line, before jax starts its CPU
client: threads that have already allocated keep their own arenas (every command line does,
`startup.command`). Set IDGUARD_HOST_MALLOC=system to leave malloc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["retain_freed_memory", "retained", "ENV"]

ENV = "IDGUARD_HOST_MALLOC"
# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_NEVER = -1                       # mallopt's int becomes glibc's size_t: the largest size
_TOP_PAD = 256 << 20              # bytes the heap grows by beyond each request
_applied = False


def _glibc():
    """The C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). True if it applied;
    False off glibc (macOS, musl), when IDGUARD_HOST_MALLOC=system, or if mallopt refused."""
    if os.environ.get(ENV, "").lower() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER),
                (_M_TOP_PAD, _TOP_PAD))
    global _applied
    _applied = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
                   for param, value in settings)
    return _applied


def retained() -> bool:
    """Whether this process's malloc keeps freed memory (retain_freed_memory applied)."""
    return _applied

