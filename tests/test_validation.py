from datetime import UTC, datetime, timedelta, timezone

import pytest

from pagecast.errors import InvalidField
from pagecast.models import MessageTag, MessagingType
from pagecast.text import text_length
from pagecast.validation import (
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
    validate_scheduled_at,
)


def _field_error(call, *args, **kwargs) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        call(*args, **kwargs)
    return caught.value


def test_missing_text_is_rejected():
    error = _field_error(validate_message, None, "UPDATE", None)
    assert error.field == "text"
    assert "empty" in str(error)


@pytest.mark.parametrize(
    ("text", "length"),
    [("a", 1), ("é", 1), ("e\u0301", 2), ("שלום", 4), ("😀", 2), ("👍🏽", 4), ("🇧🇷", 4)],
)
def test_text_length_counts_utf16_code_units(text, length):
    assert text_length(text) == length


def test_text_of_exactly_2000_characters_is_fine():
    assert validate_message("x" * 2000, "UPDATE", None).text == "x" * 2000


def test_unknown_messaging_type():
    error = _field_error(validate_message, "hi", "PROMOTION", None)
    assert error.field == "messaging_type"
    assert "RESPONSE" in str(error)


def test_messaging_type_is_case_insensitive():
    assert validate_message("hi", "update", None).messaging_type is MessagingType.UPDATE


def test_message_tag_requires_a_valid_tag():
    error = _field_error(validate_message, "hi", "MESSAGE_TAG", "NEWSLETTER")
    assert error.field == "tag"
    assert "NEWSLETTER" in str(error)


@pytest.mark.parametrize("tag", list(MessageTag))
def test_every_valid_tag(tag):
    message = validate_message("hi", "MESSAGE_TAG", tag.value)
    assert message.tag is tag


def test_known_placeholders_are_accepted():
    validate_message("Hi {first_name} {last_name} / {full_name} {{literal}}", "UPDATE", None)


def test_unknown_placeholder_is_rejected():
    error = _field_error(validate_message, "Hi {name}", "UPDATE", None)
    assert error.field == "text"
    assert "{name}" in str(error)


def test_unbalanced_brace_is_rejected():
    error = _field_error(validate_message, "50% off {today", "UPDATE", None)
    assert error.field == "text"
    assert "brace" in str(error)


@pytest.mark.parametrize(
    "text", ["Hi {first_name:d}", "Hi {first_name!r}", "Hi {full_name:>30}", "{last_name!s:x}"]
)
def test_a_placeholder_with_a_format_is_rejected(text):
    error = _field_error(validate_message, text, "UPDATE", None)
    assert error.field == "text"
    assert "has a format" in str(error)


def test_rate_above_40_needs_high_volume():
    error = _field_error(validate_rate, 41)
    assert error.field == "rate"
    assert error.limit == 40
    assert "--allow-high-volume" in str(error)
    assert validate_rate(41, allow_high_volume=True) == 41


def test_rate_above_300_is_rejected_even_with_high_volume():
    error = _field_error(validate_rate, 301, allow_high_volume=True)
    assert (error.field, error.limit) == ("rate", 300)


def test_concurrency_just_above_the_limit_is_rejected():
    error = _field_error(validate_concurrency, 1001)
    assert error.field == "concurrency"
    assert error.limit == 1000


@pytest.mark.parametrize("page_id", ["", "abc", "12 34", "1" * 33])
def test_page_id_must_be_numeric(page_id):
    assert _field_error(validate_page_id, page_id).field == "page_id"


def test_idempotency_key_bounds():
    assert validate_idempotency_key(None) is None
    assert validate_idempotency_key("k-1") == "k-1"
    assert _field_error(validate_idempotency_key, " ").field == "idempotency_key"
    assert _field_error(validate_idempotency_key, "k" * 256).limit == 255


def test_a_schedule_keeps_its_offset_and_reads_a_naive_time_as_local():
    now = datetime(2026, 11, 1, tzinfo=UTC)
    assert validate_scheduled_at(None, now=now) is None
    at = validate_scheduled_at("2026-12-01T09:00+02:00", now=now)
    assert at == datetime(2026, 12, 1, 9, tzinfo=timezone(timedelta(hours=2)))
    naive = validate_scheduled_at("2026-12-01 09:00", now=now)
    assert naive == datetime(2026, 12, 1, 9).astimezone()
