"""Sending one chunk of a job: claim its pending rows, send them paced and concurrently, record
every outcome and the job's counters in one transaction.

A chunk is named by keyset bounds over the job's PSIDs (``after`` < psid ≤ ``last``), so a task
receives two strings, never a list of recipients.
"""

import asyncio
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.errors import (
    AmbiguousDelivery,
    GraphError,
    JobFatalGraphError,
    JobNotFound,
    RecipientGraphError,
    ThrottledError,
    TransientGraphError,
)
from pagecast.graph import OUTSIDE_WINDOW, GraphClient
from pagecast.lifecycle import Lease, fence_sql, lease_params
from pagecast.models import MAX_TEXT_LENGTH, JobStatus, MessagingType, RecipientStatus, SendJob
from pagecast.outcomes import ChunkResult, Outcome, record_outcomes
from pagecast.ratelimit import Pacer
from pagecast.validation import render_text

TRANSIENT_TRIES = 6
UNEXPECTED_ERROR_TRIES = 4  # code 2 also means "the user blocked the page": only a few tries
THROTTLE_TRIES = 20
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 4.0
CONTROL_POLL_SECONDS = 1.0
TEXT_TOO_LONG = "rendered_text_too_long"


@dataclass(frozen=True)
class ChunkBounds:
    """PSIDs ``after`` < psid ≤ ``last`` of one job."""

    after: str
    last: str


def next_chunk_bounds(
    session: Session,
    *,
    job_id: uuid.UUID,
    after: str,
    chunk_size: int,
    chunks: int,
    until: str | None = None,
) -> list[ChunkBounds]:
    """Bounds of up to ``chunks`` chunks of pending recipients after ``after`` (and at most
    ``until``), by keyset paging."""
    psids = (
        session.execute(
            sa.text(
                "SELECT psid FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending' "
                "AND psid > :after AND (CAST(:until AS text) IS NULL OR psid <= :until) "
                "ORDER BY psid LIMIT :limit"
            ),
            {"job_id": job_id, "after": after, "until": until, "limit": chunk_size * chunks},
        )
        .scalars()
        .all()
    )
    bounds, start = [], after
    for index in range(0, len(psids), chunk_size):
        last = psids[min(index + chunk_size, len(psids)) - 1]
        bounds.append(ChunkBounds(after=start, last=last))
        start = last
    return bounds


@dataclass(frozen=True)
class _Claimed:
    psid: str
    text: str
    outside_window: bool


def _claim_rows_sql(lease: Lease) -> sa.TextClause:
    return sa.text(
        f"""
        WITH claimed AS (
            UPDATE send_job_recipients r SET status = 'sending', attempts = r.attempts + 1
            FROM send_jobs j
            WHERE r.job_id = :job_id AND {fence_sql(lease, "j")}
              AND j.status = 'running' AND NOT j.cancel_requested
              AND r.status = 'pending' AND r.psid > :after AND r.psid <= :last
            RETURNING r.psid, r.first_name, r.last_name, j.page_id
        )
        SELECT c.psid, COALESCE(c.first_name, ct.first_name), COALESCE(c.last_name, ct.last_name),
               COALESCE(ct.last_interaction_at < now() - interval '24 hours', false)
        FROM claimed c LEFT JOIN contacts ct ON ct.page_id = c.page_id AND ct.psid = c.psid
        ORDER BY c.psid
        """
    )


def _backoff(tries: int) -> float:
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (tries - 1)) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class _Retry:
    error: GraphError
    throttled: bool


class ChunkSender:
    """Sends one chunk's claimed recipients within the job's concurrency and the page's rate.

    Throttled calls wait for the page's slowed-down schedule; other transient failures back off
    exponentially (with jitter), up to ``TRANSIENT_TRIES`` calls (``UNEXPECTED_ERROR_TRIES`` code 2
    answers), then fail as retryable. A job-fatal error, a cancel or pause request, or a lost lease
    stops the chunk: recipients not yet called go back to ``pending``."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        lease: Lease,
        job: SendJob,
        client: GraphClient,
        concurrency: int,
    ) -> None:
        self._engine = engine
        self._lease = lease
        self._job = job
        self._client = client
        self._slots = asyncio.Semaphore(concurrency)
        self._stop = asyncio.Event()
        self._pacer = Pacer(engine, page_id=job.page_id, rate=job.rate_per_second, expected=0)
        self.fatal: JobFatalGraphError | None = None
        self.stopped = False

    async def _attempt(self, recipient: _Claimed, calls: int) -> Outcome | _Retry:
        job, psid = self._job, recipient.psid
        try:
            result = await self._client.send_text(
                page_id=job.page_id,
                psid=psid,
                text=recipient.text,
                messaging_type=job.messaging_type,
                tag=job.tag,
            )
        except ThrottledError as exc:
            await self._pacer.throttled()
            return _Retry(exc, throttled=True)
        except TransientGraphError as exc:
            return _Retry(exc, throttled=False)
        except RecipientGraphError as exc:
            status = RecipientStatus.SKIPPED if exc.skip_reason else RecipientStatus.FAILED
            return Outcome(psid, status, calls, error=exc, reason=exc.skip_reason)
        except JobFatalGraphError as exc:
            self.fatal = self.fatal or exc
            self._stop.set()
            return Outcome(psid, RecipientStatus.PENDING, calls)
        except AmbiguousDelivery as exc:
            if job.resend_unknown:
                return Outcome(psid, RecipientStatus.PENDING, calls)
            return Outcome(psid, RecipientStatus.UNKNOWN, calls, error=exc)
        await self._pacer.observe_usage(result.usage_percent)
        return Outcome(psid, RecipientStatus.SENT, calls, message_id=result.message_id)

    async def _deliver(self, recipient: _Claimed) -> Outcome:
        calls = transient = unexpected = throttled = 0
        while True:
            async with self._slots:
                if self._stop.is_set():
                    return Outcome(recipient.psid, RecipientStatus.PENDING, calls)
                await self._pacer.wait_for_slot()
                if self._stop.is_set():
                    return Outcome(recipient.psid, RecipientStatus.PENDING, calls)
                calls += 1
                result = await self._attempt(recipient, calls)
            if isinstance(result, Outcome):
                return result
            if result.throttled:
                throttled += 1
                exhausted, wait = throttled >= THROTTLE_TRIES, 0.0
            else:
                transient += 1
                unexpected += result.error.code == 2
                exhausted = transient >= TRANSIENT_TRIES or unexpected >= UNEXPECTED_ERROR_TRIES
                wait = _backoff(transient)
            if exhausted:
                return Outcome(
                    recipient.psid,
                    RecipientStatus.FAILED,
                    calls,
                    error=result.error,
                    retryable=True,
                )
            self._pacer.expect_more()
            await asyncio.sleep(wait)

    def _should_stop(self) -> bool:
        lease = self._lease
        with self._engine.connect() as connection:
            status, cancel_requested, ours = connection.execute(
                sa.text(
                    f"SELECT status, cancel_requested, {fence_sql(lease)} FROM send_jobs "
                    "WHERE id = :job_id"
                ),
                lease_params(lease),
            ).one()
        return status != JobStatus.RUNNING or cancel_requested or not ours

    async def _watch(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(CONTROL_POLL_SECONDS)
            if await asyncio.to_thread(self._should_stop):
                self.stopped = True
                self._stop.set()

    async def run(self, recipients: list[_Claimed]) -> list[Outcome]:
        """Send to every recipient that needs a call; returns one outcome per recipient."""
        outcomes, to_send = [], []
        for recipient in recipients:
            if recipient.outside_window:
                outcomes.append(
                    Outcome(recipient.psid, RecipientStatus.SKIPPED, 0, reason=OUTSIDE_WINDOW)
                )
            elif len(recipient.text) > MAX_TEXT_LENGTH:
                outcomes.append(
                    Outcome(recipient.psid, RecipientStatus.FAILED, 0, reason=TEXT_TOO_LONG)
                )
            else:
                to_send.append(recipient)
        self._pacer.expect_more(len(to_send))
        watcher = asyncio.create_task(self._watch())
        try:
            outcomes.extend(await asyncio.gather(*(self._deliver(r) for r in to_send)))
        finally:
            watcher.cancel()
        return outcomes


def _claim(
    session: Session, *, lease: Lease, bounds: ChunkBounds
) -> tuple[SendJob, list[_Claimed]]:
    job = session.get(SendJob, lease.job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(lease.job_id)
    rows = session.execute(
        _claim_rows_sql(lease), lease_params(lease) | {"after": bounds.after, "last": bounds.last}
    ).all()
    windowed = job.messaging_type != MessagingType.MESSAGE_TAG
    claimed = [
        _Claimed(
            psid=psid,
            text=render_text(job.text, first_name=first, last_name=last),
            outside_window=windowed and outside,
        )
        for psid, first, last, outside in rows
    ]
    return job, claimed


async def send_chunk(
    engine: sa.Engine,
    *,
    lease: Lease,
    bounds: ChunkBounds,
    client_factory: Callable[[int], GraphClient],
    chunks_in_flight: int = 1,
) -> ChunkResult:
    """Claim the chunk's pending rows, send them, and record the outcomes (see module docstring).

    The job's concurrency is shared by the ``chunks_in_flight`` chunks its run sends at once;
    ``client_factory(concurrency)`` builds the Graph client for this chunk's share."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        job, claimed = _claim(session, lease=lease, bounds=bounds)
    if not claimed:
        return ChunkResult()
    concurrency = max(1, math.ceil(job.concurrency / chunks_in_flight))
    async with client_factory(concurrency) as client:
        sender = ChunkSender(engine, lease=lease, job=job, client=client, concurrency=concurrency)
        outcomes = await sender.run(claimed)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        result = record_outcomes(session, lease=lease, outcomes=outcomes, fatal=sender.fatal)
    result.stopped = sender.stopped
    return result
