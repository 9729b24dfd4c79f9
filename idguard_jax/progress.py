"""A dependency-free progress bar on stderr (rate and ETA); silent when stderr is not a tty
unless forced, so logs and CI output stay clean."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "step", start: int = 0,
                 stream=None, force: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = start
        self._start_n = start
        self.stream = stream or sys.stderr
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self._t0 = time.perf_counter()

    def update(self, k: int = 1, extra: str = "") -> None:
        self.n += k
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = (self.n - self._start_n) / dt
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.n / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} "
                          f"{rate:.2f} {self.unit}/s ETA {eta:.0f}s {extra}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
