"""Reading audiences from files: one PSID a line, or CSV with a ``psid`` column.

Files are UTF-8 (a BOM is dropped) and read line by line, so their size does not raise memory.

Recipient files may carry ``first_name``/``last_name`` columns; contact files may also carry
``tags`` (separated by ``;`` or ``|``), ``opted_out`` and ``last_interaction_at`` (ISO 8601).
"""

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path

from pagecast.errors import InvalidAudience, LineProblem
from pagecast.models import MAX_PSID_LENGTH

_DIGITS = re.compile(r"[0-9]+")
_DELIMITERS = (",", ";", "\t")
_MAX_LINE_BYTES = 64 * 1024
_KEPT_PROBLEMS = 100
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
    opted_out: bool | None = None  # None: not given, the contact keeps what it had (else False)
    last_interaction_at: datetime | None = None


@dataclass(frozen=True)
class ParsedRecipients:
    """A validated audience. Iterating it reads the recipients again in listed order, duplicates
    included, so a file of millions of lines never sits in memory; the database keeps the first
    row of each PSID."""

    source: str
    read: Callable[[], Iterator[Recipient]] = field(repr=False)
    invalid: int = 0  # lines left out as invalid (only when read with ``skip_invalid``)
    problems: tuple[LineProblem, ...] = ()  # the first of them

    def __iter__(self) -> Iterator[Recipient]:
        return self.read()

    def describe(self) -> str:
        return self.source


def psid_problem(psid: str) -> str | None:
    """Why ``psid`` is not a valid page-scoped id, or ``None`` when it is. Meta's PSIDs are
    decimal numbers: a leading zero means the id was padded or retyped, and would be a second,
    different recipient next to the unpadded one."""
    if not psid:
        return "empty PSID"
    if not _DIGITS.fullmatch(psid):
        return f"PSID {psid[:40]!r} is not numeric (digits 0-9 only)"
    if len(psid) > MAX_PSID_LENGTH:
        return f"PSID is {len(psid)} digits, the limit is {MAX_PSID_LENGTH}"
    if psid.startswith("0"):
        return f"PSID {psid!r} starts with 0, which Meta's PSIDs never do"
    return None


def _decode(label: str, number: int, raw: bytes) -> str:
    if len(raw) > _MAX_LINE_BYTES:
        raise InvalidAudience(f"{label} line {number} is longer than {_MAX_LINE_BYTES} bytes")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAudience(
            f"{label} line {number} is not UTF-8 text (byte {exc.start + 1} of the line); "
            "save the file as UTF-8"
        ) from None
    if "\x00" in line:
        raise InvalidAudience(
            f"{label} line {number} holds a NUL byte: a binary or UTF-16 file, not UTF-8 text"
        )
    return line.removeprefix("\ufeff") if number == 1 else line


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines (endings kept), numbered from 1 and decoded as UTF-8 without a BOM."""
    label = repr(str(path))
    if not path.is_file():
        raise InvalidAudience(f"file {label} does not exist or is not a file")
    try:
        with path.open("rb") as file:
            raw_lines = iter(lambda: file.readline(_MAX_LINE_BYTES + 1), b"")
            for number, raw in enumerate(raw_lines, start=1):
                yield number, _decode(label, number, raw)
    except OSError as exc:
        raise InvalidAudience(f"{label} cannot be read: {exc.strerror}") from None


def _header(line: str, delimiter: str) -> list[str]:
    return [name.strip().lower() for name in next(csv.reader([line], delimiter=delimiter))]


def _delimiter(first: str) -> str | None:
    """The CSV delimiter of a first line, or ``None`` for a one-PSID-a-line file: the delimiter
    that gives a ``psid`` column, else the most frequent one (the CSV then lacks that column)."""
    first = first.strip()
    found = [d for d in _DELIMITERS if d in first]
    if not found:
        return "," if first.lower() == "psid" else None
    return next((d for d in found if "psid" in _header(first, d)), max(found, key=first.count))


def _csv_rows(
    label: str, delimiter: str, header_line: int, lines: Iterable[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(lines, delimiter=delimiter)
    skipped = header_line - 1  # blank and comment lines before the header
    try:
        header = [name.strip().lower() for name in reader.fieldnames or []]
        if "psid" not in header:
            raise InvalidAudience(
                f"{label} is a CSV without a 'psid' column (columns: {', '.join(header) or 'none'})"
            )
        reader.fieldnames = header
        for row in reader:
            if row.get(None):
                raise InvalidAudience(
                    f"{label} is not a readable CSV: line {skipped + reader.line_num} has more "
                    "fields than the header"
                )
            yield skipped + reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}
    except csv.Error as exc:
        raise InvalidAudience(
            f"{label} is not a readable CSV: line {skipped + reader.line_num}: {exc}"
        ) from None


def _is_content(line: str) -> bool:
    value = line.strip()
    return bool(value) and not value.startswith("#")


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a one-PSID-a-line file (blank and ``#`` lines skipped), or of a CSV whose header
    is its first line (separated by ``,``, ``;`` or tabs), streamed."""
    lines = _lines(path)
    first = next(((number, line) for number, line in lines if _is_content(line)), None)
    if first is None:
        return
    rest = chain([first], lines)
    delimiter = _delimiter(first[1])
    if delimiter is None:
        yield from ((number, {"psid": line.strip()}) for number, line in rest if _is_content(line))
    else:
        yield from _csv_rows(repr(str(path)), delimiter, first[0], (line for _, line in rest))


@dataclass
class _Skipped:
    """Invalid lines left out: how many, and the first of them."""

    count: int = 0
    first: list[LineProblem] = field(default_factory=list)

    def add(self, problem: LineProblem) -> None:
        self.count += 1
        if len(self.first) < _KEPT_PROBLEMS:
            self.first.append(problem)


def _recipients(
    label: str, rows: Iterable[tuple[int, dict[str, str]]], skipped: _Skipped | None
) -> Iterator[Recipient]:
    """The recipients of ``rows``, up to the first bad PSID; after the last row,
    ``InvalidAudience`` lists the bad ones. With ``skipped``, bad lines are left out and counted
    there instead."""
    problems: list[LineProblem] = []
    bad = 0
    for number, row in rows:
        reason = psid_problem(row.get("psid", ""))
        if reason is not None:
            bad += 1
            if len(problems) < _KEPT_PROBLEMS:
                problems.append(LineProblem(number, reason))
            if skipped is not None:
                skipped.add(LineProblem(number, reason))
        elif not bad or skipped is not None:
            yield Recipient(
                row["psid"], row.get("first_name") or None, row.get("last_name") or None
            )
    if bad and skipped is None:
        raise InvalidAudience(f"{label} has {bad} invalid PSID(s):", problems, problem_count=bad)


def _checked(
    label: str,
    source: str,
    rows: Callable[[], Iterable[tuple[int, dict[str, str]]]],
    *,
    skip_invalid: bool,
) -> ParsedRecipients:
    """A whole pass checks every line; the result reads ``rows`` again when iterated."""
    skipped = _Skipped() if skip_invalid else None
    listed = sum(1 for _ in _recipients(label, rows(), skipped))
    if not listed:
        raise InvalidAudience(f"{label} lists no recipients")
    return ParsedRecipients(
        source=source,
        read=lambda: _recipients(label, rows(), _Skipped() if skip_invalid else None),
        invalid=skipped.count if skipped else 0,
        problems=tuple(skipped.first) if skipped else (),
    )


def read_recipients(path: Path, *, skip_invalid: bool = False) -> ParsedRecipients:
    """Check a recipients file in one streaming pass; iterating the result reads it again.
    Invalid PSIDs raise ``InvalidAudience`` (with ``skip_invalid``, a preview's: left out and
    counted)."""
    label = repr(str(path))
    return _checked(label, f"file:{path.name}", lambda: _rows(path), skip_invalid=skip_invalid)


def recipients_from_psids(psids: list[str], *, skip_invalid: bool = False) -> ParsedRecipients:
    """Validate PSIDs given inline (e.g. pasted into a form); blank entries are ignored and
    positions are reported as line numbers."""
    rows = [
        (number, {"psid": psid.strip()})
        for number, psid in enumerate(psids, start=1)
        if psid.strip()
    ]
    label = "the PSID list"
    return _checked(label, "psid list", lambda: rows, skip_invalid=skip_invalid)


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
    cell = row.get("opted_out", "").strip()
    opted_out = _parse_bool(cell) if cell else None
    if cell and opted_out is None:
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
