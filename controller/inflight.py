"""Requests in flight through the gateway: the one writer of these counts, which the others only read.

Responsible for: counting a request from the moment the gateway hands it to an engine until its response has
ended or failed, per replica (`Replica.outstanding`, which the balancer, the autoscaler's drains, metrics and
`slinfer status` read) and per model (the autoscaler's demand and the gateway's metrics).
Not responsible for: choosing the engine (balancer.py), queueing (queue.py) or the limit on outstanding requests
(the gateway's config).
"""

from __future__ import annotations

from slinfer.controller.registry import Replica


class InFlight:
    def __init__(self) -> None:
        self._by_model: dict[str, int] = {}

    def start(self, model: str, replica: Replica) -> None:
        """A request for `model` goes to `replica`; `finish` with the same pair ends it."""
        replica.outstanding += 1
        self._by_model[model] = self._by_model.get(model, 0) + 1

    def finish(self, model: str, replica: Replica) -> None:
        replica.outstanding -= 1
        self._by_model[model] -= 1

    def model(self, model: str) -> int:
        return self._by_model.get(model, 0)
