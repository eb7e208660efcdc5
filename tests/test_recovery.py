"""Recovery in the core: dead runs ended by the sweep, stalled jobs backed off and given up,
crashed runs ending their job failed, sharded retries, and what a job waits for."""

import sqlalchemy as sa

from pagecast import commands, db, lifecycle, repo, reports, shards
from pagecast.lifecycle import Recovery
from pagecast.runner import JobRun, run_in_process
from pagecast.sandbox import SandboxConfig, running_sandbox
from pagecast.sweeps import sweep_jobs
from tests.engine import create_job, job_row, make_settings, recipient_counts, run_job

RECOVERY = Recovery(lease_seconds=60, max_stalled_runs=3, backoff_seconds=30)


def _claim(engine, job_id, owner, recovery=RECOVERY):
    with db.session_scope(engine) as session:
        return lifecycle.claim_job(session, job_id=job_id, owner=owner, recovery=recovery)


def _sweep(engine, recovery=RECOVERY):
    with db.session_scope(engine) as session:
        return sweep_jobs(session, recovery=recovery)


def _execute(engine, statement, **params):
    with engine.begin() as connection:
        connection.execute(sa.text(statement), params)


def _kill_runner(engine, job_id):
    """The runner stops heartbeating: its lease is long expired."""
    _execute(
        engine,
        "UPDATE send_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id",
        id=job_id,
    )


def _end_backoff(engine, job_id):
    _execute(
        engine,
        "UPDATE send_jobs SET next_attempt_at = now() - interval '1 second' WHERE id = :id",
        id=job_id,
    )


def _waiting(engine, job_id):
    with db.session_scope(engine) as session:
        job = repo.get_job(session, job_id=job_id)
        return reports.waiting_for(session, job, lease_seconds=RECOVERY.lease_seconds)


def test_a_job_whose_runs_die_without_progress_is_backed_off_then_given_up(engine):
    job = create_job(engine, 10)
    for run in range(1, RECOVERY.max_stalled_runs + 1):
        assert [i.job_id for i in _sweep(engine) if i.start] == [job.id]
        assert _claim(engine, job.id, f"runner-{run}") is not None
        _kill_runner(engine, job.id)
        (item,) = _sweep(engine)
        assert not item.start and item.job_id == job.id
        row = job_row(engine, job.id)
        assert row.stalled_runs == run
        if run < RECOVERY.max_stalled_runs:
            assert row.status == "pending" and row.next_attempt_at is not None
            assert "a backoff until" in _waiting(engine, job.id)
            assert _sweep(engine) == []  # not restarted during the backoff
            _end_backoff(engine, job.id)
    given_up = job_row(engine, job.id)
    assert given_up.status == "failed"
    assert given_up.last_error.startswith(f"gave up: {RECOVERY.max_stalled_runs} runs in a row")
    assert recipient_counts(engine, job.id) == {"pending": 10}
    assert _sweep(engine) == []
    with db.session_scope(engine) as session:
        commands.requeue_job(session, job_id=job.id)
    resumed = job_row(engine, job.id)
    assert (resumed.status, resumed.stalled_runs, resumed.next_attempt_at) == ("pending", 0, None)


def test_the_backoff_doubles_and_progress_resets_it(engine):
    job = create_job(engine, 10)
    _claim(engine, job.id, "a")
    _kill_runner(engine, job.id)
    _sweep(engine)
    _end_backoff(engine, job.id)
    _claim(engine, job.id, "b")
    _kill_runner(engine, job.id)
    _sweep(engine)
    with engine.connect() as connection:
        wait = connection.execute(
            sa.text("SELECT extract(epoch FROM next_attempt_at - now()) FROM send_jobs")
        ).scalar_one()
    assert 2 * RECOVERY.backoff_seconds - 5 < wait <= 2 * RECOVERY.backoff_seconds
    _end_backoff(engine, job.id)
    _claim(engine, job.id, "c")
    _execute(
        engine,
        "UPDATE send_job_recipients SET status = 'sent' WHERE psid = '1000000000000000';"
        "UPDATE send_jobs SET sent = 1",
    )
    _kill_runner(engine, job.id)
    (item,) = _sweep(engine)
    assert item.start and item.reason == "runner stopped heartbeating"
    row = job_row(engine, job.id)
    assert (row.stalled_runs, row.next_attempt_at) == (0, None)


def test_a_dead_runner_with_a_cancel_request_ends_cancelled(engine):
    job = create_job(engine, 5)
    _claim(engine, job.id, "a")
    _execute(
        engine,
        "UPDATE send_job_recipients SET status = 'sending' WHERE psid = '1000000000000000'",
    )
    with db.session_scope(engine) as session:
        commands.cancel_job(session, job_id=job.id)
    assert job_row(engine, job.id).status == "running"
    _kill_runner(engine, job.id)
    (item,) = _sweep(engine)
    assert not item.start and item.orphans_settled == 1
    ended = job_row(engine, job.id)
    assert (ended.status, ended.unknown, ended.skipped) == ("cancelled", 1, 4)


def test_two_sweeps_at_once_end_a_dead_run_once(engine):
    job = create_job(engine, 5)
    _claim(engine, job.id, "a")
    _kill_runner(engine, job.id)
    with db.session_scope(engine) as first, db.session_scope(engine) as second:
        one = sweep_jobs(first, recovery=RECOVERY)
        other = sweep_jobs(second, recovery=RECOVERY)  # skips the row the first one holds
    assert [i.job_id for i in one] == [job.id] and other == []


async def test_an_unexpected_error_ends_the_job_failed_and_retry_resumes(engine, database_url):
    job = create_job(engine, 300)
    calls = 0

    def token_for(page_id):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the vault is sealed")
        return "tok"

    with running_sandbox(SandboxConfig()) as (url, sandbox):
        settings = make_settings(database_url, url, parallel_chunks=2)
        try:
            await run_in_process(engine, settings, job_id=job.id, token_for=token_for)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the run's error must propagate")
        failed = job_row(engine, job.id)
        assert failed.status == "failed"
        assert failed.last_error == "the run crashed: RuntimeError: the vault is sealed"
        assert failed.lease_owner is None
        counts = recipient_counts(engine, job.id)
        # one recipient's error costs no other its outcome: every delivery is recorded
        assert set(counts) == {"sent", "pending"}
        assert sandbox.stats()["delivered"] == counts["sent"]
        with db.session_scope(engine) as session:
            commands.requeue_job(session, job_id=job.id)
        finished = await run_job(engine, settings, job.id)
        assert finished.status == "completed"
        assert finished.sent == 300
        assert sandbox.stats()["duplicates"] == 0


async def test_retry_of_a_sharded_job_reopens_the_ranges_it_needs(engine, database_url):
    job = create_job(engine, 300)
    failing = {"1000000000000007": "1", "1000000000000250": "2"}
    with running_sandbox(SandboxConfig(fail_psids=failing)) as (url, sandbox):
        settings = make_settings(database_url, url, shard_size=100)
        parent = JobRun(engine, settings, job_id=job.id, owner="parent")
        parent.claim()
        with db.session_scope(engine) as session:
            assert shards.ensure_shards(session, job_id=job.id, shard_size=100) == 3
        for shard in range(3):
            await run_shard(engine, settings, job.id, shard)
        first = parent.finish()
        assert (first.status, first.sent, first.failed) == ("completed_with_errors", 298, 2)
        sandbox.config.fail_psids = {}
        with db.session_scope(engine) as session:
            assert commands.requeue_job(session, job_id=job.id).failed == 2
            assert shards.plan(session, job_id=job.id, lease_seconds=60).to_start == [
                (0, 1),
                (2, 1),
            ]
        parent = JobRun(engine, settings, job_id=job.id, owner="parent-2")
        parent.claim()
        for shard in (0, 2):
            await run_shard(engine, settings, job.id, shard)
        assert parent.finish().status == "completed"
        assert sandbox.stats()["delivered"] == 300


async def run_shard(engine, settings, job_id, shard):
    await run_in_process(
        engine, settings, job_id=job_id, token_for=lambda _: "tok", owner=f"c{shard}", shard=shard
    )


def test_what_a_job_waits_for(engine):
    paused = create_job(engine, 2)
    with db.session_scope(engine) as session:
        commands.pause_job(session, job_id=paused.id, reason="too many blocks")
    assert _waiting(engine, paused.id) == "a resume (`pagecast job resume`): too many blocks"
    later = create_job(engine, 2, text="later")
    _execute(
        engine,
        "UPDATE send_jobs SET scheduled_at = now() + interval '1 day' WHERE id = :id",
        id=later.id,
    )
    assert _waiting(engine, later.id).startswith("its scheduled time")
    due = create_job(engine, 2, text="due")
    assert _waiting(engine, due.id).startswith("a runner")
    with db.session_scope(engine) as session:
        repo.set_waiting_for(session, job_id=due.id, waiting_for="a worker on work pool 'x'")
    assert _waiting(engine, due.id) == "a worker on work pool 'x'"
    _claim(engine, due.id, "a")
    assert _waiting(engine, due.id) is None
    _execute(
        engine,
        "INSERT INTO page_send_rates (page_id, backoff_factor, throttled_at) VALUES (:p, 0.5, now())",
        p=due.page_id,
    )
    assert "slowed to 50%" in _waiting(engine, due.id)
    _kill_runner(engine, due.id)
    assert _waiting(engine, due.id).startswith("a takeover")
