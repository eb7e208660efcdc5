"""The per-page send rate, held exactly across every runner through a schedule in Postgres.

A runner reserves a block of consecutive send slots for a page in one statement
(``page_send_rates.next_slot_at`` moves forward by ``block / effective_rate``), then releases its
sends one slot at a time, evenly spaced, never early. Throttling errors halve the page's
``backoff_factor`` (the effective rate is ``rate × factor``); every block reserved afterwards
recovers it additively.

Slots are spaced for ``PACING_MARGIN`` × the rate (97 %): a send that leaves a few milliseconds
late must not put one more call than the rate into any one-second window at Meta's end, so the
schedule keeps 30 ms of slack per second for timer and network jitter.
"""

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

import sqlalchemy as sa

BLOCK_SECONDS = 0.5
PACING_MARGIN = 0.97
MIN_BACKOFF_FACTOR = 0.05
RECOVERY_PER_BLOCK = 0.05
THROTTLE_COOLDOWN_SECONDS = 1.0
USAGE_SLOWDOWN_PERCENT = 75.0

_RESERVE = sa.text(
    """
    WITH current AS (
        SELECT backoff_factor, next_slot_at FROM page_send_rates WHERE page_id = :page_id FOR UPDATE
    ), moved AS (
        UPDATE page_send_rates r SET
            next_slot_at = GREATEST(c.next_slot_at, clock_timestamp())
                + make_interval(secs => :count / (:rate * c.backoff_factor)),
            backoff_factor = LEAST(1.0, c.backoff_factor + :recovery),
            updated_at = clock_timestamp()
        FROM current c WHERE r.page_id = :page_id
        RETURNING r.next_slot_at, c.backoff_factor
    )
    SELECT extract(epoch FROM next_slot_at)::float8, :rate * backoff_factor FROM moved
    """
)
_CREATE = sa.text(
    "INSERT INTO page_send_rates (page_id) VALUES (:page_id) ON CONFLICT (page_id) DO NOTHING"
)
_SLOW_DOWN = sa.text(
    """
    INSERT INTO page_send_rates AS r (page_id, backoff_factor) VALUES (:page_id, :factor)
    ON CONFLICT (page_id) DO UPDATE SET
        backoff_factor = GREATEST(:minimum, r.backoff_factor * :factor),
        next_slot_at = GREATEST(r.next_slot_at, clock_timestamp() + make_interval(secs => :pause)),
        updated_at = clock_timestamp()
    """
)


@dataclass(frozen=True)
class Reservation:
    """``count`` slots ``interval`` seconds apart; the first at ``first_at`` (Unix time from the
    database's clock: every runner, on every machine, follows one schedule, so their clocks must
    agree as NTP keeps them)."""

    first_at: float
    interval: float
    count: int


def reserve(engine: sa.Engine, *, page_id: str, rate: float, count: int) -> Reservation:
    """Reserve ``count`` consecutive send slots for the page at ``rate`` messages/s (less backoff)."""
    params = {
        "page_id": page_id,
        "count": count,
        "rate": rate * PACING_MARGIN,
        "recovery": RECOVERY_PER_BLOCK,
    }
    with engine.begin() as connection:
        row = connection.execute(_RESERVE, params).first()
        if row is None:
            connection.execute(_CREATE, {"page_id": page_id})
            row = connection.execute(_RESERVE, params).one()
    ends_at, effective_rate = row
    interval = 1.0 / effective_rate
    return Reservation(first_at=ends_at - count * interval, interval=interval, count=count)


def slow_down(engine: sa.Engine, *, page_id: str, factor: float = 0.5, pause: float = 0.0) -> None:
    """Multiply the page's rate by ``factor`` (never below 5 %) and push its next slot ``pause`` s out."""
    with engine.begin() as connection:
        connection.execute(
            _SLOW_DOWN,
            {"page_id": page_id, "factor": factor, "minimum": MIN_BACKOFF_FACTOR, "pause": pause},
        )


class Pacer:
    """Releases one send at a time for a page, on slots reserved in blocks of about half a second.

    ``expected`` bounds how many slots are reserved ahead, so a chunk never holds slots it will not
    use; a release is never earlier than its slot nor closer than one interval to the previous one.
    """

    def __init__(self, engine: sa.Engine, *, page_id: str, rate: float, expected: int) -> None:
        self._engine = engine
        self._page_id = page_id
        self._rate = rate
        self._remaining = expected
        self._slots: deque[float] = deque()
        self._interval = 1.0 / (rate * PACING_MARGIN)
        self._last_release = 0.0
        self._lock = asyncio.Lock()

    def expect_more(self, count: int = 1) -> None:
        """Announce sends beyond the expected count (retries)."""
        self._remaining += count

    async def _refill(self) -> None:
        block = max(1, min(self._remaining, math.ceil(self._rate * BLOCK_SECONDS)))
        reservation = await asyncio.to_thread(
            reserve, self._engine, page_id=self._page_id, rate=self._rate, count=block
        )
        self._interval = reservation.interval
        self._slots.extend(reservation.first_at + i * reservation.interval for i in range(block))

    async def wait_for_slot(self) -> None:
        """Sleep until this caller's send slot.

        Slots that went by while the process stalled (GC, a busy event loop) are given up, not
        caught up on: spending them late would put a burst on the wire."""
        async with self._lock:
            while True:
                if not self._slots:
                    await self._refill()
                slot = self._slots.popleft()
                release_at = max(slot, self._last_release + self._interval)
                if release_at >= time.time() - self._interval:
                    break
            self._remaining = max(0, self._remaining - 1)
            self._last_release = release_at
            delay = release_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def throttled(self) -> None:
        """Meta throttled the page: halve its rate for everyone and pause briefly."""
        self._slots.clear()
        await asyncio.to_thread(
            slow_down, self._engine, page_id=self._page_id, pause=THROTTLE_COOLDOWN_SECONDS
        )

    async def observe_usage(self, percent: float | None) -> None:
        """Slow the page down before Meta throttles it when its usage headers run high."""
        if percent is not None and percent >= USAGE_SLOWDOWN_PERCENT:
            factor = 0.5 if percent >= 90 else 0.8
            await asyncio.to_thread(slow_down, self._engine, page_id=self._page_id, factor=factor)
