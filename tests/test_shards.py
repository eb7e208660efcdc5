"""Large jobs in shards: disjoint ranges under their own leases, supervised by the job's run."""

import asyncio
import json

import sqlalchemy as sa

from pagecast import db, lifecycle, shards
from pagecast.lifecycle import Recovery
from pagecast.runner import JobRun, run_in_process
from pagecast.sandbox import SandboxConfig, running_sandbox
from tests.engine import assert_counters_match_rows, create_job, make_settings, recipient_counts

RECOVERY = Recovery(lease_seconds=60)


def _ranges(engine, job_id):
    with engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT psid_after, psid_last FROM send_job_shards WHERE job_id = :id ORDER BY shard"
            ),
            {"id": job_id},
        ).all()


def _split(engine, job_id, size=100):
    with db.session_scope(engine) as session:
        return shards.ensure_shards(session, job_id=job_id, shard_size=size)


def test_ranges_cover_every_pending_recipient_once(engine):
    job = create_job(engine, 350)
    assert _split(engine, job.id) == 4
    assert _split(engine, job.id) == 4
    ranges = _ranges(engine, job.id)
    assert ranges[0][0] == ""
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(3))
    psids = [str(10**15 + i) for i in range(350)]
    assert ranges[-1][1] == max(psids)
    covered = [p for p in psids for after, last in ranges if after < p <= last]
    assert sorted(covered) == sorted(psids)
    assert _split(engine, create_job(engine, 100, text="small").id) == 0


def test_a_range_has_one_runner_until_its_lease_expires(engine):
    job = create_job(engine, 250)
    with db.session_scope(engine) as session:
        lifecycle.claim_job(session, job_id=job.id, owner="parent", recovery=RECOVERY)
    _split(engine, job.id)
    with db.session_scope(engine) as session:
        first = shards.claim_shard(session, job_id=job.id, shard=1, owner="a", lease_seconds=60)
        assert (
            shards.claim_shard(session, job_id=job.id, shard=1, owner="b", lease_seconds=60) is None
        )
    assert (first.lease.shard, first.lease.attempt) == (1, 1)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE send_job_shards SET heartbeat_at = now() - interval '1 hour'")
        )
    with db.session_scope(engine) as session:
        plan = shards.plan(session, job_id=job.id, lease_seconds=60)
        assert plan.to_start == [(0, 0), (1, 1), (2, 0)] and plan.running == 0
        second = shards.claim_shard(session, job_id=job.id, shard=1, owner="b", lease_seconds=60)
    assert second.lease.attempt == 2


def test_a_new_job_runner_leaves_running_ranges_alone(engine):
    job = create_job(engine, 250)
    with db.session_scope(engine) as session:
        lifecycle.claim_job(session, job_id=job.id, owner="parent", recovery=RECOVERY)
    _split(engine, job.id)
    with db.session_scope(engine) as session:
        shard = shards.claim_shard(session, job_id=job.id, shard=0, owner="child", lease_seconds=60)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sending' WHERE job_id = :id AND psid <= :last"
            ),
            {"id": job.id, "last": shard.last},
        )
        connection.execute(
            sa.text("UPDATE send_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": job.id},
        )
    with db.session_scope(engine) as session:
        assert lifecycle.claim_job(session, job_id=job.id, owner="parent-2", recovery=RECOVERY)
    assert recipient_counts(engine, job.id)["sending"] == 100


async def test_ranges_sent_in_parallel_reach_everyone_once(engine, database_url, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=ledger)) as (url, sandbox):
        settings = make_settings(database_url, url)
        job = create_job(engine, 350, rate=300.0)
        parent = JobRun(engine, settings, job_id=job.id, owner="parent")
        assert parent.claim() is not None
        assert _split(engine, job.id) == 4
        children = await asyncio.gather(
            *(
                run_in_process(engine, settings, job_id=job.id, token_for=lambda p: "t", shard=i)
                for i in range(4)
            )
        )
        assert all(child is not None for child in children)
        with db.session_scope(engine) as session:
            assert shards.plan(session, job_id=job.id, lease_seconds=60).unfinished == 0
        finished = await asyncio.to_thread(parent.finish)
        sandbox.stats()
        delivered = [json.loads(line)["psid"] for line in ledger.read_text().splitlines()]
    assert finished.status == "completed"
    assert finished.sent == 350
    assert len(delivered) == len(set(delivered)) == 350
    assert_counters_match_rows(engine, job.id)


def test_shard_runs_need_a_running_job(engine):
    job = create_job(engine, 250)
    _split(engine, job.id)
    with db.session_scope(engine) as session:
        assert (
            shards.claim_shard(session, job_id=job.id, shard=0, owner="x", lease_seconds=60) is None
        )
