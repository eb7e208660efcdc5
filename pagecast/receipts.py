"""What Messenger's webhooks tell about recipients: delivery and read receipts, and opt-outs.

A ``sent`` row (or an ``unknown`` one) gets ``delivered_at`` and ``read_at`` from receipts. A
receipt's watermark covers every message to that person whose attempt began before it (the moment
the row was marked ``sending``: ``attempted_at``); an ``unknown`` row a receipt covers was
delivered, so it becomes ``sent`` — receipts shrink the only uncertainty pagecast has. A contact
who opts out is skipped in every job not yet over. Each statement moves the job counters with the
rows it moves (see ``pagecast.recipients``), so counters always equal the rows.
"""

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session

OPTED_OUT_REASON = "contact_opted_out"

REACH = "28 days"  # receipts reach the jobs of the page started this long before them


def _reached_by(seen: str) -> str:
    """The condition on job ``j`` for a receipt of the moment ``seen`` to reach it."""
    return f"j.started_at <= {seen} AND j.started_at > {seen} - interval '{REACH}'"


# Receipts (per page and PSID: the latest delivery and read watermarks) for rows that were sent
# or are unknown, in jobs the receipt reaches. Rows locked in (job, psid) order; an unknown row
# that a receipt covers was delivered: it becomes sent.
_RECEIPTS = sa.text(
    f"""
    WITH ev AS (
        SELECT page_id, psid, max(delivered) AS delivered, max(read) AS read,
               greatest(max(delivered), max(read)) AS seen
        FROM unnest(CAST(:page_ids AS text[]), CAST(:psids AS text[]),
                    CAST(:delivered AS timestamptz[]), CAST(:read AS timestamptz[]))
             AS e(page_id, psid, delivered, read)
        GROUP BY page_id, psid
    ), picked AS (
        SELECT r.job_id, r.psid, r.status AS old, r.delivered_at IS NULL AS newly_delivered,
               COALESCE(r.read_at IS NULL AND r.attempted_at <= ev.read, false) AS newly_read,
               ev.seen, ev.read
        FROM ev JOIN send_jobs j ON j.page_id = ev.page_id AND {_reached_by("ev.seen")}
        JOIN send_job_recipients r ON r.job_id = j.id AND r.psid = ev.psid
        WHERE r.status IN ('sent', 'unknown') AND r.attempted_at <= ev.seen
          AND (r.delivered_at IS NULL OR (r.read_at IS NULL AND r.attempted_at <= ev.read))
        ORDER BY r.job_id, r.psid
        FOR UPDATE OF r
    ), moved AS (
        UPDATE send_job_recipients r SET status = 'sent',
            delivered_at = COALESCE(r.delivered_at, p.seen),
            read_at = CASE WHEN p.newly_read THEN p.read ELSE r.read_at END,
            error_code = NULL, error_subcode = NULL, error_key = NULL, error_message = NULL
        FROM picked p WHERE r.job_id = p.job_id AND r.psid = p.psid
        RETURNING p.job_id, p.old, p.newly_delivered, p.newly_read
    ), counted AS (
        SELECT job_id, count(*) FILTER (WHERE old = 'unknown') AS resolved,
               count(*) FILTER (WHERE newly_delivered) AS delivered,
               count(*) FILTER (WHERE newly_read) AS read
        FROM moved GROUP BY job_id
    ), jobs AS (
        UPDATE send_jobs j SET sent = j.sent + c.resolved, unknown = j.unknown - c.resolved,
            delivered = j.delivered + c.delivered, read = j.read + c.read,
            status = CASE WHEN j.status = 'completed_with_errors' AND j.failed = 0
                               AND j.unknown = c.resolved THEN 'completed' ELSE j.status END
        FROM counted c WHERE j.id = c.job_id
        RETURNING c.resolved, c.delivered, c.read
    )
    SELECT COALESCE(sum(resolved), 0), COALESCE(sum(delivered), 0), COALESCE(sum(read), 0)
    FROM jobs
    """
)
# Receipts that find their recipient still claimed or sending (the answer not yet recorded).
_IN_FLIGHT_RECEIPTS = sa.text(
    f"""
    SELECT DISTINCT e.i FROM unnest(CAST(:page_ids AS text[]), CAST(:psids AS text[]),
                                    CAST(:seen AS timestamptz[])) WITH ORDINALITY
                         AS e(page_id, psid, seen, i)
    JOIN send_jobs j ON j.page_id = e.page_id AND {_reached_by("e.seen")}
    JOIN send_job_recipients r ON r.job_id = j.id AND r.psid = e.psid
    WHERE r.status IN ('claimed', 'sending') AND r.attempted_at <= e.seen
    """
)
_OPT_OUT = sa.text(
    """
    WITH picked AS (
        SELECT r.job_id, r.psid
        FROM unnest(CAST(:page_ids AS text[]), CAST(:psids AS text[])) AS e(page_id, psid)
        JOIN send_jobs j ON j.page_id = e.page_id AND j.status IN ('pending', 'running', 'paused')
        JOIN send_job_recipients r ON r.job_id = j.id AND r.psid = e.psid
        WHERE r.status = 'pending'
        ORDER BY r.job_id, r.psid
        FOR UPDATE OF r
    ), moved AS (
        UPDATE send_job_recipients r SET status = 'skipped', error_key = :reason,
            error_message = :reason
        FROM picked p WHERE r.job_id = p.job_id AND r.psid = p.psid
        RETURNING r.job_id
    ), counted AS (
        SELECT job_id, count(*) AS n FROM moved GROUP BY job_id
    ), jobs AS (
        UPDATE send_jobs j SET skipped = j.skipped + c.n FROM counted c WHERE j.id = c.job_id
        RETURNING c.n
    )
    SELECT COALESCE(sum(n), 0) FROM jobs
    """
)


@dataclass(frozen=True)
class Receipt:
    """Messenger's word that a page's messages to ``psid`` up to a moment were delivered or read."""

    page_id: str
    psid: str
    delivered: datetime | None = None
    read: datetime | None = None

    @property
    def seen(self) -> datetime:
        """The latest moment the receipt covers (a read message was delivered too)."""
        return max(t for t in (self.delivered, self.read) if t is not None)


@dataclass(frozen=True)
class ReceiptsApplied:
    """What receipts changed: unknown rows resolved to sent, rows newly delivered, newly read."""

    resolved: int
    delivered: int
    read: int


def apply_receipts(session: Session, receipts: list[Receipt]) -> ReceiptsApplied:
    """Mark the sent (or unknown) rows the receipts cover delivered and read."""
    row = session.execute(
        _RECEIPTS,
        {
            "page_ids": [r.page_id for r in receipts],
            "psids": [r.psid for r in receipts],
            "delivered": [r.delivered for r in receipts],
            "read": [r.read for r in receipts],
        },
    ).one()
    return ReceiptsApplied(*row)


def receipts_in_flight(session: Session, receipts: list[Receipt]) -> set[int]:
    """Positions (0-based) of the receipts that cover a row still claimed or sending: applied now,
    they would miss the answer about to be recorded."""
    rows = session.execute(
        _IN_FLIGHT_RECEIPTS,
        {
            "page_ids": [r.page_id for r in receipts],
            "psids": [r.psid for r in receipts],
            "seen": [r.seen for r in receipts],
        },
    ).scalars()
    return {i - 1 for i in rows}


def skip_opted_out(session: Session, contacts: list[tuple[str, str]]) -> int:
    """Skip the pending rows of ``(page_id, psid)`` contacts who opted out, in every job not yet
    over; returns how many."""
    return session.execute(
        _OPT_OUT,
        {
            "page_ids": [page for page, _ in contacts],
            "psids": [psid for _, psid in contacts],
            "reason": OPTED_OUT_REASON,
        },
    ).scalar_one()
