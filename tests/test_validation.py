import pytest

from pagecast.errors import InvalidField
from pagecast.models import MessageTag, MessagingType
from pagecast.validation import (
    validate_concurrency,
    validate_idempotency_key,
    validate_message,
    validate_page_id,
    validate_rate,
)


def _field_error(call, *args, **kwargs) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.mark.parametrize("text", ["", "   ", "\n\t", None])
def test_blank_text_is_rejected(text):
    error = _field_error(validate_message, text, "UPDATE", None)
    assert error.field == "text"
    assert "empty" in str(error)


def test_text_over_2000_characters_names_the_limit():
    error = _field_error(validate_message, "x" * 2001, "UPDATE", None)
    assert error.field == "text"
    assert error.limit == 2000
    assert "2001" in str(error) and "2000" in str(error)


def test_text_of_exactly_2000_characters_is_fine():
    assert validate_message("x" * 2000, "UPDATE", None).text == "x" * 2000


def test_unknown_messaging_type():
    error = _field_error(validate_message, "hi", "PROMOTION", None)
    assert error.field == "messaging_type"
    assert "RESPONSE" in str(error)


def test_messaging_type_is_case_insensitive():
    assert validate_message("hi", "update", None).messaging_type is MessagingType.UPDATE


def test_message_tag_requires_a_tag():
    error = _field_error(validate_message, "hi", "MESSAGE_TAG", None)
    assert error.field == "tag"
    assert "ACCOUNT_UPDATE" in str(error)


def test_message_tag_requires_a_valid_tag():
    error = _field_error(validate_message, "hi", "MESSAGE_TAG", "NEWSLETTER")
    assert error.field == "tag"
    assert "NEWSLETTER" in str(error)


@pytest.mark.parametrize("tag", list(MessageTag))
def test_every_valid_tag(tag):
    message = validate_message("hi", "MESSAGE_TAG", tag.value)
    assert message.tag is tag


def test_tag_without_message_tag_is_rejected():
    error = _field_error(validate_message, "hi", "UPDATE", "ACCOUNT_UPDATE")
    assert error.field == "tag"
    assert "MESSAGE_TAG" in str(error)


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


@pytest.mark.parametrize("rate", [0, -1, 301])
def test_rate_bounds(rate):
    assert _field_error(validate_rate, rate, allow_high_volume=True).field == "rate"


@pytest.mark.parametrize("concurrency", [0, 1001])
def test_concurrency_bounds(concurrency):
    error = _field_error(validate_concurrency, concurrency)
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
