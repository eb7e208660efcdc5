"""A job's attachment, uploaded once per job through the Attachment Upload API and sent to every
recipient by its ``attachment_id``.

The chunks of a job (in one run, several runs or a sharded job's child runs) meet on the job's
row: the first to find no ``attachment_id`` takes the upload (``attachment_upload_at``), the
others wait for the id it stores. An uploader that dies leaves the take to expire after
``STALE_SECONDS``; a failed upload lets it go at once. A transient failure (or an answer that may
hide an upload) is tried again a few times: uploading twice costs nothing but a second id.
"""

import asyncio
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.content import Content
from pagecast.db import retrying
from pagecast.errors import AmbiguousDelivery, TransientGraphError
from pagecast.graph import GraphClient
from pagecast.models import SendJob

STALE_SECONDS = 120.0
UPLOAD_TRIES = 4
_WAIT_SECONDS = 0.2

_TAKE = sa.text(
    """
    WITH job AS (SELECT id, attachment_id FROM send_jobs WHERE id = :job_id FOR UPDATE),
    taken AS (
        UPDATE send_jobs j SET attachment_upload_at = now() FROM job
        WHERE j.id = job.id AND job.attachment_id IS NULL
          AND (j.attachment_upload_at IS NULL
               OR j.attachment_upload_at < now() - make_interval(secs => :stale))
        RETURNING j.id
    )
    SELECT job.attachment_id, EXISTS (SELECT 1 FROM taken) FROM job
    """
)
_STORE = sa.text("UPDATE send_jobs SET attachment_id = :attachment_id WHERE id = :job_id")
_LET_GO = sa.text(
    "UPDATE send_jobs SET attachment_upload_at = NULL WHERE id = :job_id AND attachment_id IS NULL"
)


def _execute(
    engine: sa.Engine, statement: sa.TextClause, params: dict[str, Any], give_up_after: float
) -> Any:
    """The statement's first row (``None`` without one), in a transaction of its own."""

    def work() -> Any:
        with Session(engine) as session, session.begin():
            result = session.execute(statement, params)
            return result.first() if result.returns_rows else None

    return retrying(work, give_up_after=give_up_after)


async def _upload(client: GraphClient, job: SendJob, content: Content) -> str:
    tries = 1
    while True:
        try:
            return await client.upload_attachment(
                page_id=job.page_id, kind=str(content.attachment_type), url=content.attachment_url
            )
        except (TransientGraphError, AmbiguousDelivery):
            if tries == UPLOAD_TRIES:
                raise
        await asyncio.sleep(2 ** (tries - 1))
        tries += 1


async def attachment_id(
    engine: sa.Engine, job: SendJob, client: GraphClient, *, give_up_after: float = 60.0
) -> str:
    """The job's attachment id: stored already, uploaded now, or awaited from the chunk that is
    uploading it. Raises the upload's ``GraphError`` when it fails."""
    content = Content.from_json(job.content)
    params = {"job_id": job.id, "stale": STALE_SECONDS}
    while True:
        stored, mine = await asyncio.to_thread(_execute, engine, _TAKE, params, give_up_after)
        if stored:
            return stored
        if mine:
            try:
                uploaded = await _upload(client, job, content)
            except BaseException:
                await asyncio.to_thread(_execute, engine, _LET_GO, params, give_up_after)
                raise
            store = {"job_id": job.id, "attachment_id": uploaded}
            await asyncio.to_thread(_execute, engine, _STORE, store, give_up_after)
            return uploaded
        await asyncio.sleep(_WAIT_SECONDS)
