"""Telling a Send API outage from a few failed calls, so that a page's runs wait it out together.

A call *fails* when it gets a transient error or no answer at all. Once calls to
``OUTAGE_FAILURES`` different recipients of a page have failed in a row over at least
``OUTAGE_SECONDS`` (no answer from Meta in between), the page is in an outage (one recipient
failing again and again is that recipient's problem): its send schedule is held for 1, 2, 4, then 8 s between
probes (for every runner, through the schedule in Postgres), recipients' retry budgets stop
counting down, and once it has lasted ``PAGECAST_OUTAGE_PAUSE_SECONDS`` the page's jobs pause with
everything not sent still ``pending``. Any answer from Meta (a delivery, a throttle, a refusal)
ends the outage.
"""

import math
import threading
import time
from collections.abc import Callable

from pagecast.errors import GraphError

OUTAGE_FAILURES = 5
OUTAGE_SECONDS = 1.0
FIRST_HOLD_SECONDS = 1.0
MAX_HOLD_SECONDS = 8.0


class OutageWatch:
    """One process's view of one page's Send API health; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.answered()

    def answered(self) -> None:
        """Meta answered a call: whatever was failing works again."""
        with self._lock:
            self.last_failure: GraphError | None = None
            self._failing: set[str] = set()
            self._failing_since: float | None = None
            self._next_hold = FIRST_HOLD_SECONDS
            self._held_until = -math.inf

    def failed(self, recipient: str, error: GraphError) -> float | None:
        """Count a call to ``recipient`` that failed with ``error``; returns how long to hold the
        page when an outage calls for a new hold (the previous one has run out), else ``None``."""
        with self._lock:
            now = self._clock()
            self.last_failure = error
            if self._failing_since is None:
                self._failing_since = now
            if len(self._failing) < OUTAGE_FAILURES:
                self._failing.add(recipient)
            if not self._in_outage(now) or now < self._held_until:
                return None
            hold = self._next_hold
            self._next_hold = min(2 * hold, MAX_HOLD_SECONDS)
            self._held_until = now + hold
            return hold

    def _in_outage(self, now: float) -> bool:
        return (
            self._failing_since is not None
            and len(self._failing) >= OUTAGE_FAILURES
            and now - self._failing_since >= OUTAGE_SECONDS
        )

    def now(self) -> float:
        """The watch's clock."""
        return self._clock()

    def failing_for(self, since: float = -math.inf) -> float:
        """Seconds the page has been in an outage, counted from ``since`` at the earliest (0 when
        it is not in one)."""
        with self._lock:
            now = self._clock()
            if self._failing_since is None or not self._in_outage(now):
                return 0.0
            return now - max(self._failing_since, since)
