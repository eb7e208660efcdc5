"""Driving one run of a job: claim, chunks in flight, heartbeat, error threshold, finish.

The Prefect flow (``flows/send_job.py``) submits ``send_chunk`` tasks as chunks end; this module holds
the decisions, so they are tested without Prefect, and ``run_in_process`` drives the same run
with asyncio alone (tests, benchmarks, embedding)."""

import asyncio
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session

from pagecast import lifecycle, repo, shards
from pagecast.chunks import ChunkBounds, ChunkResult, next_chunk_bounds, send_chunk
from pagecast.errors import LeaseLost
from pagecast.faults import crash_point
from pagecast.graph import client_factory
from pagecast.leases import Lease
from pagecast.lifecycle import Recovery
from pagecast.models import JobStatus, SendJob
from pagecast.recorder import Recorder, shared_recorder
from pagecast.settings import Settings

ERROR_WINDOW_ATTEMPTS = 500
ERROR_WINDOW_MINIMUM = 100
ERROR_THRESHOLD = 0.2
BOUNDS_AHEAD = 8


@dataclass
class ErrorWindow:
    """Permanent failures among the last ~500 attempts, at chunk granularity (as listmonk does)."""

    attempts: int = ERROR_WINDOW_ATTEMPTS
    threshold: float = ERROR_THRESHOLD
    minimum: int = ERROR_WINDOW_MINIMUM
    _chunks: deque[tuple[int, int]] = field(default_factory=deque)

    def add(self, result: ChunkResult) -> None:
        self._chunks.append((result.sent + result.failed, result.permanent_failures))
        while sum(a for a, _ in self._chunks) - self._chunks[0][0] >= self.attempts:
            self._chunks.popleft()

    def exceeded(self) -> str | None:
        """The reason to pause, when permanent failures pass the threshold."""
        attempts = sum(a for a, _ in self._chunks)
        failures = sum(f for _, f in self._chunks)
        if attempts >= self.minimum and failures > self.threshold * attempts:
            return (
                f"paused automatically: {failures} of the last {attempts} attempts failed "
                f"permanently (over {self.threshold:.0%})"
            )
        return None


class JobRun:
    """One runner's hold on one job (or, with ``shard``, on one range of a sharded job), from
    claim to finish."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        *,
        job_id: uuid.UUID,
        owner: str,
        shard: int | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        self.shard = shard
        self.recovery = Recovery.from_settings(settings)
        self.lease: Lease | None = None
        self.totals = ChunkResult()
        self._after = ""
        self._shard_lease: shards.ShardLease | None = None
        self._errors = ErrorWindow()
        self._stop_reason: str | None = None
        self._queued: deque[ChunkBounds] = deque()
        self._recorder: Recorder | None = None

    def claim(self) -> Lease | None:
        """Take the job (or the range); ``None`` when it is not ours to run (held elsewhere, ended,
        paused or not due)."""
        crash_point("before-claim")
        with Session(self.engine) as session, session.begin():
            if self.shard is None:
                self.lease = lifecycle.claim_job(
                    session, job_id=self.job_id, owner=self.owner, recovery=self.recovery
                )
            else:
                self._shard_lease = shards.claim_shard(
                    session,
                    job_id=self.job_id,
                    shard=self.shard,
                    owner=self.owner,
                    lease_seconds=self.settings.lease_seconds,
                )
                if self._shard_lease is not None:
                    self.lease = self._shard_lease.lease
                    self._after = self._shard_lease.after
        if self.lease is not None:
            crash_point("after-claim")
        return self.lease

    def _held(self) -> Lease:
        if self.lease is None:
            raise LeaseLost(self.job_id)
        return self.lease

    def job_state(self) -> SendJob:
        """Renew the lease and read the job (cancel and pause requests, counters)."""
        lease = self._held()
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return lifecycle.heartbeat(session, lease=lease)

    def next_chunks(self, count: int) -> list[ChunkBounds]:
        """Bounds of up to ``count`` next chunks, or ``[]`` when the run is done or must stop.

        Runs keep ``PAGECAST_PARALLEL_CHUNKS`` chunks in flight and ask for the next one as soon
        as one ends, so one slow chunk (a recipient backing off) never idles the others. Bounds are
        read ``BOUNDS_AHEAD`` chunks at a time, the first ones of growing sizes; whether the job still sends is the recorder's
        latest answer (a chunk of a stopped job claims nothing anyway)."""
        if self._stop_reason is not None or (self._recorder and self._recorder.stopping):
            return []
        if len(self._queued) < count:
            size = self.settings.chunk_size
            sizes = [size] * max(count, BOUNDS_AHEAD)
            if not self._after:  # stagger the first chunks, so their ends never coincide
                sizes[:count] = [math.ceil(size * (k + 1) / count) for k in range(count)]
            with Session(self.engine) as session:
                found = next_chunk_bounds(
                    session,
                    job_id=self.job_id,
                    after=self._after,
                    sizes=sizes,
                    until=self._shard_lease.last if self._shard_lease else None,
                )
            if found:
                self._after = found[-1].last
            self._queued.extend(found)
        return [self._queued.popleft() for _ in range(min(count, len(self._queued)))]

    def absorb(self, results: list[ChunkResult]) -> None:
        """Add finished chunks' results; pause the job if too many recipients fail permanently."""
        for result in results:
            for name in ("sent", "failed", "skipped", "unknown", "requeued", "permanent_failures"):
                setattr(self.totals, name, getattr(self.totals, name) + getattr(result, name))
            for code, count in result.by_code.items():
                self.totals.by_code[code] = self.totals.by_code.get(code, 0) + count
            self.totals.fatal_error = self.totals.fatal_error or result.fatal_error
            self._errors.add(result)
        if self.totals.fatal_error:
            self._stop_reason = self.totals.fatal_error
            return
        reason = self._errors.exceeded()
        if reason is not None and self.lease is not None:
            with Session(self.engine) as session, session.begin():
                lifecycle.stop_running_job(
                    session, lease=self.lease, status=JobStatus.PAUSED, reason=reason
                )
            self._stop_reason = reason

    def finish(self) -> SendJob:
        """Settle the job's final status (a range: release it, done or pending) and the lease."""
        lease = self._held()
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if self._shard_lease is None:
                job = lifecycle.finish_job(session, lease=lease, recovery=self.recovery)
            else:
                shards.finish_shard(session, shard=self._shard_lease)
                job = repo.get_job(session, job_id=self.job_id)
            crash_point("finishing")
            return job

    def fail(self, error: BaseException) -> None:
        """Stop the job ``failed`` with ``last_error`` naming ``error``; chunks in flight stop and
        record what they sent. Recipients not yet sent stay pending for ``job retry``."""
        reason = f"the run crashed: {type(error).__name__}: {error}"
        with Session(self.engine) as session, session.begin():
            lifecycle.stop_running_job(
                session, lease=self._held(), status=JobStatus.FAILED, reason=reason
            )

    @contextmanager
    def failing_on_error(self) -> Iterator[None]:
        """An exception the run does not expect ends the job ``failed`` (see ``fail``) and its run
        (``finish``) before it propagates: a crashed run never leaves its job ``running``."""
        try:
            yield
        except Exception as error:
            with suppress(LeaseLost):
                self.fail(error)
                self.finish()
            raise

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Keep the lease alive from a background thread while the body runs, and the run's
        recorder open (its chunks share it). When the lease is lost, or cannot be renewed for half
        its length, every chunk stops calling (``Recorder.stop``) and no new chunk starts."""
        lease = self._held()
        stop = threading.Event()
        interval = max(1.0, self.settings.lease_seconds / 4)

        def beat(halt: Callable[[str], None]) -> None:
            failing_since: float | None = None
            while not stop.wait(interval if failing_since is None else 1.0):
                try:
                    self.job_state()
                    failing_since = None
                except LeaseLost:
                    return halt("the lease was lost")
                except Exception as error:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.settings.lease_seconds / 2:
                        return halt(f"the heartbeat failed: {type(error).__name__}: {error}")

        with shared_recorder(
            self.engine, lease, give_up_after=self.settings.db_retry_seconds
        ) as recorder:
            self._recorder = recorder
            thread = threading.Thread(
                target=beat,
                args=(recorder.stop,),
                name=f"pagecast-heartbeat-{self.job_id}",
                daemon=True,
            )
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
                self._recorder = None


async def run_in_process(
    engine: sa.Engine,
    settings: Settings,
    *,
    job_id: uuid.UUID,
    token_for: Callable[[str], str],
    owner: str | None = None,
    shard: int | None = None,
) -> SendJob | None:
    """Run a job (or one range of a sharded job) to its end without Prefect; ``None`` when it
    cannot be claimed."""
    run = JobRun(
        engine, settings, job_id=job_id, owner=owner or f"local-{uuid.uuid4()}", shard=shard
    )
    lease = run.claim()
    if lease is None:
        return None
    build_client = client_factory(settings, token_for)
    parallel = settings.parallel_chunks

    def start(bounds: ChunkBounds) -> asyncio.Task[ChunkResult]:
        return asyncio.create_task(
            send_chunk(
                engine,
                lease=lease,
                bounds=bounds,
                client_factory=build_client,
                chunks_in_flight=parallel,
                give_up_after=settings.db_retry_seconds,
                outage_pause_after=settings.outage_pause_seconds,
            )
        )

    with run.failing_on_error(), run.heartbeat():
        in_flight = {start(b) for b in await asyncio.to_thread(run.next_chunks, parallel)}
        while in_flight:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            errors = [error for task in done if (error := task.exception()) is not None]
            if errors:
                try:
                    await asyncio.to_thread(run.fail, errors[0])
                finally:  # the other chunks record what they sent, or stop
                    if in_flight:
                        await asyncio.gather(*in_flight, return_exceptions=True)
                raise errors[0]
            await asyncio.to_thread(run.absorb, [task.result() for task in done])
            more = await asyncio.to_thread(run.next_chunks, parallel - len(in_flight))
            in_flight |= {start(b) for b in more}
    return await asyncio.to_thread(run.finish)
