"""The send-job flow: claim a job, keep a few chunk tasks in flight until it is sent, settle it."""

import sys
import time
import uuid
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL
from prefect.states import State

from pagecast import commands, lifecycle, repo, shards, trigger
from pagecast.chunks import ChunkBounds, ChunkResult
from pagecast.db import ready_engine, session_scope
from pagecast.errors import MissingPageToken
from pagecast.faults import crash_point
from pagecast.leases import Lease
from pagecast.models import JobStatus, SendJob
from pagecast.reports import job_summary_rows, waiting_for
from pagecast.runner import JobRun
from pagecast.settings import get_settings
from pagecast.sweeps import launch_key
from tasks.sending import send_chunk
from tasks.tokens import page_token

SEND_JOB_DEPLOYMENT = "send-job/send-job"
SUPERVISE_SECONDS = 2.0
PROGRESS_SECONDS = 2.0
CHUNK_RESUBMITS = 6
RESUBMIT_MAX_SECONDS = 20.0
_ORCHESTRATION_MODULES = ("prefect", "httpx", "httpcore", "anyio", "websockets")


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
            commands.cancel_run(session, job_id=job_id, owner=str(flow_run.id))


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


def _why_no_child_runs() -> str | None:
    """Why child runs could not send ranges now (``None``: a worker is online for the send-job
    deployment's pool, so they can)."""
    api_url = PREFECT_API_URL.value()
    if not api_url:
        return "no Prefect server runs deployments here"
    name = SEND_JOB_DEPLOYMENT.split("/")
    deployment = trigger.find_deployment(
        api_url, flow_name=name[0], deployment_name=name[1], api_key=PREFECT_API_KEY.value()
    )
    if deployment is None:
        return "there is no send-job deployment"
    if not deployment.workers_online:
        return f"no worker is online for work pool {deployment.work_pool!r}"
    return None


def _failed_in_prefect(error: BaseException) -> bool:
    """Whether a chunk task failed in Prefect's hands (its API unreachable or overloaded, a
    concurrency slot not granted) rather than in pagecast's code."""
    return type(error).__module__.split(".")[0] in _ORCHESTRATION_MODULES


def _show_progress(progress: uuid.UUID | None, job: SendJob) -> None:
    """Update the progress artifact; the Prefect API being away costs the job nothing."""
    if progress is None:
        return
    try:
        update_progress_artifact(progress, _percent(job))
    except Exception as error:
        get_run_logger().warning("job %s: progress not shown: %s", job.id, error)


def _send_chunks(run: JobRun, job: SendJob, lease: Lease, progress: uuid.UUID | None) -> None:
    """Keep ``parallel_chunks`` chunk tasks in flight; each gets two keyset bounds, never a list.
    A chunk task that failed in Prefect's hands is submitted again after a backoff (a chunk
    resumes the rows it owns, so this never sends a row twice). When a chunk task fails for
    good, the job is stopped ``failed`` and the other chunks are waited for (they record what
    they sent) before the error propagates."""
    parallel = run.settings.parallel_chunks
    bounds_of: dict[PrefectFuture[dict[str, Any]], ChunkBounds] = {}
    resubmits: Counter[ChunkBounds] = Counter()

    def submit(bounds: ChunkBounds) -> PrefectFuture[dict[str, Any]]:
        future = send_chunk.submit(
            job_id=job.id,
            page_id=job.page_id,
            owner=lease.owner,
            attempt=lease.attempt,
            after=bounds.after,
            last=bounds.last,
            chunks_in_flight=parallel,
            shard=lease.shard,
        )
        bounds_of[future] = bounds
        return future

    in_flight = [submit(bounds) for bounds in run.next_chunks(parallel)]
    reported_at = time.monotonic()
    while in_flight:
        done = next(as_completed(in_flight))
        in_flight.remove(done)
        bounds = bounds_of.pop(done)
        try:
            result = ChunkResult(**done.result())
        except Exception as error:
            if _failed_in_prefect(error) and resubmits[bounds] < CHUNK_RESUBMITS:
                resubmits[bounds] += 1
                pause = min(RESUBMIT_MAX_SECONDS, 2.0 ** resubmits[bounds])
                get_run_logger().warning(
                    "job %s: chunk after %r failed in Prefect (%s: %s); again in %.0f s",
                    job.id,
                    bounds.after,
                    type(error).__name__,
                    error,
                    pause,
                )
                time.sleep(pause)
                in_flight.append(submit(bounds))
                continue
            run.fail(error)
            wait(in_flight)
            raise
        run.absorb([result])
        in_flight += [submit(bounds) for bounds in run.next_chunks(parallel - len(in_flight))]
        if time.monotonic() - reported_at >= PROGRESS_SECONDS:
            _show_progress(progress, run.job_state())
            reported_at = time.monotonic()


def _send_range(parent: JobRun, shard: int) -> None:
    """Send one range of a sharded job in this run (a child run, or the job's own run when no
    worker could start one)."""
    run = JobRun(
        parent.engine, parent.settings, job_id=parent.job_id, owner=parent.owner, shard=shard
    )
    lease = run.claim()
    if lease is None:
        return
    with run.failing_on_error(), run.heartbeat():
        _send_chunks(run, run.job_state(), lease, progress=None)
    run.finish()


def _supervise_shards(run: JobRun, progress: uuid.UUID) -> None:
    """Start a child run per range (again when one stops heartbeating) until all are done, or
    until the job stops and no child is sending any more. A range whose child run cannot start
    (no worker online) or has not started within ``PAGECAST_CHILD_PICKUP_SECONDS`` is sent by this
    run."""
    logger = get_run_logger()
    lease_seconds = run.settings.lease_seconds
    pickup_seconds = run.settings.child_pickup_seconds
    launched: dict[tuple[int, int], float] = {}
    while True:
        job = run.job_state()
        with session_scope(run.engine) as session:
            state = shards.plan(session, job_id=run.job_id, lease_seconds=lease_seconds)
        active = job.status == JobStatus.RUNNING and not job.cancel_requested
        blocker = _why_no_child_runs() if active and state.to_start else None
        for shard, attempt in state.to_start if active else []:
            waited = time.monotonic() - launched.get((shard, attempt), time.monotonic())
            if waited > pickup_seconds:
                reason = f"its child run did not start within {pickup_seconds:.0f} s"
            else:
                reason = blocker
            if reason is not None:
                logger.warning("job %s: this run sends range %d: %s", run.job_id, shard, reason)
                _send_range(run, shard)
                continue
            if (shard, attempt) in launched:
                continue
            launched[shard, attempt] = time.monotonic()
            run_deployment(
                SEND_JOB_DEPLOYMENT,
                parameters={"job_id": str(run.job_id), "shard": shard},
                timeout=0,
                idempotency_key=launch_key(
                    f"pagecast-shard-{run.job_id}-{shard}-{attempt}", lease_seconds
                ),
                as_subflow=False,
            )
        _show_progress(progress, job)
        crash_point("supervisor")
        if state.unfinished == 0 or (not active and state.running == 0):
            with session_scope(run.engine) as session:
                shards.release_stale(session, job_id=run.job_id, lease_seconds=lease_seconds)
            return
        time.sleep(SUPERVISE_SECONDS)


def _log_unclaimable(run: JobRun) -> None:
    with session_scope(run.engine) as session:
        job = repo.get_job(session, job_id=run.job_id)
        waiting = waiting_for(session, job, lease_seconds=run.settings.lease_seconds)
    get_run_logger().info(
        "job %s (range %s) is not claimable now: it is %s%s",
        run.job_id,
        run.shard,
        job.status,
        f", waiting for {waiting}" if waiting else "",
    )


def _send_whole_job(run: JobRun, lease: Lease) -> SendJob:
    """The job's own run: send it (or supervise child runs over its ranges) and settle it."""
    job = run.job_state()
    progress = create_progress_artifact(
        _percent(job), key=f"pagecast-job-{job.id}-progress", description=f"job {job.id}"
    )
    with run.failing_on_error(), run.heartbeat():
        if _has_token(run, lease, job):
            _send_or_supervise(run, job, lease, progress)
    job = run.finish()
    _show_progress(progress, job)
    return job


def _has_token(run: JobRun, lease: Lease, job: SendJob) -> bool:
    """Whether the page's token is configured; without it the job is stopped ``failed``."""
    try:
        page_token(job.page_id)
    except MissingPageToken as exc:
        with session_scope(run.engine) as session:
            lifecycle.stop_running_job(
                session, lease=lease, status=JobStatus.FAILED, reason=str(exc)
            )
        return False
    return True


def _send_or_supervise(run: JobRun, job: SendJob, lease: Lease, progress: uuid.UUID) -> None:
    logger = get_run_logger()
    large = job.total > run.settings.shard_size
    blocker = _why_no_child_runs() if large else None
    ranges = 0
    if large and blocker is None:
        with session_scope(run.engine) as session:
            ranges = shards.ensure_shards(
                session, job_id=job.id, shard_size=run.settings.shard_size
            )
    if ranges:
        logger.info("job %s is sent by %d child runs", job.id, ranges)
        _supervise_shards(run, progress)
    else:
        if blocker is not None:
            logger.warning("job %s is sent by this run alone: %s", job.id, blocker)
        _send_chunks(run, job, lease, progress)


@flow(name="send-job", on_cancellation=[request_cancel])
def send_job(job_id: uuid.UUID, shard: int | None = None) -> dict[str, Any]:
    """Send a pagecast job: every recipient ends sent, failed, skipped or unknown — exactly once.

    A job with more than ``PAGECAST_SHARD_SIZE`` pending recipients is split into ranges sent by
    child runs of this deployment (``shard`` names the range of a child run). An error the run
    does not expect ends the job ``failed`` with the error in ``last_error``."""
    settings = get_settings()
    engine = ready_engine(settings)
    owner = str(current_flow_run.id or uuid.uuid4())
    run = JobRun(engine, settings, job_id=job_id, owner=owner, shard=shard)
    if shard is not None:
        _send_range(run, shard)
        return {"job_id": str(job_id), "shard": shard}
    lease = run.claim()
    if lease is None:
        _log_unclaimable(run)
        return {"job_id": str(job_id), "claimed": False}
    try:
        job = _send_whole_job(run, lease)
    except Exception:
        with session_scope(engine) as session:
            _announce(repo.get_job(session, job_id=job_id))
        raise
    with session_scope(engine) as session:
        errors = repo.error_counts(session, job_id=job_id)
    create_table_artifact(
        job_summary_rows(job, errors), key=f"pagecast-job-{job_id}", description=f"job {job_id}"
    )
    _announce(job)
    get_run_logger().info("job %s ended %s", job_id, job.status)
    return {"job_id": str(job_id), "claimed": True, "status": job.status}


if __name__ == "__main__":
    send_job(uuid.UUID(sys.argv[1]))
