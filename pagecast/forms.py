"""A broadcast as a form fills it in (the Prefect deployment's parameters, the HTTP API's body):
typed fields whose schema approaches Meta's limits, checked with pagecast's own rules into a
``repo.JobRequest`` (the schema counts text in code points, the rules in UTF-16 units)."""

import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from pagecast import repo
from pagecast.audience import recipients_from_psids
from pagecast.content import (
    MAX_BUTTON_TITLE,
    MAX_BUTTONS,
    MAX_PAYLOAD,
    MAX_QUICK_REPLIES,
    MAX_QUICK_REPLY_TITLE,
    MAX_URL,
    AttachmentType,
    ButtonType,
    Content,
    build_content,
    make_button,
    make_quick_reply,
)
from pagecast.errors import InvalidField, InvalidInput
from pagecast.models import MAX_TEXT_LENGTH, MessageTag, MessagingType
from pagecast.validation import (
    MAX_CONCURRENCY,
    MAX_RATE_PER_SECOND,
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
)

_SEPARATORS = re.compile(r"[\s,;]+")
URL_PATTERN = r"^https?://\S+$"


class QuickReplyField(BaseModel):
    """A quick reply of the form: its title, and the payload your webhook receives."""

    title: Annotated[str, Field(min_length=1, max_length=MAX_QUICK_REPLY_TITLE)]
    payload: Annotated[str | None, Field(max_length=MAX_PAYLOAD, description="Default: title")] = (
        None
    )


class ButtonField(BaseModel):
    """A button of a button template: a URL to open, or a payload to post back."""

    title: Annotated[str, Field(min_length=1, max_length=MAX_BUTTON_TITLE)]
    url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    payload: Annotated[str | None, Field(max_length=MAX_PAYLOAD)] = None


def _content(
    image_url: str | None,
    video_url: str | None,
    file_url: str | None,
    quick_replies: list[QuickReplyField],
    buttons: list[ButtonField],
) -> Content:
    for button in buttons:
        if (button.url is None) == (button.payload is None):
            raise InvalidField("button", f"{button.title!r} needs either a url or a payload")
    return build_content(
        attachments={
            AttachmentType.IMAGE: image_url,
            AttachmentType.VIDEO: video_url,
            AttachmentType.FILE: file_url,
        },
        quick_replies=[make_quick_reply(q.title, q.payload) for q in quick_replies],
        buttons=[
            make_button(ButtonType.WEB_URL, b.title, b.url)
            if b.url is not None
            else make_button(ButtonType.POSTBACK, b.title, b.payload or "")
            for b in buttons
        ],
    )


class JobForm(BaseModel):
    """A broadcast as the HTTP API takes it: the page, the message, the audience (PSIDs or
    contact tags) and the pace."""

    page_id: Annotated[str, Field(pattern=r"^[0-9]{1,32}$")]
    text: Annotated[str | None, Field(max_length=MAX_TEXT_LENGTH)] = None
    psids: list[str] = []
    contact_tags: list[str] = []
    match_all_tags: bool = False
    messaging_type: MessagingType = MessagingType.UPDATE
    tag: MessageTag | None = None
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 50
    rate_per_second: Annotated[float, Field(gt=0, le=MAX_RATE_PER_SECOND)] = 20.0
    allow_high_volume: bool = False
    scheduled_at: str | None = None
    resend_unknown: bool = False
    dry_run: bool = False
    image_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    video_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    file_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    quick_replies: Annotated[list[QuickReplyField], Field(max_length=MAX_QUICK_REPLIES)] = []
    buttons: Annotated[list[ButtonField], Field(max_length=MAX_BUTTONS)] = []


def broadcast_request(
    *,
    page_id: str,
    text: str | None,
    psids: str | list[str],
    contact_tags: list[str],
    messaging_type: str,
    tag: str | None,
    concurrency: int,
    rate_per_second: float,
    allow_high_volume: bool,
    idempotency_key: str | None,
    image_url: str | None = None,
    video_url: str | None = None,
    file_url: str | None = None,
    quick_replies: list[QuickReplyField] | None = None,
    buttons: list[ButtonField] | None = None,
    skip_invalid: bool = False,
    match_all_tags: bool = False,
    resend_unknown: bool = False,
    scheduled_at: datetime | None = None,
) -> repo.JobRequest:
    """The broadcast's parameters checked with pagecast's rules, which the schema only approaches
    (it counts text in code points, not UTF-16 units): a job request, or ``InvalidInput``.
    ``psids`` is the form's text (PSIDs separated by spaces, commas or lines) or a list."""
    entries = [p for p in _SEPARATORS.split(psids) if p] if isinstance(psids, str) else psids
    if bool(entries) == bool(contact_tags):
        raise InvalidInput("audience: give either psids or contact_tags")
    return repo.JobRequest(
        page_id=validate_page_id(page_id),
        message=validate_message(
            text or None,
            messaging_type,
            tag,
            _content(image_url, video_url, file_url, quick_replies or [], buttons or []),
        ),
        audience=recipients_from_psids(entries, skip_invalid=skip_invalid)
        if entries
        else repo.TagFilter(tuple(contact_tags), match_all=match_all_tags),
        concurrency=validate_concurrency(concurrency),
        rate_per_second=validate_rate(rate_per_second, allow_high_volume=allow_high_volume),
        idempotency_key=validate_idempotency_key(idempotency_key),
        resend_unknown=resend_unknown,
        scheduled_at=scheduled_at,
    )
