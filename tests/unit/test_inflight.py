"""In-flight counts (controller/inflight.py): per replica and per model, kept by the one writer."""

from __future__ import annotations

from slinfer.controller.inflight import InFlight
from slinfer.controller.registry import Replica
from slinfer.v1 import engine_pb2


def _replica(job_id: str) -> Replica:
    return Replica(job_id=job_id, model="m", node="n1", base_url="http://127.0.0.1:1", api_key="",
                   state=engine_pb2.READY, pool=True)


def test_counts_per_replica_and_per_model() -> None:
    counts = InFlight()
    a, b = _replica("1"), _replica("2")
    counts.start("m", a)
    counts.start("m", a)
    counts.start("m", b)
    assert (a.outstanding, b.outstanding, counts.model("m"), counts.model("other")) == (2, 1, 3, 0)
    counts.finish("m", a)
    counts.finish("m", b)
    assert (a.outstanding, b.outstanding, counts.model("m")) == (1, 0, 1)
