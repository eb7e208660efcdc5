"""Infrastructure faults while a job sends: its PostgreSQL stopped and started again, its
connections killed. Each ends with every recipient terminal, counters equal to rows, and no
message delivered twice (the Prefect server's death is in tests/test_operations.py)."""

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from pagecast import db
from pagecast.chunks import BOUND_SECONDS
from tests.engine import (
    PAGE,
    assert_counters_match_rows,
    create_job,
    job_row,
    make_settings,
    process_env,
    run_job,
)

RATE, CONCURRENCY = 300.0, 50
RESTART_WINDOW_SECONDS = 120
UNKNOWN_BOUND = CONCURRENCY + BOUND_SECONDS * RATE


@pytest.fixture
def own_postgres() -> Iterator[Path]:
    """An embedded PostgreSQL of this test's own (stopping it touches no other test), migrated;
    yields its home."""
    home = Path(tempfile.mkdtemp(prefix="pagecast-test-own-db-"))
    engine = sa.create_engine(db.embedded_database_url(home), poolclass=sa.NullPool)
    db.upgrade(engine)
    engine.dispose()
    yield home
    db.stop_embedded_database(home)
    shutil.rmtree(home, ignore_errors=True)


def _reachable(database_url: str, seconds: float) -> bool:
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                with engine.connect():
                    return True
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
    finally:
        engine.dispose()


def _start_again(home: Path, database_url: str) -> None:
    """Start the stopped embedded server again; it answers within 30 s."""
    db.embedded_database_url(home)
    assert _reachable(database_url, seconds=30), "the embedded PostgreSQL did not start again"


async def _as_operator(work: Callable[..., object], *args: object) -> object:
    """Run ``work`` in a thread of its own, as an operator acts from outside the run: never behind
    the run's own waits for its database in the loop's executor."""
    with ThreadPoolExecutor(max_workers=1) as operator:
        return await asyncio.get_running_loop().run_in_executor(operator, work, *args)


def _statuses(engine: sa.Engine, job_id) -> dict[str, set[str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT status, psid FROM send_job_recipients WHERE job_id = :job_id"),
            {"job_id": job_id},
        ).all()
    statuses: dict[str, set[str]] = {}
    for status, psid in rows:
        statuses.setdefault(status, set()).add(psid)
    return statuses


async def test_postgres_stopped_and_started_again_mid_job(own_postgres, sandbox):
    url, state, ledger = sandbox
    database_url = db.embedded_database_url(own_postgres)
    engine = db.engine_for(database_url)
    job = create_job(engine, 1500, rate=RATE, concurrency=CONCURRENCY)
    # The run waits out the outage.
    settings = make_settings(database_url, url, db_retry_seconds=RESTART_WINDOW_SECONDS)
    running = asyncio.create_task(run_job(engine, settings, job.id))
    while state.stats()["delivered"] < 300:
        await asyncio.sleep(0.02)
    await _as_operator(db.stop_embedded_database, own_postgres)
    delivered_when_stopped = state.stats()["delivered"]
    slept_from = time.monotonic()
    await asyncio.sleep(3)
    # The run's loop is not frozen by its waits for the database (it was, for the whole window).
    assert time.monotonic() - slept_from < RESTART_WINDOW_SECONDS / 4
    # A row is called only once it is durably marked: the marked ones at most go out.
    assert state.stats()["delivered"] - delivered_when_stopped <= UNKNOWN_BOUND
    await _as_operator(_start_again, own_postgres, database_url)
    finished = await running
    assert (finished.status, finished.sent) == ("completed", 1500)
    delivered = [r["psid"] for r in ledger()]
    assert len(delivered) == len(set(delivered)) == 1500
    assert state.stats()["duplicates"] == 0
    assert _statuses(engine, job.id) == {"sent": set(delivered)}
    assert_counters_match_rows(engine, job.id)


async def test_a_run_that_outlives_its_database_retries_stops_and_the_sweep_finishes_the_job(
    own_postgres, sandbox, tmp_path
):
    url, state, ledger = sandbox
    database_url = db.embedded_database_url(own_postgres)
    engine = db.engine_for(database_url)
    job = create_job(engine, 1500, rate=RATE, concurrency=CONCURRENCY)
    settings = make_settings(database_url, url, db_retry_seconds=2.0, lease_seconds=5)
    running = asyncio.create_task(run_job(engine, settings, job.id))
    while state.stats()["delivered"] < 300:
        await asyncio.sleep(0.02)
    await _as_operator(db.stop_embedded_database, own_postgres)
    with pytest.raises(sa.exc.OperationalError):  # gave up after retrying for 2 s
        await running
    stopped_at = state.stats()["delivered"]
    await _as_operator(_start_again, own_postgres, database_url)
    env = process_env(
        tmp_path / "home",
        database_url,
        url,
        PAGECAST_LEASE_SECONDS="5",
        **{f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}": "tok"},
    )
    await asyncio.sleep(5)  # the dead run's lease runs out
    swept = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pagecast", "sweep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert swept.returncode == 0, swept.stderr
    # Taken over as a dead run's job; rows it left in flight, if any, settled (", N in-flight …").
    assert f"job {job.id} (runner stopped heartbeating" in swept.stdout
    finished = job_row(engine, job.id)
    assert finished.status in ("completed", "completed_with_errors")
    assert state.stats()["duplicates"] == 0
    statuses = _statuses(engine, job.id)
    assert set(statuses) <= {"sent", "unknown"}
    delivered = {r["psid"] for r in ledger()}
    assert statuses["sent"] <= delivered <= statuses["sent"] | statuses.get("unknown", set())
    assert len(statuses.get("unknown", ())) <= UNKNOWN_BOUND
    assert stopped_at < 1500
    assert_counters_match_rows(engine, job.id)
