"""What the HTTP API shows of a job, and how it slows down key guessing."""

import threading
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
    """Failed authentications per client. A client over ``FAILURES_ALLOWED`` within
    ``FAILURE_WINDOW_SECONDS`` is answered 429 instead of 401 until the window has passed; a valid
    key is never refused, so nobody can lock others out by failing from their address."""

    def __init__(self) -> None:
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def failed(self, client: str) -> bool:
        """Count a failure; whether the client is now over the limit."""
        now = time.monotonic()
        with self._lock:
            for known in [
                c for c, f in self._failures.items() if now - f[-1] > FAILURE_WINDOW_SECONDS
            ]:
                del self._failures[known]
            failures = self._failures[client]
            while failures and now - failures[0] > FAILURE_WINDOW_SECONDS:
                failures.popleft()
            failures.append(now)
            return len(failures) > FAILURES_ALLOWED
