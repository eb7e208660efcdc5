"""Reading audiences from files: one PSID a line, or CSV with a ``psid`` column.

Recipient files may carry ``first_name``/``last_name`` columns; contact files may also carry
``tags`` (separated by ``;`` or ``|``), ``opted_out`` and ``last_interaction_at`` (ISO 8601).
"""

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pagecast.errors import InvalidAudience, LineProblem
from pagecast.models import MAX_PSID_LENGTH

_DIGITS = re.compile(r"[0-9]+")
_TAG_SEPARATORS = re.compile(r"[;|]")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"", "0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class Recipient:
    """One recipient as read from a file."""

    psid: str
    first_name: str | None = None
    last_name: str | None = None


@dataclass(frozen=True)
class ContactRow:
    """One contact as read from a contacts file."""

    psid: str
    first_name: str | None = None
    last_name: str | None = None
    tags: tuple[str, ...] = ()
    opted_out: bool = False
    last_interaction_at: datetime | None = None


@dataclass
class ParsedRecipients:
    """Unique recipients in file order, the PSIDs listed more than once, and where they came from."""

    recipients: list[Recipient]
    source: str
    duplicates: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return self.source


def psid_problem(psid: str) -> str | None:
    """Why ``psid`` is not a valid page-scoped id, or ``None`` when it is."""
    if not psid:
        return "empty PSID"
    if not _DIGITS.fullmatch(psid):
        return f"PSID {psid[:40]!r} is not numeric"
    if len(psid) > MAX_PSID_LENGTH:
        return f"PSID is {len(psid)} digits, the limit is {MAX_PSID_LENGTH}"
    return None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InvalidAudience(f"recipients file {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidAudience(
            f"{str(path)!r} is not readable UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise InvalidAudience(f"{str(path)!r} cannot be read: {exc.strerror}") from None


def _is_csv(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "," in first or first.strip().lower() == "psid"


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(text.splitlines())
    try:
        header = [name.strip().lower() for name in reader.fieldnames or []]
    except csv.Error as exc:
        raise InvalidAudience(f"{str(path)!r} is not a readable CSV: {exc}") from None
    if "psid" not in header:
        raise InvalidAudience(
            f"{str(path)!r} is a CSV without a 'psid' column (columns: {', '.join(header) or 'none'})"
        )
    reader.fieldnames = header
    try:
        for row in reader:
            if row.get(None):
                raise InvalidAudience(
                    f"{str(path)!r} is not a readable CSV: line {reader.line_num} has "
                    f"more fields than the header"
                )
            yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}
    except csv.Error as exc:
        raise InvalidAudience(
            f"{str(path)!r} is not a readable CSV: line {reader.line_num}: {exc}"
        ) from None


def _plain_rows(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if value and not value.startswith("#"):
            yield number, {"psid": value}


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    text = _read_text(path)
    return _csv_rows(path, text) if _is_csv(text) else _plain_rows(text)


def _recipients_from_rows(
    label: str, source: str, rows: list[tuple[int, dict[str, str]]]
) -> ParsedRecipients:
    problems = [
        LineProblem(number, reason)
        for number, row in rows
        if (reason := psid_problem(row.get("psid", ""))) is not None
    ]
    if problems:
        raise InvalidAudience(f"{label} has {len(problems)} invalid PSID(s):", problems)
    if not rows:
        raise InvalidAudience(f"{label} lists no recipients")
    parsed = ParsedRecipients(recipients=[], source=source)
    seen: set[str] = set()
    for _, row in rows:
        psid = row["psid"]
        if psid in seen:
            parsed.duplicates.append(psid)
            continue
        seen.add(psid)
        parsed.recipients.append(
            Recipient(psid, row.get("first_name") or None, row.get("last_name") or None)
        )
    return parsed


def read_recipients(path: Path) -> ParsedRecipients:
    """Read and validate a recipients file; duplicates are dropped (first one wins) and reported."""
    return _recipients_from_rows(repr(str(path)), f"file:{path.name}", list(_rows(path)))


def recipients_from_psids(psids: list[str]) -> ParsedRecipients:
    """Validate PSIDs given inline (e.g. pasted into a form); blank entries are ignored and
    positions are reported as line numbers."""
    rows = [
        (number, {"psid": psid.strip()})
        for number, psid in enumerate(psids, start=1)
        if psid.strip()
    ]
    return _recipients_from_rows("the PSID list", "psid list", rows)


def _parse_bool(value: str) -> bool | None:
    lowered = value.lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else None


def _parse_time(value: str) -> datetime | None:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _contact(number: int, row: dict[str, str], problems: list[LineProblem]) -> ContactRow | None:
    psid = row.get("psid", "")
    if (reason := psid_problem(psid)) is not None:
        problems.append(LineProblem(number, reason))
        return None
    opted_out = _parse_bool(row.get("opted_out", ""))
    if opted_out is None:
        problems.append(LineProblem(number, f"opted_out {row['opted_out']!r} is not true/false"))
        return None
    last = row.get("last_interaction_at", "")
    try:
        last_interaction_at = _parse_time(last) if last else None
    except ValueError:
        problems.append(LineProblem(number, f"last_interaction_at {last!r} is not ISO 8601"))
        return None
    tags = tuple(t.strip() for t in _TAG_SEPARATORS.split(row.get("tags", "")) if t.strip())
    return ContactRow(
        psid=psid,
        first_name=row.get("first_name") or None,
        last_name=row.get("last_name") or None,
        tags=tags,
        opted_out=opted_out,
        last_interaction_at=last_interaction_at,
    )


def read_contacts(path: Path) -> list[ContactRow]:
    """Read and validate a contacts file; a PSID listed twice keeps its last row."""
    problems: list[LineProblem] = []
    contacts: dict[str, ContactRow] = {}
    for number, row in _rows(path):
        contact = _contact(number, row, problems)
        if contact is not None:
            contacts[contact.psid] = contact
    if problems:
        raise InvalidAudience(f"{str(path)!r} has {len(problems)} invalid line(s):", problems)
    if not contacts:
        raise InvalidAudience(f"{str(path)!r} lists no contacts")
    return list(contacts.values())
