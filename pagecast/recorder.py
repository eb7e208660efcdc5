"""The write-ahead log of a run's sends: rows are marked ``sending`` just before their requests leave,
and answers are recorded soon after they arrive, a few statements a second however fast the run
sends.

One ``Recorder`` per run and process is shared by its chunks, whichever thread and event loop
each runs in; a background thread batches what they hand it and every ``FLUSH_SECONDS`` runs one
``recipients.flush`` statement that records the answers received and marks the rows about to be
sent. A chunk sends a row only after its mark is committed, so after a crash ``unknown`` rows are
at most those marked and not yet answered plus the answers of the last ``FLUSH_SECONDS``.

The flush also tells the chunks when to stop: the job stopped running (paused, cancelled, failed),
the lease was lost, or the database stayed unreachable for ``give_up_after`` seconds — a run that
cannot record must not send.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast import recipients
from pagecast.db import retrying
from pagecast.errors import LeaseLost, RunStopped
from pagecast.faults import crash_point
from pagecast.leases import Lease
from pagecast.models import JobStatus
from pagecast.recipients import Flushed, Outcome

FLUSH_SECONDS = 0.2
IDLE_POLL_SECONDS = 1.0


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any) -> None:
    def settle() -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    with suppress(RuntimeError):  # the caller's loop has closed: nobody waits any more
        loop.call_soon_threadsafe(settle)


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    psid: str = ""


@dataclass
class _Batch:
    outcomes: list[Outcome] = field(default_factory=list)
    marks: list[_Waiter] = field(default_factory=list)
    drains: list[_Waiter] = field(default_factory=list)


class Recorder:
    """Batches a run's marks and answers into one flush every ``interval`` seconds (see module)."""

    def __init__(
        self,
        engine: sa.Engine,
        lease: Lease,
        *,
        interval: float = FLUSH_SECONDS,
        give_up_after: float = 60.0,
        unrecorded: list[Outcome] | None = None,
    ) -> None:
        self._engine = engine
        self._lease = lease
        self._interval = interval
        self._give_up_after = give_up_after
        self._wake = threading.Condition()
        self._batch = _Batch(outcomes=list(unrecorded or []))
        self._closing = False
        self._connection: sa.Connection | None = None
        self.stop_reason: str | None = None
        self.failure: BaseException | None = None
        self.unrecorded: list[Outcome] = []
        self._thread = threading.Thread(
            target=self._run, name=f"pagecast-recorder-{lease.job_id}", daemon=True
        )
        self._thread.start()

    @property
    def stopping(self) -> bool:
        """Whether chunks must stop calling: the job stopped, or the run cannot record."""
        return self.stop_reason is not None or self.failure is not None

    def stop(self, reason: str) -> None:
        """Make every chunk of the run stop calling (the heartbeat failed, a job-fatal error)."""
        self.stop_reason = self.stop_reason or reason

    async def mark(self, psid: str) -> bool:
        """Wait until ``psid`` is durably ``sending``; ``False`` when the job no longer sends."""
        return await self._enqueue(lambda waiter: self._batch.marks.append(waiter), psid)

    def record(self, outcome: Outcome) -> None:
        """Hand over an answer; the next flush records it (after a failure, the recorder that
        replaces this one does)."""
        with self._wake:
            if self.failure is not None:
                self.unrecorded.append(outcome)
            else:
                self._batch.outcomes.append(outcome)
                self._wake.notify()

    def holds_answers(self) -> bool:
        """Whether answers wait for a flush."""
        with self._wake:
            return bool(self._batch.outcomes)

    async def drain(self) -> None:
        """Wait until everything handed over before this call is recorded."""
        await self._enqueue(lambda waiter: self._batch.drains.append(waiter))

    async def _enqueue(self, add: Any, psid: str = "") -> Any:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future(), psid)
        with self._wake:
            if self.failure is not None:
                raise self.failure
            add(waiter)
            self._wake.notify()
        return await waiter.future

    def close(self) -> None:
        """Record what is left, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _wait_for_work(self) -> bool:
        """Wait for something to flush (at most ``IDLE_POLL_SECONDS``: then the flush only reads the
        job's state); ``False`` once closing with nothing left."""
        with self._wake:
            batch = self._batch
            if batch.outcomes or batch.marks or batch.drains:
                return True
            if self._closing:
                return False
            self._wake.wait(IDLE_POLL_SECONDS)
            return True

    def _take(self) -> _Batch:
        """Everything handed over, except marks of rows whose answer is in it (a row moves once per
        statement; those wait for the next flush)."""
        with self._wake:
            batch = self._batch
            batch.outcomes = list({o.psid: o for o in batch.outcomes}.values())  # the latest counts
            answered = {o.psid for o in batch.outcomes}
            self._batch = _Batch(marks=[w for w in batch.marks if w.psid in answered])
            batch.marks = [w for w in batch.marks if w.psid not in answered]
            return batch

    def _flush(self, batch: _Batch) -> Flushed:
        def work() -> Flushed | None:
            if batch.outcomes:
                crash_point("before-flush")
            if self._connection is None:  # one statement per flush, no BEGIN, no COMMIT, no ping
                self._connection = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            try:
                with Session(bind=self._connection) as session:
                    return recipients.flush(
                        session,
                        lease=self._lease,
                        outcomes=batch.outcomes,
                        marks=[w.psid for w in batch.marks],
                    )
            except sa.exc.OperationalError:
                self._disconnect()
                raise

        flushed = retrying(work, give_up_after=self._give_up_after)
        if flushed is None:
            raise LeaseLost(self._lease.job_id)
        if batch.marks:
            crash_point("marked")
        if batch.outcomes:
            crash_point("after-flush")
        return flushed

    def _disconnect(self) -> None:
        if self._connection is not None:
            with suppress(Exception):
                self._connection.invalidate()
                self._connection.close()
            self._connection = None

    def _run(self) -> None:
        last_flush = 0.0
        while self._wait_for_work():
            if not self._closing:
                time.sleep(max(0.0, last_flush + self._interval - time.monotonic()))
            batch = self._take()
            last_flush = time.monotonic()
            try:
                flushed = self._flush(batch)
            except Exception as error:
                self._fail(batch, error)
                return
            if flushed.job_status != JobStatus.RUNNING or flushed.cancel_requested:
                self.stop(
                    f"the job is {flushed.job_status}, cancel requested: {flushed.cancel_requested}"
                )
            for waiter in batch.marks:
                _resolve(waiter.loop, waiter.future, waiter.psid in flushed.marked)
            for waiter in batch.drains:
                _resolve(waiter.loop, waiter.future, None)
        if self._connection is not None:
            self._connection.close()

    def _fail(self, batch: _Batch, error: Exception) -> None:
        failure = (
            error
            if isinstance(error, LeaseLost)
            else RunStopped(self._lease.job_id, f"cannot record outcomes: {error}")
        )
        with self._wake:
            self.failure = failure
            pending, self._batch = self._batch, _Batch()
            self.unrecorded = batch.outcomes + pending.outcomes
        self._disconnect()
        for waiter in [*batch.marks, *batch.drains, *pending.marks, *pending.drains]:
            _resolve(waiter.loop, waiter.future, failure)


@dataclass
class _Shared:
    recorder: Recorder
    users: int = 0


_shared: dict[tuple[str, Lease], _Shared] = {}
_shared_lock = threading.Lock()


@contextmanager
def shared_recorder(engine: sa.Engine, lease: Lease, *, give_up_after: float) -> Iterator[Recorder]:
    """The run's recorder in this process, started by its first user and closed (everything
    recorded) by its last; a recorder that failed other than by losing the lease is replaced by one
    that records what it could not, so a retried chunk starts afresh."""
    key = (str(engine.url), lease)
    with _shared_lock:
        shared = _shared.get(key)
        if shared is None or (
            shared.recorder.failure is not None
            and not isinstance(shared.recorder.failure, LeaseLost)
        ):
            unrecorded = shared.recorder.unrecorded if shared else []
            shared = _shared[key] = _Shared(
                Recorder(engine, lease, give_up_after=give_up_after, unrecorded=unrecorded)
            )
        shared.users += 1
    try:
        yield shared.recorder
    finally:
        with _shared_lock:
            shared.users -= 1
            last = shared.users == 0
            if last and _shared.get(key) is shared:
                del _shared[key]
        if last:
            shared.recorder.close()
