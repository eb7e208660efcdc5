"""Messenger webhook events: the signature check, the parse, storing each event once, and applying
stored events to recipients (``pagecast.receipts``) and contacts.

Meta signs every POST with ``X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body with the
app secret>``, batches events (``entry[].messaging[]``), redelivers and reorders them. An event is
stored under a key derived from its content, so a redelivery stores nothing; applying is separate
(a receiver answers fast) and idempotent: watermarks only move rows forward, and an event is marked
applied in the transaction that applies it.
"""

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.models import WebhookEventKind
from pagecast.receipts import Receipt, apply_receipts, receipts_in_flight, skip_opted_out

SIGNATURE_HEADER = "X-Hub-Signature-256"
_RETRY_IN_FLIGHT = "1 second"
# A receipt waits for its recipient's answer at most this long after it arrived (seconds): a row
# its dead runner left in flight is settled by the next run or the sweep, which may never come.
_IN_FLIGHT_WAIT_LIMIT = 600
_RECEIPT_KINDS = {"delivery": WebhookEventKind.DELIVERY, "read": WebhookEventKind.READ}


def signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends with ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` (constant-time comparison)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header.strip())


def token_valid(given: str, expected: str) -> bool:
    """Whether a verification request carries the verify token (constant-time comparison)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def opt_out_keywords(setting: str) -> frozenset[str]:
    """The opt-out keywords of ``PAGECAST_OPT_OUT_KEYWORDS`` (comma-separated), upper-cased."""
    return frozenset(word.strip().upper() for word in setting.split(",") if word.strip())


@dataclass(frozen=True)
class Event:
    """One event of a webhook body, as stored: who, which page, what kind, when."""

    dedupe_key: str
    page_id: str
    psid: str
    kind: WebhookEventKind
    occurred_at: datetime
    opt_out: bool = False


@dataclass
class Parsed:
    """A webhook body's events, and the items left out by kind (``standby``, ``reaction``, …)."""

    events: list[Event] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)


def _moment(milliseconds: Any) -> datetime:
    if not isinstance(milliseconds, int) or isinstance(milliseconds, bool) or milliseconds < 0:
        raise ValueError("not a timestamp")
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


def _event(page_id: str, item: dict[str, Any], keywords: frozenset[str]) -> Event | str:
    """The event of one ``messaging`` item, or the name it is ignored under."""
    sender = item.get("sender")
    sender = sender.get("id") if isinstance(sender, dict) else None
    if not isinstance(sender, str) or not sender.isdigit() or sender == page_id:
        return "echo" if sender == page_id else "malformed"
    kind, moment, opt_out = None, item.get("timestamp"), False
    for name, receipt_kind in _RECEIPT_KINDS.items():
        if isinstance(item.get(name), dict):
            kind, moment = receipt_kind, item[name].get("watermark")
    message = item.get("message")
    if isinstance(message, dict):
        if message.get("is_echo"):
            return "echo"
        kind = WebhookEventKind.MESSAGE
        text = message.get("text")
        opt_out = isinstance(text, str) and text.strip().upper() in keywords
    elif isinstance(item.get("postback"), dict):
        kind = WebhookEventKind.POSTBACK
    if kind is None:
        known = set(item) - {"sender", "recipient", "timestamp"}
        return min(known) if known else "malformed"
    try:
        occurred_at = _moment(moment)
    except ValueError:
        return "malformed"
    canonical = json.dumps([page_id, item], sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(canonical.encode()).hexdigest()
    return Event(key, page_id, sender, kind, occurred_at, opt_out)


def _list(value: Any) -> list[Any]:
    """``value`` when it is a list, else empty (a missing or malformed part of a body)."""
    return value if isinstance(value, list) else []


def parse(payload: Any, *, keywords: frozenset[str]) -> Parsed:
    """The events of a decoded webhook body. Items of other kinds, other objects (not ``page``)
    and malformed items are counted in ``ignored``, never an error: Meta would only resend them."""
    parsed = Parsed()
    if not isinstance(payload, dict) or payload.get("object") != "page":
        parsed.ignored["object"] += 1
        return parsed
    for entry in _list(payload.get("entry")):
        page_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(page_id, str) or not page_id.isdigit():
            parsed.ignored["malformed"] += 1
            continue
        parsed.ignored["standby"] += len(_list(entry.get("standby")))
        for item in _list(entry.get("messaging")):
            event = _event(page_id, item, keywords) if isinstance(item, dict) else "malformed"
            if isinstance(event, Event):
                parsed.events.append(event)
            else:
                parsed.ignored[event] += 1
    if not parsed.ignored["standby"]:
        del parsed.ignored["standby"]
    return parsed


_STORE = sa.text(
    """
    INSERT INTO webhook_events (dedupe_key, page_id, psid, kind, occurred_at, opt_out)
    SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:pages AS text[]), CAST(:psids AS text[]),
                         CAST(:kinds AS text[]), CAST(:moments AS timestamptz[]),
                         CAST(:opt_outs AS boolean[]))
    ON CONFLICT (dedupe_key) DO NOTHING
    """
)


def store(session: Session, events: list[Event]) -> int:
    """Store the events not stored before; returns how many were new."""
    if not events:
        return 0
    result = session.execute(
        _STORE,
        {
            "keys": [e.dedupe_key for e in events],
            "pages": [e.page_id for e in events],
            "psids": [e.psid for e in events],
            "kinds": [e.kind.value for e in events],
            "moments": [e.occurred_at for e in events],
            "opt_outs": [e.opt_out for e in events],
        },
    )
    return result.rowcount


_NEXT = sa.text(
    """
    SELECT id, page_id, psid, kind, occurred_at, opt_out,
           received_at > now() - make_interval(secs => :wait_limit) AS may_wait
    FROM webhook_events
    WHERE applied_at IS NULL AND (apply_after IS NULL OR apply_after <= now())
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
# People who wrote to the page: the 24-hour window opens at their latest message (never in the
# future), and an opt-out keyword opts them out for good.
_INTERACTIONS = sa.text(
    """
    INSERT INTO contacts (page_id, psid, last_interaction_at, opted_out)
    SELECT page_id, psid, least(max(moment), now()), bool_or(opt_out)
    FROM unnest(CAST(:pages AS text[]), CAST(:psids AS text[]), CAST(:moments AS timestamptz[]),
                CAST(:opt_outs AS boolean[])) AS e(page_id, psid, moment, opt_out)
    GROUP BY page_id, psid
    ORDER BY page_id, psid
    ON CONFLICT (page_id, psid) DO UPDATE SET
        last_interaction_at = greatest(contacts.last_interaction_at, EXCLUDED.last_interaction_at),
        opted_out = contacts.opted_out OR EXCLUDED.opted_out, updated_at = now()
    """
)


@dataclass(frozen=True)
class Applied:
    """What one ``apply_stored`` call did."""

    events: int = 0
    deferred: int = 0
    delivered: int = 0
    read: int = 0
    resolved: int = 0
    opted_out_skipped: int = 0


def _interactions(session: Session, rows: list[Any]) -> int:
    session.execute(
        _INTERACTIONS,
        {
            "pages": [r.page_id for r in rows],
            "psids": [r.psid for r in rows],
            "moments": [r.occurred_at for r in rows],
            "opt_outs": [r.opt_out for r in rows],
        },
    )
    opted_out = sorted({(r.page_id, r.psid) for r in rows if r.opt_out})
    return skip_opted_out(session, opted_out) if opted_out else 0


def apply_stored(session: Session, *, limit: int = 2000) -> Applied:
    """Apply up to ``limit`` stored events, oldest first. A receipt whose recipient is still in
    flight waits a second (its answer is about to be recorded), for at most ten minutes; the
    others are marked applied."""
    rows = session.execute(_NEXT, {"limit": limit, "wait_limit": _IN_FLIGHT_WAIT_LIMIT}).all()
    if not rows:
        return Applied()
    receipt_rows = [r for r in rows if r.kind in _RECEIPT_KINDS.values()]
    receipts = [
        Receipt(
            r.page_id,
            r.psid,
            delivered=r.occurred_at if r.kind == WebhookEventKind.DELIVERY else None,
            read=r.occurred_at if r.kind == WebhookEventKind.READ else None,
        )
        for r in receipt_rows
    ]
    may_wait = [i for i, r in enumerate(receipt_rows) if r.may_wait]
    in_flight = receipts_in_flight(session, [receipts[i] for i in may_wait]) if may_wait else set()
    waiting = {may_wait[i] for i in in_flight}
    deferred = [receipt_rows[i].id for i in waiting]
    ready = [receipt for i, receipt in enumerate(receipts) if i not in waiting]
    applied = apply_receipts(session, ready) if ready else None
    interactions = [r for r in rows if r.kind not in _RECEIPT_KINDS.values()]
    skipped = _interactions(session, interactions) if interactions else 0
    session.execute(
        sa.text(
            "UPDATE webhook_events SET "
            "applied_at = CASE WHEN id = ANY(CAST(:deferred AS bigint[])) THEN NULL ELSE now() END, "
            "apply_after = CASE WHEN id = ANY(CAST(:deferred AS bigint[])) "
            f"THEN now() + interval '{_RETRY_IN_FLIGHT}' END "
            "WHERE id = ANY(CAST(:ids AS bigint[]))"
        ),
        {"ids": [r.id for r in rows], "deferred": deferred},
    )
    return Applied(
        events=len(rows) - len(deferred),
        deferred=len(deferred),
        delivered=applied.delivered if applied else 0,
        read=applied.read if applied else 0,
        resolved=applied.resolved if applied else 0,
        opted_out_skipped=skipped,
    )


def unapplied_count(session: Session) -> int:
    """How many stored events wait to be applied."""
    return session.execute(
        sa.text("SELECT count(*) FROM webhook_events WHERE applied_at IS NULL")
    ).scalar_one()


def settled(
    engine: sa.Engine, *, timeout: float, waiting_elsewhere: Callable[[], int] = lambda: 0
) -> bool:
    """Wait until every stored event is applied and ``waiting_elsewhere()`` (events not yet posted,
    e.g. the sandbox's receipts) is 0; whether that happened within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with Session(engine) as session:
            if not waiting_elsewhere() and not unapplied_count(session):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
