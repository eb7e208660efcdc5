"""What a sweep must start: due pending jobs, and running jobs whose runner stopped heartbeating.

A sweep starts one ``send-job`` run per such job with an idempotency key derived from the job, its
attempt and the current launch period (the lease, at least a minute, so a worker has time to
start the run): two sweeps in the same period start one run, and a run that died before claiming
its job is replaced in the next period. Two runs of one job can never both send (the claim admits
one), so the key only saves wasted runs."""

import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.lifecycle import release_orphans

MIN_LAUNCH_PERIOD_SECONDS = 60

_CANDIDATES = sa.text(
    """
    SELECT id, attempt, status FROM send_jobs
    WHERE NOT cancel_requested
      AND ((status = 'pending' AND scheduled_at <= now())
           OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => :lease_seconds)))
    ORDER BY scheduled_at, created_at
    LIMIT :limit
    """
)


@dataclass(frozen=True)
class SweepItem:
    """A job to start: why, and how many in-flight recipients of a dead runner were settled."""

    job_id: uuid.UUID
    attempt: int
    reason: str
    orphans_settled: int = 0

    def run_key(self, lease_seconds: int, now: float | None = None) -> str:
        """The idempotency key of the ``send-job`` run that this sweep item starts."""
        return launch_key(f"pagecast-send-job-{self.job_id}-{self.attempt}", lease_seconds, now)


def launch_key(prefix: str, lease_seconds: int, now: float | None = None) -> str:
    """``prefix`` and the current launch period: the idempotency key of a run started on behalf of
    a job or a range that is still unclaimed at that attempt."""
    period_seconds = max(lease_seconds, MIN_LAUNCH_PERIOD_SECONDS)
    return f"{prefix}-{int((time.time() if now is None else now) // period_seconds)}"


def jobs_to_start(session: Session, *, lease_seconds: int, limit: int = 100) -> list[SweepItem]:
    """Due pending jobs and stale running ones; a stale job's ``sending`` rows are settled now
    (``unknown``, or ``pending`` with ``resend_unknown``)."""
    rows = session.execute(_CANDIDATES, {"lease_seconds": lease_seconds, "limit": limit}).all()
    items = []
    for job_id, attempt, status in rows:
        if status == "running":
            settled = release_orphans(session, job_id=job_id)
            items.append(SweepItem(job_id, attempt, "runner stopped heartbeating", settled))
        else:
            items.append(SweepItem(job_id, attempt, "due"))
    return items
