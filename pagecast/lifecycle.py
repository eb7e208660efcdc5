"""A job's life under its runners: claim and lease, heartbeat, the end of a run (dead or not), and
the end states. What an operator does to a job is in ``pagecast.commands``.

A runner owns a job through its lease (``lease_owner`` + ``attempt``), or one shard of a large job
through the shard's lease (see ``pagecast.shards``). The claim is one conditional UPDATE; every
later write of the runner is fenced by those values, so a runner that lost its lease can neither
write nor send again. What a dead runner left behind is settled by ``recipients.release``: claimed
recipients were never called and are ``pending`` again; ``sending`` ones become ``unknown`` (never
silently resent), or ``pending`` when the job has ``resend_unknown``.

A run that ends with recipients still pending (its runner died, or it stopped early) puts the job
back to ``pending``. Runs that end without progress (no recipient sent, failed or skipped since the
claim) are counted: the sweep waits an exponential backoff before the next one, and gives the job
up as ``failed`` after ``max_stalled_runs`` of them in a row, instead of restarting it forever.
"""

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.errors import LeaseLost
from pagecast.faults import crash_point
from pagecast.leases import Lease, fence_sql, lease_params
from pagecast.models import TERMINAL_JOB_STATUSES, JobStatus, SendJob
from pagecast.recipients import cancel_pending, pending_count, release
from pagecast.repo import get_job
from pagecast.settings import Settings


@dataclass(frozen=True)
class Recovery:
    """When a silent runner counts as dead, and how runs that end without progress are retried:
    after ``backoff_seconds`` (doubling, at most 16 times that), at most ``max_stalled_runs`` in a row."""

    lease_seconds: int = 120
    max_stalled_runs: int = 5
    backoff_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Recovery":
        return cls(
            lease_seconds=settings.lease_seconds,
            max_stalled_runs=settings.max_stalled_runs,
            backoff_seconds=settings.stall_backoff_seconds,
        )

    def params(self) -> dict[str, float]:
        return {
            "lease_seconds": self.lease_seconds,
            "max_stalled": self.max_stalled_runs,
            "backoff": self.backoff_seconds,
        }


_CLAIM = sa.text(
    """
    UPDATE send_jobs SET status = 'running', lease_owner = :owner, attempt = attempt + 1,
        heartbeat_at = now(), started_at = COALESCE(started_at, now()), finished_at = NULL,
        progress_at_claim = sent + failed + skipped, waiting_for = NULL
    WHERE id = :job_id AND status = 'pending' AND NOT cancel_requested AND scheduled_at <= now()
      AND lease_owner IS NULL
    RETURNING attempt
    """
)
_DEAD_RUNS = sa.text(
    """
    SELECT id, cancel_requested, status FROM send_jobs
    WHERE lease_owner IS NOT NULL
      AND heartbeat_at < now() - make_interval(secs => :lease_seconds)
      AND (CAST(:job_id AS uuid) IS NULL OR id = :job_id)
    ORDER BY heartbeat_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
# A run ended with recipients pending: back to pending, or given up after too many stalled runs.
# (SET expressions see the row as it was: ``stalled_runs`` is the count before this run.)
_END_RUN = """
    UPDATE send_jobs SET lease_owner = NULL, heartbeat_at = NULL,
        stalled_runs = CASE WHEN sent + failed + skipped > progress_at_claim THEN 0
                            ELSE stalled_runs + 1 END,
        status = CASE WHEN sent + failed + skipped <= progress_at_claim
                           AND stalled_runs + 1 >= :max_stalled THEN 'failed' ELSE 'pending' END,
        finished_at = CASE WHEN sent + failed + skipped <= progress_at_claim
                                AND stalled_runs + 1 >= :max_stalled THEN now() END,
        last_error = CASE WHEN sent + failed + skipped <= progress_at_claim
                               AND stalled_runs + 1 >= :max_stalled
                          THEN 'gave up: ' || (stalled_runs + 1) || ' runs in a row ended without '
                               || 'progress (last: ' || :reason || '); pagecast job retry resumes'
                          ELSE last_error END,
        next_attempt_at = CASE WHEN sent + failed + skipped > progress_at_claim THEN NULL
                               ELSE now() + make_interval(secs => least(
                                   :backoff * power(2, stalled_runs), :backoff * 16)) END
    WHERE {where}
    RETURNING status
"""


def claim_job(
    session: Session, *, job_id: uuid.UUID, owner: str, recovery: Recovery
) -> Lease | None:
    """Take the job if it is pending and due, or running under an expired lease (that dead run is
    ended first, see ``end_dead_runs``); ``None`` otherwise. Recipients an earlier runner left
    claimed or sending are settled in the same transaction."""
    end_dead_runs(session, recovery=recovery, job_id=job_id)
    attempt = session.execute(_CLAIM, {"job_id": job_id, "owner": owner}).scalar_one_or_none()
    if attempt is None:
        return None
    release(session, job_id=job_id)
    return Lease(job_id=job_id, owner=owner, attempt=attempt)


@dataclass(frozen=True)
class DeadRun:
    """A run whose runner stopped heartbeating, as ``end_dead_runs`` settled it."""

    job_id: uuid.UUID
    orphans_settled: int
    status: JobStatus


def end_dead_runs(
    session: Session, *, recovery: Recovery, job_id: uuid.UUID | None = None, limit: int = 100
) -> list[DeadRun]:
    """End the runs whose runner stopped heartbeating (all of them, or ``job_id``'s): settle their
    in-flight recipients, then make a running job ``pending`` again (``failed`` when it stalled too
    often) or, when a cancel was requested, ``cancelled``. A job its runner had stopped (paused,
    failed) keeps its status and loses the lease. Jobs another transaction holds are skipped."""
    rows = session.execute(_DEAD_RUNS, recovery.params() | {"job_id": job_id, "limit": limit}).all()
    ended = []
    for dead_id, cancel_requested, status in rows:
        settled = release(session, job_id=dead_id)
        if cancel_requested:
            status = cancel_now(session, dead_id)
        elif status == JobStatus.RUNNING:
            status = _end_run(
                session,
                "id = :job_id",
                {"job_id": dead_id},
                recovery,
                "runner stopped heartbeating",
            )
        else:
            _let_go(session, "id = :job_id", {"job_id": dead_id}, JobStatus(status))
        ended.append(DeadRun(job_id=dead_id, orphans_settled=settled, status=JobStatus(status)))
        crash_point("takeover")
    return ended


def _let_go(session: Session, where: str, params: dict[str, object], status: JobStatus) -> None:
    """Release the lease, leaving the job ``status`` (``finished_at`` set when that is final)."""
    session.execute(
        sa.text(
            "UPDATE send_jobs SET status = :status, lease_owner = NULL, heartbeat_at = NULL, "
            f"finished_at = CASE WHEN :finished THEN now() END WHERE {where}"
        ),
        params | {"status": status.value, "finished": status in TERMINAL_JOB_STATUSES},
    )


def _end_run(
    session: Session, where: str, params: dict[str, object], recovery: Recovery, reason: str
) -> JobStatus:
    status = session.execute(
        sa.text(_END_RUN.format(where=where)), params | recovery.params() | {"reason": reason}
    ).scalar_one_or_none()
    if status is None:
        raise LeaseLost(params["job_id"])
    return JobStatus(status)


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
    return get_job(session, job_id=lease.job_id)


def stop_running_job(session: Session, *, lease: Lease, status: JobStatus, reason: str) -> None:
    """Stop the job from its runner: ``failed`` (a job-fatal or unexpected error) or ``paused``
    (too many permanent failures). Recipients not yet sent stay ``pending`` for a retry or a resume."""
    if status not in (JobStatus.FAILED, JobStatus.PAUSED):
        raise ValueError(f"a runner stops its job as failed or paused, not {status}")
    session.execute(
        sa.text(
            f"UPDATE send_jobs SET status = :status, last_error = :reason WHERE {fence_sql(lease)} "
            "AND status = 'running'"
        ),
        lease_params(lease) | {"status": status.value, "reason": reason},
    )


def cancel_now(session: Session, job_id: uuid.UUID) -> JobStatus:
    """End the job ``cancelled``: what a runner still holding it has in flight is settled (see
    ``recipients.release``; that runner is fenced out), and every pending recipient is skipped."""
    release(session, job_id=job_id)
    cancel_pending(session, job_id=job_id)
    session.execute(
        sa.text(
            "UPDATE send_jobs SET status = 'cancelled', cancel_requested = true, "
            "finished_at = now(), lease_owner = NULL, heartbeat_at = NULL WHERE id = :job_id"
        ),
        {"job_id": job_id},
    )
    return JobStatus.CANCELLED


def finish_job(session: Session, *, lease: Lease, recovery: Recovery) -> SendJob:
    """End the run: settle leftovers, pick the final status, and release the lease.

    ``failed`` and ``paused`` (set while running) stay; a cancel request skips what is left and
    ends ``cancelled``; recipients still pending make the job ``pending`` again (see
    ``end_dead_runs`` for stalled runs); otherwise ``completed``, or ``completed_with_errors`` when
    anything failed or is unknown. Recipients this run left claimed go back to ``pending``; those
    left ``sending`` (a chunk that crashed in flight) have an unknowable outcome: ``unknown``."""
    job = heartbeat(session, lease=lease)
    release(session, job_id=lease.job_id)
    fence, params = fence_sql(lease), lease_params(lease)
    if job.cancel_requested and job.status not in TERMINAL_JOB_STATUSES:
        cancel_now(session, lease.job_id)
    elif job.status == JobStatus.RUNNING and pending_count(session, lease.job_id):
        _end_run(session, fence, params, recovery, "the run ended with recipients pending")
    elif job.status == JobStatus.RUNNING:
        job = get_job(session, job_id=lease.job_id)
        errors = job.failed + job.unknown
        status = JobStatus.COMPLETED_WITH_ERRORS if errors else JobStatus.COMPLETED
        _let_go(session, fence, params, status)
    else:
        _let_go(session, fence, params, JobStatus(job.status))
    return get_job(session, job_id=lease.job_id)
