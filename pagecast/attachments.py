"""A job's attachment, uploaded once per job through the Attachment Upload API and sent to every
recipient by its ``attachment_id``.

The chunks of a running job (in one run, several runs or a sharded job's child runs) meet on the
job's row: the first to find no ``attachment_id`` takes the upload (``attachment_upload_at``,
refreshed before each try), the others wait for the id it stores, and stop waiting when the job
stops running. An uploader that dies leaves its take to go stale after ``STALE_SECONDS``. A
failed upload keeps its take: the failing chunk stops the job (``failed`` when Meta refuses the
file, ``paused`` after ``UPLOAD_TRIES`` transient failures), and resuming or retrying the job
clears the take and the id (``commands._restartable``), so the next run uploads afresh.
"""

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.content import Content
from pagecast.db import retrying
from pagecast.errors import AmbiguousDelivery, ThrottledError, TransientGraphError
from pagecast.graph import GraphClient
from pagecast.models import JobStatus, SendJob

UPLOAD_TRIES = 4
UPLOAD_BACKOFF_SECONDS = 1.0  # doubling between tries
STALE_SECONDS = 180.0  # longer than UPLOAD_TRIES answers that time out, and the pauses between
_WAIT_SECONDS = (0.2, 2.0)

_READ = sa.text("SELECT attachment_id, status FROM send_jobs WHERE id = :job_id")
_TAKE = sa.text(
    """
    UPDATE send_jobs SET attachment_upload_at = now()
    WHERE id = :job_id AND status = 'running' AND attachment_id IS NULL
      AND (attachment_upload_at IS NULL
           OR attachment_upload_at < now() - make_interval(secs => :stale))
    RETURNING id
    """
)
_REFRESH = sa.text(
    "UPDATE send_jobs SET attachment_upload_at = now() WHERE id = :job_id AND attachment_id IS NULL"
)
_STORE = sa.text(
    "UPDATE send_jobs SET attachment_id = COALESCE(attachment_id, :attachment_id) "
    "WHERE id = :job_id RETURNING attachment_id"
)
Upload = Callable[[], Awaitable[str | None]]


def _execute(
    engine: sa.Engine, statement: sa.TextClause, params: dict[str, Any], give_up_after: float
) -> Any:
    """The statement's first row (``None`` without one), in a transaction of its own."""

    def work() -> Any:
        with Session(engine) as session, session.begin():
            result = session.execute(statement, params)
            return result.first() if result.returns_rows else None

    return retrying(work, give_up_after=give_up_after)


async def _upload(
    engine: sa.Engine, client: GraphClient, job: SendJob, give_up_after: float
) -> str:
    content = Content.from_json(job.content)
    db = functools.partial(_execute, engine, give_up_after=give_up_after)
    tries = 1
    while True:
        try:
            return await client.upload_attachment(
                page_id=job.page_id, kind=str(content.attachment_type), url=content.attachment_url
            )
        except (TransientGraphError, AmbiguousDelivery) as error:
            if tries == UPLOAD_TRIES:
                raise
            wait = UPLOAD_BACKOFF_SECONDS * 2 ** (tries - 1)
            if isinstance(error, ThrottledError) and error.retry_after:
                wait = max(wait, error.retry_after)
        await asyncio.sleep(wait)
        await asyncio.to_thread(db, _REFRESH, {"job_id": job.id})
        tries += 1


async def attachment_id(
    engine: sa.Engine, job: SendJob, client: GraphClient, *, give_up_after: float = 60.0
) -> str | None:
    """The job's attachment id: stored already, uploaded now, or awaited from the chunk that is
    uploading it; ``None`` when the job stopped running meanwhile. Raises the upload's
    ``GraphError`` when it fails."""
    db = functools.partial(_execute, engine, give_up_after=give_up_after)
    params = {"job_id": job.id, "stale": STALE_SECONDS}
    wait, longest = _WAIT_SECONDS
    while True:
        stored, status = await asyncio.to_thread(db, _READ, params)
        if stored:
            return stored
        if status != JobStatus.RUNNING:
            return None
        if await asyncio.to_thread(db, _TAKE, params):
            uploaded = await _upload(engine, client, job, give_up_after)
            (kept,) = await asyncio.to_thread(db, _STORE, params | {"attachment_id": uploaded})
            return kept
        await asyncio.sleep(wait)
        wait = min(wait * 2, longest)


def uploader(
    engine: sa.Engine, job: SendJob, client: GraphClient, give_up_after: float
) -> Upload | None:
    """How a chunk gets the job's attachment id, when the job has an attachment."""
    if not Content.from_json(job.content).attachment_url:
        return None
    return functools.partial(attachment_id, engine, job, client, give_up_after=give_up_after)
