"""Rules a send request must meet before anything is written: text, messaging type, tag, limits.

Text length is counted as Meta may count it (UTF-16 code units, see ``pagecast.text``).
"""

import re
import string
from dataclasses import dataclass, field
from datetime import datetime

from pagecast.content import MAX_TEMPLATE_TEXT, Content
from pagecast.errors import InvalidField
from pagecast.models import MAX_TEXT_LENGTH, MessageTag, MessagingType
from pagecast.text import check_storable, text_length

PLACEHOLDERS = ("first_name", "last_name", "full_name")
SAFE_RATE_PER_SECOND = 40.0
MAX_RATE_PER_SECOND = 300.0
MAX_CONCURRENCY = 1000
MAX_IDEMPOTENCY_KEY_LENGTH = 255
_PAGE_ID = re.compile(r"[0-9]{1,32}")


@dataclass(frozen=True)
class Message:
    """A validated message: what to send and under which Messenger policy. ``text`` is ``None``
    for an attachment; ``content`` holds what goes beyond text."""

    text: str | None
    messaging_type: MessagingType
    tag: MessageTag | None
    content: Content = field(default_factory=Content)


def validate_page_id(page_id: str) -> str:
    """A Facebook Page id: digits only."""
    page_id = (page_id or "").strip()
    if not _PAGE_ID.fullmatch(page_id):
        raise InvalidField("page_id", f"must be a numeric Page id (1–32 digits), got {page_id!r}")
    return page_id


_SAMPLE_NAMES = (("Ana", "Lima"), ("{x}", "%s"), ("", ""), ("Zoë", None), (None, None))


def _check_placeholders(text: str) -> None:
    """Only plain ``{first_name}``, ``{last_name}`` and ``{full_name}``; the template must render
    for any name, so a format spec or conversion (``{first_name:d}``, ``{first_name!r}``) is refused."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise InvalidField(
            "text", f"has an unbalanced brace ({exc}); write {{{{ and }}}} for literal braces"
        ) from None
    names = [name for _, name, _, _ in fields if name is not None]
    unknown = sorted({name for name in names if name not in PLACEHOLDERS})
    if unknown:
        allowed = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
        raise InvalidField(
            "text",
            f"unknown placeholder {', '.join('{' + n + '}' for n in unknown)}; allowed: {allowed}",
        )
    for _, name, spec, conversion in fields:
        if spec or conversion:
            written = (
                "{"
                + f"{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}"
                + "}"
            )
            raise InvalidField(
                "text", f"placeholder {written} has a format; write {{{name}}} without ! or :"
            )
    for first, last in _SAMPLE_NAMES:
        try:
            render_text(text, first_name=first, last_name=last)
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise InvalidField("text", f"cannot be rendered: {exc}") from None


def text_limit(content: Content) -> int:
    """The most UTF-16 code units a text may have beside ``content``."""
    return MAX_TEMPLATE_TEXT if content.buttons else MAX_TEXT_LENGTH


def _validate_text(text: str | None, content: Content) -> str | None:
    if content.attachment_url:
        if text is not None and text.strip():
            raise InvalidField(
                "text",
                "an attachment is sent on its own (Messenger has no captions): send the text as "
                "a job of its own, or as a button template",
            )
        return None
    if text is None or not text.strip():
        raise InvalidField("text", "must not be empty or only whitespace")
    check_storable("text", text)
    length, limit = text_length(text), text_limit(content)
    if length > limit:
        where = " in a button template" if content.buttons else ""
        raise InvalidField(
            "text",
            f"is {length} characters (UTF-16 code units, as Meta counts), "
            f"the limit is {limit}{where}",
            limit=limit,
        )
    _check_placeholders(text)
    return text


def validate_message(
    text: str | None, messaging_type: str, tag: str | None, content: Content | None = None
) -> Message:
    """Check the text (not blank, at most 2,000 UTF-16 code units, or 640 in a button template;
    known placeholders; none beside an attachment) and the messaging type / tag pairing Meta
    requires."""
    content = content or Content()
    text = _validate_text(text, content)
    try:
        kind = MessagingType((messaging_type or "").upper())
    except ValueError:
        allowed = ", ".join(MessagingType)
        raise InvalidField(
            "messaging_type", f"{messaging_type!r} is not one of {allowed}"
        ) from None
    if kind is MessagingType.MESSAGE_TAG:
        if not tag:
            raise InvalidField(
                "tag", f"is required with MESSAGE_TAG; one of {', '.join(MessageTag)}"
            )
        try:
            return Message(text, kind, MessageTag(tag.upper()), content)
        except ValueError:
            raise InvalidField("tag", f"{tag!r} is not one of {', '.join(MessageTag)}") from None
    if tag:
        raise InvalidField("tag", f"is only allowed with messaging_type MESSAGE_TAG, not {kind}")
    return Message(text, kind, None, content)


def validate_concurrency(concurrency: int) -> int:
    """Concurrent requests per job: 1 to 1,000."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidField(
            "concurrency",
            f"must be between 1 and {MAX_CONCURRENCY}, got {concurrency}",
            limit=MAX_CONCURRENCY,
        )
    return concurrency


def validate_rate(rate_per_second: float, *, allow_high_volume: bool = False) -> float:
    """Messages per second for the page: above 40/s Meta may cut the page off, so that needs
    ``allow_high_volume``; 300/s is the Send API's hard limit."""
    limit = MAX_RATE_PER_SECOND if allow_high_volume else SAFE_RATE_PER_SECOND
    if not 0 < rate_per_second <= limit:  # false for NaN too
        hint = "" if allow_high_volume else " (pass --allow-high-volume to go up to 300)"
        raise InvalidField(
            "rate",
            f"must be above 0 and at most {limit:g} messages/s, got {rate_per_second:g}{hint}",
            limit=limit,
        )
    return rate_per_second


def validate_idempotency_key(key: str | None) -> str | None:
    """An optional client-chosen key, 1–255 characters, that makes job creation repeatable."""
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidField(
            "idempotency_key",
            f"must be 1–{MAX_IDEMPOTENCY_KEY_LENGTH} characters, not blank; got {len(key)}",
            limit=MAX_IDEMPOTENCY_KEY_LENGTH,
        )
    check_storable("idempotency_key", key)
    return key


def validate_scheduled_at(value: str | None, *, now: datetime) -> datetime | None:
    """An optional ISO 8601 start time (``2026-12-01T09:00``, ``…Z``, ``…+02:00``; without an
    offset it is local time) that is not in the past."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidField(
            "scheduled_at", f"{value[:40]!r} is not an ISO 8601 time such as 2026-12-01T09:00+00:00"
        ) from None
    when = when if when.tzinfo else when.astimezone()
    if when < now:
        raise InvalidField(
            "scheduled_at",
            f"{when.isoformat()} is in the past (now is {now.isoformat(timespec='seconds')}); "
            "leave it out to start now",
            limit=now,
        )
    return when


def render_text(template: str, *, first_name: str | None, last_name: str | None) -> str:
    """Fill the placeholders of a validated template; missing names render as empty strings."""
    first, last = first_name or "", last_name or ""
    full = f"{first} {last}".strip()
    return template.format_map({"first_name": first, "last_name": last, "full_name": full})
