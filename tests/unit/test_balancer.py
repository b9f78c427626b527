"""The balancer's choices: least outstanding, random ties, exclusions, limits, bounded prefix affinity."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from slinfer.controller.balancer import Balancer
from slinfer.controller.registry import Replica
from slinfer.v1 import engine_pb2


def rep(job_id: str, outstanding: int = 0) -> Replica:
    return Replica(job_id=job_id, model="m", node="n", base_url=f"http://h:{job_id}", api_key="",
                   state=engine_pb2.READY, pool=True, outstanding=outstanding)


def test_fewest_outstanding_wins():
    b = Balancer(random.Random(1))
    reps = [rep("a", 3), rep("b", 1), rep("c", 2)]
    assert all(b.pick(reps).job_id == "b" for _ in range(50))


def test_ties_are_broken_at_random_and_evenly():
    b = Balancer(random.Random(7))
    reps = [rep("a"), rep("b"), rep("c"), rep("d", 1)]
    counts = Counter(b.pick(reps).job_id for _ in range(3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(900 < n < 1100 for n in counts.values()), counts


def test_exclude_and_limit():
    b = Balancer()
    reps = [rep("a", 0), rep("b", 5)]
    assert b.pick(reps, exclude={"a"}).job_id == "b"
    assert b.pick(reps, exclude={"a"}, limit=5) is None
    assert b.pick(reps, limit=1).job_id == "a"
    assert b.pick([]) is None


def test_same_prefix_same_engine_and_prefixes_spread():
    b = Balancer()
    reps = [rep(str(i)) for i in range(4)]
    chosen = {b.pick(reps, prefix=b"system: you are a pirate").job_id for _ in range(20)}
    assert len(chosen) == 1
    spread = Counter(b.pick(reps, prefix=f"prompt {i}".encode()).job_id for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50, spread


def test_affinity_is_bounded_by_load():
    b = Balancer(affinity_slack=0.25)
    reps = [rep(str(i)) for i in range(4)]
    home = b.pick(reps, prefix=b"p").job_id
    for r in reps:
        r.outstanding = 10 if r.job_id == home else 2
    # total 16, bound ceil(1.25 * 17 / 4) = 6: the home engine is over it, the next in hash order takes it.
    other = b.pick(reps, prefix=b"p")
    assert other.job_id != home and other.outstanding == 2
    assert b.pick(reps, prefix=b"p", exclude={other.job_id}).job_id not in (home, other.job_id)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=50), min_size=2, max_size=8), st.binary(min_size=1, max_size=40))
def test_removing_an_engine_moves_only_its_prefixes(loads, prefix):
    b = Balancer(affinity_slack=1000.0)  # no load bound: pure rendezvous hashing
    reps = [rep(f"j{i}", n) for i, n in enumerate(loads)]
    first = b.pick(reps, prefix=prefix)
    survivors = [r for r in reps if r is not reps[-1]]
    after = b.pick(survivors, prefix=prefix)
    if first is not reps[-1]:
        assert after is first


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=8), st.binary(max_size=20))
def test_affine_choice_never_exceeds_the_bound(loads, prefix):
    b = Balancer(affinity_slack=0.25)
    reps = [rep(f"j{i}", n) for i, n in enumerate(loads)]
    chosen = b.pick(reps, prefix=prefix or None)
    if prefix:
        bound = -(-(1.25 * (sum(loads) + 1)) // len(loads))
        assert chosen.outstanding + 1 <= bound
    else:
        assert chosen.outstanding == min(loads)
