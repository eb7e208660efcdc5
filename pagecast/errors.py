"""Typed errors raised by pagecast.

Exception tree::

    PagecastError                  base of everything pagecast raises on purpose
    ├── ConfigurationError         settings or environment cannot work (bad DSN, schema not migrated)
    ├── JobNotFound                no job with that id
    ├── JobStateConflict           the job's status does not allow the command (cancel a completed job)
    ├── IdempotencyConflict        an idempotency key already names a job with other parameters
    ├── MissingPageToken           no access token is configured for a page
    ├── LeaseLost                  another runner owns the job now; this one must stop writing and sending
    ├── RunStopped                 the run cannot record outcomes, so it stopped sending
    ├── InvalidInput               bad input; nothing was written or sent
    │   ├── InvalidField           one field breaks a rule (``field`` names it, ``limit`` gives the bound)
    │   └── InvalidAudience        the recipients file or filter cannot give a valid audience
    │       (``problems`` lists ``(line, reason)`` pairs when lines are at fault)
    └── GraphError                 the Send API refused or failed a call (``code``, ``subcode``, ``message``)
        ├── TransientGraphError    retry later: 5xx, 429, throttling, network errors before sending
        │   └── ThrottledError     the page or app is over a rate limit: slow down, then retry
        ├── RecipientGraphError    this recipient cannot get the message (blocked, unavailable, outside window)
        ├── JobFatalGraphError     no message of this job can go out (bad token, missing permission, payload)
        └── AmbiguousDelivery      the request may have been delivered: the outcome is unknowable

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
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class JobStateConflict(PagecastError):
    """The job's status does not allow the command; nothing was changed."""

    def __init__(self, job_id: object, status: str, message: str) -> None:
        super().__init__(f"job {job_id} is {status}: {message}")
        self.job_id = job_id
        self.status = status


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


class MissingPageToken(PagecastError):
    """No access token is configured for the page."""

    def __init__(self, page_id: str) -> None:
        super().__init__(
            f"no access token for page {page_id}: set PAGECAST_PAGE_ACCESS_TOKEN__{page_id} "
            f"or PAGECAST_PAGE_ACCESS_TOKEN, or create the Secret block pagecast-page-token-{page_id}"
        )
        self.page_id = page_id


class LeaseLost(PagecastError):
    """The job's lease belongs to another runner now; this runner must not write or send."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"job {job_id}: the lease was taken over by another runner")
        self.job_id = job_id


class RunStopped(PagecastError):
    """The run stopped sending because it cannot record outcomes (the database stayed unreachable
    for ``PAGECAST_DB_RETRY_SECONDS``). What it sent is recorded or ``unknown``; the rest is sent by
    the next run."""

    def __init__(self, job_id: object, reason: str) -> None:
        super().__init__(f"job {job_id}: the run stopped sending: {reason}")
        self.job_id = job_id
        self.reason = reason


class WarmRunnerSilent(PagecastError):
    """The local stack's warm runner took a request to run a job and never answered: whether it
    started a run is unknown, so no other run is started in its place."""

    def __init__(self, job_id: object, seconds: float) -> None:
        super().__init__(
            f"job {job_id}: the stack's warm runner did not answer within {seconds:.0f} s; it may "
            "be running the job (see `pagecast job status`); its log is warm-runner.log"
        )
        self.job_id = job_id


class GraphError(PagecastError):
    """A Send API call failed; ``code``/``subcode`` are Meta's, ``http_status`` the HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        subcode: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.subcode = subcode
        self.http_status = http_status

    @property
    def code_key(self) -> str:
        """``"code"`` or ``"code/subcode"``; ``"http_<status>"`` or ``"network"`` without a code."""
        if self.code is None:
            return f"http_{self.http_status}" if self.http_status else "network"
        return f"{self.code}/{self.subcode}" if self.subcode else str(self.code)


class TransientGraphError(GraphError):
    """Worth retrying after a pause."""


class ThrottledError(TransientGraphError):
    """A rate limit was hit: the page's sending rate must come down, and no call may go out for
    ``retry_after`` seconds when the answer said so (HTTP ``Retry-After``)."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, **kwargs: int | None
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RecipientGraphError(GraphError):
    """This recipient cannot receive the message; ``skip_reason`` is set when it is skipped, not failed."""

    def __init__(
        self, message: str, *, skip_reason: str | None = None, **kwargs: int | None
    ) -> None:
        super().__init__(message, **kwargs)
        self.skip_reason = skip_reason


class JobFatalGraphError(GraphError):
    """No message of this job can go out until someone fixes the cause."""


class AmbiguousDelivery(GraphError):
    """The request was written but no answer came back: it may or may not have been delivered."""


@dataclass
class LineProblem:
    """One bad line of a recipients or contacts file."""

    line: int
    reason: str


_MAX_REPORTED_LINES = 20


class InvalidAudience(InvalidInput):
    """The audience cannot be built: missing or unreadable file, bad PSIDs, or nobody to send to.
    ``problems`` keeps the first bad lines; ``problem_count`` counts them all."""

    def __init__(
        self,
        message: str,
        problems: list[LineProblem] | None = None,
        *,
        problem_count: int | None = None,
    ) -> None:
        self.problems = problems or []
        self.problem_count = len(self.problems) if problem_count is None else problem_count
        shown = self.problems[:_MAX_REPORTED_LINES]
        lines = [message, *(f"  line {p.line}: {p.reason}" for p in shown)]
        if self.problem_count > len(shown):
            lines.append(f"  … and {self.problem_count - len(shown)} more")
        super().__init__("\n".join(lines))


__all__ = [
    "AmbiguousDelivery",
    "ConfigurationError",
    "GraphError",
    "IdempotencyConflict",
    "InvalidAudience",
    "InvalidField",
    "InvalidInput",
    "JobFatalGraphError",
    "JobNotFound",
    "JobStateConflict",
    "LeaseLost",
    "LineProblem",
    "MissingPageToken",
    "PagecastError",
    "RecipientGraphError",
    "RunStopped",
    "ThrottledError",
    "TransientGraphError",
]
