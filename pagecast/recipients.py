"""The recipient state machine: every change of a recipient's status, and of the job counters that
count them, is one of the named statements below.

::

    pending ──claim──▶ claimed ──mark──▶ sending ──answer──▶ sent | failed | skipped | unknown
       ▲                │  ▲                │
       │                │  └──not delivered─┘  (a transient error: marked again after a backoff)
       ├──release───────┤                   │
       │  (never called)│                   ├──release──▶ unknown  (in flight when its runner died;
       │                │                   │              ``pending`` with ``resend_unknown``)
       │                └──settle──▶ skipped | failed      (outside the 24-hour window, too long)
       ├──────────── stop: called, not delivered (a job-fatal error) ──┘
       └──requeue── failed (retryable) | unknown (asked for)
    pending ──cancel──▶ skipped
    pending ──opt-out──▶ skipped, unknown ──receipt──▶ sent   (Messenger's webhooks: ``pagecast.receipts``)

A runner *claims* a chunk's rows (they are its own, but no request has gone out), *marks* a few at a
time ``sending`` just before their requests leave, and records each answer soon after it arrives
(``flush`` does both in one statement). So after a crash only rows marked and not yet recorded can
be ``unknown``: ``release`` turns them ``unknown`` and returns claimed rows to ``pending``.

The job's ``sent``/``failed``/``skipped``/``unknown`` counters change only here and in
``pagecast.receipts``, in the statement
that moves the rows (``_counting``), so they always equal the rows' statuses.
"""

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.errors import GraphError
from pagecast.leases import Lease, fence_sql, lease_params
from pagecast.models import RecipientStatus

CANCELLED_REASON = "job_cancelled"
IN_FLIGHT_KEY = "in_flight_when_runner_stopped"
IN_FLIGHT_MESSAGE = "runner stopped while the request was in flight"
_COUNTED = ("sent", "failed", "skipped", "unknown")


def _counting(moved: str) -> str:
    """``SET`` items of ``send_jobs`` that apply the moves in CTE ``moved(old, new)`` to its counters."""
    return ", ".join(
        f"{name} = {name} + (SELECT count(*) FILTER (WHERE new = '{name}') "
        f"- count(*) FILTER (WHERE old = '{name}') FROM {moved})"
        for name in _COUNTED
    )


_LOST = "p.old = 'sending' AND NOT job.resend_unknown"


def _settle_picked(otherwise: str) -> str:
    """``SET`` items for picked rows (CTE ``picked(psid, old)``): those lost in flight become
    ``unknown`` with the reason, the others ``otherwise``."""
    return (
        f"status = CASE WHEN {_LOST} THEN 'unknown' ELSE '{otherwise}' END, "
        f"error_key = CASE WHEN {_LOST} THEN :lost_key ELSE r.error_key END, "
        f"error_message = CASE WHEN {_LOST} THEN :lost_message ELSE r.error_message END"
    )


def _claim_sql(lease: Lease) -> sa.TextClause:
    return sa.text(
        f"""
        WITH job AS (
            SELECT id, page_id, resend_unknown FROM send_jobs
            WHERE {fence_sql(lease)} AND status = 'running' AND NOT cancel_requested
        ), picked AS (
            SELECT r.psid, r.status AS old FROM send_job_recipients r JOIN job ON r.job_id = job.id
            WHERE r.psid > :after AND r.psid <= :last
              AND r.status IN ('pending', 'claimed', 'sending')
            FOR UPDATE OF r
        ), moved AS (
            UPDATE send_job_recipients r
            SET {_settle_picked("claimed")}
            FROM picked p, job WHERE r.job_id = job.id AND r.psid = p.psid
            RETURNING r.psid, p.old, r.status AS new, r.first_name, r.last_name
        ), counted AS (
            UPDATE send_jobs SET {_counting("moved")}
            WHERE id = :job_id AND EXISTS (SELECT 1 FROM moved WHERE new = 'unknown')
        )
        SELECT m.psid, COALESCE(m.first_name, c.first_name), COALESCE(m.last_name, c.last_name),
               COALESCE(c.last_interaction_at < now() - interval '24 hours', false)
        FROM moved m CROSS JOIN job
        LEFT JOIN contacts c ON c.page_id = job.page_id AND c.psid = m.psid
        WHERE m.new = 'claimed'
        ORDER BY m.psid
        """
    )


def _flush_sql(lease: Lease) -> sa.TextClause:
    heartbeat = ", heartbeat_at = now()" if lease.shard is None else ""
    return sa.text(
        f"""
        WITH job AS (
            SELECT id, status, cancel_requested FROM send_jobs WHERE {fence_sql(lease)} FOR UPDATE
        ), answered AS (
            UPDATE send_job_recipients r SET status = v.status, message_id = v.message_id,
                error_code = v.code, error_subcode = v.subcode, error_key = v.key,
                error_message = v.message, retryable = v.retryable
            FROM job, unnest(CAST(:psids AS text[]), CAST(:statuses AS text[]),
                             CAST(:message_ids AS text[]), CAST(:codes AS int[]),
                             CAST(:subcodes AS int[]), CAST(:keys AS text[]),
                             CAST(:messages AS text[]), CAST(:retryable AS boolean[]))
                 AS v(psid, status, message_id, code, subcode, key, message, retryable)
            WHERE r.job_id = job.id AND r.psid = v.psid AND r.status IN ('claimed', 'sending')
            RETURNING NULL::text AS old, v.status AS new
        ), marked AS (
            UPDATE send_job_recipients r SET status = 'sending', attempts = r.attempts + 1,
                attempted_at = now()
            FROM job
            WHERE r.job_id = job.id AND job.status = 'running' AND NOT job.cancel_requested
              AND r.psid = ANY(CAST(:marks AS text[])) AND r.status = 'claimed'
            RETURNING r.psid
        )
        UPDATE send_jobs j SET {_counting("answered")}{heartbeat}
        FROM job WHERE j.id = job.id
        RETURNING job.status, job.cancel_requested, ARRAY(SELECT psid FROM marked),
                  (SELECT count(*) FROM answered)
        """
    )


_RELEASE = sa.text(
    f"""
    WITH job AS (
        SELECT id, resend_unknown FROM send_jobs WHERE id = :job_id
    ), picked AS (
        SELECT r.psid, r.status AS old FROM send_job_recipients r
        WHERE r.job_id = :job_id AND r.status IN ('claimed', 'sending')
          AND r.psid > :after AND (CAST(:last AS text) IS NULL OR r.psid <= :last)
          AND NOT EXISTS (
              SELECT 1 FROM send_job_shards s
              WHERE s.job_id = r.job_id AND s.status = 'running'
                AND s.shard IS DISTINCT FROM CAST(:shard AS integer)
                AND r.psid > s.psid_after AND r.psid <= s.psid_last)
        FOR UPDATE OF r
    ), moved AS (
        UPDATE send_job_recipients r
        SET {_settle_picked("pending")}
        FROM picked p, job WHERE r.job_id = :job_id AND r.psid = p.psid
        RETURNING p.old, r.status AS new
    )
    UPDATE send_jobs SET {_counting("moved")} WHERE id = :job_id
    RETURNING (SELECT count(*) FROM moved WHERE old = 'sending')
    """
)
_CANCEL = sa.text(
    f"""
    WITH moved AS (
        UPDATE send_job_recipients SET status = 'skipped', error_key = :reason,
            error_message = :reason
        WHERE job_id = :job_id AND status = 'pending'
        RETURNING 'pending'::text AS old, status AS new
    )
    UPDATE send_jobs SET {_counting("moved")} WHERE id = :job_id
    """
)
_REQUEUE = sa.text(
    f"""
    WITH picked AS (
        SELECT psid, status AS old FROM send_job_recipients
        WHERE job_id = :job_id
          AND ((status = 'failed' AND retryable) OR (status = 'unknown' AND :include_unknown))
        FOR UPDATE
    ), moved AS (
        UPDATE send_job_recipients r SET status = 'pending', error_code = NULL,
            error_subcode = NULL, error_key = NULL, error_message = NULL, retryable = false
        FROM picked p WHERE r.job_id = :job_id AND r.psid = p.psid
        RETURNING p.old, r.status AS new
    )
    UPDATE send_jobs SET {_counting("moved")} WHERE id = :job_id
    RETURNING (SELECT count(*) FILTER (WHERE old = 'failed') FROM moved),
              (SELECT count(*) FILTER (WHERE old = 'unknown') FROM moved)
    """
)
_LOST_PARAMS = {"lost_key": IN_FLIGHT_KEY, "lost_message": IN_FLIGHT_MESSAGE}


@dataclass(frozen=True)
class Claimed:
    """A claimed recipient, with its names (its own, else its contact's) and whether the page's
    24-hour window with it is closed."""

    psid: str
    first_name: str | None
    last_name: str | None
    outside_window: bool


@dataclass
class Outcome:
    """What one call (or the decision not to call) made of a claimed or sending recipient:
    a final status, ``claimed`` (not delivered, to be marked again) or ``pending`` (given back)."""

    psid: str
    status: RecipientStatus
    message_id: str | None = None
    error: GraphError | None = None
    reason: str | None = None
    retryable: bool = False

    @property
    def key(self) -> str | None:
        """What a settled, unsent outcome counts under: the Graph error code, or the reason no call
        was made (``outside_24h_window``, ``rendered_text_too_long``)."""
        if self.status in (RecipientStatus.SENT, RecipientStatus.CLAIMED, RecipientStatus.PENDING):
            return None
        return self.error.code_key if self.error else self.reason


@dataclass(frozen=True)
class Flushed:
    """The answer to a flush: the rows now ``sending``, how many outcomes were recorded (rows a
    sweep settled meanwhile keep that state), and whether the job still wants sending."""

    marked: frozenset[str]
    recorded: int
    job_status: str
    cancel_requested: bool


def claim(session: Session, *, lease: Lease, after: str, last: str) -> list[Claimed]:
    """Claim the chunk ``after`` < psid ≤ ``last`` of a running job: its pending rows, and the rows
    an earlier attempt of the chunk left claimed (resumed) or sending (now ``unknown``)."""
    params = lease_params(lease) | _LOST_PARAMS | {"after": after, "last": last}
    return [Claimed(*row) for row in session.execute(_claim_sql(lease), params).all()]


def flush(
    session: Session, *, lease: Lease, outcomes: list[Outcome], marks: list[str]
) -> Flushed | None:
    """Record ``outcomes`` and mark ``marks`` ``sending`` (only while the job runs and no cancel is
    requested), in one statement fenced by the lease; ``None`` when the lease is lost."""
    row = session.execute(
        _flush_sql(lease),
        lease_params(lease)
        | {
            "psids": [o.psid for o in outcomes],
            "statuses": [o.status.value for o in outcomes],
            "message_ids": [o.message_id for o in outcomes],
            "codes": [o.error.code if o.error else None for o in outcomes],
            "subcodes": [o.error.subcode if o.error else None for o in outcomes],
            "keys": [o.key for o in outcomes],
            "messages": [o.error.message[:500] if o.error else o.reason for o in outcomes],
            "retryable": [o.retryable for o in outcomes],
            "marks": marks,
        },
    ).first()
    if row is None:
        return None
    status, cancel_requested, marked, recorded = row
    return Flushed(frozenset(marked), recorded, status, cancel_requested)


def release(
    session: Session,
    *,
    job_id: uuid.UUID,
    after: str = "",
    last: str | None = None,
    shard: int | None = None,
) -> int:
    """Settle the rows a run left behind (in ``after`` < psid ≤ ``last``, not in another range
    being sent right now): claimed ones go back to ``pending``, sending ones become ``unknown``
    (``pending`` with ``resend_unknown``). Returns how many were in flight."""
    params = {"job_id": job_id, "after": after, "last": last, "shard": shard} | _LOST_PARAMS
    return session.execute(_RELEASE, params).scalar_one_or_none() or 0


def cancel_pending(session: Session, *, job_id: uuid.UUID) -> None:
    """Skip every pending recipient: the job is cancelled."""
    session.execute(_CANCEL, {"job_id": job_id, "reason": CANCELLED_REASON})


def requeue(session: Session, *, job_id: uuid.UUID, include_unknown: bool) -> tuple[int, int]:
    """Make retryable failures (and ``unknown`` rows, with ``include_unknown``) ``pending`` again;
    returns how many of each."""
    failed, unknown = session.execute(
        _REQUEUE, {"job_id": job_id, "include_unknown": include_unknown}
    ).one()
    return failed, unknown


def pending_count(session: Session, job_id: uuid.UUID) -> int:
    """How many of the job's recipients are ``pending``."""
    return session.execute(
        sa.text(
            "SELECT count(*) FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending'"
        ),
        {"job_id": job_id},
    ).scalar_one()
