"""The sandbox's checks of a Send API ``message`` object and of an Attachment Upload API body, to
Meta's documented shapes and limits: an answer is ``None`` (accepted) or Meta's error message
(the sandbox answers it as error code 100)."""

from collections.abc import Container
from typing import Any
from urllib.parse import urlsplit

from pagecast.content import (
    MAX_BUTTON_TITLE,
    MAX_BUTTONS,
    MAX_PAYLOAD,
    MAX_QUICK_REPLIES,
    MAX_QUICK_REPLY_TITLE,
    MAX_TEMPLATE_TEXT,
    AttachmentType,
    ButtonType,
)
from pagecast.models import MAX_TEXT_LENGTH
from pagecast.text import text_length

UNREACHABLE_HOST = "unreachable.invalid"  # an upload from here fails as Meta's would


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.netloc)


def _text(value: Any, limit: int, name: str) -> str | None:
    if not isinstance(value, str) or not value:
        return f"(#100) param {name} must be non-empty UTF-8 encoded string"
    if text_length(value) > limit:
        return f"(#100) Length of param {name} must be less than or equal to {limit}"
    return None


def _button(button: Any) -> str | None:
    if not isinstance(button, dict) or button.get("type") not in set(ButtonType):
        return "(#100) buttons[type] must be web_url or postback"
    problem = _text(button.get("title"), MAX_BUTTON_TITLE, "buttons[title]")
    if problem:
        return problem
    if button["type"] == ButtonType.WEB_URL and not _http_url(button.get("url")):
        return "(#100) buttons[url] should represent a valid URL"
    if button["type"] == ButtonType.POSTBACK:
        return _text(button.get("payload"), MAX_PAYLOAD, "buttons[payload]")
    return None


def _template(payload: dict[str, Any]) -> str | None:
    if payload.get("template_type") != "button":
        return "(#100) The sandbox knows the button template only"
    problem = _text(payload.get("text"), MAX_TEMPLATE_TEXT, "message[attachment][payload][text]")
    buttons = payload.get("buttons")
    if problem is None and (not isinstance(buttons, list) or not 1 <= len(buttons) <= MAX_BUTTONS):
        problem = f"(#100) param buttons must have 1 to {MAX_BUTTONS} elements"
    return problem or next((p for b in buttons if (p := _button(b))), None)


def _attachment(attachment: Any, uploads: Container[str]) -> str | None:
    kind = attachment.get("type") if isinstance(attachment, dict) else None
    payload = attachment.get("payload") if isinstance(attachment, dict) else None
    if not isinstance(payload, dict):
        return "(#100) param message[attachment][payload] is required"
    if kind == "template":
        return _template(payload)
    if kind not in set(AttachmentType):
        return (
            "(#100) param message[attachment][type] must be image, video, audio, file or template"
        )
    if "attachment_id" in payload:
        known = str(payload["attachment_id"]) in uploads
        return None if known else "(#100) No attachment found for the attachment_id"
    return None if _http_url(payload.get("url")) else "(#100) payload[url] should be a valid URL"


def _quick_replies(replies: Any) -> str | None:
    if not isinstance(replies, list) or not 1 <= len(replies) <= MAX_QUICK_REPLIES:
        return f"(#100) param quick_replies must have 1 to {MAX_QUICK_REPLIES} elements"
    for reply in replies:
        if not isinstance(reply, dict) or reply.get("content_type") != "text":
            return "(#100) quick_replies[content_type] must be text"
        problem = _text(reply.get("title"), MAX_QUICK_REPLY_TITLE, "quick_replies[title]")
        problem = problem or _text(reply.get("payload"), MAX_PAYLOAD, "quick_replies[payload]")
        if problem:
            return problem
    return None


def invalid_message(message: Any, uploads: Container[str]) -> str | None:
    """Why Meta would refuse ``message`` (text or an attachment, not both; quick replies)."""
    if not isinstance(message, dict) or ("text" in message) == ("attachment" in message):
        return "(#100) param message must have either text or attachment"
    if "text" in message:
        problem = _text(message["text"], MAX_TEXT_LENGTH, "message[text]")
    else:
        problem = _attachment(message["attachment"], uploads)
    if problem is None and "quick_replies" in message:
        problem = _quick_replies(message["quick_replies"])
    return problem


def invalid_upload(body: dict[str, Any]) -> str | None:
    """Why Meta would refuse an Attachment Upload API body (a reusable media attachment by URL)."""
    message = body.get("message")
    attachment = message.get("attachment") if isinstance(message, dict) else None
    if not isinstance(attachment, dict) or attachment.get("type") not in set(AttachmentType):
        return "(#100) param message[attachment][type] must be image, video, audio or file"
    payload = attachment.get("payload")
    if not isinstance(payload, dict) or not _http_url(payload.get("url")):
        return "(#100) payload[url] should be a valid URL"
    if payload.get("is_reusable") is not True:
        return "(#100) Attachment Upload API needs payload[is_reusable] true"
    if urlsplit(payload["url"]).hostname == UNREACHABLE_HOST:
        return "(#100) Failed to fetch the file from the url"
    return None


def ledger_text(message: dict[str, Any]) -> str | None:
    """The text a delivered message showed: its own, or its button template's."""
    if "text" in message:
        return message["text"]
    payload = message.get("attachment", {}).get("payload", {})
    return payload.get("text")
