"""A moving average of a load signal over a time window.

Responsible for: remembering the samples of the last `window_s` seconds and averaging them, weighting each
sample by how long it held (so an irregular sampling interval does not skew the average).
Not responsible for: sampling (the autoscaler calls `add`), or deciding anything from the value.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class MovingAverage:
    """Time-weighted average of a step signal over the trailing window.

    Each sample holds from its time until the next sample (the newest one until now). Time before the first
    sample does not count, so a fresh average reflects the samples it has rather than reading as zero.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be above 0, not {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float) -> None:
        now = self._clock()
        if self._samples and now < self._samples[-1][0]:
            now = self._samples[-1][0]  # a clock step backwards must not reorder samples
        self._samples.append((now, value))
        self._trim(now)

    def value(self) -> float:
        """The average over the window; 0.0 when there is no sample yet."""
        if not self._samples:
            return 0.0
        now = max(self._clock(), self._samples[-1][0])
        self._trim(now)
        start = max(now - self.window_s, self._samples[0][0])
        total = 0.0
        weight = 0.0
        for i, (at, v) in enumerate(self._samples):
            begin = max(at, start)
            end = self._samples[i + 1][0] if i + 1 < len(self._samples) else now
            if end > begin:
                total += v * (end - begin)
                weight += end - begin
        if weight == 0.0:
            return self._samples[-1][1]  # every sample was taken at this instant
        return total / weight

    def latest(self) -> float:
        return self._samples[-1][1] if self._samples else 0.0

    def _trim(self, now: float) -> None:
        # Keep the newest sample older than the window: it is the value held at the window's start.
        horizon = now - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()
