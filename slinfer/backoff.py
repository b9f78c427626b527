"""Exponential backoff after failures: the one schedule the agent's reporter, the Kubernetes publisher and the
autoscaler's sbatch retries share.

Responsible for: counting consecutive failures, the delay before the next try (doubling from `initial_s` up to
`max_s`), when that try is due, and the last error for status pages. Not responsible for: sleeping, clocks
(callers pass `now`), or deciding what counts as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    initial_s: float
    max_s: float


# The agent's reconnect to the controller: quick at first, so that a controller restart costs one heartbeat;
# capped so that a controller that comes back is seen within seconds.
AGENT_RECONNECT = BackoffPolicy(initial_s=0.5, max_s=10.0)


@dataclass
class Backoff:
    initial_s: float
    max_s: float
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    down_since: float = 0.0

    @classmethod
    def of(cls, policy: BackoffPolicy) -> Backoff:
        return cls(policy.initial_s, policy.max_s)

    def failed(self, now: float, error: str = "") -> float:
        """Records one more failure and returns the delay before the next try."""
        if not self.failures:
            self.down_since = now
        self.failures += 1
        delay = min(self.max_s, self.initial_s * 2 ** (self.failures - 1))
        self.retry_at = now + delay
        self.last_error = error
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""

# A gateway's reconnect to the controller's feed: it serves from its last table meanwhile, so a quick retry
# only shortens how stale that table gets.
GATEWAY_RECONNECT = BackoffPolicy(initial_s=0.25, max_s=2.0)
