"""Where a protection run's time goes: seconds per stage, summed over the threads that ran it
(what `idguard protect --profile` prints).

    timer = profile.StageTimer()
    with timer.stage("reading"):
        ...
    print(timer.table(photos=26, wall_seconds=40.0))

Compiling the generator (jax's compile events while the timer watches them) is its own row and
taken out of 'protection'. Stages run concurrently (worker threads read, detect and encode while the calling thread runs the
generator), so the stage seconds add up to more than the run's wall-clock time; each stage's
photos/s is what that stage alone would sustain on one thread.
"""
from __future__ import annotations

import contextlib
import threading
import time

__all__ = ["StageTimer", "NullTimer", "STAGES", "TimedAnalyzer"]

# The stages of photos.protect_photos, in the order a photo passes them.
STAGES = ("reading", "detection", "landmarks", "alignment", "compiling", "protection", "warp-back",
          "encoding", "writing")
# jax's events for the parts of compiling a function (tracing, lowering, XLA)
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class StageTimer:
    """Thread-safe seconds and call counts per stage."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    @contextlib.contextmanager
    def compiles(self):
        """Count jax's compile time meanwhile as the stage 'compiling' (in any thread)."""
        import jax.monitoring

        def listener(event: str, seconds: float, **_):
            if event in _COMPILE_EVENTS:
                self.add("compiling", seconds)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)

    def net_seconds(self) -> dict[str, float]:
        """Seconds per stage, compiling taken out of protection (it happens inside its calls)."""
        net = dict(self.seconds)
        if "compiling" in net and "protection" in net:
            net["protection"] = max(0.0, net["protection"] - net["compiling"])
        return net

    def table(self, photos: int, wall_seconds: float) -> str:
        """Per stage: seconds, share of the stages' sum, photos/s; then the run's wall time and
        photos/s."""
        seconds = self.net_seconds()
        order = [s for s in STAGES if s in seconds] + sorted(set(seconds) - set(STAGES))
        total = sum(seconds.values()) or 1e-12
        rows = [f"{'stage':<11} {'seconds':>8} {'share':>6} {'photos/s':>9} {'calls':>6}"]
        for s in order:
            sec = seconds[s]
            rate = f"{photos / sec:9.2f}" if sec > 0 else f"{'-':>9}"
            rows.append(f"{s:<11} {sec:8.2f} {sec / total:6.1%} {rate} {self.calls[s]:6d}")
        rows.append(f"{'sum':<11} {total:8.2f} {1:6.0%}")
        rows.append(f"wall clock  {wall_seconds:8.2f} s for {photos} photo(s): "
                    f"{photos / max(wall_seconds, 1e-12):.2f} photos/s (stages overlap across "
                    f"threads)")
        return "\n".join(rows)


class NullTimer:
    """A StageTimer that records nothing (the default: profiling off)."""

    @contextlib.contextmanager
    def stage(self, name: str):
        yield

    def add(self, stage: str, seconds: float) -> None:
        pass


class TimedAnalyzer:
    """A faces.detection.FaceAnalyzer whose detect() counts as 'detection' and landmarks() /
    landmarks68() as 'landmarks'; everything else is passed through unchanged."""

    def __init__(self, analyzer, timer):
        self._analyzer, self._timer = analyzer, timer
        self.spent = 0.0     # seconds in detect/landmarks so far (one analyzer per thread)

    def _timed(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.spent += dt
            self._timer.add(stage, dt)

    def detect(self, *args, **kwargs):
        return self._timed("detection", self._analyzer.detect, *args, **kwargs)

    def landmarks(self, *args, **kwargs):
        return self._timed("landmarks", self._analyzer.landmarks, *args, **kwargs)

    def landmarks68(self, *args, **kwargs):
        return self._timed("landmarks", self._analyzer.landmarks68, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._analyzer, name)
