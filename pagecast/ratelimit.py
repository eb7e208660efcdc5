"""The per-page send rate, held exactly across every runner through a schedule in Postgres.

A runner reserves a block of consecutive send slots for a page in one statement
(``page_send_rates.next_slot_at`` moves forward by ``block / effective_rate``), then releases its
sends one slot at a time, evenly spaced, never early. Slot times are the database's: the
statement also returns its ``clock_timestamp()``, and the runner moves the slots onto its own
monotonic clock by the offset measured over that round trip, so runners whose clocks disagree
follow one schedule.

A throttling error halves the page's effective rate (``rate × backoff_factor``), at most once per
``THROTTLE_WINDOW_SECONDS`` however many sends hit it, and pauses the page briefly. The factor
recovers with the time since ``throttled_at``, whoever reserves, so recovery does not depend on
how many chunks or runs share the page.

Slots are spaced for ``PACING_MARGIN`` × the rate (97 %): a send that leaves a few milliseconds
late must not put one more call than the rate into any one-second window at Meta's end, so the
schedule keeps 30 ms of slack per second for timer and network jitter.
"""

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import sqlalchemy as sa

from pagecast.db import retrying

BLOCK_SECONDS = 0.5
PACING_MARGIN = 0.97
MIN_BACKOFF_FACTOR = 0.05
RECOVERY_PER_SECOND = 0.05
THROTTLE_WINDOW_SECONDS = 1.0
LATE_SECONDS = 0.025
THROTTLE_COOLDOWN_SECONDS = 1.0
USAGE_SLOWDOWN_PERCENT = 75.0

# A page_send_rates row's factor right now: 1 once recovered, or when never throttled (LEAST
# ignores the NULL).
EFFECTIVE_FACTOR = (
    f"LEAST(1.0, backoff_factor"
    f" + {RECOVERY_PER_SECOND} * extract(epoch FROM clock_timestamp() - throttled_at)::float8)"
)
# Each CTE reads the one before it, so every clock_timestamp() is taken after the row lock.
_RESERVE = sa.text(
    f"""
    WITH locked AS (
        SELECT * FROM page_send_rates WHERE page_id = :page_id FOR UPDATE
    ), block AS (
        SELECT GREATEST(next_slot_at, clock_timestamp()) AS starts_at,
            :rate * {EFFECTIVE_FACTOR} AS rate
        FROM locked
    ), moved AS (
        UPDATE page_send_rates r SET
            next_slot_at = b.starts_at + make_interval(secs => :count / b.rate),
            updated_at = clock_timestamp()
        FROM block b WHERE r.page_id = :page_id
        RETURNING b.starts_at, b.rate
    )
    SELECT extract(epoch FROM starts_at - clock_timestamp())::float8, rate FROM moved
    """
)
_CREATE = sa.text(
    "INSERT INTO page_send_rates (page_id) VALUES (:page_id) ON CONFLICT (page_id) DO NOTHING"
)
_SLOW_DOWN = sa.text(
    f"""
    WITH locked AS (
        SELECT * FROM page_send_rates WHERE page_id = :page_id FOR UPDATE
    ), current AS (
        SELECT {EFFECTIVE_FACTOR} AS factor, throttled_at IS NULL
            OR throttled_at < clock_timestamp() - make_interval(secs => :window) AS cuts
        FROM locked
    )
    UPDATE page_send_rates r SET
        backoff_factor = CASE WHEN c.cuts
            THEN GREATEST(:minimum, c.factor * :factor) ELSE r.backoff_factor END,
        throttled_at = CASE WHEN c.cuts THEN clock_timestamp() ELSE r.throttled_at END,
        next_slot_at = GREATEST(r.next_slot_at, clock_timestamp() + make_interval(secs => :pause)),
        updated_at = clock_timestamp()
    FROM current c WHERE r.page_id = :page_id
    """
)

_HOLD = sa.text(
    """
    UPDATE page_send_rates SET
        next_slot_at = GREATEST(next_slot_at, clock_timestamp() + make_interval(secs => :pause)),
        updated_at = clock_timestamp()
    WHERE page_id = :page_id
    """
)


@dataclass
class _Gate:
    """One event loop's turn at waiting for the pacer in a thread."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True)
class Reservation:
    """``count`` slots ``interval`` seconds apart; the first at ``first_at`` on the caller's clock."""

    first_at: float
    interval: float
    count: int


def reserve(
    engine: sa.Engine,
    *,
    page_id: str,
    rate: float,
    count: int,
    clock: Callable[[], float] = time.monotonic,
) -> Reservation:
    """Reserve ``count`` consecutive send slots for the page at ``rate`` messages/s (less backoff).

    The database's clock is read mid round trip: a slot's time on ``clock`` is its offset from
    ``clock_timestamp()`` plus the midpoint of ``clock`` before and after the statement."""
    params = {"page_id": page_id, "count": count, "rate": rate * PACING_MARGIN}
    with engine.begin() as connection:
        before = clock()
        row = connection.execute(_RESERVE, params).first()
        if row is None:
            connection.execute(_CREATE, params)
            before = clock()
            row = connection.execute(_RESERVE, params).one()
        after = clock()
    starts_in, effective_rate = row
    return Reservation(
        first_at=starts_in + (before + after) / 2, interval=1.0 / effective_rate, count=count
    )


def slow_down(engine: sa.Engine, *, page_id: str, factor: float = 0.5, pause: float = 0.0) -> None:
    """Multiply the page's effective rate by ``factor`` (never below 5 %) unless it was cut less
    than ``THROTTLE_WINDOW_SECONDS`` ago, and push its next slot ``pause`` seconds out."""
    params = {
        "page_id": page_id,
        "factor": factor,
        "minimum": MIN_BACKOFF_FACTOR,
        "window": THROTTLE_WINDOW_SECONDS,
        "pause": pause,
    }
    with engine.begin() as connection:
        connection.execute(_CREATE, params)
        connection.execute(_SLOW_DOWN, params)


def hold(engine: sa.Engine, *, page_id: str, seconds: float) -> None:
    """Let no slot of the page start within ``seconds`` (its rate stays as it is)."""
    params = {"page_id": page_id, "pause": seconds}
    with engine.begin() as connection:
        connection.execute(_CREATE, params)
        connection.execute(_HOLD, params)


class Pacer:
    """Releases one send at a time for a page, on slots reserved in blocks of about half a second.

    Thread-safe: one pacer may serve chunks in several threads, each with its own event loop.
    Reservations never exceed the sends announced with ``expect``; a release is never earlier
    than its slot on ``clock`` nor closer than one interval to the pacer's previous release.
    The slots' lock is held while a reservation waits for the database (for as long as an outage
    lasts), so an event loop never blocks on it, and only one sender per event loop waits for a
    slot in a thread (the others wait in the loop: an outage must not take every thread of the
    loop's executor); the count of announced sends has a lock of its own.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        page_id: str,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        give_up_after: float = 60.0,
    ) -> None:
        self._engine = engine
        self._page_id = page_id
        self._rate = rate
        self._clock = clock
        self._give_up_after = give_up_after
        self._remaining = 0
        self._slots: deque[float] = deque()
        self._interval = 1.0 / (rate * PACING_MARGIN)
        self._last_release = -math.inf
        self._paused_until = -math.inf
        self._lock = threading.Lock()
        self._remaining_lock = threading.Lock()
        self._gates_lock = threading.Lock()
        self._gates: dict[asyncio.AbstractEventLoop, _Gate] = {}
        self._refill_failure: tuple[float, sa.exc.OperationalError] | None = None

    def expect(self, count: int) -> None:
        """Announce ``count`` more sends (a chunk's recipients, a retry)."""
        with self._remaining_lock:
            self._remaining += count

    def _refill_locked(self) -> None:
        with self._remaining_lock:
            remaining = self._remaining
        block = max(1, min(remaining, math.ceil(BLOCK_SECONDS / self._interval)))
        reservation = retrying(
            lambda: reserve(
                self._engine, page_id=self._page_id, rate=self._rate, count=block, clock=self._clock
            ),
            give_up_after=self._give_up_after,
        )
        self._interval = reservation.interval
        self._slots.extend(reservation.first_at + i * reservation.interval for i in range(block))

    def _release_locked(self) -> float | None:
        """The next usable slot's release time (``None``: none left); stale slots are dropped."""
        while self._slots:
            release_at = max(self._slots.popleft(), self._last_release + self._interval)
            if release_at >= self._clock() - self._interval:
                with self._remaining_lock:
                    self._remaining = max(0, self._remaining - 1)
                self._last_release = release_at
                return release_at
        return None

    def _claim(self, asked_at: float) -> float:
        """The next release time; blocks while it reserves slots. A reservation that gave up on
        the database fails every caller that asked before it gave up, instead of each retrying
        for the whole window in turn."""
        with self._lock:
            while (release_at := self._release_locked()) is None:
                if self._refill_failure and asked_at <= self._refill_failure[0]:
                    failure = self._refill_failure[1]
                    raise sa.exc.OperationalError(
                        failure.statement, None, failure.orig
                    ) from failure
                try:
                    self._refill_locked()
                except sa.exc.OperationalError as error:
                    self._refill_failure = (self._clock(), error)
                    raise
                self._refill_failure = None
            return release_at

    def _claim_at_once(self) -> float | None:
        """The next release time if no reservation and no wait for the lock is needed."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._release_locked()
        finally:
            self._lock.release()

    async def _claim_from_loop(self) -> float:
        """The next release time, waited for in a thread by one caller of this loop at a time."""
        asked_at, loop = self._clock(), asyncio.get_running_loop()
        with self._gates_lock:
            gate = self._gates.get(loop)
            if gate is None:
                gate = self._gates[loop] = _Gate()
            gate.users += 1
        try:
            async with gate.lock:
                release_at = self._claim_at_once()  # the caller before may have reserved enough
                if release_at is None:
                    release_at = await asyncio.to_thread(self._claim, asked_at)
                return release_at
        finally:
            with self._gates_lock:
                gate.users -= 1
                if not gate.users:  # the loop's last waiter: the entry goes (loops come and go)
                    del self._gates[loop]

    async def wait_for_slot(self) -> None:
        """Sleep until this caller's send slot (taken without a thread hop when one is at hand).

        Slots that went by while the process stalled (GC, a busy event loop) are given up, not
        caught up on: spending them late would put a burst on the wire. A caller woken more than
        ``LATE_SECONDS`` after its slot takes a fresh one, once; a caller whose slot fell inside a
        pause that began while it waited (a throttle, a hold) takes one after the pause."""
        retook_late = False
        while True:
            release_at = self._claim_at_once()
            if release_at is None:
                release_at = await self._claim_from_loop()
            while (delay := release_at - self._clock()) > 0:
                await asyncio.sleep(delay)
            if release_at >= self._paused_until:
                if self._clock() - release_at <= LATE_SECONDS or retook_late:
                    return
                retook_late = True
            self.expect(1)

    def _reschedule(self, change: Callable[[], None], pause: float) -> None:
        with self._lock:
            retrying(change, give_up_after=self._give_up_after)
            if pause:
                self._slots.clear()

    def _slow_down(self, factor: float, pause: float) -> None:
        self._reschedule(
            partial(slow_down, self._engine, page_id=self._page_id, factor=factor, pause=pause),
            pause,
        )

    async def throttled(self, retry_after: float | None = None) -> None:
        """Meta throttled the page: halve its rate for everyone (once per window) and pause it,
        for ``retry_after`` seconds when the answer asked for that."""
        pause = max(THROTTLE_COOLDOWN_SECONDS, retry_after or 0.0)
        self._pause_here(pause)
        await asyncio.to_thread(self._slow_down, 0.5, pause)

    async def hold(self, seconds: float) -> None:
        """Send nothing on the page, from any runner, for ``seconds``."""
        self._pause_here(seconds)
        change = partial(hold, self._engine, page_id=self._page_id, seconds=seconds)
        await asyncio.to_thread(self._reschedule, change, seconds)

    def _pause_here(self, seconds: float) -> None:
        """Stop this process's callers at once, before the pause reaches the shared schedule."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def observe_usage(self, percent: float | None) -> None:
        """Slow the page down before Meta throttles it when its usage headers run high."""
        if percent is not None and percent >= USAGE_SLOWDOWN_PERCENT:
            await asyncio.to_thread(self._slow_down, 0.5 if percent >= 90 else 0.8, 0.0)
