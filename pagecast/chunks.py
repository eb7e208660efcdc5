"""Sending one chunk of a job: claim its rows, send them (``pagecast.sender``: for each one mark it
``sending``, wait for the page's send slot and a connection, call, and hand the answer to the
run's recorder), and stop the job when a chunk says it must stop.

A chunk is named by keyset bounds over the job's PSIDs (``after`` < psid ≤ ``last``), so a task
receives two strings, never a list of recipients. What a row goes through is in
``pagecast.recipients``; how marks and answers reach the database, in ``pagecast.recorder``.

At most ``MARK_AHEAD_SECONDS`` × rate rows are marked ahead of a connection, and at most the
job's concurrency are in flight: with the recorder's flush interval that bounds how many rows a
crash can leave ``unknown`` (see docs/reliability.md).
"""

import asyncio
import functools
import math
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast import attachments, lifecycle, recipients
from pagecast.db import retrying
from pagecast.errors import (
    GraphError,
)
from pagecast.faults import crash_point
from pagecast.graph import GraphClient
from pagecast.leases import Lease
from pagecast.models import JobStatus, RecipientStatus, SendJob
from pagecast.outages import OutageWatch
from pagecast.ratelimit import Pacer
from pagecast.recipients import Claimed, Outcome
from pagecast.recorder import FLUSH_SECONDS, shared_recorder
from pagecast.repo import get_job
from pagecast.sender import ChunkSender

MARK_AHEAD_SECONDS = 0.25
BOUND_SECONDS = 0.5


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
    sizes: list[int],
    until: str | None = None,
) -> list[ChunkBounds]:
    """Bounds of the next chunks of pending recipients after ``after`` (and at most ``until``), of
    ``sizes`` recipients each (fewer at the end), by keyset paging."""
    psids = (
        session.execute(
            sa.text(
                "SELECT psid FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending' "
                "AND psid > :after AND (CAST(:until AS text) IS NULL OR psid <= :until) "
                "ORDER BY psid LIMIT :limit"
            ),
            {"job_id": job_id, "after": after, "until": until, "limit": sum(sizes)},
        )
        .scalars()
        .all()
    )
    bounds, start, index = [], after, 0
    for size in sizes:
        if index >= len(psids):
            break
        index = min(index + size, len(psids))
        bounds.append(ChunkBounds(after=start, last=psids[index - 1]))
        start = psids[index - 1]
    return bounds


@dataclass
class ChunkResult:
    """Counts of one chunk, and why it stopped early if it did."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    unknown: int = 0
    requeued: int = 0
    permanent_failures: int = 0
    fatal_error: str | None = None
    stopped: bool = False
    by_code: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, outcomes: list[Outcome], fatal: GraphError | None, stopped: bool) -> "ChunkResult":
        counts = Counter(o.status for o in outcomes)
        return cls(
            sent=counts[RecipientStatus.SENT],
            failed=counts[RecipientStatus.FAILED],
            skipped=counts[RecipientStatus.SKIPPED],
            unknown=counts[RecipientStatus.UNKNOWN],
            requeued=counts[RecipientStatus.PENDING],
            permanent_failures=sum(
                1 for o in outcomes if o.status == RecipientStatus.FAILED and not o.retryable
            ),
            fatal_error=None if fatal is None else f"{fatal.code_key}: {fatal.message}",
            stopped=stopped,
            by_code=dict(Counter(key for o in outcomes if (key := o.key) is not None)),
        )

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _shares(job: SendJob, chunks: int) -> tuple[int, int]:
    """One chunk's connections and mark-ahead budget. Rows marked and not yet recorded stay within
    concurrency + ``BOUND_SECONDS`` × rate, answers awaiting a flush included: the marked-ahead rows
    take their part first, and only what exceeds it comes out of the connections."""
    rate = job.rate_per_second
    ahead = math.ceil(rate * MARK_AHEAD_SECONDS / chunks) + 1
    marked = job.concurrency + int(rate * (BOUND_SECONDS - FLUSH_SECONDS)) - ahead * chunks
    return max(1, min(job.concurrency, marked) // chunks), ahead


_pacers: dict[tuple[str, str, float], Pacer] = {}
_outages: dict[tuple[str, str], OutageWatch] = {}


def _pacer(engine: sa.Engine, job: SendJob, give_up_after: float) -> Pacer:
    """The process's pacer for the job's page at the job's rate, shared by its chunks and runs."""
    key = (str(engine.url), job.page_id, job.rate_per_second)
    if key not in _pacers:
        _pacers[key] = Pacer(
            engine, page_id=job.page_id, rate=job.rate_per_second, give_up_after=give_up_after
        )
    return _pacers[key]


def _outage(engine: sa.Engine, job: SendJob) -> OutageWatch:
    """The process's outage watch of the job's page, shared by its chunks and runs."""
    return _outages.setdefault((str(engine.url), job.page_id), OutageWatch())


@functools.lru_cache(maxsize=64)
def _job(engine: sa.Engine, lease: Lease) -> SendJob:
    """The job as its run sends it (a run never changes what it sends), read once per process."""
    with Session(engine, expire_on_commit=False) as session:
        return get_job(session, job_id=lease.job_id)


def _claim(
    engine: sa.Engine, lease: Lease, bounds: ChunkBounds, give_up_after: float
) -> tuple[SendJob, list[Claimed]]:
    def work() -> tuple[SendJob, list[Claimed]]:
        job = _job(engine, lease)
        with Session(engine) as session, session.begin():
            claimed = recipients.claim(session, lease=lease, after=bounds.after, last=bounds.last)
        return job, claimed

    return retrying(work, give_up_after=give_up_after)


async def send_chunk(
    engine: sa.Engine,
    *,
    lease: Lease,
    bounds: ChunkBounds,
    client_factory: Callable[[int], GraphClient],
    chunks_in_flight: int = 1,
    give_up_after: float = 60.0,
    outage_pause_after: float = 300.0,
) -> ChunkResult:
    """Claim the chunk's rows and send them (see the module docstring). A job-fatal answer stops
    the job ``failed``, an outage of the Send API longer than ``outage_pause_after`` seconds
    ``paused``. The job's concurrency and mark-ahead budget are shared by the
    ``chunks_in_flight`` chunks its run sends at once; ``client_factory(concurrency)`` builds the
    Graph client for this chunk's share. Database work retries for ``give_up_after`` seconds."""
    with shared_recorder(engine, lease, give_up_after=give_up_after) as recorder:
        if recorder.holds_answers():  # answers an earlier attempt could not record go first
            await recorder.drain()
        job, claimed = await asyncio.to_thread(_claim, engine, lease, bounds, give_up_after)
        crash_point("chunk-claimed")
        if not claimed:
            return ChunkResult()
        concurrency, mark_ahead = _shares(job, chunks_in_flight)
        try:
            async with client_factory(concurrency) as client:
                sender = ChunkSender(
                    job=job,
                    client=client,
                    pacer=_pacer(engine, job, give_up_after),
                    outage=_outage(engine, job),
                    recorder=recorder,
                    concurrency=concurrency,
                    mark_ahead=mark_ahead,
                    outage_pause_after=outage_pause_after,
                    attachment=attachments.uploader(engine, job, client, give_up_after),
                )
                await sender.run(claimed)
        except BaseException:
            with suppress(Exception):  # a retry of the chunk must find every answer recorded
                await recorder.drain()
            raise
        stopped = recorder.stopping
    if sender.fatal is not None:
        reason = f"{sender.fatal.code_key}: {sender.fatal.message}"
        await asyncio.to_thread(_stop, engine, lease, JobStatus.FAILED, reason)
    elif sender.outage_error is not None:
        error = sender.outage_error
        reason = (
            f"paused automatically: the Send API failed every call for over "
            f"{outage_pause_after:.0f} s (last: {error.code_key}: {error.message}); "
            "resume the job when it is back"
        )
        await asyncio.to_thread(_stop, engine, lease, JobStatus.PAUSED, reason)
    elif sender.upload_error is not None:
        error = sender.upload_error
        reason = (
            f"paused: the attachment upload failed {attachments.UPLOAD_TRIES} times (last: "
            f"{error.code_key}: {error.message}); resume the job to upload it again"
        )
        await asyncio.to_thread(_stop, engine, lease, JobStatus.PAUSED, reason)
    halted = sender.outage_error is not None or sender.upload_error is not None
    return ChunkResult.of(sender.outcomes, sender.fatal, stopped or halted)


def _stop(engine: sa.Engine, lease: Lease, status: JobStatus, reason: str) -> None:
    with Session(engine) as session, session.begin():
        lifecycle.stop_running_job(session, lease=lease, status=status, reason=reason)
