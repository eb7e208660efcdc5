"""What a message carries beyond plain text: an attachment by URL, quick replies, or a button
template, validated to Meta's limits, stored with the job as JSON, and turned into the Send API's
``message`` object for each recipient.

One job sends one Send API message per recipient (so exactly-once holds per call): text, or an
attachment, or a button template (text ≤ 640 characters with 1–3 buttons); quick replies (≤ 13,
titles ≤ 20 characters) go with text or an attachment. An attachment is uploaded once per job
through the Attachment Upload API and sent by ``attachment_id`` (``pagecast.attachments``).
"""

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pagecast.errors import InvalidField
from pagecast.text import check_storable, text_length

MAX_QUICK_REPLIES = 13
MAX_QUICK_REPLY_TITLE = 20
MAX_TEMPLATE_TEXT = 640
MAX_BUTTONS = 3
MAX_BUTTON_TITLE = 20
MAX_PAYLOAD = 1000
MAX_URL = 2000


class AttachmentType(StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    FILE = "file"


class ButtonType(StrEnum):
    WEB_URL = "web_url"
    POSTBACK = "postback"


@dataclass(frozen=True)
class QuickReply:
    title: str
    payload: str


@dataclass(frozen=True)
class Button:
    type: ButtonType
    title: str
    target: str  # the URL of a web_url button, the payload of a postback one


@dataclass(frozen=True)
class Content:
    """The non-text parts of a message; empty for a plain text message."""

    attachment_type: AttachmentType | None = None
    attachment_url: str | None = None
    quick_replies: tuple[QuickReply, ...] = ()
    buttons: tuple[Button, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.attachment_url or self.quick_replies or self.buttons)

    def to_json(self) -> dict[str, Any] | None:
        """The job's ``content`` column (``None`` for plain text)."""
        if not self:
            return None
        stored: dict[str, Any] = {}
        if self.attachment_url:
            stored["attachment"] = {"type": self.attachment_type, "url": self.attachment_url}
        if self.quick_replies:
            stored["quick_replies"] = [[q.title, q.payload] for q in self.quick_replies]
        if self.buttons:
            stored["buttons"] = [[b.type, b.title, b.target] for b in self.buttons]
        return stored

    @classmethod
    def from_json(cls, stored: dict[str, Any] | None) -> "Content":
        if not stored:
            return cls()
        attachment = stored.get("attachment") or {}
        return cls(
            attachment_type=AttachmentType(attachment["type"]) if attachment else None,
            attachment_url=attachment.get("url"),
            quick_replies=tuple(QuickReply(*q) for q in stored.get("quick_replies", [])),
            buttons=tuple(
                Button(ButtonType(t), title, target)
                for t, title, target in stored.get("buttons", [])
            ),
        )

    def message(
        self, text: str | None, *, attachment_id: str | None = None, by_url: bool = False
    ) -> dict[str, Any]:
        """The Send API ``message`` for one recipient, ``text`` already rendered. An attachment
        goes by its uploaded ``attachment_id``; only ``by_url`` (a test send) names its URL."""
        message: dict[str, Any]
        if self.buttons:
            buttons = [
                {"type": b.type.value, "title": b.title}
                | ({"url": b.target} if b.type is ButtonType.WEB_URL else {"payload": b.target})
                for b in self.buttons
            ]
            payload = {"template_type": "button", "text": text, "buttons": buttons}
            message = {"attachment": {"type": "template", "payload": payload}}
        elif self.attachment_url:
            if attachment_id:
                source: dict[str, Any] = {"attachment_id": attachment_id}
            elif by_url:
                source = {"url": self.attachment_url}
            else:
                raise ValueError("an attachment is sent by its uploaded attachment_id")
            message = {"attachment": {"type": str(self.attachment_type), "payload": source}}
        else:
            message = {"text": text}
        if self.quick_replies:
            message["quick_replies"] = [
                {"content_type": "text", "title": q.title, "payload": q.payload}
                for q in self.quick_replies
            ]
        return message

    def describe(self) -> str:
        """A one-line account for tables and previews (``image https://…, 2 quick replies``)."""
        parts = []
        if self.attachment_url:
            parts.append(f"{self.attachment_type} {self.attachment_url}")
        if self.buttons:
            parts.append(
                f"{len(self.buttons)} button(s): " + ", ".join(b.title for b in self.buttons)
            )
        if self.quick_replies:
            parts.append(f"{len(self.quick_replies)} quick replies")
        return "; ".join(parts)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _checked_url(field: str, url: str) -> str:
    url = url.strip()
    check_storable(field, url)
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or len(url) > MAX_URL
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise InvalidField(
            field,
            f"must be an http(s) URL of at most {MAX_URL} characters, without spaces, "
            f"got {url[:80]!r}",
            limit=MAX_URL,
        )
    return url


def _bounded(field: str, what: str, value: str, limit: int) -> str:
    """``value`` when storable and 1–``limit`` UTF-16 code units long; ``InvalidField`` else."""
    check_storable(field, value)
    length = text_length(value)
    if not value or length > limit:
        raise InvalidField(
            field,
            f"{what} must be 1–{limit} characters (UTF-16 code units), got {length}",
            limit=limit,
        )
    return value


def _titled(field: str, title: str, limit: int) -> str:
    title = title.strip()
    return _bounded(field, f"title {title[:40]!r}", title, limit)


def _payload(field: str, payload: str) -> str:
    return _bounded(field, "payload", payload, MAX_PAYLOAD)


def make_quick_reply(title: str, payload: str | None = None) -> QuickReply:
    """A quick reply; its payload defaults to its title."""
    title = _titled("quick_reply", title, MAX_QUICK_REPLY_TITLE)
    return QuickReply(title, _payload("quick_reply", payload or title))


def make_button(kind: ButtonType, title: str, target: str) -> Button:
    """A ``web_url`` button opening ``target``, or a ``postback`` one posting it back."""
    title = _titled("button", title, MAX_BUTTON_TITLE)
    if kind is ButtonType.WEB_URL:
        return Button(kind, title, _checked_url("button", target))
    return Button(kind, title, _payload("button", target))


def parse_quick_reply(spec: str) -> QuickReply:
    """``TITLE[=PAYLOAD]`` (the payload defaults to the title)."""
    title, _, payload = spec.partition("=")
    return make_quick_reply(title, payload)


def parse_button(spec: str) -> Button:
    """``TITLE=URL`` (a ``web_url`` button: anything with a scheme or ``www.`` is taken for a URL
    and must be http(s)) or ``TITLE=PAYLOAD`` (a ``postback`` one)."""
    title, separator, target = spec.partition("=")
    if not separator or not target:
        raise InvalidField("button", f"{spec[:40]!r} must be TITLE=URL or TITLE=PAYLOAD")
    looks_like_url = _SCHEME.match(target.strip()) or target.strip().lower().startswith("www.")
    kind = ButtonType.WEB_URL if looks_like_url else ButtonType.POSTBACK
    return make_button(kind, title, target)


def build_content(
    *,
    attachments: dict[AttachmentType, str | None],
    quick_replies: list[QuickReply],
    buttons: list[Button],
) -> Content:
    """Validated content from its options: at most one attachment URL (given per type),
    ≤ 13 quick replies, 0 or 1–3 buttons, and not an attachment and buttons together."""
    given = {kind: url for kind, url in attachments.items() if url}
    if len(given) > 1:
        raise InvalidField(
            "attachment", f"one attachment per message, got {', '.join(map(str, given))}"
        )
    if len(quick_replies) > MAX_QUICK_REPLIES:
        raise InvalidField(
            "quick_reply",
            f"at most {MAX_QUICK_REPLIES} quick replies, got {len(quick_replies)}",
            limit=MAX_QUICK_REPLIES,
        )
    if len(buttons) > MAX_BUTTONS:
        raise InvalidField(
            "button", f"1–{MAX_BUTTONS} buttons, got {len(buttons)}", limit=MAX_BUTTONS
        )
    if given and buttons:
        raise InvalidField("button", "a button template carries text, not an attachment")
    kind, url = next(iter(given.items()), (None, None))
    return Content(
        attachment_type=kind,
        attachment_url=_checked_url(f"{kind}_url", url) if url else None,
        quick_replies=tuple(quick_replies),
        buttons=tuple(buttons),
    )
