"""``pagecast job …``: create, inspect, test-send, run and steer send jobs."""

import sys
import uuid
from typing import Annotated

import typer
from rich.table import Table

from pagecast import commands, db, launch, lifecycle, repo, trigger, warm
from pagecast.cli.common import (
    JsonOption,
    handles_errors,
    job_dict,
    load_settings,
    parse_job_id,
    print_json,
    stderr,
    stdout,
)
from pagecast.cli.create import job_create
from pagecast.cli.previews import job_test
from pagecast.errors import ConfigurationError
from pagecast.models import JobStatus
from pagecast.reports import receipt_share, waiting_for
from pagecast.settings import Settings

job_app = typer.Typer(help="Send jobs.", no_args_is_help=True)


job_app.command("create")(job_create)


@job_app.command("status")
@handles_errors
def job_status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")], as_json: JsonOption = False
) -> None:
    """A job's status, counters, pending recipients and error summary."""
    settings = load_settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        progress = repo.job_progress(session, job_id=parse_job_id(job_id))
        waiting = waiting_for(session, progress.job, lease_seconds=settings.lease_seconds)
    job = progress.job
    if as_json:
        print_json(
            job_dict(job)
            | {
                "pending": progress.pending,
                "recipients_by_status": progress.by_status,
                "errors": [error.__dict__ for error in progress.errors],
                "waiting_for": waiting,
            }
        )
        return
    table = Table(title=f"job {job.id}", show_header=False)
    for name, value in (
        ("status", job.status),
        ("page", job.page_id),
        ("messaging type", f"{job.messaging_type} {job.tag or ''}".strip()),
        ("audience", job.source),
        ("total", job.total),
        ("sent", job.sent),
        ("failed", job.failed),
        ("skipped", job.skipped),
        ("unknown", job.unknown),
        ("delivered", f"{job.delivered} {receipt_share(job.delivered, job)}".strip()),
        ("read", f"{job.read} {receipt_share(job.read, job)}".strip()),
        ("pending", progress.pending),
        ("rate / concurrency", f"{job.rate_per_second:g}/s, {job.concurrency}"),
        ("created", job.created_at),
        ("waiting for", waiting or ""),
        ("last error", job.last_error or ""),
    ):
        table.add_row(name, str(value))
    for error in progress.errors:
        table.add_row(f"{error.status} {error.key}", str(error.count))
    stdout.print(table)


@job_app.command("list")
@handles_errors
def job_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    page_id: Annotated[str | None, typer.Option(help="Only jobs of this page.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many jobs, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent jobs, newest first."""
    with db.session_scope(db.ready_engine(load_settings())) as session:
        jobs = repo.list_jobs(session, status=status, page_id=page_id, limit=limit)
    if as_json:
        print_json([job_dict(job) for job in jobs])
        return
    table = Table(
        "id", "status", "page", "total", "sent", "failed", "skipped", "unknown", "created"
    )
    for job in jobs:
        table.add_row(
            str(job.id),
            job.status,
            job.page_id,
            *(str(n) for n in (job.total, job.sent, job.failed, job.skipped, job.unknown)),
            job.created_at.isoformat(timespec="seconds"),
        )
    stdout.print(table)


def run_and_watch(settings: Settings, job_id: uuid.UUID) -> None:
    """Run the job's flow with a progress bar and print the summary; exit 1 unless it completed.
    A job that no run could claim now (unknown, ended, paused, being sent) starts nothing, and a
    run that another runner beat to the claim says which runner sends the job."""
    engine = db.ready_engine(settings)
    with db.session_scope(engine) as session:
        commands.ensure_startable(
            session, job_id=job_id, recovery=lifecycle.Recovery.from_settings(settings)
        )
    log_path = settings.home / "logs" / f"send-job-{job_id}.log"
    process = launch.start_flow(
        settings, job_id, log_path=log_path, say=lambda note: stderr.print(f"[dim]{note}[/]")
    )
    try:
        job = launch.watch(engine, job_id, process, stderr, lease_seconds=settings.lease_seconds)
    except KeyboardInterrupt:
        process.terminate()
        raise
    if process.returncode == 0 and job.status == JobStatus.RUNNING:
        raise commands.sent_elsewhere(job)  # the flow exited without the job: another run has it
    stdout.print(launch.summary_table(engine, job))
    if isinstance(process, warm.WarmChild) and process.exit_unknown:
        stderr.print(f"the warm runner stopped before the flow run ended; its log: {log_path}")
    elif process.returncode != 0:
        stderr.print(f"[red]the flow run failed[/]; its log: {log_path}")
    if job.status not in launch.SUCCESSFUL:
        raise typer.Exit(1)


@job_app.command("submit")
@handles_errors
def job_submit(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    api_url: Annotated[
        str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect API URL.")
    ] = None,
) -> None:
    """Start the job on the Prefect server (the send-job deployment) and print the flow run id."""
    job_uuid = parse_job_id(job_id)
    settings = load_settings()
    engine = db.ready_engine(settings)
    with db.session_scope(engine) as session:
        recovery = lifecycle.Recovery.from_settings(settings)
        attempt = commands.ensure_startable(session, job_id=job_uuid, recovery=recovery).attempt
    api = api_url or launch.prefect_api_url(settings)
    if not api:
        raise ConfigurationError("no Prefect server: set PREFECT_API_URL or run `make up`")
    run = trigger.submit(
        api,
        flow_name="send-job",
        deployment_name="send-job",
        parameters={"job_id": str(job_uuid)},
        idempotency_key=f"pagecast-submit-{job_uuid}-{attempt}",
    )
    stderr.print(f"send-job run {run.name}: {run.ui_url}")
    if not run.deployment.workers_online:
        waiting = (
            f"a worker on work pool {run.deployment.work_pool!r} to start send-job run "
            f"{run.name} (none is online: `make up`, or `prefect worker start --pool "
            f"{run.deployment.work_pool}`)"
        )
        with db.session_scope(engine) as session:
            repo.set_waiting_for(session, job_id=job_uuid, waiting_for=waiting)
        stderr.print(f"[yellow]the job waits for {waiting}[/]")
    sys.stdout.write(f"{run.flow_run_id}\n")


@job_app.command("run")
@handles_errors
def job_run(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Run the send-job flow for a job with a progress bar, then print the summary.

    Exit code 0 when the job completes (with or without errors), 1 otherwise."""
    run_and_watch(load_settings(), parse_job_id(job_id))


@job_app.command("cancel")
@handles_errors
def job_cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Cancel a job: at once if idle, else its runner stops within seconds."""
    settings = load_settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        job = commands.cancel_job(
            session,
            job_id=parse_job_id(job_id),
            recovery=lifecycle.Recovery.from_settings(settings),
        )
    stderr.print(
        f"job {job.id}: {'cancelled' if job.status == JobStatus.CANCELLED else 'cancel requested'}"
    )


@job_app.command("pause")
@handles_errors
def job_pause(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Pause a job without losing its place; `pagecast job resume` continues it."""
    with db.session_scope(db.ready_engine(load_settings())) as session:
        commands.pause_job(session, job_id=parse_job_id(job_id))
    stderr.print(f"job {job_id} paused")


@job_app.command("resume")
@handles_errors
def job_resume(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    run: Annotated[bool, typer.Option(help="Run the job now (else a sweep picks it up).")] = True,
) -> None:
    """Make a paused job pending again and run it."""
    settings = load_settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        job = commands.resume_job(session, job_id=parse_job_id(job_id))
    stderr.print(f"job {job.id} resumed")
    if run:
        run_and_watch(settings, job.id)


job_app.command("test")(handles_errors(job_test))


@job_app.command("retry")
@handles_errors
def job_retry(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    include_unknown: Annotated[
        bool, typer.Option(help="Also resend recipients whose delivery is unknown (may duplicate).")
    ] = False,
    run: Annotated[bool, typer.Option(help="Run the job now (else a sweep picks it up).")] = True,
) -> None:
    """Re-queue transient failures (and unknowns with --include-unknown) and run the job again."""
    settings = load_settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        requeued = commands.requeue_job(
            session, job_id=parse_job_id(job_id), include_unknown=include_unknown
        )
    stderr.print(f"re-queued {requeued.failed} failed and {requeued.unknown} unknown recipients")
    if run:
        run_and_watch(settings, parse_job_id(job_id))
