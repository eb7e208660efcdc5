"""Human summaries of a job: what it waits for, and the rows of the final table (no PSIDs, no
token)."""

from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.models import JobStatus, SendJob
from pagecast.ratelimit import EFFECTIVE_FACTOR
from pagecast.repo import ErrorCount

BOOKED_AHEAD_SECONDS = 5.0
_WAIT_FACTS = sa.text(
    f"""
    SELECT j.scheduled_at > now(), j.next_attempt_at > now(),
           j.heartbeat_at < now() - make_interval(secs => :lease_seconds),
           {EFFECTIVE_FACTOR}, extract(epoch FROM r.next_slot_at - now())
    FROM send_jobs j LEFT JOIN page_send_rates r ON r.page_id = j.page_id
    WHERE j.id = :job_id
    """
)


def _time(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def waiting_for(session: Session, job: SendJob, *, lease_seconds: int) -> str | None:
    """What the job waits for right now, in words (``None`` when it waits for nothing): its
    schedule, a backoff after stalled runs, a worker, a runner, a resume, or the page's send
    schedule (throttled by Meta, or booked by the page's other jobs)."""
    early, backing_off, stale, factor, booked = session.execute(
        _WAIT_FACTS, {"job_id": job.id, "lease_seconds": lease_seconds}
    ).one()
    if job.status == JobStatus.PAUSED:
        return f"a resume (`pagecast job resume`): {job.last_error or 'paused'}"
    if job.status == JobStatus.PENDING:
        if early:
            return f"its scheduled time, {_time(job.scheduled_at)}"
        if backing_off:
            return (
                f"a backoff until {_time(job.next_attempt_at)}: {job.stalled_runs} run(s) in a row "
                "ended without progress"
            )
        return job.waiting_for or "a runner: the next sweep, `pagecast sweep` or `pagecast job run`"
    if job.status != JobStatus.RUNNING:
        return None
    if stale:
        return "a takeover: its runner stopped heartbeating (the next sweep ends that run)"
    if factor is not None and factor < 1:
        return f"the page's send schedule, slowed to {factor:.0%} of the rate after throttling"
    if booked is not None and booked > BOOKED_AHEAD_SECONDS:
        return f"the page's send schedule, booked {booked:.0f} s ahead by this page's other jobs"
    return job.waiting_for


def receipt_share(count: int, job: SendJob) -> str:
    """``count`` (delivered or read, from Messenger's receipts) as a share of the messages sent."""
    return f"{count / job.sent:.0%} of sent" if job.sent else ""


def job_summary_rows(job: SendJob, errors: list[ErrorCount]) -> list[dict[str, Any]]:
    """Counts, error codes with their counts and Meta's messages, and durations."""
    rows: list[dict[str, Any]] = [
        {"item": "status", "value": job.status, "detail": job.last_error or ""},
        {"item": "total", "value": job.total, "detail": f"page {job.page_id}, {job.source}"},
        {"item": "sent", "value": job.sent, "detail": ""},
        {"item": "failed", "value": job.failed, "detail": ""},
        {"item": "skipped", "value": job.skipped, "detail": ""},
        {
            "item": "unknown",
            "value": job.unknown,
            "detail": "in flight when a runner died; not resent",
        },
        {"item": "delivered", "value": job.delivered, "detail": receipt_share(job.delivered, job)},
        {"item": "read", "value": job.read, "detail": receipt_share(job.read, job)},
    ]
    for error in errors:
        rows.append(
            {
                "item": f"{error.status} {error.key}",
                "value": error.count,
                "detail": (error.message or "")[:300],
            }
        )
    if job.started_at and job.finished_at:
        seconds = (job.finished_at - job.started_at).total_seconds()
        done = job.sent + job.failed + job.skipped + job.unknown
        rate = f"{done / seconds:.1f} recipients/s" if seconds > 0 else ""
        rows.append({"item": "duration", "value": f"{seconds:.1f} s", "detail": rate})
    return rows
