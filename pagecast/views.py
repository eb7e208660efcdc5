"""What the HTTP API shows of a job, and how it slows down key guessing."""

import time
from collections import defaultdict, deque
from typing import Any

from pagecast.models import TERMINAL_JOB_STATUSES, JobStatus, SendJob
from pagecast.ratelimit import PACING_MARGIN
from pagecast.repo import JobProgress

FAILURES_ALLOWED = 10
FAILURE_WINDOW_SECONDS = 60.0


def counts(job: SendJob, pending: int) -> dict[str, int]:
    """The job's counters: each recipient's fate, and the receipts."""
    return {
        "total": job.total,
        "sent": job.sent,
        "failed": job.failed,
        "skipped": job.skipped,
        "unknown": job.unknown,
        "pending": pending,
        "delivered": job.delivered,
        "read": job.read,
    }


def eta_seconds(job: SendJob, pending: int) -> float | None:
    """Seconds until the job's pending recipients are sent at its rate (``None`` once it ended
    or while it is paused)."""
    if job.status in TERMINAL_JOB_STATUSES or job.status == JobStatus.PAUSED:
        return None
    return round(pending / (job.rate_per_second * PACING_MARGIN), 1)


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_view(progress: JobProgress) -> dict[str, Any]:
    """A job as the API answers it."""
    job = progress.job
    return {
        "id": str(job.id),
        "status": job.status,
        "page_id": job.page_id,
        "messaging_type": job.messaging_type,
        "tag": job.tag,
        "text": job.text,
        "content": job.content,
        "audience": job.source,
        "rate_per_second": job.rate_per_second,
        "concurrency": job.concurrency,
        "counts": counts(job, progress.pending),
        "errors": [
            {"status": e.status, "reason": e.key, "count": e.count, "message": e.message}
            for e in progress.errors
        ],
        "eta_seconds": eta_seconds(job, progress.pending),
        "last_error": job.last_error,
        "waiting_for": job.waiting_for,
        "idempotency_key": job.idempotency_key,
        "scheduled_at": _time(job.scheduled_at),
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
    }


class FailedAttempts:
    """Failed authentications per client: more than ``FAILURES_ALLOWED`` in
    ``FAILURE_WINDOW_SECONDS`` blocks the client until the window has passed."""

    def __init__(self) -> None:
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)

    def _recent(self, client: str) -> deque[float]:
        failures, now = self._failures[client], time.monotonic()
        while failures and now - failures[0] > FAILURE_WINDOW_SECONDS:
            failures.popleft()
        return failures

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= FAILURES_ALLOWED

    def failed(self, client: str) -> None:
        self._recent(client).append(time.monotonic())
