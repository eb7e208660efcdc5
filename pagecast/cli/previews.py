"""``pagecast job create --dry-run``'s preview and ``pagecast job test``: looking at a job before
it is sent."""

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from pagecast import db
from pagecast.cli.common import JsonOption, load_settings, parse_job_id, print_json, stdout
from pagecast.errors import MissingPageToken
from pagecast.models import MessagingType, TestSendStatus
from pagecast.preview import Preview
from pagecast.settings import page_token_from_env
from pagecast.testsend import send_tests


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def print_preview(preview: Preview) -> None:
    """The dry run's preview as a table and the rendered samples."""
    stdout.print("[bold]dry run: nothing written, nothing sent[/]")
    if preview.existing_job_id:
        stdout.print(
            f"the idempotency key names job {preview.existing_job_id}: creating returns it"
        )
    table = Table(show_header=False, box=None)
    table.add_row("recipients", f"{preview.recipients:,}")
    table.add_row("duplicates removed", f"{preview.duplicates_removed:,}")
    table.add_row("opted-out contacts excluded", f"{preview.opted_out_excluded:,}")
    if preview.invalid:
        first = "; ".join(preview.invalid_lines)
        table.add_row("invalid PSIDs", f"{preview.invalid:,} left out ({first}…)")
    if preview.messaging_type != MessagingType.MESSAGE_TAG:
        table.add_row("outside the 24-hour window", f"{preview.outside_window:,} would be skipped")
    table.add_row("to send", f"{preview.to_send:,}")
    table.add_row(
        f"queued on page {preview.page_id}",
        f"{preview.recipients_ahead:,} recipients of {preview.jobs_ahead} pending or running jobs",
    )
    table.add_row(
        "ETA",
        f"{_duration(preview.eta_seconds)} at {preview.rate_per_second:g}/s: done about "
        f"{preview.finishes_at.astimezone():%Y-%m-%d %H:%M}",
    )
    stdout.print(table)
    stdout.print("sample:")
    if preview.content:
        stdout.print(f"with: {preview.content}", markup=False, highlight=False)
    for sample in preview.samples:
        shown = sample["text"] if sample["text"] is not None else preview.content
        stdout.print(f"  {sample['psid']}: {shown}", markup=False, highlight=False)


def _token_from_env(page_id: str) -> str:
    token = page_token_from_env(page_id)
    if token is None:
        raise MissingPageToken(page_id)
    return token


def job_test(
    job_id: Annotated[str, typer.Argument(help="The job's id (pending or paused).")],
    psid: Annotated[
        list[str], typer.Option(help="A test recipient's PSID (repeatable, up to 20).")
    ],
    as_json: JsonOption = False,
) -> None:
    """Send the job's message, rendered for each test PSID, to those PSIDs only: not counted in
    the job. Exit code 0 when every test message was sent, 1 otherwise."""
    settings = load_settings()
    sends = asyncio.run(
        send_tests(
            db.ready_engine(settings),
            settings,
            job_id=parse_job_id(job_id),
            psids=psid,
            token_for=_token_from_env,
        )
    )
    if as_json:
        print_json([send.model_dump(mode="json", exclude={"job_id"}) for send in sends])
    else:
        table = Table("psid", "status", "detail", title=f"test sends of job {job_id}")
        for send in sends:
            detail = send.message_id or (
                f"{send.error_key}: {send.error_message}" if send.error_key else "outcome unknown"
            )
            table.add_row(send.psid, send.status, detail)
        stdout.print(table)
    if any(send.status != TestSendStatus.SENT for send in sends):
        raise typer.Exit(1)
