"""``pagecast job …``: create, inspect, test-send, run and steer send jobs."""

import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pagecast import commands, db, launch, lifecycle, repo, trigger
from pagecast.audience import ParsedRecipients, read_recipients
from pagecast.cli.common import (
    JsonOption,
    handles_errors,
    load_settings,
    parse_job_id,
    print_json,
    stderr,
    stdout,
)
from pagecast.cli.previews import job_test, print_preview
from pagecast.content import AttachmentType, build_content, parse_button, parse_quick_reply
from pagecast.errors import ConfigurationError, InvalidInput
from pagecast.models import JobStatus, MessagingType, SendJob
from pagecast.preview import preview_job
from pagecast.reports import receipt_share, waiting_for
from pagecast.settings import Settings
from pagecast.text import text_length
from pagecast.validation import (
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
    validate_scheduled_at,
)

job_app = typer.Typer(help="Send jobs.", no_args_is_help=True)


def _job_dict(job: SendJob) -> dict[str, Any]:
    length = text_length(job.text) if job.text is not None else 0
    return job.model_dump(mode="json", exclude={"text"}) | {"text_length": length}


@job_app.command("create")
@handles_errors
def job_create(
    page_id: Annotated[str, typer.Option(help="The Facebook Page that sends.")],
    text: Annotated[
        str | None,
        typer.Option(
            help="Message text (≤ 2,000 chars, ≤ 640 with --button; {first_name}, {last_name}, "
            "{full_name}). Not with an attachment."
        ),
    ] = None,
    image_url: Annotated[
        str | None, typer.Option(help="Send this image instead of text (uploaded once per job).")
    ] = None,
    video_url: Annotated[str | None, typer.Option(help="Send this video instead of text.")] = None,
    file_url: Annotated[str | None, typer.Option(help="Send this file instead of text.")] = None,
    quick_reply: Annotated[
        list[str] | None,
        typer.Option(help="TITLE[=PAYLOAD]: a quick reply (≤ 13, titles ≤ 20 chars; repeatable)."),
    ] = None,
    button: Annotated[
        list[str] | None,
        typer.Option(
            help="TITLE=URL or TITLE=PAYLOAD: a button of a button template (1–3; repeatable)."
        ),
    ] = None,
    recipients: Annotated[
        Path | None, typer.Option(help="File: one PSID a line, or CSV with a psid column.")
    ] = None,
    tag_filter: Annotated[
        list[str] | None,
        typer.Option(help="Send to the page's contacts with this tag (repeatable)."),
    ] = None,
    match_all_tags: Annotated[
        bool, typer.Option(help="Contacts must carry every --tag-filter.")
    ] = False,
    messaging_type: Annotated[
        str, typer.Option(help="RESPONSE, UPDATE or MESSAGE_TAG.")
    ] = MessagingType.UPDATE.value,
    tag: Annotated[str | None, typer.Option(help="Message tag, with MESSAGE_TAG only.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Repeating the key returns the same job.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight for this job.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Messages per second for the page (≤ 40).")
    ] = None,
    allow_high_volume: Annotated[
        bool, typer.Option(help="Allow a rate above 40/s (up to 300/s).")
    ] = False,
    resend_unknown: Annotated[
        bool, typer.Option(help="Resend messages whose delivery is unknown after a crash.")
    ] = False,
    scheduled_at: Annotated[
        str | None,
        typer.Option(
            help="Do not start before this ISO 8601 time (2026-12-01T09:00+01:00; local time "
            "without an offset)."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="Preview the job (counts, a rendered sample, the ETA): write nothing."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a pending job and print its id (with --dry-run: preview it)."""
    settings = load_settings()
    page_id = validate_page_id(page_id)
    content = build_content(
        attachments={
            AttachmentType.IMAGE: image_url,
            AttachmentType.VIDEO: video_url,
            AttachmentType.FILE: file_url,
        },
        quick_replies=[parse_quick_reply(spec) for spec in quick_reply or []],
        buttons=[parse_button(spec) for spec in button or []],
    )
    message = validate_message(text, messaging_type, tag, content)
    concurrency = validate_concurrency(
        settings.default_concurrency if concurrency is None else concurrency
    )
    rate = validate_rate(
        settings.default_rate_per_second if rate is None else rate,
        allow_high_volume=allow_high_volume,
    )
    idempotency_key = validate_idempotency_key(idempotency_key)
    start_at = validate_scheduled_at(scheduled_at, now=datetime.now(UTC))
    if (recipients is None) == (not tag_filter):
        raise InvalidInput("audience: give exactly one of --recipients FILE or --tag-filter TAG")
    audience: ParsedRecipients | repo.TagFilter
    if recipients is not None:
        audience = read_recipients(recipients, skip_invalid=dry_run)
    else:
        audience = repo.TagFilter(tuple(tag_filter or ()), match_all=match_all_tags)
    request = repo.JobRequest(
        page_id=page_id,
        message=message,
        audience=audience,
        concurrency=concurrency,
        rate_per_second=rate,
        idempotency_key=idempotency_key,
        resend_unknown=resend_unknown,
        scheduled_at=start_at,
    )
    if dry_run:
        preview = preview_job(db.ready_engine(settings), request=request)
        if as_json:
            print_json(preview.as_dict())
        else:
            print_preview(preview)
        return
    with db.session_scope(db.ready_engine(settings)) as session:
        created = repo.create_job(session, request=request)
    job = created.job
    if as_json:
        print_json(
            _job_dict(job)
            | {
                "created": created.created,
                "duplicates_removed": created.duplicates_removed,
                "opted_out_excluded": created.opted_out_excluded,
            }
        )
        return
    verb = "created" if created.created else "already exists (same idempotency key):"
    stderr.print(f"job {verb} {job.id}: {job.total} recipients on page {job.page_id}")
    if created.duplicates_removed:
        stderr.print(f"  {created.duplicates_removed} duplicate PSIDs removed")
    if created.opted_out_excluded:
        stderr.print(f"  {created.opted_out_excluded} opted-out contacts excluded")
    sys.stdout.write(f"{job.id}\n")


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
            _job_dict(job)
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
        print_json([_job_dict(job) for job in jobs])
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
    process = launch.start_flow(settings, job_id, log_path=log_path)
    try:
        job = launch.watch(engine, job_id, process, stderr, lease_seconds=settings.lease_seconds)
    except KeyboardInterrupt:
        process.terminate()
        raise
    if process.returncode == 0 and job.status == JobStatus.RUNNING:
        raise commands.sent_elsewhere(job)  # the flow exited without the job: another run has it
    stdout.print(launch.summary_table(engine, job))
    if process.returncode != 0:
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
