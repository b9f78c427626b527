"""The balancer's round-robin policy: engines in turn, blind to load, per model; exclusions and limits hold."""

from __future__ import annotations

import pytest

from slinfer.controller.balancer import ROUND_ROBIN, Balancer
from slinfer.controller.registry import Replica
from slinfer.v1 import engine_pb2


def _replica(job_id: str, model: str = "m", outstanding: int = 0) -> Replica:
    return Replica(job_id=job_id, model=model, node="n", base_url=f"http://{job_id}", api_key="k",
                   state=engine_pb2.READY, pool=True, outstanding=outstanding)


def test_round_robin_takes_engines_in_turn_whatever_their_load() -> None:
    balancer = Balancer(policy=ROUND_ROBIN)
    replicas = [_replica("2", outstanding=50), _replica("1"), _replica("3", outstanding=7)]
    picks = [balancer.pick(replicas) for _ in range(6)]
    assert [r.job_id for r in picks if r is not None] == ["1", "2", "3", "1", "2", "3"]


def test_round_robin_keeps_a_turn_per_model() -> None:
    balancer = Balancer(policy=ROUND_ROBIN)
    a = [_replica("1", "a"), _replica("2", "a")]
    b = [_replica("7", "b"), _replica("8", "b")]
    picks = [balancer.pick(a), balancer.pick(b), balancer.pick(a), balancer.pick(b)]
    assert [r.job_id for r in picks if r is not None] == ["1", "7", "2", "8"]


def test_round_robin_skips_excluded_and_full_engines() -> None:
    balancer = Balancer(policy=ROUND_ROBIN)
    replicas = [_replica("1"), _replica("2", outstanding=4), _replica("3")]
    picks = [balancer.pick(replicas, exclude={"3"}, limit=4) for _ in range(3)]
    assert [r.job_id for r in picks if r is not None] == ["1", "1", "1"]
    assert balancer.pick(replicas, exclude={"1", "3"}, limit=4) is None


def test_prefix_affinity_still_wins_over_round_robin() -> None:
    balancer = Balancer(policy=ROUND_ROBIN)
    replicas = [_replica("1"), _replica("2"), _replica("3")]
    first = balancer.pick(replicas, prefix=b"same system prompt")
    assert all(balancer.pick(replicas, prefix=b"same system prompt") is first for _ in range(5))


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="round-robin"):
        Balancer(policy="round-robin")


def test_a_models_policy_overrides_the_default_per_pick() -> None:
    """The gateway passes each model's `[[models]].balancer`; least-outstanding stays the default."""
    balancer = Balancer()
    engines = [_replica("1", outstanding=5), _replica("2", outstanding=0)]
    assert {balancer.pick(engines).job_id for _ in range(4)} == {"2"}  # type: ignore[union-attr]
    turns = [balancer.pick(engines, policy=ROUND_ROBIN).job_id for _ in range(4)]  # type: ignore[union-attr]
    assert sorted(turns) == ["1", "1", "2", "2"]
