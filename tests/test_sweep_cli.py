"""``pagecast sweep`` without Prefect: real processes against the sandbox, as cron would run it."""

import json
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from pagecast.sandbox import SandboxConfig, running_sandbox
from tests.engine import PAGE, create_job, job_row, process_env, recipient_counts

TOKEN = "sweep-test-token"


@pytest.fixture
def sweep_env(tmp_path, database_url):
    ledger = tmp_path / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=ledger)) as (url, sandbox):
        env = process_env(
            tmp_path / "home",
            database_url,
            url,
            PAGECAST_CHUNK_SIZE="50",
            PAGECAST_LEASE_SECONDS="5",
            **{f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}": TOKEN},
        )

        def delivered() -> list[str]:
            sandbox.stats()  # flushes the ledger
            if not ledger.exists():
                return []
            return [json.loads(line)["psid"] for line in ledger.read_text().splitlines()]

        yield env, delivered


def _sweep(env, *args) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pagecast", "sweep", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_a_sweep_sends_a_due_job_in_this_process(engine, sweep_env):
    env, delivered = sweep_env
    job = create_job(engine, 120, text="swept here")
    code, out, err = _finish(_sweep(env))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "sweep: sending 1 job(s) in this process: no Prefect API is configured " + (
        "(PREFECT_API_URL, or `make up`)"
    )
    assert lines[1] == (
        f"job {job.id} (due): sent here, completed: 120 sent, 0 failed, 0 skipped, 0 unknown of 120"
    )
    assert sorted(delivered()) == sorted(str(10**15 + i) for i in range(120))


def test_two_sweeps_at_once_send_each_job_once(engine, sweep_env):
    env, delivered = sweep_env
    jobs = [create_job(engine, 150, text=f"twice {n}", rate=100.0) for n in range(2)]
    outputs = [_finish(p) for p in [_sweep(env), _sweep(env)]]
    assert all(code == 0 for code, _, _ in outputs), outputs
    sent_here = [line for _, out, _ in outputs for line in out.splitlines() if "sent here" in line]
    assert sorted(sent_here) == sorted(
        f"job {j.id} (due): sent here, completed: 150 sent, 0 failed, 0 skipped, 0 unknown of 150"
        for j in jobs
    )
    psids = delivered()
    assert len(psids) == 300 and all(psids.count(p) == 2 for p in set(psids))  # once per job


def test_a_sweep_takes_over_a_dead_runners_job(engine, sweep_env):
    env, delivered = sweep_env
    job = create_job(engine, 40, text="taken over")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE send_jobs SET status = 'running', lease_owner = 'dead', attempt = 1, "
                "sent = 5, heartbeat_at = now() - interval '1 minute' WHERE id = :id"
            ),
            {"id": job.id},
        )
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sending' WHERE job_id = :id "
                "AND psid IN ('1000000000000000', '1000000000000001')"
            ),
            {"id": job.id},
        )
        connection.execute(  # the dead run had sent five: it made progress
            sa.text(
                "UPDATE send_job_recipients SET status = 'sent' WHERE job_id = :id "
                "AND psid > '1000000000000001' AND psid <= '1000000000000006'"
            ),
            {"id": job.id},
        )
    code, out, err = _finish(_sweep(env))
    assert code == 0, err
    assert (
        f"job {job.id} (runner stopped heartbeating, 2 in-flight recipients settled): sent here, "
        "completed_with_errors: 38 sent, 0 failed, 0 skipped, 2 unknown of 40"
    ) in out.splitlines()
    assert len(delivered()) == 33


def test_a_job_without_a_token_here_is_left_pending_and_says_why(engine, sweep_env):
    env, delivered = sweep_env
    env = {k: v for k, v in env.items() if not k.startswith("PAGECAST_PAGE_ACCESS_TOKEN")}
    job = create_job(engine, 5, text="no token")
    code, out, _ = _finish(_sweep(env))
    assert code == 0
    assert f"job {job.id} (due): left pending, waiting for a token for page {PAGE}" in out
    assert job_row(engine, job.id).status == "pending"
    status = subprocess.run(
        [sys.executable, "-m", "pagecast", "job", "status", str(job.id), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)["waiting_for"].startswith(f"a token for page {PAGE}")
    assert delivered() == []


def test_sweep_every_picks_up_jobs_created_later(engine, sweep_env):
    env, delivered = sweep_env
    process = _sweep(env, "--every", "1")
    try:
        time.sleep(2)
        job = create_job(engine, 30, text="later")
        deadline = time.monotonic() + 60
        while job_row(engine, job.id).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        process.terminate()  # as a container stop does
        out, _ = process.communicate(timeout=30)
    assert recipient_counts(engine, job.id) == {"sent": 30}
    assert f"job {job.id} (due): sent here, completed" in out
    assert len(delivered()) == 30


def test_once_and_every_exclude_each_other(sweep_env):
    env, _ = sweep_env
    code, _, err = _finish(_sweep(env, "--once", "--every", "5"))
    assert code == 2 and "--once and --every" in err
