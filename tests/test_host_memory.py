"""idguard_jax.host_memory: freed memory is kept for reuse (no fresh pages the second time),
and IDGUARD_HOST_MALLOC=system turns it off (tests/test_startup.py: only for a command line
run)."""
import os
import subprocess
import sys

import pytest

from idguard_jax import host_memory

# Mallocs, writes and frees 256 MiB twice in a fresh process (as XLA:CPU does with a step's
# buffers) and prints the page faults of the second round.
_ROUNDS = """
import ctypes, resource, sys
from idguard_jax import host_memory
print(host_memory.retain_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL(host_memory._glibc()._name)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch(n=256 << 20):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(env_value: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    if env_value is not None:
        env[host_memory.ENV] = env_value
    r = subprocess.run([sys.executable, "-c", _ROUNDS], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), r.stderr.strip()


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_fresh_pages():
    retained, applied = _second_round_faults(None)
    system, not_applied = _second_round_faults("system")
    assert (applied, not_applied) == ("True", "False")
    assert retained < 1000
    # 256 MiB are 65536 pages of 4 KiB: glibc gives them back and faults them in again (with
    # transparent huge pages always on, 2 MiB pages: a few hundred faults)
    assert system > (100 if _huge_pages_always() else 30000)
