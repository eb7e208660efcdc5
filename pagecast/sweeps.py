"""What a sweep does: end the runs whose runner died, and list the jobs to start now.

A sweep first ends dead runs (``lifecycle.end_dead_runs``: in-flight recipients settled, the job
pending again, or failed after too many runs without progress), then lists pending jobs that are
due and past their backoff. Each is started once per launch period: a ``send-job`` run gets an
idempotency key derived from the job, its attempt and the period (the lease, at least a minute, so
a worker has time to start the run), and a run in this process must win the claim, which admits
one runner. Two sweeps at once therefore start each job once."""

import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.lifecycle import Recovery, end_dead_runs
from pagecast.models import JobStatus

MIN_LAUNCH_PERIOD_SECONDS = 60
DEAD_RUNNER = "runner stopped heartbeating"

_DUE = sa.text(
    """
    SELECT id, attempt FROM send_jobs
    WHERE status = 'pending' AND NOT cancel_requested AND scheduled_at <= now()
      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    ORDER BY scheduled_at, created_at
    LIMIT :limit
    """
)


@dataclass(frozen=True)
class SweepItem:
    """One job the sweep acted on: whether to start it now, and why."""

    job_id: uuid.UUID
    attempt: int
    reason: str
    start: bool = True
    orphans_settled: int = 0

    def run_key(self, lease_seconds: int, now: float | None = None) -> str:
        """The idempotency key of the ``send-job`` run that this sweep item starts."""
        return launch_key(f"pagecast-send-job-{self.job_id}-{self.attempt}", lease_seconds, now)

    def describe(self) -> str:
        settled = (
            f", {self.orphans_settled} in-flight recipients settled" if self.orphans_settled else ""
        )
        return f"job {self.job_id} ({self.reason}{settled})"


def launch_key(prefix: str, lease_seconds: int, now: float | None = None) -> str:
    """``prefix`` and the current launch period: the idempotency key of a run started on behalf of
    a job or a range that is still unclaimed at that attempt."""
    period_seconds = max(lease_seconds, MIN_LAUNCH_PERIOD_SECONDS)
    return f"{prefix}-{int((time.time() if now is None else now) // period_seconds)}"


def sweep_jobs(session: Session, *, recovery: Recovery, limit: int = 100) -> list[SweepItem]:
    """End dead runs and list the jobs to start now, with one item for every dead run that is not
    restarted now (given up, cancelled, or backing off after a run without progress)."""
    ended = {dead.job_id: dead for dead in end_dead_runs(session, recovery=recovery, limit=limit)}
    items = []
    for job_id, attempt in session.execute(_DUE, {"limit": limit}).all():
        dead = ended.pop(job_id, None)
        reason = DEAD_RUNNER if dead else "due"
        items.append(SweepItem(job_id, attempt, reason, True, dead.orphans_settled if dead else 0))
    for dead in ended.values():
        if dead.status == JobStatus.PENDING:
            outcome = "ended without progress; next attempt after a backoff"
        elif dead.status == JobStatus.FAILED:
            outcome = "given up after too many runs without progress"
        else:
            outcome = str(dead.status)
        reason = f"{DEAD_RUNNER}; {outcome}"
        items.append(SweepItem(dead.job_id, 0, reason, False, dead.orphans_settled))
    return items
