"""How long the engine process's threads could not run: a daemon thread wakes every `period` seconds and records how
late it woke. A step whose launch stalls while this meter stays on time was held outside Python (the device
driver, a compile); one it shares a long delay with was held by the interpreter lock or the whole process."""

from __future__ import annotations

import threading
import time


class StallMeter:
    def __init__(self, period: float = 0.02):
        self.period, self._longest, self._lock = period, 0.0, threading.Lock()
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

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
