"""The ``pagecast`` command line: database, contacts, jobs and the Send API sandbox.

Every read has ``--json``. Errors print one clear message to stderr and exit non-zero:
2 for rejected input (nothing written), 1 for any other pagecast error.
"""

import functools
import json
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.table import Table

from pagecast import db, launch, lifecycle, repo
from pagecast.audience import ParsedRecipients, read_contacts, read_recipients
from pagecast.errors import ConfigurationError, InvalidInput, PagecastError
from pagecast.models import JobStatus, MessagingType, SendJob
from pagecast.sandbox import SandboxConfig, serve
from pagecast.settings import Settings
from pagecast.validation import (
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
)

app = typer.Typer(help="Durable, rate-limited Messenger broadcasts.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
contacts_app = typer.Typer(help="A page's contacts.", no_args_is_help=True)
job_app = typer.Typer(help="Send jobs.", no_args_is_help=True)
sandbox_app = typer.Typer(help="The local Send API sandbox.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(contacts_app, name="contacts")
app.add_typer(job_app, name="job")
app.add_typer(sandbox_app, name="sandbox")

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)
_F = TypeVar("_F", bound=Callable[..., Any])
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _handles_errors(command: _F) -> _F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PagecastError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2 if isinstance(exc, InvalidInput) else 1) from None

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise ConfigurationError(
            "; ".join(
                f"PAGECAST_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
        ) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@db_app.command("upgrade")
@_handles_errors
def db_upgrade() -> None:
    """Apply pending migrations to the configured database."""
    db.upgrade(db.get_engine(_settings()))
    stderr.print("database schema is up to date")


@db_app.command("sql")
@_handles_errors
def db_sql(
    from_revision: Annotated[
        str | None, typer.Option("--from", help="Only migrations after this revision.")
    ] = None,
) -> None:
    """Print the migration SQL, to apply by hand (e.g. in Supabase's SQL editor)."""
    sys.stdout.write(db.migration_sql(from_revision))


@contacts_app.command("import")
@_handles_errors
def contacts_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with psid[,first_name,last_name,tags,opted_out,last_interaction_at]."
        ),
    ],
    page_id: Annotated[str, typer.Option(help="The Facebook Page the contacts belong to.")],
    as_json: JsonOption = False,
) -> None:
    """Insert or update a page's contacts from a file."""
    page_id = validate_page_id(page_id)
    contacts = read_contacts(file)
    with db.session_scope(db.ready_engine(_settings())) as session:
        result = repo.import_contacts(session, page_id=page_id, contacts=contacts)
    if as_json:
        _print_json({"inserted": result.inserted, "updated": result.updated})
    else:
        stderr.print(
            f"{result.inserted} contacts added, {result.updated} updated for page {page_id}"
        )


def _job_dict(job: SendJob) -> dict[str, Any]:
    return job.model_dump(mode="json", exclude={"text"}) | {"text_length": len(job.text)}


@job_app.command("create")
@_handles_errors
def job_create(
    page_id: Annotated[str, typer.Option(help="The Facebook Page that sends.")],
    text: Annotated[
        str,
        typer.Option(help="Message text (≤ 2,000 chars; {first_name}, {last_name}, {full_name})."),
    ],
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
        datetime | None, typer.Option(help="Do not start before this time.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a pending job and print its id."""
    settings = _settings()
    page_id = validate_page_id(page_id)
    message = validate_message(text, messaging_type, tag)
    if (recipients is None) == (not tag_filter):
        raise InvalidInput("audience: give exactly one of --recipients FILE or --tag-filter TAG")
    audience: ParsedRecipients | repo.TagFilter
    if recipients is not None:
        audience = read_recipients(recipients)
    else:
        audience = repo.TagFilter(tuple(tag_filter or ()), match_all=match_all_tags)
    request = repo.JobRequest(
        page_id=page_id,
        message=message,
        audience=audience,
        concurrency=validate_concurrency(
            settings.default_concurrency if concurrency is None else concurrency
        ),
        rate_per_second=validate_rate(
            settings.default_rate_per_second if rate is None else rate,
            allow_high_volume=allow_high_volume,
        ),
        idempotency_key=validate_idempotency_key(idempotency_key),
        resend_unknown=resend_unknown,
        scheduled_at=scheduled_at,
    )
    with db.session_scope(db.ready_engine(settings)) as session:
        created = repo.create_job(session, request=request)
    job = created.job
    if as_json:
        _print_json(
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


def _parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise InvalidInput(f"job_id: {job_id!r} is not a UUID") from None


@job_app.command("status")
@_handles_errors
def job_status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")], as_json: JsonOption = False
) -> None:
    """A job's status, counters, pending recipients and error summary."""
    with db.session_scope(db.ready_engine(_settings())) as session:
        progress = repo.job_progress(session, job_id=_parse_job_id(job_id))
    job = progress.job
    if as_json:
        _print_json(
            _job_dict(job)
            | {"pending": progress.pending, "recipients_by_status": progress.by_status}
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
        ("pending", progress.pending),
        ("rate / concurrency", f"{job.rate_per_second:g}/s, {job.concurrency}"),
        ("created", job.created_at),
        ("last error", job.last_error or ""),
    ):
        table.add_row(name, str(value))
    for code, count in (job.error_summary.get("by_code") or {}).items():
        table.add_row(f"error {code}", str(count))
    stdout.print(table)


@job_app.command("list")
@_handles_errors
def job_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    page_id: Annotated[str | None, typer.Option(help="Only jobs of this page.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many jobs, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent jobs, newest first."""
    with db.session_scope(db.ready_engine(_settings())) as session:
        jobs = repo.list_jobs(session, status=status, page_id=page_id, limit=limit)
    if as_json:
        _print_json([_job_dict(job) for job in jobs])
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


def _run_and_watch(settings: Settings, job_id: uuid.UUID) -> None:
    engine = db.ready_engine(settings)
    log_path = settings.home / "logs" / f"send-job-{job_id}.log"
    process = launch.start_flow(settings, job_id, log_path=log_path)
    try:
        job = launch.watch(engine, job_id, process, stderr)
    except KeyboardInterrupt:
        process.terminate()
        raise
    stdout.print(launch.summary_table(job))
    if process.returncode != 0:
        stderr.print(f"[red]the flow run failed[/]; its log: {log_path}")
    if job.status not in launch.SUCCESSFUL:
        raise typer.Exit(1)


@job_app.command("run")
@_handles_errors
def job_run(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Run the send-job flow for a job with a progress bar, then print the summary.

    Exit code 0 when the job completes (with or without errors), 1 otherwise."""
    _run_and_watch(_settings(), _parse_job_id(job_id))


@job_app.command("cancel")
@_handles_errors
def job_cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Cancel a job: at once if idle, else its runner stops within seconds."""
    with db.session_scope(db.ready_engine(_settings())) as session:
        job = lifecycle.cancel_job(session, job_id=_parse_job_id(job_id))
    stderr.print(
        f"job {job.id}: {'cancelled' if job.status == JobStatus.CANCELLED else 'cancel requested'}"
    )


@job_app.command("pause")
@_handles_errors
def job_pause(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Pause a job without losing its place; `pagecast job resume` continues it."""
    with db.session_scope(db.ready_engine(_settings())) as session:
        lifecycle.pause_job(session, job_id=_parse_job_id(job_id))
    stderr.print(f"job {job_id} paused")


@job_app.command("resume")
@_handles_errors
def job_resume(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    run: Annotated[bool, typer.Option(help="Run the job now (else a sweep picks it up).")] = True,
) -> None:
    """Make a paused job pending again and run it."""
    settings = _settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        job = lifecycle.resume_job(session, job_id=_parse_job_id(job_id))
    stderr.print(f"job {job.id} resumed")
    if run:
        _run_and_watch(settings, job.id)


@job_app.command("retry")
@_handles_errors
def job_retry(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    include_unknown: Annotated[
        bool, typer.Option(help="Also resend recipients whose delivery is unknown (may duplicate).")
    ] = False,
    run: Annotated[bool, typer.Option(help="Run the job now (else a sweep picks it up).")] = True,
) -> None:
    """Re-queue transient failures (and unknowns with --include-unknown) and run the job again."""
    settings = _settings()
    with db.session_scope(db.ready_engine(settings)) as session:
        requeued = lifecycle.requeue_job(
            session, job_id=_parse_job_id(job_id), include_unknown=include_unknown
        )
    stderr.print(f"re-queued {requeued.failed} failed and {requeued.unknown} unknown recipients")
    if run:
        _run_and_watch(settings, _parse_job_id(job_id))


@app.command("demo")
@_handles_errors
def demo(
    contacts: Annotated[
        int, typer.Option(min=10, max=100_000, help="How many contacts to generate.")
    ] = 2400,
) -> None:
    """Broadcast to generated contacts through the local sandbox, with a progress bar and a summary."""
    from pagecast import demo as demo_kit

    settings = _settings()
    home = settings.home.expanduser().resolve()
    engine = db.ready_engine(settings)
    with demo_kit.demo_sandbox(home) as (url, sandbox):
        demo_kit.point_at_sandbox(url)
        job = demo_kit.create_demo_job(engine, home, contacts=contacts)
        stderr.print(
            f"sandbox on {url}; job {job.id}: {job.total} of {contacts} contacts "
            f"(opted-out ones excluded), {job.rate_per_second:g} msg/s, concurrency {job.concurrency}"
        )
        try:
            _run_and_watch(settings, job.id)
        finally:
            stats = sandbox.stats()
            stderr.print(
                f"sandbox ledger: {stats['delivered']} delivered, {stats['duplicates']} duplicates, "
                f"faults injected: {stats['errors']}"
            )


@sandbox_app.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(help="Latency varies by ± this much.")] = 0.0,
    rate_limit: Annotated[
        int | None, typer.Option(help="Calls per second per page before code 613.")
    ] = None,
    transient_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of calls failing with HTTP 500 (codes 1/2).")
    ] = 0.0,
    permanent_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of PSIDs that always fail (551, 100/2018001)."),
    ] = 0.0,
    outside_window_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of PSIDs outside the 24 h window (10/2018278)."),
    ] = 0.0,
    ambiguous_rate: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="Share of calls delivered, then dropped without a response."
        ),
    ] = 0.0,
    revoke_after: Annotated[
        int | None, typer.Option(help="Revoke the token after this many deliveries (code 190).")
    ] = None,
    fail_psid: Annotated[
        list[str] | None, typer.Option(help="PSID=CODE[/SUBCODE] to fail always (repeatable).")
    ] = None,
    token: Annotated[
        list[str] | None, typer.Option(help="Accept only these tokens (repeatable; default: any).")
    ] = None,
    ledger: Annotated[
        Path | None, typer.Option(help="Append every delivery to this JSONL file.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible random faults.")] = None,
    usage_percent: Annotated[
        float | None, typer.Option(help="Report this page usage % in X-Page-Usage headers.")
    ] = None,
) -> None:
    """Run the Messenger Send API sandbox in the foreground."""
    fail_psids = dict(entry.split("=", 1) for entry in fail_psid or [] if "=" in entry)
    config = SandboxConfig(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        rate_limit_per_page=rate_limit,
        transient_rate=transient_rate,
        permanent_rate=permanent_rate,
        outside_window_rate=outside_window_rate,
        ambiguous_rate=ambiguous_rate,
        revoke_after=revoke_after,
        fail_psids=fail_psids,
        valid_tokens=list(token or []),
        ledger_path=ledger,
        seed=seed,
        usage_percent=usage_percent,
    )
    stderr.print(f"Send API sandbox on http://{host}:{port} (GET /__stats for counters)")
    serve(config, host=host, port=port)
