from hypothesis import given
from hypothesis import strategies as st

from slinfer.controller.movingaverage import MovingAverage


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_empty_average_is_zero() -> None:
    assert MovingAverage(30, Clock()).value() == 0.0


def test_single_sample_is_its_value() -> None:
    clock = Clock()
    ma = MovingAverage(30, clock)
    ma.add(7.0)
    assert ma.value() == 7.0
    clock.now += 10
    assert ma.value() == 7.0


def test_time_weighted_over_window() -> None:
    clock = Clock()
    ma = MovingAverage(30, clock)
    ma.add(0.0)
    clock.now += 20
    ma.add(30.0)  # the load of the last 20 s
    clock.now += 10
    ma.add(0.0)  # the load of the last 10 s
    assert ma.value() == 20.0


def test_newest_sample_counts_at_once() -> None:
    clock = Clock()
    ma = MovingAverage(30, clock)
    for _ in range(15):
        ma.add(0.0)
        clock.now += 2
    ma.add(30.0)
    # 2 s of 30 in a 30 s window: an average that ignored the newest sample would say 0.
    assert ma.value() == 2.0


def test_irregular_sampling_does_not_skew() -> None:
    clock = Clock()
    ma = MovingAverage(10, clock)
    ma.add(0.0)
    clock.now += 5
    ma.add(4.0)
    for _ in range(50):  # a burst of samples within one second
        clock.now += 0.02
        ma.add(0.0)
    clock.now += 4
    ma.add(0.0)
    # 5 s at 4, 5 s at 0: a plain mean of the samples would say about 0.08.
    assert abs(ma.value() - 2.0) < 1e-9


def test_old_samples_leave_the_window() -> None:
    clock = Clock()
    ma = MovingAverage(10, clock)
    ma.add(0.0)
    clock.now += 5
    ma.add(100.0)
    clock.now += 5
    ma.add(0.0)
    clock.now += 20
    assert ma.value() == 0.0
    assert len(ma._samples) == 1


def test_sample_across_window_start_counts_partially() -> None:
    clock = Clock()
    ma = MovingAverage(10, clock)
    ma.add(0.0)
    clock.now += 15
    ma.add(10.0)
    clock.now += 5
    ma.add(0.0)
    # The window (now-10, now] saw 5 s of 10 and 5 s of 0.
    assert ma.value() == 5.0


def test_clock_going_backwards_keeps_order() -> None:
    clock = Clock()
    ma = MovingAverage(10, clock)
    ma.add(2.0)
    clock.now -= 5
    ma.add(4.0)
    assert ma.value() == 4.0


def test_rejects_bad_window() -> None:
    try:
        MovingAverage(0)
    except ValueError as exc:
        assert "window_s" in str(exc)
    else:
        raise AssertionError("window 0 accepted")


@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 1000)), min_size=1, max_size=40))
def test_average_within_sample_bounds(steps: list[tuple[float, float]]) -> None:
    clock = Clock()
    ma = MovingAverage(30, clock)
    for dt, v in steps:
        clock.now += dt
        ma.add(v)
    clock.now += 1
    value = ma.value()
    kept = [v for _, v in ma._samples]
    assert min(kept) - 1e-6 <= value <= max(kept) + 1e-6
