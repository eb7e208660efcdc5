"""Recording a chunk's outcomes: every recipient's fate and the job's counters and error summary,
in one transaction fenced by the lease."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from pagecast.errors import GraphError, LeaseLost
from pagecast.lifecycle import Lease, fence_sql, lease_params
from pagecast.models import JobStatus, RecipientStatus, SendJob

MAX_ERROR_SAMPLES = 5

_RECORD_ROWS = sa.text(
    """
    UPDATE send_job_recipients r SET status = v.status, message_id = v.message_id,
        error_code = v.code, error_subcode = v.subcode, error_message = v.message,
        retryable = v.retryable, attempts = r.attempts + v.extra_calls
    FROM unnest(CAST(:psids AS text[]), CAST(:statuses AS text[]), CAST(:message_ids AS text[]),
                CAST(:codes AS int[]), CAST(:subcodes AS int[]), CAST(:messages AS text[]),
                CAST(:retryable AS boolean[]), CAST(:extra_calls AS int[]))
         AS v(psid, status, message_id, code, subcode, message, retryable, extra_calls)
    WHERE r.job_id = :job_id AND r.psid = v.psid AND r.status = 'sending'
    RETURNING r.psid
    """
)


@dataclass
class Outcome:
    """What happened to one claimed recipient."""

    psid: str
    status: RecipientStatus
    calls: int = 1
    message_id: str | None = None
    error: GraphError | None = None
    reason: str | None = None
    retryable: bool = False


@dataclass
class ChunkResult:
    """Counts of one chunk, and why it stopped early if it did."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    unknown: int = 0
    requeued: int = 0
    permanent_failures: int = 0
    fatal_error: str | None = None
    stopped: bool = False
    by_code: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _outcome_key(outcome: Outcome) -> str | None:
    """What a settled, unsent outcome counts under: the Graph error code, or the reason no call
    was made (``outside_24h_window``, ``rendered_text_too_long``)."""
    if outcome.status in (RecipientStatus.PENDING, RecipientStatus.SENT):
        return None
    return outcome.error.code_key if outcome.error else outcome.reason


def _summary(existing: dict[str, Any], outcomes: list[Outcome]) -> dict[str, Any]:
    by_code = Counter(existing.get("by_code") or {})
    samples = list(existing.get("samples") or [])
    known = {sample["code"] for sample in samples}
    for outcome in outcomes:
        key = _outcome_key(outcome)
        if key is None:
            continue
        by_code[key] += 1
        if key not in known and len(samples) < MAX_ERROR_SAMPLES:
            message = outcome.error.message[:300] if outcome.error else key.replace("_", " ")
            samples.append({"code": key, "message": message})
            known.add(key)
    return {"by_code": dict(by_code), "samples": samples}


def record_outcomes(
    session: Session, *, lease: Lease, outcomes: list[Outcome], fatal: GraphError | None
) -> ChunkResult:
    """Write every outcome and the job's counters in one transaction, fenced by the lease."""
    summary_row = session.execute(
        sa.text(f"SELECT error_summary FROM send_jobs WHERE {fence_sql(lease)} FOR UPDATE"),
        lease_params(lease),
    ).first()
    if summary_row is None:
        raise LeaseLost(lease.job_id)
    recorded = session.execute(
        _RECORD_ROWS,
        {
            "job_id": lease.job_id,
            "psids": [o.psid for o in outcomes],
            "statuses": [o.status.value for o in outcomes],
            "message_ids": [o.message_id for o in outcomes],
            "codes": [o.error.code if o.error else None for o in outcomes],
            "subcodes": [o.error.subcode if o.error else None for o in outcomes],
            "messages": [
                o.reason or (o.error.message[:500] if o.error else None) for o in outcomes
            ],
            "retryable": [o.retryable for o in outcomes],
            "extra_calls": [o.calls - 1 for o in outcomes],
        },
    ).scalars()
    # Rows a sweep already settled as orphans (this runner was presumed dead) keep that state.
    kept = set(recorded)
    outcomes = [o for o in outcomes if o.psid in kept]
    counts = Counter(o.status for o in outcomes)
    summary = _summary(summary_row[0], outcomes)
    session.execute(
        sa.update(SendJob)
        .where(col(SendJob.id) == lease.job_id)
        .values(
            sent=SendJob.sent + counts[RecipientStatus.SENT],
            failed=SendJob.failed + counts[RecipientStatus.FAILED],
            skipped=SendJob.skipped + counts[RecipientStatus.SKIPPED],
            unknown=SendJob.unknown + counts[RecipientStatus.UNKNOWN],
            error_summary=summary,
            heartbeat_at=sa.func.now(),
            **(
                {
                    "status": JobStatus.FAILED.value,
                    "last_error": f"{fatal.code_key}: {fatal.message}",
                }
                if fatal is not None
                else {}
            ),
        )
    )
    chunk_codes = Counter(key for o in outcomes if (key := _outcome_key(o)) is not None)
    return ChunkResult(
        sent=counts[RecipientStatus.SENT],
        failed=counts[RecipientStatus.FAILED],
        skipped=counts[RecipientStatus.SKIPPED],
        unknown=counts[RecipientStatus.UNKNOWN],
        requeued=counts[RecipientStatus.PENDING],
        permanent_failures=sum(
            1 for o in outcomes if o.status == RecipientStatus.FAILED and not o.retryable
        ),
        fatal_error=None if fatal is None else f"{fatal.code_key}: {fatal.message}",
        by_code=dict(chunk_codes),
    )
