"""How Meta counts text, and what PostgreSQL can store.

Lengths are UTF-16 code units, the larger of the two counts Meta may apply (an emoji outside the
Basic Multilingual Plane is 2, a combining mark or a Hebrew letter 1): Meta documents "2,000
characters" without saying which unit, so pagecast never accepts a text Meta could count as
longer. The same count applies to titles and payloads of quick replies and buttons.
"""

from pagecast.errors import InvalidField


def text_length(text: str) -> int:
    """The length Meta's limits are checked against: UTF-16 code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def check_storable(field: str, value: str) -> None:
    """PostgreSQL text holds valid Unicode without NUL: refuse what it would fail on."""
    if "\x00" in value:
        position = value.index("\x00") + 1
        raise InvalidField(field, f"contains a NUL character (U+0000) at position {position}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidField(
            field, f"is not valid Unicode (a lone surrogate at position {exc.start + 1})"
        ) from None
