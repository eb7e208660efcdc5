"""Leases and fencing: a runner that lost its lease can neither claim rows nor record outcomes."""

import asyncio

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from pagecast import commands, db, lifecycle, recipients
from pagecast.chunks import ChunkBounds, send_chunk
from pagecast.errors import JobStateConflict, LeaseLost
from pagecast.lifecycle import Recovery
from pagecast.models import RecipientStatus
from pagecast.recipients import Outcome
from tests.engine import create_job, job_row, recipient_counts


def _claim(engine, job_id, owner, lease_seconds=120):
    with db.session_scope(engine) as session:
        return lifecycle.claim_job(
            session, job_id=job_id, owner=owner, recovery=Recovery(lease_seconds=lease_seconds)
        )


def _expire_heartbeat(engine, job_id):
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE send_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": job_id},
        )


def test_claim_is_exclusive_until_the_lease_expires(engine):
    job = create_job(engine, 5)
    first = _claim(engine, job.id, "a")
    assert first.attempt == 1
    assert _claim(engine, job.id, "b") is None
    _expire_heartbeat(engine, job.id)
    second = _claim(engine, job.id, "b")
    assert (second.owner, second.attempt) == ("b", 2)


def test_jobs_not_due_are_not_claimed(engine):
    from datetime import UTC, datetime, timedelta

    job = create_job(engine, 5, scheduled_at=datetime.now(UTC) + timedelta(hours=1))
    assert _claim(engine, job.id, "a") is None


def test_stale_runner_can_neither_claim_rows_nor_record(engine):
    job = create_job(engine, 5)
    stale = _claim(engine, job.id, "a")
    _expire_heartbeat(engine, job.id)
    _claim(engine, job.id, "b")

    def no_client(concurrency):
        raise AssertionError("a stale runner must not build a client")

    result = asyncio.run(
        send_chunk(engine, lease=stale, bounds=ChunkBounds("", "9" * 20), client_factory=no_client)
    )
    assert result.sent == 0
    assert recipient_counts(engine, job.id) == {"pending": 5}
    with Session(engine) as session:
        outcomes = [Outcome("1000000000000000", RecipientStatus.SENT)]
        assert recipients.flush(session, lease=stale, outcomes=outcomes, marks=[]) is None
    with Session(engine) as session, pytest.raises(LeaseLost):
        lifecycle.heartbeat(session, lease=stale)


def test_takeover_turns_in_flight_rows_unknown_or_pending(engine):
    for resend, expected in ((False, "unknown"), (True, "pending")):
        job = create_job(engine, 3, resend_unknown=resend, text=f"resend {resend}")
        _claim(engine, job.id, "a")
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE send_job_recipients SET status = 'sending' WHERE job_id = :id"),
                {"id": job.id},
            )
        _expire_heartbeat(engine, job.id)
        _claim(engine, job.id, "b")
        assert recipient_counts(engine, job.id) == {expected: 3}
        assert job_row(engine, job.id).unknown == (0 if resend else 3)


def test_cancel_pause_resume_rules(engine):
    job = create_job(engine, 4)
    with db.session_scope(engine) as session:
        commands.pause_job(session, job_id=job.id)
    with (
        db.session_scope(engine) as session,
        pytest.raises(JobStateConflict, match="only a paused job"),
    ):
        commands.resume_job(session, job_id=create_job(engine, 1, text="other").id)
    with db.session_scope(engine) as session:
        commands.resume_job(session, job_id=job.id)
        cancelled = commands.cancel_job(session, job_id=job.id)
    assert cancelled.status == "cancelled"
    assert (cancelled.skipped, cancelled.total) == (4, 4)
    with (
        db.session_scope(engine) as session,
        pytest.raises(JobStateConflict, match="is cancelled: it has ended"),
    ):
        commands.cancel_job(session, job_id=job.id)
    with db.session_scope(engine) as session, pytest.raises(JobStateConflict):
        commands.requeue_job(session, job_id=job.id)


def test_retry_with_nothing_to_retry_is_refused(engine):
    job = create_job(engine, 2)
    lease = _claim(engine, job.id, "a")
    psids = ["1000000000000000", "1000000000000001"]
    with db.session_scope(engine) as session:
        recipients.claim(session, lease=lease, after="", last="9")
        recipients.flush(session, lease=lease, outcomes=[], marks=psids)
        sent = [Outcome(p, RecipientStatus.SENT, message_id="m") for p in psids]
        recipients.flush(session, lease=lease, outcomes=sent, marks=[])
    with db.session_scope(engine) as session:
        finished = lifecycle.finish_job(session, lease=lease, recovery=Recovery())
    assert finished.status == "completed"
    with (
        db.session_scope(engine) as session,
        pytest.raises(JobStateConflict, match="nothing to retry"),
    ):
        commands.requeue_job(session, job_id=job.id)
    assert job_row(engine, job.id).status == "completed"


def test_cancelled_runner_ends_its_job_at_once(engine):
    job = create_job(engine, 4)
    _claim(engine, job.id, "run-1")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sending' WHERE job_id = :id "
                "AND psid = '1000000000000000'"
            ),
            {"id": job.id},
        )
    with db.session_scope(engine) as session:
        other = commands.cancel_run(session, job_id=job.id, owner="someone-else")
    assert (other.status, other.cancel_requested) == ("running", True)
    with db.session_scope(engine) as session:
        ended = commands.cancel_run(session, job_id=job.id, owner="run-1")
    assert (ended.status, ended.unknown, ended.skipped) == ("cancelled", 1, 3)
    assert ended.lease_owner is None
