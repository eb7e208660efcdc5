"""Test sends (``pagecast job test``): the job's exact message, rendered for each test PSID as the
job would render it (the recipient row's names, else the contact's), sent to those PSIDs only.
Each is written ahead (``sending``) just before its call and paced on the page's shared schedule,
throttling included, like a job's sends; they are recorded in ``job_test_sends``, never among the
job's recipients or in its counters."""

import asyncio
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import Session

from pagecast import repo
from pagecast.audience import recipients_from_psids
from pagecast.content import Content
from pagecast.errors import (
    AmbiguousDelivery,
    GraphError,
    InvalidField,
    JobStateConflict,
    ThrottledError,
)
from pagecast.graph import GraphClient, client_factory
from pagecast.models import JobStatus, JobTestSend, SendJob, TestSendStatus
from pagecast.ratelimit import Pacer
from pagecast.sender import TEXT_TOO_LONG
from pagecast.settings import Settings
from pagecast.text import text_length
from pagecast.validation import render_text, text_limit

MAX_TEST_PSIDS = 20
_TESTABLE = (JobStatus.PENDING, JobStatus.PAUSED)
_NAMES = sa.text(
    """
    SELECT p.psid, COALESCE(r.first_name, c.first_name), COALESCE(r.last_name, c.last_name)
    FROM unnest(CAST(:psids AS text[])) AS p(psid)
    LEFT JOIN send_job_recipients r ON r.job_id = :job_id AND r.psid = p.psid
    LEFT JOIN contacts c ON c.page_id = :page_id AND c.psid = p.psid
    """
)


def validate_test_psids(psids: list[str]) -> list[str]:
    """The test PSIDs validated and de-duplicated, in order; ``InvalidInput`` otherwise."""
    unique = list(dict.fromkeys(r.psid for r in recipients_from_psids(psids)))
    if not unique:
        raise InvalidField("psid", "give at least one test PSID")
    if len(unique) > MAX_TEST_PSIDS:
        raise InvalidField(
            "psid", f"{len(unique)} test PSIDs, the limit is {MAX_TEST_PSIDS}", limit=MAX_TEST_PSIDS
        )
    return unique


def _rendered(
    engine: sa.Engine, job_id: uuid.UUID, psids: list[str]
) -> tuple[SendJob, list[JobTestSend]]:
    """The job, checked to be testable, and a test send per PSID with its rendered text."""
    with Session(engine, expire_on_commit=False) as session:
        job = repo.get_job(session, job_id=job_id)
        if job.status not in _TESTABLE:
            raise JobStateConflict(job_id, job.status, "only a pending or paused job is test-sent")
        keys = {"psids": psids, "job_id": job.id, "page_id": job.page_id}
        names = {psid: (first, last) for psid, first, last in session.execute(_NAMES, keys)}
    described = Content.from_json(job.content).describe()  # what an attachment's row says
    return job, [
        JobTestSend(
            job_id=job.id,
            psid=psid,
            text=described
            if job.text is None
            else render_text(job.text, first_name=names[psid][0], last_name=names[psid][1]),
        )
        for psid in psids
    ]


def _save(engine: sa.Engine, send: JobTestSend) -> None:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.merge(send)


async def _send_one(client: GraphClient, pacer: Pacer, job: SendJob, send: JobTestSend) -> None:
    """Fill in the send's outcome; a throttled call slows the page down for every runner."""
    try:
        content = Content.from_json(job.content)
        text = None if job.text is None else send.text
        result = await client.send_message(
            page_id=job.page_id,
            psid=send.psid,
            message=content.message(text, attachment_id=job.attachment_id, by_url=True),
            messaging_type=job.messaging_type,
            tag=job.tag,
        )
    except GraphError as error:
        if isinstance(error, ThrottledError):
            await pacer.throttled(error.retry_after)
        ambiguous = isinstance(error, AmbiguousDelivery)
        send.status = TestSendStatus.UNKNOWN if ambiguous else TestSendStatus.FAILED
        send.error_key, send.error_message = error.code_key, error.message
    else:
        await pacer.observe_usage(result.usage_percent)
        send.status, send.message_id = TestSendStatus.SENT, result.message_id


async def send_tests(
    engine: sa.Engine,
    settings: Settings,
    *,
    job_id: uuid.UUID,
    psids: list[str],
    token_for: Callable[[str], str],
) -> list[JobTestSend]:
    """Send the job's message to ``psids`` (validated, at most ``MAX_TEST_PSIDS``), one at a
    time, and return the recorded test sends; ``JobStateConflict`` unless the job is pending or
    paused. ``token_for(page_id)`` is asked once, before anything is written (it may raise
    ``MissingPageToken``)."""
    job, sends = await asyncio.to_thread(_rendered, engine, job_id, validate_test_psids(psids))
    token = token_for(job.page_id)
    pacer = Pacer(
        engine,
        page_id=job.page_id,
        rate=job.rate_per_second,
        give_up_after=settings.db_retry_seconds,
    )
    async with client_factory(settings, lambda _page_id: token)(1) as client:
        limit = text_limit(Content.from_json(job.content))
        for send in sends:
            if job.text is not None and text_length(send.text) > limit:  # as the job: no call
                send.status, send.error_key = TestSendStatus.FAILED, TEXT_TOO_LONG
                send.error_message = f"the rendered text is over {limit} characters"
                await asyncio.to_thread(_save, engine, send)
                continue
            pacer.expect(1)
            await pacer.wait_for_slot()
            await asyncio.to_thread(_save, engine, send)  # written ahead: left so, it is unknown
            await _send_one(client, pacer, job, send)
            await asyncio.to_thread(_save, engine, send)
    return sends
