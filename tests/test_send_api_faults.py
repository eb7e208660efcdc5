"""Send API faults while a job sends, played by the sandbox: what pagecast does with each (see the
fault table in docs/reliability.md). Every case ends with every recipient terminal, the job's
counters equal to its rows, and no message delivered twice."""

import asyncio
import socket
import time

import pytest
import sqlalchemy as sa

from pagecast import commands, db
from pagecast.outages import MAX_HOLD_SECONDS
from pagecast.sandbox import FAULTS, SandboxConfig, running_sandbox
from tests.engine import (
    assert_counters_match_rows,
    create_job,
    errors_by_key,
    job_row,
    make_settings,
    recipient_counts,
    run_job,
)

MAYBE_DELIVERED = ["html_502", "malformed", "empty", "hang", "reset"]
REFUSED = ["transient", "html_503"]


def _delivered_once(state, ledger) -> set[str]:
    psids = [r["psid"] for r in ledger()]
    assert state.stats()["duplicates"] == 0
    assert len(psids) == len(set(psids))
    return set(psids)


def _psids_with(engine, job_id, status: str) -> set[str]:
    with db.session_scope(engine) as session:
        rows = session.execute(
            sa.text(
                "SELECT psid FROM send_job_recipients WHERE job_id = :job_id AND status = :status"
            ),
            {"job_id": job_id, "status": status},
        )
        return set(rows.scalars())


async def test_answers_that_may_hide_a_delivery_are_unknown_never_resent(
    engine, database_url, sandbox
):
    url, state, ledger = sandbox
    job = create_job(engine, 100)
    faulty = {str(10**15 + 7 * (i + 1)): fault for i, fault in enumerate(MAYBE_DELIVERED)}
    state.config.update({"fail_psids": faulty, "hang_seconds": 3.0})
    settings = make_settings(database_url, url, send_timeout_seconds=1.0)
    finished = await run_job(engine, settings, job.id)
    assert finished.status == "completed_with_errors"
    assert recipient_counts(engine, job.id) == {"sent": 95, "unknown": 5}
    assert _psids_with(engine, job.id, "unknown") == set(faulty)
    assert errors_by_key(engine, job.id) == {"http_502": 1, "http_200": 2, "network": 2}
    delivered = _delivered_once(state, ledger)
    assert delivered - _psids_with(engine, job.id, "sent") == {
        psid for psid, fault in faulty.items() if FAULTS[fault][0]
    }
    assert_counters_match_rows(engine, job.id)


@pytest.mark.parametrize("fault", REFUSED)
async def test_refused_calls_are_retried_until_delivered(engine, database_url, sandbox, fault):
    url, state, ledger = sandbox
    job = create_job(engine, 200, rate=100.0)
    state.config.update({"outage_fault": fault, "outage_until": time.time() + 1.5})
    finished = await run_job(engine, make_settings(database_url, url), job.id)
    assert (finished.status, finished.sent, finished.failed, finished.unknown) == (
        "completed",
        200,
        0,
        0,
    )
    assert state.stats()["faults"][fault] > 0
    assert len(_delivered_once(state, ledger)) == 200
    assert_counters_match_rows(engine, job.id)


async def test_calls_refused_before_they_are_written_are_retried(engine, database_url, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on until the sandbox starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = create_job(engine, 100, rate=100.0)
    settings = make_settings(database_url, f"http://127.0.0.1:{port}")
    running = asyncio.create_task(run_job(engine, settings, job.id))
    await asyncio.sleep(1.5)
    assert not running.done()
    ledger = tmp_path / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=ledger), port=port) as (_, state):
        finished = await running
        assert state.stats()["duplicates"] == 0
    assert (finished.status, finished.sent, finished.unknown) == ("completed", 100, 0)
    assert_counters_match_rows(engine, job.id)


async def test_retry_after_of_a_429_is_honoured_by_the_whole_page(engine, database_url, sandbox):
    url, state, ledger = sandbox
    job = create_job(engine, 100, rate=50.0)
    state.config.update(
        {"outage_fault": "throttle_429", "outage_calls": 1, "retry_after_seconds": 3}
    )
    finished = await run_job(engine, make_settings(database_url, url), job.id)
    assert (finished.status, finished.sent) == ("completed", 100)
    throttled_at = state.stats()["first_fault_at"]["throttle_429"]
    # Calls sent before the 429 came back may still arrive just after it; then none for 3 s.
    assert not [r for r in ledger() if throttled_at + 0.1 <= r["t"] < throttled_at + 3.0]
    assert len(_delivered_once(state, ledger)) == 100


async def test_a_30_second_storm_of_5xx_is_waited_out_without_hammering_the_api(
    engine, database_url, sandbox
):
    url, state, ledger = sandbox
    rate, storm_seconds = 100.0, 30.0
    job = create_job(engine, 1200, rate=rate, concurrency=20)
    running = asyncio.create_task(run_job(engine, make_settings(database_url, url), job.id))
    while state.stats()["delivered"] < 300:
        await asyncio.sleep(0.05)
    state.config.update({"outage_fault": "transient", "outage_until": time.time() + storm_seconds})
    finished = await running
    assert (finished.status, finished.sent, finished.failed, finished.unknown) == (
        "completed",
        1200,
        0,
        0,
    )
    assert len(_delivered_once(state, ledger)) == 1200
    # Held between probes: calls into the storm stay far below what the rate allows in it.
    storm_calls = state.stats()["faults"]["transient"]
    assert storm_calls <= 0.05 * rate * storm_seconds
    assert storm_calls >= storm_seconds / MAX_HOLD_SECONDS  # it kept probing
    assert_counters_match_rows(engine, job.id)


async def test_an_outage_longer_than_the_limit_pauses_the_job_and_resume_finishes_it(
    engine, database_url, sandbox
):
    url, state, ledger = sandbox
    job = create_job(engine, 300, rate=100.0)
    state.config.update({"outage_fault": "transient", "outage_until": time.time() + 600})
    settings = make_settings(database_url, url, outage_pause_seconds=3.0)
    paused = await run_job(engine, settings, job.id)
    assert paused.status == "paused"
    assert "the Send API failed every call for over 3 s" in paused.last_error
    assert recipient_counts(engine, job.id) == {"pending": 300}
    state.config.update({"outage_until": None})
    with db.session_scope(engine) as session:
        commands.resume_job(session, job_id=job.id)
    finished = await run_job(engine, settings, job.id)
    assert (finished.status, finished.sent) == ("completed", 300)
    assert len(_delivered_once(state, ledger)) == 300
    assert job_row(engine, job.id).last_error is None
    assert_counters_match_rows(engine, job.id)
