"""A job's life: claim and lease, heartbeat, takeover of a dead runner's work, and the end states.

A runner owns a job through its lease (``lease_owner`` + ``attempt``), or one shard of a large job
through the shard's lease (see ``pagecast.shards``). The claim is one conditional UPDATE; every
later write of the runner is fenced by those values, so a runner that lost its lease can neither
write nor send again. Recipients a dead runner left ``sending`` become ``unknown``
(never silently resent), or ``pending`` when the job has ``resend_unknown``.
"""

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.errors import InvalidInput, JobNotFound, LeaseLost
from pagecast.models import JobStatus, SendJob

CANCELLED_REASON = "job_cancelled"


@dataclass(frozen=True)
class Lease:
    """Proof that a runner owns a job: every write it makes is fenced by these values."""

    job_id: uuid.UUID
    owner: str
    attempt: int
    shard: int | None = None


_CLAIM = sa.text(
    """
    UPDATE send_jobs SET status = 'running', lease_owner = :owner, attempt = attempt + 1,
        heartbeat_at = now(), started_at = COALESCE(started_at, now()), finished_at = NULL
    WHERE id = :job_id AND NOT cancel_requested AND scheduled_at <= now()
      AND (status = 'pending'
           OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => :lease_seconds)))
    RETURNING attempt
    """
)
_ORPHANS = sa.text(
    """
    WITH orphans AS (
        UPDATE send_job_recipients r
        SET status = CASE WHEN j.resend_unknown THEN 'pending' ELSE 'unknown' END,
            error_message = CASE WHEN j.resend_unknown THEN NULL
                                 ELSE 'runner stopped while the request was in flight' END
        FROM send_jobs j
        WHERE r.job_id = :job_id AND j.id = r.job_id AND r.status = 'sending'
          AND r.psid > :after AND (CAST(:last AS text) IS NULL OR r.psid <= :last)
          AND NOT EXISTS (
              SELECT 1 FROM send_job_shards s
              WHERE s.job_id = r.job_id AND s.status = 'running'
                AND s.shard IS DISTINCT FROM CAST(:shard AS integer)
                AND r.psid > s.psid_after AND r.psid <= s.psid_last)
        RETURNING r.status
    )
    UPDATE send_jobs SET unknown = unknown + (SELECT count(*) FROM orphans WHERE status = 'unknown')
    WHERE id = :job_id
    RETURNING (SELECT count(*) FROM orphans)
    """
)


def fence_sql(lease: Lease, table: str = "send_jobs") -> str:
    """The SQL condition on a ``send_jobs`` row (named ``table``) that holds only while ``lease``
    does; bind it with ``lease_params``."""
    if lease.shard is None:
        return (
            f"{table}.id = :job_id AND {table}.lease_owner = :owner AND {table}.attempt = :attempt"
        )
    return (
        f"{table}.id = :job_id AND EXISTS (SELECT 1 FROM send_job_shards s WHERE s.job_id = :job_id "
        "AND s.shard = :shard AND s.lease_owner = :owner AND s.attempt = :attempt "
        "AND s.status = 'running')"
    )


def lease_params(lease: Lease) -> dict[str, object]:
    """The bind parameters of ``fence_sql``."""
    return {
        "job_id": lease.job_id,
        "owner": lease.owner,
        "attempt": lease.attempt,
        "shard": lease.shard,
    }


def claim_job(
    session: Session, *, job_id: uuid.UUID, owner: str, lease_seconds: int
) -> Lease | None:
    """Take the job if it is pending and due, or running under an expired lease; ``None`` otherwise.

    Recipients left ``sending`` by an earlier runner are settled in the same transaction."""
    attempt = session.execute(
        _CLAIM, {"job_id": job_id, "owner": owner, "lease_seconds": lease_seconds}
    ).scalar_one_or_none()
    if attempt is None:
        return None
    release_orphans(session, job_id=job_id)
    return Lease(job_id=job_id, owner=owner, attempt=attempt)


def release_orphans(
    session: Session,
    *,
    job_id: uuid.UUID,
    after: str = "",
    last: str | None = None,
    shard: int | None = None,
) -> int:
    """Settle recipients left ``sending`` (in ``after`` < psid ≤ ``last``): ``unknown``, or
    ``pending`` with ``resend_unknown``. Rows of other shards being sent right now are left alone."""
    params = {"job_id": job_id, "after": after, "last": last, "shard": shard}
    return session.execute(_ORPHANS, params).scalar_one()


def heartbeat(session: Session, *, lease: Lease) -> SendJob:
    """Keep the lease alive; returns the job so the runner sees cancel and pause requests."""
    if lease.shard is None:
        statement = (
            f"UPDATE send_jobs SET heartbeat_at = now() WHERE {fence_sql(lease)} RETURNING id"
        )
    else:
        statement = (
            "UPDATE send_job_shards SET heartbeat_at = now() WHERE job_id = :job_id "
            "AND shard = :shard AND lease_owner = :owner AND attempt = :attempt "
            "AND status = 'running' RETURNING job_id"
        )
    job_id = session.execute(sa.text(statement), lease_params(lease)).scalar_one_or_none()
    if job_id is None:
        raise LeaseLost(lease.job_id)
    job = session.get(SendJob, lease.job_id, populate_existing=True)
    assert job is not None
    return job


def stop_running_job(session: Session, *, lease: Lease, status: JobStatus, reason: str) -> None:
    """Stop the job from its runner: ``failed`` (a job-fatal error) or ``paused`` (too many
    permanent failures). Recipients not yet sent stay ``pending`` for a retry or a resume."""
    assert status in (JobStatus.FAILED, JobStatus.PAUSED)
    session.execute(
        sa.text(
            f"UPDATE send_jobs SET status = :status, last_error = :reason WHERE {fence_sql(lease)} "
            "AND status = 'running'"
        ),
        lease_params(lease) | {"status": status.value, "reason": reason},
    )


def _skip_pending(session: Session, job_id: uuid.UUID) -> None:
    session.execute(
        sa.text(
            """
            WITH skipped AS (
                UPDATE send_job_recipients SET status = 'skipped', error_message = :reason
                WHERE job_id = :job_id AND status = 'pending' RETURNING 1
            )
            UPDATE send_jobs SET skipped = skipped + (SELECT count(*) FROM skipped) WHERE id = :job_id
            """
        ),
        {"job_id": job_id, "reason": CANCELLED_REASON},
    )


def finish_job(session: Session, *, lease: Lease) -> SendJob:
    """End the run: settle leftovers, pick the final status, and release the lease.

    ``failed`` and ``paused`` (set while running) stay; a cancel request skips what is left and
    ends ``cancelled``; otherwise ``completed``, or ``completed_with_errors`` when anything failed
    or is unknown. Recipients still ``sending`` under this lease belong to a chunk that crashed
    after claiming them: their outcome is unknowable, so they become ``unknown``."""
    job = heartbeat(session, lease=lease)
    release_orphans(session, job_id=lease.job_id)
    if job.status == JobStatus.RUNNING and job.cancel_requested:
        _skip_pending(session, lease.job_id)
        status = JobStatus.CANCELLED
    elif job.status == JobStatus.RUNNING:
        pending = session.execute(
            sa.text(
                "SELECT count(*) FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending'"
            ),
            {"job_id": lease.job_id},
        ).scalar_one()
        if pending:
            status = JobStatus.PENDING
        else:
            job = session.get(SendJob, lease.job_id, populate_existing=True)
            assert job is not None
            errors = job.failed + job.unknown
            status = JobStatus.COMPLETED_WITH_ERRORS if errors else JobStatus.COMPLETED
    else:
        status = JobStatus(job.status)
    finished = status not in (JobStatus.PENDING, JobStatus.PAUSED)
    session.execute(
        sa.text(
            f"UPDATE send_jobs SET status = :status, lease_owner = NULL, heartbeat_at = NULL, "
            f"finished_at = CASE WHEN :finished THEN now() END WHERE {fence_sql(lease)}"
        ),
        lease_params(lease) | {"status": status.value, "finished": finished},
    )
    job = session.get(SendJob, lease.job_id, populate_existing=True)
    assert job is not None
    return job


def _job(session: Session, job_id: uuid.UUID) -> SendJob:
    job = session.get(SendJob, job_id, populate_existing=True, with_for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    return job


def cancel_job(session: Session, *, job_id: uuid.UUID) -> SendJob:
    """Cancel a job: at once when no runner holds it, else by a flag its runner checks per chunk."""
    job = _job(session, job_id)
    if job.status in (JobStatus.PENDING, JobStatus.PAUSED):
        _skip_pending(session, job_id)
        session.execute(
            sa.text(
                "UPDATE send_jobs SET status = 'cancelled', cancel_requested = true, "
                "finished_at = now() WHERE id = :job_id"
            ),
            {"job_id": job_id},
        )
    elif job.status == JobStatus.RUNNING:
        session.execute(
            sa.text("UPDATE send_jobs SET cancel_requested = true WHERE id = :job_id"),
            {"job_id": job_id},
        )
    else:
        raise InvalidInput(f"job_id: job {job_id} is already {job.status}")
    return _job(session, job_id)


def cancel_run(session: Session, *, job_id: uuid.UUID, owner: str) -> SendJob:
    """A runner was cancelled from outside (Prefect): request the cancel and, when that runner holds
    the lease, end the job now, since its process may already be gone. Its in-flight recipients
    become ``unknown`` and the rest ``skipped``."""
    job = cancel_job(session, job_id=job_id)
    if job.status == JobStatus.RUNNING and job.lease_owner == owner:
        return finish_job(session, lease=Lease(job_id=job_id, owner=owner, attempt=job.attempt))
    return job


def pause_job(session: Session, *, job_id: uuid.UUID, reason: str = "paused by request") -> SendJob:
    """Pause a pending or running job; its runner stops after the chunks in flight."""
    job = _job(session, job_id)
    if job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
        raise InvalidInput(f"job_id: job {job_id} is {job.status} and cannot be paused")
    job.status, job.last_error = JobStatus.PAUSED, reason
    session.add(job)
    session.flush()
    return job


def resume_job(session: Session, *, job_id: uuid.UUID) -> SendJob:
    """Make a paused job pending again, to be picked up where it stopped."""
    job = _job(session, job_id)
    if job.status != JobStatus.PAUSED:
        raise InvalidInput(f"job_id: job {job_id} is {job.status}, not paused")
    job.status, job.last_error = JobStatus.PENDING, None
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
    those a job-fatal error left pending."""
    job = _job(session, job_id)
    if job.status in (JobStatus.RUNNING, JobStatus.PENDING, JobStatus.CANCELLED):
        raise InvalidInput(
            f"job_id: job {job_id} is {job.status}; only ended or paused jobs can be retried"
        )
    failed, unknown = session.execute(
        sa.text(
            """
            WITH chosen AS (
                SELECT psid, status FROM send_job_recipients
                WHERE job_id = :job_id
                  AND ((status = 'failed' AND retryable) OR (status = 'unknown' AND :include_unknown))
                FOR UPDATE
            ), requeued AS (
                UPDATE send_job_recipients r SET status = 'pending', error_code = NULL,
                    error_subcode = NULL, error_message = NULL, retryable = false
                FROM chosen c WHERE r.job_id = :job_id AND r.psid = c.psid
                RETURNING c.status
            )
            SELECT count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'unknown')
            FROM requeued
            """
        ),
        {"job_id": job_id, "include_unknown": include_unknown},
    ).one()
    pending = session.execute(
        sa.text(
            "SELECT count(*) FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending'"
        ),
        {"job_id": job_id},
    ).scalar_one()
    if pending == 0:
        hint = (
            ""
            if include_unknown or not job.unknown
            else " (pass --include-unknown to resend unknowns)"
        )
        raise InvalidInput(f"job_id: job {job_id} has nothing to retry{hint}")
    session.execute(
        sa.text(
            "UPDATE send_jobs SET status = 'pending', failed = failed - :failed, "
            "unknown = unknown - :unknown, finished_at = NULL, last_error = NULL WHERE id = :job_id"
        ),
        {"job_id": job_id, "failed": failed, "unknown": unknown},
    )
    return Requeued(failed=failed, unknown=unknown)
