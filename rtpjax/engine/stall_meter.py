"""How long the engine process's threads could not run: a daemon thread wakes every `period` seconds and records how
late it woke. A step whose launch stalls while this meter stays on time was held outside Python (the device
driver, a compile); one it shares a long delay with was held by the interpreter lock or the whole process. Python's
full collections (`GcTimes`) are one such hold, named beside the delay."""

from __future__ import annotations

import gc
import threading
import time


class GcTimes:
    """Python's cyclic collections (a gc callback): per generation, how many, their time in all and the longest. A
    full (generation 2) pass scans every object the process holds and stops every thread meanwhile."""

    def __init__(self):
        self.count, self.seconds, self.longest, self._began = [0, 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            g, took = info["generation"], time.perf_counter() - self._began
            self.count[g] += 1
            self.seconds[g] += took
            self.longest[g] = max(self.longest[g], took)

    def summary(self) -> dict:
        return {f"gen{g}": dict(count=self.count[g], ms=round(1e3 * self.seconds[g], 2),
                                longest_ms=round(1e3 * self.longest[g], 2)) for g in range(3)}  # fmt: skip


class StallMeter:
    def __init__(self, period: float = 0.02):
        self.period, self._longest, self._lock = period, 0.0, threading.Lock()
        self.collections = GcTimes()
        gc.callbacks.append(self.collections)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtpjax-stall-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            began = time.perf_counter()
            if self._stop.wait(self.period):
                return
            late = time.perf_counter() - began - self.period
            with self._lock:
                self._longest = max(self._longest, late)

    def take(self) -> float:
        """The longest delay (seconds) since the last call."""
        with self._lock:
            longest, self._longest = self._longest, 0.0
        return longest

    def report(self) -> str:
        """The longest delay and the full collections since the last call, for the loop log."""
        full = self.collections
        line = f"threads woke up to {1e3 * self.take():.1f} ms late"
        if full.count[2]:
            line += f"; full gc passes: {full.count[2]}, the longest {1e3 * full.longest[2]:.1f} ms"
        full.count[2], full.longest[2] = 0, 0.0  # (the callback runs on whichever thread collects: a race loses one)
        return line

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        if self.collections in gc.callbacks:
            gc.callbacks.remove(self.collections)
