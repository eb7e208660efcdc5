"""A job's preview (``--dry-run``): the job is created in a transaction that is rolled back, so the
counts are exactly what creating it would give (de-duplication, opted-out contacts, the
idempotency key), yet nothing is written and nothing is sent."""

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast import repo
from pagecast.content import Content
from pagecast.models import MessagingType
from pagecast.ratelimit import EFFECTIVE_FACTOR, PACING_MARGIN, RECOVERY_PER_SECOND
from pagecast.validation import render_text

SAMPLE_SIZE = 3

_OUTSIDE_WINDOW = sa.text(
    """
    SELECT count(*) FROM send_job_recipients r
    JOIN contacts c ON c.page_id = :page_id AND c.psid = r.psid
    WHERE r.job_id = :job_id AND r.status = 'pending'
      AND c.last_interaction_at < now() - interval '24 hours'
    """
)
_SAMPLE = sa.text(
    """
    SELECT r.psid, COALESCE(r.first_name, c.first_name), COALESCE(r.last_name, c.last_name)
    FROM send_job_recipients r
    LEFT JOIN contacts c ON c.page_id = :page_id AND c.psid = r.psid
    WHERE r.job_id = :job_id ORDER BY r.psid LIMIT :limit
    """
)
# The page's work that goes out before (or beside) the job: running jobs and pending ones due by
# its start. Each message takes 1 / (its job's rate) of the page's shared send schedule.
_AHEAD = sa.text(
    """
    SELECT count(*), COALESCE(sum((total - sent - failed - skipped - unknown) / rate_per_second), 0),
           COALESCE(sum(total - sent - failed - skipped - unknown), 0)
    FROM send_jobs
    WHERE page_id = :page_id AND id <> :job_id AND NOT cancel_requested
      AND (status = 'running'
           OR (status = 'pending' AND COALESCE(scheduled_at, now()) <= :starts_at))
    """
)


@dataclass
class Preview:
    """What creating the job would do; ``existing_job_id`` when its idempotency key already names
    a job (creating would return that job)."""

    page_id: str
    messaging_type: str
    recipients: int
    duplicates_removed: int
    opted_out_excluded: int
    invalid: int  # lines left out: an invalid PSID (creating the job refuses the file)
    outside_window: int  # skipped at send time (24-hour window); 0 with MESSAGE_TAG
    to_send: int
    jobs_ahead: int
    recipients_ahead: int
    rate_per_second: float
    starts_at: datetime
    eta_seconds: float
    finishes_at: datetime
    samples: list[dict[str, str | None]] = field(default_factory=list)
    content: str = ""  # beyond the text: the attachment, buttons, quick replies
    invalid_lines: list[str] = field(default_factory=list)  # the first few, with line numbers
    existing_job_id: uuid.UUID | None = None

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["starts_at"] = self.starts_at.isoformat()
        values["finishes_at"] = self.finishes_at.isoformat()
        values["existing_job_id"] = str(self.existing_job_id) if self.existing_job_id else None
        return values


def _recovery_seconds(session: Session, page_id: str) -> float:
    """What the page's throttling backoff costs from now: its factor ``f`` recovers linearly to 1
    at ``RECOVERY_PER_SECOND``, sending ``(1 - f)² / (2 × recovery)`` seconds' worth less."""
    factor = session.execute(
        sa.text(f"SELECT {EFFECTIVE_FACTOR} FROM page_send_rates WHERE page_id = :page_id"),
        {"page_id": page_id},
    ).scalar_one_or_none()
    shortfall = 1.0 - (1.0 if factor is None else float(factor))
    return shortfall**2 / (2 * RECOVERY_PER_SECOND)


def preview_job(engine: sa.Engine, *, request: repo.JobRequest) -> Preview:
    """Preview the job ``request`` describes (with an idempotency key that names a job, what is
    left of that job). The page is busy with the work ahead until ``now + ahead``; the job ends
    its own work after that or after its start, whichever is later."""
    now = datetime.now(UTC)
    starts_at = max(now, request.scheduled_at or now)
    with Session(engine) as session:
        try:
            created = repo.create_job(session, request=request)
            job = created.job
            keys = {"job_id": job.id, "page_id": job.page_id}
            ahead, ahead_seconds, recipients_ahead = session.execute(
                _AHEAD, keys | {"starts_at": starts_at}
            ).one()
            windowed = job.messaging_type != MessagingType.MESSAGE_TAG
            outside = session.execute(_OUTSIDE_WINDOW, keys).scalar_one() if windowed else 0
            rows = session.execute(_SAMPLE, keys | {"limit": SAMPLE_SIZE}).all()
            to_send = job.total - job.sent - job.failed - job.skipped - job.unknown - outside
            recovering = _recovery_seconds(session, job.page_id)
            page_free_at = now + timedelta(
                seconds=float(ahead_seconds) / PACING_MARGIN + recovering
            )
            finishes_at = max(page_free_at, starts_at) + timedelta(
                seconds=to_send / job.rate_per_second / PACING_MARGIN
            )
            return Preview(
                page_id=job.page_id,
                messaging_type=job.messaging_type,
                recipients=job.total,
                duplicates_removed=created.duplicates_removed,
                opted_out_excluded=created.opted_out_excluded,
                invalid=getattr(request.audience, "invalid", 0),
                invalid_lines=[
                    f"line {p.line}: {p.reason}"
                    for p in getattr(request.audience, "problems", ())[:SAMPLE_SIZE]
                ],
                outside_window=outside,
                to_send=to_send,
                jobs_ahead=ahead,
                recipients_ahead=int(recipients_ahead),
                rate_per_second=job.rate_per_second,
                starts_at=starts_at,
                eta_seconds=(finishes_at - now).total_seconds(),
                finishes_at=finishes_at,
                samples=[
                    {
                        "psid": psid,
                        "text": None
                        if job.text is None
                        else render_text(job.text, first_name=first, last_name=last),
                    }
                    for psid, first, last in rows
                ],
                content=Content.from_json(job.content).describe(),
                existing_job_id=None if created.created else job.id,
            )
        finally:
            session.rollback()
