"""What an operator does to a job: check that it can start, cancel, pause, resume and retry it.

Each command reads the job under a row lock and refuses, with ``JobStateConflict``, a command that
does not fit its status (cancel a completed job, retry a running one): nothing is changed then.
"""

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.errors import JobStateConflict
from pagecast.leases import Lease
from pagecast.lifecycle import Recovery, cancel_now, finish_job
from pagecast.models import JobStatus, SendJob
from pagecast.recipients import pending_count, requeue
from pagecast.repo import get_job

_START_BLOCKERS = {
    JobStatus.COMPLETED: "it has ended; `pagecast job retry` re-queues transient failures",
    JobStatus.COMPLETED_WITH_ERRORS: "it has ended; `pagecast job retry` re-queues transient failures",
    JobStatus.FAILED: "`pagecast job retry` re-queues it",
    JobStatus.CANCELLED: "it was cancelled; create a new job to send again",
    JobStatus.PAUSED: "`pagecast job resume` continues it",
}


def ensure_startable(session: Session, *, job_id: uuid.UUID, recovery: Recovery) -> SendJob:
    """The job, when a run started now could claim it; otherwise ``JobStateConflict`` says why
    (ended, paused, cancelled, another runner sending it, scheduled for later)."""
    job = get_job(session, job_id=job_id)
    alive, early = session.execute(
        sa.text(
            "SELECT heartbeat_at >= now() - make_interval(secs => :lease_seconds), "
            "scheduled_at > now() FROM send_jobs WHERE id = :job_id"
        ),
        {"job_id": job_id, "lease_seconds": recovery.lease_seconds},
    ).one()
    blocker = _START_BLOCKERS.get(JobStatus(job.status))
    if blocker is not None:
        detail = f" (last error: {job.last_error})" if job.last_error else ""
        raise JobStateConflict(job_id, job.status, blocker + detail)
    if job.cancel_requested:
        raise JobStateConflict(job_id, job.status, "a cancel was requested")
    if job.status == JobStatus.RUNNING and alive:
        raise sent_elsewhere(job)
    if early:
        raise JobStateConflict(
            job_id, job.status, f"it is scheduled for {job.scheduled_at}; the sweep starts it then"
        )
    return job


def sent_elsewhere(job: SendJob) -> JobStateConflict:
    """The refusal to start a job that runner ``job.lease_owner`` is sending."""
    return JobStateConflict(
        job.id, job.status, f"runner {job.lease_owner} is sending it; watch `pagecast job status`"
    )


def cancel_job(session: Session, *, job_id: uuid.UUID, recovery: Recovery = Recovery()) -> SendJob:
    """Cancel a job: at once when no live runner holds it, else by a flag its runner acts on (it
    stops calling, records what it sent, and ends the job ``cancelled``)."""
    job = get_job(session, job_id=job_id, for_update=True)
    if job.status not in (JobStatus.PENDING, JobStatus.PAUSED, JobStatus.RUNNING):
        raise JobStateConflict(job_id, job.status, "it has ended and cannot be cancelled")
    held = session.execute(
        sa.text(
            "SELECT lease_owner IS NOT NULL AND heartbeat_at >= now() - "
            "make_interval(secs => :lease_seconds) FROM send_jobs WHERE id = :job_id"
        ),
        {"job_id": job_id, "lease_seconds": recovery.lease_seconds},
    ).scalar_one()
    if held:
        session.execute(
            sa.text("UPDATE send_jobs SET cancel_requested = true WHERE id = :job_id"),
            {"job_id": job_id},
        )
    else:
        cancel_now(session, job_id)
    return get_job(session, job_id=job_id)


def cancel_run(session: Session, *, job_id: uuid.UUID, owner: str) -> SendJob:
    """A runner was cancelled from outside (Prefect): request the cancel and, when that runner holds
    the lease, end the job now, since its process may already be gone. Its in-flight recipients
    become ``unknown`` and the rest ``skipped``."""
    job = cancel_job(session, job_id=job_id)
    if job.status == JobStatus.RUNNING and job.lease_owner == owner:
        lease = Lease(job_id=job_id, owner=owner, attempt=job.attempt)
        return finish_job(session, lease=lease, recovery=Recovery())
    return job


def pause_job(session: Session, *, job_id: uuid.UUID, reason: str = "paused by request") -> SendJob:
    """Pause a pending or running job; its runner stops after the chunks in flight."""
    job = get_job(session, job_id=job_id, for_update=True)
    if job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
        raise JobStateConflict(job_id, job.status, "only pending or running jobs can be paused")
    if job.cancel_requested:
        raise JobStateConflict(job_id, job.status, "a cancel was requested; it ends cancelled")
    job.status, job.last_error = JobStatus.PAUSED, reason
    session.add(job)
    session.flush()
    return job


HELD_FOR_TESTS = (
    "held for test sends: submit the broadcast again with the same idempotency key and no "
    "test_psids to send it (or: pagecast job resume)"
)


def hold_for_tests(session: Session, *, job_id: uuid.UUID) -> SendJob:
    """Pause a job just created for test sends, so nothing sweeps it up before it is released."""
    return pause_job(session, job_id=job_id, reason=HELD_FOR_TESTS)


def release_held(session: Session, *, job_id: uuid.UUID) -> SendJob | None:
    """Make a job held for test sends pending again; ``None`` when it is not held."""
    job = get_job(session, job_id=job_id, for_update=True)
    if job.status != JobStatus.PAUSED or job.last_error != HELD_FOR_TESTS:
        return None
    return resume_job(session, job_id=job_id)


def _restartable(job: SendJob) -> None:
    """A job made pending by hand starts afresh: no stalled runs, no backoff, and its attachment
    uploaded again (a failed upload's claim let go, an id Meta no longer knows forgotten)."""
    job.stalled_runs, job.next_attempt_at, job.waiting_for = 0, None, None
    job.attachment_id, job.attachment_upload_at = None, None


def resume_job(session: Session, *, job_id: uuid.UUID) -> SendJob:
    """Make a paused job pending again, to be picked up where it stopped."""
    job = get_job(session, job_id=job_id, for_update=True)
    if job.status != JobStatus.PAUSED:
        raise JobStateConflict(job_id, job.status, "only a paused job can be resumed")
    job.status, job.last_error = JobStatus.PENDING, None
    _restartable(job)
    session.add(job)
    session.flush()
    return job


@dataclass(frozen=True)
class Requeued:
    """What ``requeue_job`` put back to ``pending``."""

    failed: int
    unknown: int


def requeue_job(session: Session, *, job_id: uuid.UUID, include_unknown: bool = False) -> Requeued:
    """Put an ended or paused job back to ``pending``: recipients that failed transiently (and
    ``unknown`` ones with ``include_unknown``, at the risk of a duplicate) are sent again, as are
    those a job-fatal error left pending. Ranges of a sharded job are reopened where they hold
    pending recipients again."""
    job = get_job(session, job_id=job_id, for_update=True)
    if job.status in (JobStatus.RUNNING, JobStatus.PENDING, JobStatus.CANCELLED):
        raise JobStateConflict(job_id, job.status, "only ended or paused jobs can be retried")
    failed, unknown = requeue(session, job_id=job_id, include_unknown=include_unknown)
    if pending_count(session, job_id) == 0:
        hint = (
            ""
            if include_unknown or not job.unknown
            else " (pass --include-unknown to resend unknowns)"
        )
        raise JobStateConflict(job_id, job.status, f"it has nothing to retry{hint}")
    reopen_ranges(session, job_id=job_id)
    session.execute(
        sa.text(
            "UPDATE send_jobs SET status = 'pending', finished_at = NULL, last_error = NULL, "
            "stalled_runs = 0, next_attempt_at = NULL, waiting_for = NULL, "
            "attachment_id = NULL, attachment_upload_at = NULL WHERE id = :job_id"
        ),
        {"job_id": job_id},
    )
    return Requeued(failed=failed, unknown=unknown)


def reopen_ranges(session: Session, *, job_id: uuid.UUID) -> int:
    """Make ``done`` ranges of a sharded job ``pending`` again where they hold pending recipients
    (after a retry re-queued some), so that the job's next run sends them."""
    return session.execute(
        sa.text(
            """
            UPDATE send_job_shards s SET status = 'pending'
            WHERE s.job_id = :job_id AND s.status = 'done' AND EXISTS (
                SELECT 1 FROM send_job_recipients r WHERE r.job_id = s.job_id
                  AND r.status = 'pending' AND r.psid > s.psid_after AND r.psid <= s.psid_last)
            """
        ),
        {"job_id": job_id},
    ).rowcount
