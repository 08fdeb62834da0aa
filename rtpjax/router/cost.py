"""A replica's predicted time to first token, from its own measured steps (RTP-LLM FlexLB's idea).

A step costs `a + b * tokens` seconds. The replica reports cumulative counters (steps, tokens through the model, busy
seconds); every change between two reads is one point (tokens per step, seconds per step) and `a`, `b` are their least
squares fit over recent points. Until a replica has run enough steps the fit starts from `PRIOR`, the same for every
replica, so the first choices are made on tokens queued alone.

A new request waits for the prompt tokens queued ahead of it and then prefills its own uncached tokens, in steps of
the replica's token budget less one row per running (decoding) sequence.
"""

from __future__ import annotations

import collections
import math

PRIOR = (5e-3, 5e-5)  # (a, b) before any measurement: a few ms a step, tens of microseconds a token
MIN_STEPS = 3  # a point needs this many steps between two reads


class CostModel:
    def __init__(self, window: int = 32):
        self.a, self.b = PRIOR
        self.points: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._last: tuple[int, int, float] | None = None
        self.calibrated = False

    def observe(self, steps: int, tokens: int, busy_s: float) -> None:
        """The replica's cumulative counters as just read."""
        last, self._last = self._last, (steps, tokens, busy_s)
        if last is None or steps < last[0]:  # first read, or the replica restarted
            return
        n = steps - last[0]
        if n < MIN_STEPS:
            self._last = last  # keep accumulating from the older read
            return
        self.points.append(((tokens - last[1]) / n, (busy_s - last[2]) / n))
        self._fit()

    def _fit(self) -> None:
        xs, ys = zip(*self.points)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 1e-9 * max(1.0, mx * mx) and len(xs) >= 2:
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
            self.b = max(b, 0.0)
        self.a = max(my - self.b * mx, 0.0)
        self.calibrated = True

    def step_time(self, tokens: float) -> float:
        return self.a + self.b * tokens

    def ttft(self, tokens_ahead: float, new_tokens: int, running: int, budget: int) -> float:
        """Seconds until a request with `new_tokens` uncached prompt tokens gets its first token, behind
        `tokens_ahead` queued prompt tokens, with `running` sequences decoding and `budget` tokens a step."""
        total = tokens_ahead + max(new_tokens, 1)
        per_step = max(1, budget - running) if budget > 0 else total
        steps = math.ceil(total / per_step)
        return steps * self.step_time(min(total, per_step) + running)
