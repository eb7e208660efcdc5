"""The send-job flow: claim a job, send it in waves of mapped chunk tasks, settle its status."""

import sys
import uuid
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run
from prefect.states import State

from pagecast import lifecycle
from pagecast.db import ready_engine, session_scope
from pagecast.errors import MissingPageToken
from pagecast.models import JobStatus, SendJob
from pagecast.outcomes import ChunkResult
from pagecast.reports import job_summary_rows
from pagecast.runner import JobRun
from pagecast.settings import get_settings
from tasks.sending import send_chunk
from tasks.tokens import page_token


def request_cancel(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Prefect cancelled the run: cancel the job (ended at once when this run held it)."""
    job_id = uuid.UUID(str(flow_run.parameters["job_id"]))
    with session_scope(ready_engine(get_settings())) as session:
        job = session.get(SendJob, job_id)
        if job is not None and job.status in (
            JobStatus.PENDING,
            JobStatus.RUNNING,
            JobStatus.PAUSED,
        ):
            lifecycle.cancel_run(session, job_id=job_id, owner=str(flow_run.id))


def _percent(job: SendJob) -> float:
    done = job.sent + job.failed + job.skipped + job.unknown
    return 100.0 * done / job.total if job.total else 100.0


def _announce(job: SendJob) -> None:
    name = "pagecast.job.failed" if job.status == JobStatus.FAILED else "pagecast.job.finished"
    emit_event(
        event=name,
        resource={
            "prefect.resource.id": f"pagecast.job.{job.id}",
            "prefect.resource.name": f"job {job.id}",
        },
        payload={
            "job_id": str(job.id),
            "page_id": job.page_id,
            "status": job.status,
            "total": job.total,
            "sent": job.sent,
            "failed": job.failed,
            "skipped": job.skipped,
            "unknown": job.unknown,
            "last_error": job.last_error,
        },
    )


@flow(name="send-job", on_cancellation=[request_cancel])
def send_job(job_id: uuid.UUID) -> dict[str, Any]:
    """Send a pagecast job: every recipient ends sent, failed, skipped or unknown — exactly once."""
    logger = get_run_logger()
    settings = get_settings()
    engine = ready_engine(settings)
    run = JobRun(engine, settings, job_id=job_id, owner=str(current_flow_run.id or uuid.uuid4()))
    lease = run.claim()
    if lease is None:
        logger.info("job %s is not claimable (running elsewhere, ended, paused or not due)", job_id)
        return {"job_id": str(job_id), "claimed": False}
    with session_scope(engine) as session:
        job = session.get(SendJob, job_id)
    assert job is not None
    try:
        page_token(job.page_id)
    except MissingPageToken as exc:
        with session_scope(engine) as session:
            lifecycle.stop_running_job(
                session, lease=lease, status=JobStatus.FAILED, reason=str(exc)
            )
    progress = create_progress_artifact(
        _percent(job), key=f"pagecast-job-{job_id}-progress", description=f"job {job_id}"
    )
    with run.heartbeat():
        while wave := run.next_wave():
            futures = send_chunk.map(
                job_id=unmapped(job_id),
                page_id=unmapped(job.page_id),
                owner=unmapped(lease.owner),
                attempt=unmapped(lease.attempt),
                after=[bounds.after for bounds in wave],
                last=[bounds.last for bounds in wave],
                chunks_in_flight=unmapped(len(wave)),
            )
            run.absorb([ChunkResult(**future.result()) for future in futures])
            with session_scope(engine) as session:
                update_progress_artifact(progress, _percent(session.get(SendJob, job_id)))
    job = run.finish()
    update_progress_artifact(progress, _percent(job))
    create_table_artifact(
        job_summary_rows(job), key=f"pagecast-job-{job_id}", description=f"job {job_id}"
    )
    _announce(job)
    logger.info("job %s ended %s: %s", job_id, job.status, run.totals.as_dict())
    return {"job_id": str(job_id), "claimed": True, "status": job.status}


if __name__ == "__main__":
    send_job(uuid.UUID(sys.argv[1]))
