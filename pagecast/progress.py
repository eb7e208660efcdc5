"""Live progress of a job as Server-Sent Events (``GET /v1/jobs/{id}/events``).

One poller per watched job and server process reads the job's row twice a second and hands each
new snapshot to every viewer of that job, so viewers cost one primary-key read per half second
whatever their number, and the sender nothing (reads never wait for its writes). Polling was
chosen over ``LISTEN/NOTIFY``: a notification per recorder flush would be a write on the
sender's path for the sake of viewers.

A viewer gets a ``counts`` event whenever the counts change and at least every second, and a final
``end`` event when the job has ended (or is paused, or was deleted); the stream then closes. An
event's id is the job's processed count (sent + failed + skipped + unknown). A client that
reconnects with ``Last-Event-ID`` is sent the current counts, or 204 when the job has ended, which
tells ``EventSource`` to stop reconnecting. A stream whose key is revoked closes within
``KEY_CHECK_SECONDS``.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Header, Request
from fastapi.responses import Response, StreamingResponse

from pagecast import apikeys, repo
from pagecast.db import session_scope
from pagecast.errors import JobNotFound
from pagecast.models import TERMINAL_JOB_STATUSES, ApiKey, JobStatus
from pagecast.views import counts

log = logging.getLogger("pagecast.api")
POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 1.0
KEY_CHECK_SECONDS = 10.0  # an open stream stops within this long of its key's revocation
GONE = "gone"  # the status of a job deleted while watched
_ENDED = TERMINAL_JOB_STATUSES | {JobStatus.PAUSED, GONE}


def _snapshot(engine: sa.Engine, job_id: uuid.UUID) -> dict[str, Any]:
    """The job's status and counts, as ``GET /v1/jobs/{id}`` gives them."""
    with session_scope(engine) as session:
        try:
            progress = repo.job_progress(session, job_id=job_id, errors=False)
        except JobNotFound:
            return {"status": GONE, "processed": 0}
    job = progress.job
    processed = job.sent + job.failed + job.skipped + job.unknown
    return {"status": job.status, "processed": processed} | counts(job, progress.pending)


class JobWatch:
    """The latest snapshot of one job, renewed by one poller while anyone watches."""

    def __init__(self, engine: sa.Engine, job_id: uuid.UUID) -> None:
        self.viewers = 0
        self.version = 0
        self.latest: dict[str, Any] = {}
        self._changed = asyncio.Condition()
        self._poller = asyncio.create_task(self._poll(engine, job_id))

    async def _poll(self, engine: sa.Engine, job_id: uuid.UUID) -> None:
        while True:
            try:
                snapshot = await asyncio.to_thread(_snapshot, engine, job_id)
            except sa.exc.DBAPIError as error:  # an outage: viewers keep the last counts
                log.warning("reading job %s for its viewers failed: %s", job_id, error.orig)
                await asyncio.sleep(POLL_SECONDS)
                continue
            if snapshot != self.latest:
                async with self._changed:
                    self.latest, self.version = snapshot, self.version + 1
                    self._changed.notify_all()
            await asyncio.sleep(POLL_SECONDS)

    async def after(self, seen: int, timeout: float) -> tuple[int, dict[str, Any]]:
        """The snapshot after version ``seen``, or the latest after ``timeout`` seconds."""
        async with self._changed:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > seen), timeout)
            return self.version, self.latest

    def stop(self) -> None:
        self._poller.cancel()


class Watches:
    """The jobs watched in this process."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._watches: dict[uuid.UUID, JobWatch] = {}

    @asynccontextmanager
    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[JobWatch]:
        watch = self._watches.get(job_id) or JobWatch(self._engine, job_id)
        self._watches[job_id] = watch
        watch.viewers += 1
        try:
            yield watch
        finally:
            watch.viewers -= 1
            if not watch.viewers:
                watch.stop()
                del self._watches[job_id]


def _revoked(engine: sa.Engine, api_key: ApiKey) -> bool:
    with engine.connect() as connection:
        revoked = connection.execute(
            sa.text("SELECT revoked_at FROM api_keys WHERE id = :id"), {"id": api_key.id}
        ).scalar_one_or_none()
    return revoked is not None


def _check_visible(engine: sa.Engine, api_key: ApiKey, job_id: uuid.UUID) -> None:
    with session_scope(engine) as session:
        apikeys.visible_job(session, api_key, job_id)


def _event(kind: str, snapshot: dict[str, Any]) -> str:
    return f"id: {snapshot['processed']}\nevent: {kind}\ndata: {json.dumps(snapshot)}\n\n"


def events_endpoint(engine: sa.Engine, key: Callable[..., ApiKey]) -> Callable[..., Any]:
    """The SSE endpoint, authenticated by the ``key`` dependency."""
    watches = Watches(engine)

    async def events(
        job_id: uuid.UUID,
        request: Request,
        api_key: Annotated[ApiKey, Depends(key)],
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        await asyncio.to_thread(_check_visible, engine, api_key, job_id)
        if last_event_id is not None:
            status = (await asyncio.to_thread(_snapshot, engine, job_id))["status"]
            if status in _ENDED:  # the end was sent: 204 stops EventSource reconnecting
                return Response(status_code=204)

        async def stream() -> AsyncIterator[str]:
            yield f"retry: {int(HEARTBEAT_SECONDS * 1000)}\n\n"
            async with watches.watch(job_id) as watch:
                seen, checked = 0, time.monotonic()
                while not await request.is_disconnected():
                    if time.monotonic() - checked > KEY_CHECK_SECONDS:
                        if await asyncio.to_thread(_revoked, engine, api_key):
                            return  # the key was revoked while it watched
                        checked = time.monotonic()
                    seen, snapshot = await watch.after(seen, HEARTBEAT_SECONDS)
                    if not snapshot:
                        continue
                    ended = snapshot["status"] in _ENDED
                    yield _event("end" if ended else "counts", snapshot)
                    if ended:
                        return

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    return events
