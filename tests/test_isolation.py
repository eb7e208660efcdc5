"""Isolation: no error of one recipient, of the database or of the heartbeat costs another
recipient its outcome, and a run that cannot record stops sending."""

import asyncio
import threading

import pytest
import sqlalchemy as sa

from pagecast import db, lifecycle, ratelimit
from pagecast.chunks import ChunkBounds, send_chunk
from pagecast.graph import client_factory
from pagecast.lifecycle import Recovery
from pagecast.runner import JobRun
from pagecast.sandbox import SandboxConfig, running_sandbox
from tests.engine import (
    assert_counters_match_rows,
    create_job,
    job_row,
    make_settings,
    recipient_counts,
    run_job,
)


def _database_down() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("SELECT 1", {}, Exception("the database is down"))


def _failing_reservations(monkeypatch, *, after: int, times: int) -> None:
    """Make slot reservations fail ``times`` times once ``after`` of them have succeeded."""
    real, calls = ratelimit.reserve, [0]

    def reserve(*args, **kwargs):
        calls[0] += 1
        if after < calls[0] <= after + times:
            raise _database_down()
        return real(*args, **kwargs)

    monkeypatch.setattr(ratelimit, "reserve", reserve)


async def test_a_database_error_while_reserving_slots_loses_no_outcome(
    engine, database_url, monkeypatch
):
    job = create_job(engine, 600, rate=200.0)
    _failing_reservations(monkeypatch, after=3, times=10**6)
    with running_sandbox(SandboxConfig(latency_ms=20)) as (url, sandbox):
        settings = make_settings(database_url, url, db_retry_seconds=0.5)
        with pytest.raises(sa.exc.OperationalError):
            await run_job(engine, settings, job.id)
        delivered = sandbox.stats()["delivered"]
    failed = job_row(engine, job.id)
    counts = recipient_counts(engine, job.id)
    assert failed.status == "failed" and failed.last_error.startswith("the run crashed")
    assert 0 < delivered == counts["sent"]  # every delivery recorded, none unknown
    assert set(counts) == {"sent", "pending"}
    assert_counters_match_rows(engine, job.id)


async def test_a_short_database_outage_is_retried_through(engine, database_url, monkeypatch):
    job = create_job(engine, 600, rate=200.0)
    _failing_reservations(monkeypatch, after=2, times=3)
    with running_sandbox(SandboxConfig(latency_ms=20)) as (url, sandbox):
        finished = await run_job(engine, make_settings(database_url, url), job.id)
        stats = sandbox.stats()
    assert (finished.status, finished.sent) == ("completed", 600)
    assert (stats["delivered"], stats["duplicates"]) == (600, 0)


async def test_a_retried_chunk_resumes_the_rows_it_owns(engine, database_url, monkeypatch):
    job = create_job(engine, 200, rate=100.0)
    with db.session_scope(engine) as session:
        lease = lifecycle.claim_job(session, job_id=job.id, owner="run", recovery=Recovery())
    bounds = ChunkBounds("", "9" * 20)
    with running_sandbox(SandboxConfig(latency_ms=20)) as (url, sandbox):
        settings = make_settings(database_url, url)
        build = client_factory(settings, lambda _page: "tok")
        _failing_reservations(monkeypatch, after=2, times=10**6)
        with pytest.raises(sa.exc.OperationalError):
            await send_chunk(
                engine, lease=lease, bounds=bounds, client_factory=build, give_up_after=0
            )
        first = sandbox.stats()["delivered"]
        assert 0 < first == recipient_counts(engine, job.id)["sent"] < 200
        monkeypatch.undo()
        result = await send_chunk(engine, lease=lease, bounds=bounds, client_factory=build)
        stats = sandbox.stats()
    assert result.sent == 200 - first
    assert (stats["delivered"], stats["duplicates"]) == (200, 0)
    assert recipient_counts(engine, job.id) == {"sent": 200}


async def test_a_failing_heartbeat_stops_the_run_cleanly(engine, database_url, monkeypatch):
    job = create_job(engine, 3000, rate=100.0)
    real, beats = JobRun.job_state, [0]

    def job_state(self):
        if threading.current_thread().name.startswith("pagecast-heartbeat"):
            beats[0] += 1
            raise _database_down()
        return real(self)

    monkeypatch.setattr(JobRun, "job_state", job_state)
    with running_sandbox(SandboxConfig(latency_ms=20)) as (url, sandbox):
        settings = make_settings(database_url, url, lease_seconds=5)
        ended = await run_job(engine, settings, job.id)
        delivered = sandbox.stats()["delivered"]
    counts = recipient_counts(engine, job.id)
    assert beats[0] >= 2
    assert ended.status == "pending"  # stopped early; the next sweep resumes it
    assert 0 < delivered == counts["sent"] < 3000
    assert set(counts) == {"sent", "pending"}
    assert_counters_match_rows(engine, job.id)


async def test_connections_killed_mid_run_are_reopened_and_nothing_is_lost(engine, database_url):
    job = create_job(engine, 1500, rate=300.0)

    def kill_connections() -> None:
        killer = sa.create_engine(database_url, poolclass=sa.NullPool)
        with killer.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        killer.dispose()

    with running_sandbox(SandboxConfig(latency_ms=20)) as (url, sandbox):
        run = asyncio.create_task(run_job(engine, make_settings(database_url, url), job.id))
        for _ in range(2):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(kill_connections)
        finished = await run
        stats = sandbox.stats()
    assert (finished.status, finished.sent) == ("completed", 1500)
    assert (stats["delivered"], stats["duplicates"]) == (1500, 0)
