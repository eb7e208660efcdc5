"""The page's shared send schedule: runners with disagreeing clocks, windowed throttling, recovery
with time."""

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from pagecast import ratelimit
from pagecast.ratelimit import (
    MIN_BACKOFF_FACTOR,
    PACING_MARGIN,
    RECOVERY_PER_SECOND,
    THROTTLE_COOLDOWN_SECONDS,
    Pacer,
    reserve,
    slow_down,
)

PAGE = "page-1"


def _skewed(offset: float) -> Callable[[], float]:
    return lambda: time.monotonic() + offset


def _in_threads(*work: Callable[[], object]) -> None:
    """Run each callable in a thread of its own, all started together; re-raise the first error."""
    start = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        start.wait()
        try:
            job()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(job,)) for job in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _sender(pacer: Pacer, sends: int, released: list[float]) -> Callable[[], None]:
    """A runner's thread: its own event loop releasing ``sends`` sends, instants on one clock."""

    async def send() -> None:
        pacer.expect(sends)
        for _ in range(sends):
            await pacer.wait_for_slot()
            released.append(time.monotonic())

    return lambda: asyncio.run(send())


def _busiest_second(instants: list[float]) -> int:
    instants = sorted(instants)
    end, busiest = 0, 0
    for start, at in enumerate(instants):
        while end < len(instants) and instants[end] < at + 1.0:
            end += 1
        busiest = max(busiest, end - start)
    return busiest


def _factor(engine: sa.Engine) -> float:
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT backoff_factor FROM page_send_rates WHERE page_id = :p"), {"p": PAGE}
        ).scalar_one()


def _throttled_ago(engine: sa.Engine, seconds: float) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE page_send_rates SET throttled_at = clock_timestamp() - "
                "make_interval(secs => :s), next_slot_at = clock_timestamp() WHERE page_id = :p"
            ),
            {"s": seconds, "p": PAGE},
        )


def _effective_factor(engine: sa.Engine, rate: float) -> float:
    reservation = reserve(engine, page_id=PAGE, rate=rate, count=1)
    return 1.0 / (reservation.interval * rate * PACING_MARGIN)


def test_runners_whose_clocks_disagree_share_the_page_rate(engine):
    rate, sends = 200.0, 150
    runs: dict[float, list[float]] = {offset: [] for offset in (0.0, 7.0, -0.4)}
    _in_threads(
        *(
            _sender(Pacer(engine, page_id=PAGE, rate=rate, clock=_skewed(offset)), sends, released)
            for offset, released in runs.items()
        )
    )
    everything = [at for released in runs.values() for at in released]
    assert len(everything) == 3 * sends
    assert _busiest_second(everything) <= 1.05 * rate + 1
    # one schedule from start to end: no runner sent on another's slots nor wasted its own
    span = max(everything) - min(everything)
    assert (len(everything) - 1) / rate <= span <= len(everything) / (rate * PACING_MARGIN) + 1.0


def test_one_pacer_is_shared_by_threads_with_their_own_event_loops(engine):
    rate, sends = 200.0, 60
    pacer = Pacer(engine, page_id=PAGE, rate=rate)
    released: list[float] = []
    _in_threads(*(_sender(pacer, sends, released) for _ in range(3)))
    assert len(released) == 3 * sends
    assert _busiest_second(released) <= 1.05 * rate + 1
    assert max(released) - min(released) >= (len(released) - 1) / rate


async def test_senders_waiting_on_a_reservation_that_gave_up_give_up_with_it(engine, monkeypatch):
    """50 senders of a run whose database is down: one retry window in all, not one each."""
    calls = []

    def database_down(*args, **kwargs):
        calls.append(time.monotonic())
        raise sa.exc.OperationalError("SELECT", {}, Exception("the database is down"))

    monkeypatch.setattr(ratelimit, "reserve", database_down)
    pacer = Pacer(engine, page_id=PAGE, rate=100.0, give_up_after=0.3)
    pacer.expect(50)
    outcomes = await asyncio.gather(
        *(pacer.wait_for_slot() for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(outcome, sa.exc.OperationalError) for outcome in outcomes)
    assert len(calls) <= 2 * 3  # a window of 0.3 s retries twice (0.1 s, 0.2 s): 3 calls


def _wait_for_a_lock_wait(engine: sa.Engine) -> None:
    """Until a session waits for a row lock (a statement of its own: the activity view is read
    once per transaction)."""
    deadline = time.monotonic() + 30
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        with engine.connect() as connection:
            if connection.execute(query).scalar():
                return
        assert time.monotonic() < deadline, "no session waited for a lock"
        time.sleep(0.05)


@contextmanager
def _reservations_stuck(engine: sa.Engine) -> Iterator[None]:
    """The page's row locked by another session, as an outage keeps a reservation retrying."""
    reserve(engine, page_id=PAGE, rate=100.0, count=1)  # the page's row exists
    with engine.connect() as blocker:
        blocker.execute(
            sa.text("SELECT 1 FROM page_send_rates WHERE page_id = :page FOR UPDATE"),
            {"page": PAGE},
        )
        yield
        blocker.rollback()


def test_announcing_sends_never_waits_for_a_reservation_stuck_on_the_database(engine):
    """A stuck reservation holds the slots' lock; announcing sends, which event loops do, must not
    wait for it (it did: a run's loop froze for the whole outage)."""
    pacer = Pacer(engine, page_id=PAGE, rate=100.0)
    with _reservations_stuck(engine):
        pacer.expect(1)
        sender = threading.Thread(target=lambda: asyncio.run(pacer.wait_for_slot()))
        sender.start()
        _wait_for_a_lock_wait(engine)
        announcer = threading.Thread(target=pacer.expect, args=(1,))
        announcer.start()
        announcer.join(timeout=5)
        assert not announcer.is_alive()
    sender.join(timeout=30)
    assert not sender.is_alive()


def test_senders_waiting_on_a_stuck_reservation_leave_their_loop_s_executor_free(engine):
    """20 senders of one loop whose executor has 2 threads: one waits for the reservation in a
    thread, the others in the loop, so other work of the loop still gets a thread (it did not:
    the test restarting a run's database from that loop waited out the run's retry window)."""
    pacer = Pacer(engine, page_id=PAGE, rate=100.0)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    running = threading.Thread(target=loop.run_forever)
    running.start()

    def in_loop(work):
        return asyncio.run_coroutine_threadsafe(work, loop)

    try:
        with _reservations_stuck(engine):
            pacer.expect(20)
            senders = [in_loop(pacer.wait_for_slot()) for _ in range(20)]
            _wait_for_a_lock_wait(engine)
            assert in_loop(asyncio.to_thread(lambda: "ran")).result(timeout=5) == "ran"
        for sender in senders:
            sender.result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        running.join()
        loop.close()


def test_a_pacer_keeps_no_event_loop_alive(engine):
    """A pacer lives as long as its process; each chunk sends from an event loop of its own."""
    pacer = Pacer(engine, page_id=PAGE, rate=1000.0)
    loops = []

    async def send() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        pacer.expect(50)
        await asyncio.gather(*(pacer.wait_for_slot() for _ in range(50)))

    asyncio.run(send())
    gc.collect()
    assert loops[0]() is None


def test_reservations_never_exceed_the_expected_sends(engine):
    rate = 100.0
    pacer = Pacer(engine, page_id=PAGE, rate=rate)
    pacer.expect(3)

    async def send() -> None:
        for _ in range(3):
            await pacer.wait_for_slot()

    asyncio.run(send())
    after = reserve(engine, page_id=PAGE, rate=rate, count=1)
    assert after.first_at - time.monotonic() < 2 / rate  # nothing was held beyond the third slot


def test_slots_are_converted_onto_the_callers_clock(engine):
    for offset in (0.0, 1000.0, -1000.0):
        clock = _skewed(offset)
        first = reserve(engine, page_id=PAGE, rate=10.0, count=5, clock=clock)
        assert abs(first.first_at - clock()) < 0.05
        second = reserve(engine, page_id=PAGE, rate=10.0, count=1, clock=clock)
        assert second.first_at == pytest.approx(first.first_at + 5 * first.interval, abs=0.01)
        _throttled_ago(engine, 60.0)  # frees the schedule for the next clock


def test_simultaneous_throttles_cut_the_rate_once(engine):
    pacers = [Pacer(engine, page_id=PAGE, rate=100.0) for _ in range(13)]
    _in_threads(*(lambda pacer=pacer: asyncio.run(pacer.throttled()) for pacer in pacers))

    async def on_one_loop() -> None:
        await asyncio.gather(*(pacers[0].throttled() for _ in range(13)))

    asyncio.run(on_one_loop())
    assert _factor(engine) == pytest.approx(0.5)
    paused = reserve(engine, page_id=PAGE, rate=100.0, count=1)
    assert paused.first_at - time.monotonic() > THROTTLE_COOLDOWN_SECONDS - 0.2


def test_recovery_follows_time_not_reservations(engine):
    rate = 100.0
    slow_down(engine, page_id=PAGE)
    started = time.monotonic()
    while time.monotonic() - started < 0.2:
        reserve(engine, page_id=PAGE, rate=rate, count=1)
    assert 0.5 <= _effective_factor(engine, rate) <= 0.55
    _throttled_ago(engine, 5.0)
    assert _effective_factor(engine, rate) == pytest.approx(0.5 + 5 * RECOVERY_PER_SECOND, abs=0.01)
    _throttled_ago(engine, 0.5 / RECOVERY_PER_SECOND)
    assert _effective_factor(engine, rate) == pytest.approx(1.0)


def test_a_throttle_after_the_window_cuts_again_from_the_recovered_rate(engine):
    slow_down(engine, page_id=PAGE)
    slow_down(engine, page_id=PAGE)
    assert _factor(engine) == pytest.approx(0.5)
    _throttled_ago(engine, 2.0)
    slow_down(engine, page_id=PAGE)
    assert _factor(engine) == pytest.approx((0.5 + 2 * RECOVERY_PER_SECOND) / 2, abs=0.005)
    _throttled_ago(engine, 1.1)
    slow_down(engine, page_id=PAGE, factor=0.01)
    assert _factor(engine) == MIN_BACKOFF_FACTOR


async def test_high_usage_slows_the_page_down_within_the_same_window(engine):
    pacer = Pacer(engine, page_id=PAGE, rate=100.0)
    await pacer.observe_usage(None)
    await pacer.observe_usage(50.0)
    assert reserve(engine, page_id=PAGE, rate=100.0, count=1).interval == pytest.approx(
        1 / (100.0 * PACING_MARGIN)
    )
    await pacer.observe_usage(80.0)
    await pacer.observe_usage(95.0)
    assert _factor(engine) == pytest.approx(0.8)
