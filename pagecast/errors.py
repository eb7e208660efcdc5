"""Typed errors raised by pagecast.

Exception tree::

    PagecastError                  base of everything pagecast raises on purpose
    ├── ConfigurationError         settings or environment cannot work (bad DSN, schema not migrated)
    ├── JobNotFound                no job with that id
    ├── IdempotencyConflict        an idempotency key already names a job with other parameters
    └── InvalidInput               bad input; nothing was written or sent
        ├── InvalidField           one field breaks a rule (``field`` names it, ``limit`` gives the bound)
        └── InvalidAudience        the recipients file or filter cannot give a valid audience
            (``problems`` lists ``(line, reason)`` pairs when lines are at fault)

Every error's ``str()`` is a complete sentence fit for a person; the CLI prints it and exits non-zero.
"""

from dataclasses import dataclass


class PagecastError(Exception):
    """Base class of pagecast's errors."""


class ConfigurationError(PagecastError):
    """The configuration or environment cannot work as given."""


class JobNotFound(PagecastError):
    """No job has the given id."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class IdempotencyConflict(PagecastError):
    """The idempotency key is already used by a job created with different parameters."""

    def __init__(self, key: str, job_id: object, differing: list[str]) -> None:
        super().__init__(
            f"idempotency key {key!r} already names job {job_id}, created with a different "
            + ", ".join(differing)
        )
        self.key = key
        self.job_id = job_id
        self.differing = differing


class InvalidInput(PagecastError):
    """Input was rejected before anything was written or sent."""


class InvalidField(InvalidInput):
    """A field breaks a rule; ``field`` names it and ``limit`` states the bound, when there is one."""

    def __init__(self, field: str, message: str, *, limit: object = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.limit = limit


@dataclass
class LineProblem:
    """One bad line of a recipients or contacts file."""

    line: int
    reason: str


_MAX_REPORTED_LINES = 20


class InvalidAudience(InvalidInput):
    """The audience cannot be built: missing or unreadable file, bad PSIDs, or nobody to send to."""

    def __init__(self, message: str, problems: list[LineProblem] | None = None) -> None:
        self.problems = problems or []
        shown = self.problems[:_MAX_REPORTED_LINES]
        lines = [message, *(f"  line {p.line}: {p.reason}" for p in shown)]
        if len(self.problems) > len(shown):
            lines.append(f"  … and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


__all__ = [
    "ConfigurationError",
    "IdempotencyConflict",
    "InvalidAudience",
    "InvalidField",
    "InvalidInput",
    "JobNotFound",
    "LineProblem",
    "PagecastError",
]
