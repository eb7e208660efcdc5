from pagecast.errors import TransientGraphError
from pagecast.outages import OUTAGE_FAILURES, OutageWatch

DOWN = TransientGraphError("Service temporarily unavailable", code=2, http_status=500)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_for_a_second_make_an_outage_held_longer_each_time():
    clock = Clock()
    watch = OutageWatch(clock)
    holds = []
    for call in range(320):  # a failed call every 0.125 s for 40 s
        holds.append(watch.failed(str(call), DOWN))
        clock.now += 0.125
    assert [h for h in holds if h is not None] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert holds.index(1.0) == 8  # 1 s after the first failure
    assert watch.failing_for() == 40.0
    assert watch.failing_for(since=30.0) == 10.0  # a chunk that started 10 s ago
    assert watch.last_failure is DOWN


def test_any_answer_ends_the_outage():
    clock = Clock()
    watch = OutageWatch(clock)
    for call in range(20):
        watch.failed(str(call), DOWN)
        clock.now += 0.1
    assert watch.failing_for() > 0
    watch.answered()
    assert watch.failing_for() == 0
    assert watch.failed("21", DOWN) is None  # counting starts again


def test_failures_between_answers_are_no_outage():
    clock = Clock()
    watch = OutageWatch(clock)
    for call in range(1000):  # 30 % of calls fail, for 100 s
        if call % 10 < 3:
            assert watch.failed(str(call), DOWN) is None
        else:
            watch.answered()
        clock.now += 0.1
    assert watch.failing_for() == 0


def test_a_burst_of_failures_within_a_second_is_no_outage():
    clock = Clock()
    watch = OutageWatch(clock)
    assert [watch.failed(str(c), DOWN) for c in range(10 * OUTAGE_FAILURES)] == [
        None
    ] * 10 * OUTAGE_FAILURES
    assert watch.failing_for() == 0


def test_one_recipient_failing_again_and_again_is_no_outage():
    clock = Clock()
    watch = OutageWatch(clock)
    for _ in range(100):
        assert watch.failed("7", DOWN) is None
        clock.now += 0.5
    assert watch.failing_for() == 0
