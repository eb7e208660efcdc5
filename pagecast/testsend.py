"""Test sends (``pagecast job test``): the job's exact message, rendered for each test PSID from
its contact's names, sent to those PSIDs only. Each is written ahead (``sending``) before its call
and paced on the page's shared schedule, like a job's sends; they are recorded in
``job_test_sends``, never among the job's recipients or in its counters."""

import asyncio
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import Session, col, select

from pagecast import repo
from pagecast.audience import recipients_from_psids
from pagecast.errors import AmbiguousDelivery, GraphError, InvalidField, JobStateConflict
from pagecast.graph import client_factory
from pagecast.models import Contact, JobStatus, JobTestSend, SendJob, TestSendStatus
from pagecast.ratelimit import Pacer
from pagecast.settings import Settings
from pagecast.validation import render_text

MAX_TEST_PSIDS = 20
_TESTABLE = (JobStatus.PENDING, JobStatus.PAUSED)


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


def _write_ahead(
    engine: sa.Engine, job_id: uuid.UUID, psids: list[str]
) -> tuple[SendJob, list[JobTestSend]]:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        job = repo.get_job(session, job_id=job_id, for_update=True)
        if job.status not in _TESTABLE:
            raise JobStateConflict(job_id, job.status, "only a pending or paused job is test-sent")
        names = {
            contact.psid: contact
            for contact in session.exec(
                select(Contact).where(Contact.page_id == job.page_id, col(Contact.psid).in_(psids))
            )
        }
        sends = []
        for psid in psids:
            contact = names.get(psid)
            text = render_text(
                job.text,
                first_name=contact.first_name if contact else None,
                last_name=contact.last_name if contact else None,
            )
            sends.append(JobTestSend(job_id=job.id, psid=psid, text=text))
        session.add_all(sends)
    return job, sends


def _record(engine: sa.Engine, sends: list[JobTestSend]) -> None:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        for send in sends:
            session.merge(send)


async def send_tests(
    engine: sa.Engine,
    settings: Settings,
    *,
    job_id: uuid.UUID,
    psids: list[str],
    token_for: Callable[[str], str],
) -> list[JobTestSend]:
    """Send the job's message to ``psids`` (validated, at most ``MAX_TEST_PSIDS``) and return the
    recorded test sends; ``JobStateConflict`` unless the job is pending or paused."""
    psids = validate_test_psids(psids)
    job, sends = await asyncio.to_thread(_write_ahead, engine, job_id, psids)
    pacer = Pacer(
        engine,
        page_id=job.page_id,
        rate=job.rate_per_second,
        give_up_after=settings.db_retry_seconds,
    )
    pacer.expect(len(sends))
    try:
        async with client_factory(settings, token_for)(len(sends)) as client:
            for send in sends:
                await pacer.wait_for_slot()
                try:
                    result = await client.send_text(
                        page_id=job.page_id,
                        psid=send.psid,
                        text=send.text,
                        messaging_type=job.messaging_type,
                        tag=job.tag,
                    )
                except GraphError as error:
                    ambiguous = isinstance(error, AmbiguousDelivery)
                    send.status = TestSendStatus.UNKNOWN if ambiguous else TestSendStatus.FAILED
                    send.error_key, send.error_message = error.code_key, error.message
                else:
                    send.status, send.message_id = TestSendStatus.SENT, result.message_id
    finally:
        await asyncio.to_thread(_record, engine, sends)
    return sends
