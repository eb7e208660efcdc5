"""The retry-failed flow: re-queue a job's transient failures (and unknowns, if asked) and send."""

import uuid
from typing import Any

from prefect import flow

from flows.send_job import send_job
from pagecast.commands import requeue_job
from pagecast.db import ready_engine, session_scope
from pagecast.settings import get_settings


@flow(name="retry-failed")
def retry_failed(job_id: uuid.UUID, include_unknown: bool = False) -> dict[str, Any]:
    """Put retryable recipients back to pending and run the job again."""
    with session_scope(ready_engine(get_settings())) as session:
        requeued = requeue_job(session, job_id=job_id, include_unknown=include_unknown)
    return send_job(job_id) | {
        "requeued_failed": requeued.failed,
        "requeued_unknown": requeued.unknown,
    }
