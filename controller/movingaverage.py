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
    """Time-weighted average of a sampled signal over the trailing window.

    A sample describes the load since the previous sample (so the newest one counts at once, as an autoscaler
    needs), and keeps holding until now. The first sample covers no time before itself: a fresh average reflects
    the samples it has rather than reading as zero.
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
        start = now - self.window_s
        total = 0.0
        weight = 0.0
        last = len(self._samples) - 1
        for i, (at, v) in enumerate(self._samples):
            begin = max(self._samples[i - 1][0] if i > 0 else at, start)
            end = now if i == last else at
            if end > begin:
                total += v * (end - begin)
                weight += end - begin
        if weight == 0.0:
            return self._samples[-1][1]  # every sample was taken at this instant
        return total / weight

    def latest(self) -> float:
        return self._samples[-1][1] if self._samples else 0.0

    def _trim(self, now: float) -> None:
        # A sample covers the time back to its predecessor: keep the one whose successor is inside the window.
        horizon = now - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()
