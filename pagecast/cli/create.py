"""``pagecast job create``: a job from a file or a tag filter, its message (text or rich) and
its pace, checked before anything is written; ``--dry-run`` previews it instead."""

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from pagecast import db, repo
from pagecast.audience import ParsedRecipients, read_recipients
from pagecast.cli.common import (
    JsonOption,
    handles_errors,
    job_dict,
    load_settings,
    print_json,
    stderr,
)
from pagecast.cli.previews import print_preview
from pagecast.content import AttachmentType, build_content, parse_button, parse_quick_reply
from pagecast.errors import InvalidInput
from pagecast.models import MessagingType
from pagecast.preview import preview_job
from pagecast.validation import (
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
    validate_scheduled_at,
)


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
            job_dict(job)
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
