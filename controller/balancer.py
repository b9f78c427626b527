"""The balancer: which routable engine gets one request.

Least outstanding requests first (the gateway's own in-flight count per engine, exact and current, unlike the
engine's /metrics which lag a heartbeat), ties broken at random. With prefix affinity, a request whose prompt
starts like an earlier one goes to the same engine (rendezvous hashing over the engines, so adding or losing
one moves only its share), unless that engine already carries more than (1 + slack) times the average load,
in which case the next engine in the hash order takes it ("consistent hashing with bounded loads"). The
`round_robin` policy instead hands requests to the engines in turn, blind to load (the baseline the routing
benchmark compares against). It does not know which engines are routable (the Registry does) or wait for
capacity (the gateway's queue does).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence

from slinfer.controller.registry import Replica

LEAST_OUTSTANDING = "least_outstanding"
ROUND_ROBIN = "round_robin"
POLICIES = (LEAST_OUTSTANDING, ROUND_ROBIN)


class Balancer:
    def __init__(self, rng: random.Random | None = None, affinity_slack: float = 0.25,
                 policy: str = LEAST_OUTSTANDING) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancer policy {policy!r} (known: {', '.join(POLICIES)})")
        self._rng = rng or random.Random()
        self._slack = affinity_slack
        self._policy = policy
        # Round-robin position per model, so that one model's traffic does not skew another's turn.
        self._turn: dict[str, int] = {}

    def pick(self, replicas: Sequence[Replica], prefix: bytes | None = None, exclude: Collection[str] = (),
             limit: int = 0, policy: str | None = None) -> Replica | None:
        """The engine for a request, or None when every candidate is excluded or at `limit` outstanding.
        `policy` (a model's `[[models]].balancer`) overrides the balancer's default."""
        if prefix:
            return self._pick_affine(replicas, prefix, exclude, limit)
        if (policy or self._policy) == ROUND_ROBIN:
            return self._pick_round_robin(replicas, exclude, limit)
        best: Replica | None = None
        ties = 0
        for r in replicas:
            if (limit and r.outstanding >= limit) or (exclude and r.job_id in exclude):
                continue
            if best is None or r.outstanding < best.outstanding:
                best, ties = r, 1
            elif r.outstanding == best.outstanding:
                # Reservoir sampling: each tied engine ends up chosen with probability 1/ties.
                ties += 1
                if self._rng.random() * ties < 1.0:
                    best = r
        return best

    def _pick_affine(self, replicas: Sequence[Replica], prefix: bytes, exclude: Collection[str],
                     limit: int) -> Replica | None:
        candidates = [r for r in replicas
                      if not (limit and r.outstanding >= limit) and not (exclude and r.job_id in exclude)]
        if not candidates:
            return None
        total = sum(r.outstanding for r in candidates)
        # The bound counts this request; it is always met by the least-loaded candidate.
        bound = math.ceil((1.0 + self._slack) * (total + 1) / len(candidates))
        ranked = sorted(candidates, key=lambda r: _score(prefix, r.job_id), reverse=True)
        for r in ranked:
            if r.outstanding + 1 <= bound:
                return r
        return min(ranked, key=lambda r: r.outstanding)


    def _pick_round_robin(self, replicas: Sequence[Replica], exclude: Collection[str],
                          limit: int) -> Replica | None:
        candidates = sorted((r for r in replicas
                             if not (limit and r.outstanding >= limit) and not (exclude and r.job_id in exclude)),
                            key=lambda r: r.job_id)
        if not candidates:
            return None
        model = candidates[0].model
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        return candidates[turn % len(candidates)]


def _score(prefix: bytes, job_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(prefix + b"\0" + job_id.encode(), digest_size=8).digest(), "big")
