"""The broadcast flow: create a job from a typed form (Prefect UI, API) and send it.

Parameters are ``Annotated`` so their constraints reach the deployment's parameter schema and the
UI form rejects bad values; the flow validates again with pagecast's rules before writing."""

import uuid
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import Field

from flows.send_job import send_job
from pagecast import commands, repo
from pagecast.content import MAX_BUTTONS, MAX_QUICK_REPLIES, MAX_URL
from pagecast.db import ready_engine, session_scope
from pagecast.errors import InvalidField
from pagecast.forms import URL_PATTERN, ButtonField, QuickReplyField, broadcast_request
from pagecast.models import MAX_TEXT_LENGTH, MessageTag, MessagingType
from pagecast.preview import preview_job
from pagecast.settings import get_settings
from pagecast.testsend import MAX_TEST_PSIDS, send_tests, validate_test_psids
from pagecast.validation import (
    MAX_CONCURRENCY,
    MAX_RATE_PER_SECOND,
)
from tasks.tokens import page_token


def _preview(request: repo.JobRequest) -> dict[str, Any]:
    preview = preview_job(ready_engine(get_settings()), request=request)
    rows = [
        {"item": item, "value": value}
        for item, value in preview.as_dict().items()
        if item != "samples"
    ] + [
        {"item": f"sample {s['psid']}", "value": s["text"] or preview.content}
        for s in preview.samples
    ]
    create_table_artifact(rows, description="broadcast preview (dry run: nothing written)")
    get_run_logger().info(
        "dry run: %d recipients to send, ETA %.0f s", preview.to_send, preview.eta_seconds
    )
    return preview.as_dict() | {"dry_run": True}


@flow(name="broadcast")
def broadcast(
    page_id: Annotated[str, Field(pattern=r"^[0-9]{1,32}$", description="The Facebook Page id")],
    text: Annotated[
        str,
        Field(
            max_length=MAX_TEXT_LENGTH,
            description="Message text; {first_name}, {last_name} and {full_name} are filled in "
            "(≤ 640 with buttons; leave empty to send an attachment)",
        ),
    ] = "",
    psids: Annotated[
        str, Field(description="Recipients: PSIDs, one per line (or leave empty and give tags)")
    ] = "",
    contact_tags: Annotated[
        list[str], Field(description="Or: send to the page's contacts carrying any of these tags")
    ] = [],  # noqa: B006 - Prefect needs a JSON default
    messaging_type: MessagingType = MessagingType.UPDATE,
    tag: Annotated[MessageTag | None, Field(description="Required with MESSAGE_TAG")] = None,
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 50,
    rate_per_second: Annotated[
        float, Field(gt=0, le=MAX_RATE_PER_SECOND, description="Above 40 needs allow_high_volume")
    ] = 20.0,
    allow_high_volume: bool = False,
    idempotency_key: Annotated[
        str | None, Field(max_length=255, description="Resubmitting the key returns the same job")
    ] = None,
    dry_run: Annotated[
        bool,
        Field(description="Only preview: counts, a rendered sample and the ETA as an artifact"),
    ] = False,
    image_url: Annotated[
        str | None,
        Field(
            pattern=URL_PATTERN,
            max_length=MAX_URL,
            description="Send this image instead of text (uploaded once)",
        ),
    ] = None,
    video_url: Annotated[
        str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL, description="Or this video")
    ] = None,
    file_url: Annotated[
        str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL, description="Or this file")
    ] = None,
    quick_replies: Annotated[
        list[QuickReplyField], Field(max_length=MAX_QUICK_REPLIES, description="Up to 13")
    ] = [],  # noqa: B006 - Prefect needs a JSON default
    buttons: Annotated[
        list[ButtonField],
        Field(max_length=MAX_BUTTONS, description="1–3 buttons make a button template"),
    ] = [],  # noqa: B006 - Prefect needs a JSON default
    test_psids: Annotated[
        list[str],
        Field(
            max_length=MAX_TEST_PSIDS,
            description="Only test-send to these PSIDs and hold the job (needs idempotency_key; "
            "submit again without them to send it)",
        ),
    ] = [],  # noqa: B006 - Prefect needs a JSON default
) -> dict[str, Any]:
    """Create a pagecast job and send it (with ``dry_run``, preview it in an artifact and write
    nothing); nothing is written when a value is invalid."""
    logger = get_run_logger()
    request = broadcast_request(
        page_id=page_id,
        text=text,
        psids=psids,
        contact_tags=contact_tags,
        messaging_type=messaging_type,
        tag=tag,
        concurrency=concurrency,
        rate_per_second=rate_per_second,
        allow_high_volume=allow_high_volume,
        idempotency_key=idempotency_key,
        image_url=image_url,
        video_url=video_url,
        file_url=file_url,
        quick_replies=quick_replies,
        buttons=buttons,
        skip_invalid=dry_run,
    )
    if dry_run:
        return _preview(request)
    testing = validate_test_psids(test_psids) if test_psids else []
    if testing and idempotency_key is None:
        raise InvalidField(
            "idempotency_key",
            "is required with test_psids: submitting the broadcast again with the same key and "
            "no test_psids sends the held job",
        )
    engine = ready_engine(get_settings())
    with session_scope(engine) as session:
        created = repo.create_job(session, request=request)
        job_id: uuid.UUID = created.job.id
        if testing and created.created:
            commands.hold_for_tests(session, job_id=job_id)
        elif not testing and commands.release_held(session, job_id=job_id):
            logger.info("job %s released after its test sends", job_id)
    logger.info(
        "job %s %s with %d recipients",
        job_id,
        "created" if created.created else "exists",
        created.job.total,
    )
    if testing:
        return _test_sends(engine, job_id, testing) | {"created": created.created}
    return send_job(job_id) | {"created": created.created}


def _test_sends(engine: Any, job_id: uuid.UUID, psids: list[str]) -> dict[str, Any]:
    sends = run_coro_as_sync(
        send_tests(engine, get_settings(), job_id=job_id, psids=psids, token_for=page_token)
    )
    rows = [
        {"psid": s.psid, "status": s.status, "detail": s.message_id or s.error_message or ""}
        for s in sends
    ]
    create_table_artifact(rows, description=f"test sends of job {job_id} (the job is held)")
    return {"job_id": str(job_id), "held": True, "test_sends": rows}
