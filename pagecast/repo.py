"""Reads and writes of jobs, recipients and contacts. Every function takes the session first and
keyword-only arguments; callers own the transaction."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, col, select

from pagecast.audience import ContactRow, ParsedRecipients
from pagecast.db import without_timeouts
from pagecast.errors import IdempotencyConflict, InvalidAudience, JobNotFound
from pagecast.models import (
    IN_FLIGHT_RECIPIENT_STATUSES,
    RecipientStatus,
    SendJob,
    SendJobRecipient,
)
from pagecast.validation import Message

_COPY_RECIPIENTS = "COPY _recipients_in (position, psid, first_name, last_name) FROM STDIN"
_COPY_CONTACTS = (
    "COPY _contacts_in (psid, first_name, last_name, tags, opted_out, last_interaction_at) "
    "FROM STDIN"
)


@dataclass(frozen=True)
class TagFilter:
    """Contacts of the job's page carrying any of ``tags`` (all of them with ``match_all``)."""

    tags: tuple[str, ...]
    match_all: bool = False

    def describe(self) -> str:
        joiner = " & " if self.match_all else " | "
        return "tags:" + joiner.join(self.tags)


@dataclass(frozen=True)
class JobRequest:
    """Everything needed to create a job; values are already validated."""

    page_id: str
    message: Message
    audience: ParsedRecipients | TagFilter
    concurrency: int
    rate_per_second: float
    idempotency_key: str | None = None  # names one job of the page
    resend_unknown: bool = False
    scheduled_at: datetime | None = None
    fingerprint: str | None = None  # the whole request's, when its maker compares them


@dataclass
class CreatedJob:
    """The outcome of ``create_job``: the job, whether it is new, and what was left out."""

    job: SendJob
    created: bool
    duplicates_removed: int = 0
    opted_out_excluded: int = 0


@dataclass(frozen=True)
class ErrorCount:
    """Recipients of a job that ended ``status`` for one reason (a Graph error code, or why no call
    was made), with one of their error messages."""

    key: str
    status: str
    count: int
    message: str | None


@dataclass
class JobProgress:
    """A job with its recipients counted by status, and its errors by reason."""

    job: SendJob
    by_status: dict[str, int] = field(default_factory=dict)
    errors: list[ErrorCount] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.by_status.get(RecipientStatus.PENDING, 0)


def _raw(session: Session) -> Any:
    return session.connection().connection.driver_connection


def _matches(job: SendJob, request: JobRequest) -> list[str]:
    wanted = {
        "text": request.message.text,
        "content": request.message.content.to_json(),
        "messaging_type": request.message.messaging_type,
        "tag": request.message.tag,
    }
    differing = [name for name, value in wanted.items() if getattr(job, name) != value]
    fingerprints = (job.request_fingerprint, request.fingerprint)
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        differing.append("request (audience, pace or schedule)")
    return differing


def _existing(session: Session, request: JobRequest) -> CreatedJob | None:
    if request.idempotency_key is None:
        return None
    job = session.exec(
        select(SendJob).where(
            SendJob.page_id == request.page_id, SendJob.idempotency_key == request.idempotency_key
        )
    ).first()
    if job is None:
        return None
    differing = _matches(job, request)
    if differing:
        raise IdempotencyConflict(request.idempotency_key, job.id, differing)
    return CreatedJob(job=job, created=False, duplicates_removed=job.duplicates_removed)


def _insert_job(session: Session, request: JobRequest) -> uuid.UUID | None:
    values: dict[str, Any] = {
        "page_id": request.page_id,
        "text": request.message.text,
        "content": request.message.content.to_json(),
        "messaging_type": request.message.messaging_type.value,
        "tag": request.message.tag.value if request.message.tag else None,
        "source": request.audience.describe(),
        "concurrency": request.concurrency,
        "rate_per_second": request.rate_per_second,
        "idempotency_key": request.idempotency_key,
        "request_fingerprint": request.fingerprint,
        "resend_unknown": request.resend_unknown,
    }
    if request.scheduled_at is not None:
        values["scheduled_at"] = request.scheduled_at
    statement = (
        pg_insert(SendJob)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["page_id", "idempotency_key"])
        .returning(SendJob.id)
    )
    return session.execute(statement).scalar_one_or_none()


def _insert_recipients(
    session: Session, job_id: uuid.UUID, parsed: ParsedRecipients
) -> tuple[int, int]:
    """Stream the recipients into a scratch table, then keep the first row of each PSID; the
    recipients inserted and the duplicates left out."""
    session.execute(
        sa.text(
            "CREATE TEMP TABLE _recipients_in (position bigint, psid text, first_name text, "
            "last_name text)"
        )
    )
    copied = 0
    with _raw(session).cursor() as cursor, cursor.copy(_COPY_RECIPIENTS) as copy:
        for copied, recipient in enumerate(parsed, start=1):
            copy.write_row((copied, recipient.psid, recipient.first_name, recipient.last_name))
    inserted = session.execute(
        sa.text(
            "INSERT INTO send_job_recipients (job_id, psid, first_name, last_name) "
            "SELECT DISTINCT ON (psid) :job_id, psid, first_name, last_name FROM _recipients_in "
            "ORDER BY psid, position"
        ),
        {"job_id": job_id},
    ).rowcount
    session.execute(sa.text("DROP TABLE _recipients_in"))
    return inserted, copied - inserted


def _exclude_opted_out(session: Session, job_id: uuid.UUID, page_id: str) -> int:
    result = session.execute(
        sa.text(
            "DELETE FROM send_job_recipients r USING contacts c "
            "WHERE r.job_id = :job_id AND c.page_id = :page_id AND c.psid = r.psid AND c.opted_out"
        ),
        {"job_id": job_id, "page_id": page_id},
    )
    return result.rowcount


def _insert_from_contacts(
    session: Session, job_id: uuid.UUID, page_id: str, tags: TagFilter
) -> int:
    operator = "@>" if tags.match_all else "&&"
    result = session.execute(
        sa.text(
            "INSERT INTO send_job_recipients (job_id, psid, first_name, last_name) "
            "SELECT :job_id, psid, first_name, last_name FROM contacts "
            f"WHERE page_id = :page_id AND NOT opted_out AND tags {operator} CAST(:tags AS text[]) "
            "ORDER BY psid"
        ),
        {"job_id": job_id, "page_id": page_id, "tags": list(tags.tags)},
    )
    return result.rowcount


def create_job(session: Session, *, request: JobRequest) -> CreatedJob:
    """Create a pending job and its recipients in the session's transaction.

    With an idempotency key already in use, the existing job is returned (``created=False``), or
    ``IdempotencyConflict`` is raised if it was created with another page, text, type or tag. Opted-out contacts of the page are never recipients; an empty audience raises
    ``InvalidAudience`` and the caller's rollback leaves nothing behind.
    """
    existing = _existing(session, request)
    if existing is not None:
        return existing
    without_timeouts(session.connection())
    job_id = _insert_job(session, request)
    if job_id is None:  # a concurrent request with the same key won the insert
        existing = _existing(session, request)
        if existing is None:
            raise JobNotFound(f"with idempotency key {request.idempotency_key}")
        return existing
    duplicates = opted_out = 0
    if isinstance(request.audience, TagFilter):
        total = _insert_from_contacts(session, job_id, request.page_id, request.audience)
        if total == 0:
            raise InvalidAudience(
                f"no contact of page {request.page_id} that has not opted out matches "
                f"{request.audience.describe()}"
            )
    else:
        inserted, duplicates = _insert_recipients(session, job_id, request.audience)
        opted_out = _exclude_opted_out(session, job_id, request.page_id)
        total = inserted - opted_out
        if total == 0:
            raise InvalidAudience(
                f"every recipient ({opted_out}) has opted out of page {request.page_id}"
            )
    session.execute(
        sa.update(SendJob)
        .where(col(SendJob.id) == job_id)
        .values(total=total, duplicates_removed=duplicates)
    )
    job = get_job(session, job_id=job_id)
    return CreatedJob(
        job=job, created=True, duplicates_removed=duplicates, opted_out_excluded=opted_out
    )


def get_job(session: Session, *, job_id: uuid.UUID, for_update: bool = False) -> SendJob:
    """The job with ``job_id`` (row-locked with ``for_update``), or ``JobNotFound``."""
    job = session.get(SendJob, job_id, populate_existing=True, with_for_update=for_update)
    if job is None:
        raise JobNotFound(job_id)
    return job


_ERROR_COUNTS = sa.text(
    "SELECT job_id, error_key, status, count(*), min(error_message) FROM send_job_recipients "
    "WHERE job_id IN :job_ids AND status IN ('failed', 'skipped', 'unknown') "
    "AND error_key IS NOT NULL GROUP BY job_id, error_key, status ORDER BY 1, 4 DESC, 2"
).bindparams(sa.bindparam("job_ids", expanding=True))


def _error_counts(
    session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[ErrorCount]]:
    counts: dict[uuid.UUID, list[ErrorCount]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        for job_id, *row in session.execute(_ERROR_COUNTS, {"job_ids": list(job_ids)}):
            counts[job_id].append(ErrorCount(*row))
    return counts


def error_counts(session: Session, *, job_id: uuid.UUID) -> list[ErrorCount]:
    """The job's failed, skipped and unknown recipients counted by reason, most frequent first."""
    return _error_counts(session, [job_id])[job_id]


def job_progress(session: Session, *, job_id: uuid.UUID, errors: bool = True) -> JobProgress:
    """The job, its recipients by status and (unless ``errors`` is false: a poller that shows
    counts only) its errors by reason. Terminal and pending counts
    come from the job's counters, which every transaction that moves a recipient keeps equal to
    the rows; only the few rows in flight (and the errors) are counted, so the cost does not grow
    with the audience (a count over a million rows took 190 ms)."""
    return jobs_progress(session, [get_job(session, job_id=job_id)], errors=errors)[0]


def jobs_progress(
    session: Session, jobs: Sequence[SendJob], *, errors: bool = True
) -> list[JobProgress]:
    """``job_progress`` of each of ``jobs`` (a listed page of them), in two statements."""
    ids = [job.id for job in jobs]
    in_flight: dict[uuid.UUID, dict[str, int]] = {job_id: {} for job_id in ids}
    if ids:
        rows = session.execute(
            sa.select(SendJobRecipient.job_id, SendJobRecipient.status, sa.func.count())
            .where(
                col(SendJobRecipient.job_id).in_(ids),
                col(SendJobRecipient.status).in_(IN_FLIGHT_RECIPIENT_STATUSES),
            )
            .group_by(SendJobRecipient.job_id, SendJobRecipient.status)
        )
        for job_id, status, count in rows:
            in_flight[job_id][status] = count
    reasons = _error_counts(session, ids) if errors else {}
    return [_progress(job, in_flight[job.id], reasons.get(job.id, [])) for job in jobs]


def _progress(job: SendJob, in_flight: dict[str, int], errors: list[ErrorCount]) -> JobProgress:
    settled = {
        RecipientStatus.SENT: job.sent,
        RecipientStatus.FAILED: job.failed,
        RecipientStatus.SKIPPED: job.skipped,
        RecipientStatus.UNKNOWN: job.unknown,
    }
    # two reads: rows answered between them show as pending for a moment, never below 0
    pending = max(0, job.total - sum(settled.values()) - sum(in_flight.values()))
    counts = {RecipientStatus.PENDING: pending, **in_flight, **settled}
    return JobProgress(
        job=job,
        by_status={str(status): count for status, count in counts.items() if count},
        errors=errors,
    )


def set_waiting_for(session: Session, *, job_id: uuid.UUID, waiting_for: str | None) -> None:
    """Record what the job waits for that its row cannot tell (a worker, a token); the next
    claim clears it."""
    session.execute(
        sa.update(SendJob).where(col(SendJob.id) == job_id).values(waiting_for=waiting_for)
    )


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    page_id: str | None = None,
    limit: int = 20,
    page_ids: Sequence[str] = (),
    before: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[SendJob]:
    """The most recently created jobs, newest first (ties by id); only ``page_ids``' when given,
    and only those created before ``before`` (a page of a paged list)."""
    query = (
        select(SendJob)
        .order_by(col(SendJob.created_at).desc(), col(SendJob.id).desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(SendJob.status == status)
    if page_id is not None:
        query = query.where(SendJob.page_id == page_id)
    if page_ids:
        query = query.where(col(SendJob.page_id).in_(page_ids))
    if before is not None:
        query = query.where(sa.tuple_(SendJob.created_at, SendJob.id) < sa.tuple_(*before))
    return session.exec(query).all()


@dataclass(frozen=True)
class ContactImport:
    """Counts of a contacts import."""

    inserted: int
    updated: int


def import_contacts(session: Session, *, page_id: str, contacts: list[ContactRow]) -> ContactImport:
    """Insert or update a page's contacts (keyed by PSID) in one COPY and one upsert."""
    without_timeouts(session.connection())
    session.execute(
        sa.text(
            "CREATE TEMP TABLE _contacts_in (psid text, first_name text, last_name text, "
            "tags text[], opted_out boolean, last_interaction_at timestamptz) ON COMMIT DROP"
        )
    )
    with _raw(session).cursor() as cursor, cursor.copy(_COPY_CONTACTS) as copy:
        for c in contacts:
            copy.write_row(
                (
                    c.psid,
                    c.first_name,
                    c.last_name,
                    list(c.tags),
                    c.opted_out,
                    c.last_interaction_at,
                )
            )
    session.execute(  # an opt-out (a STOP through the webhook) stands unless the file says
        sa.text(
            "UPDATE _contacts_in i SET opted_out = c.opted_out FROM contacts c "
            "WHERE i.opted_out IS NULL AND c.page_id = :page_id AND c.psid = i.psid"
        ),
        {"page_id": page_id},
    )
    rows = (
        session.execute(
            sa.text(
                "INSERT INTO contacts (page_id, psid, first_name, last_name, tags, opted_out, "
                "last_interaction_at) "
                "SELECT :page_id, psid, first_name, last_name, tags, COALESCE(opted_out, false), "
                "last_interaction_at "
                "FROM _contacts_in "
                "ON CONFLICT (page_id, psid) DO UPDATE SET first_name = EXCLUDED.first_name, "
                "last_name = EXCLUDED.last_name, tags = EXCLUDED.tags, opted_out = EXCLUDED.opted_out, "
                "last_interaction_at = COALESCE(EXCLUDED.last_interaction_at, "
                "contacts.last_interaction_at), updated_at = now() "
                "RETURNING (xmax = 0)"
            ),
            {"page_id": page_id},
        )
        .scalars()
        .all()
    )
    inserted = sum(1 for fresh in rows if fresh)
    return ContactImport(inserted=inserted, updated=len(rows) - inserted)
