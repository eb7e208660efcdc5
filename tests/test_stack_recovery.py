"""Recovery on a running stack: the scheduled sweep picks up pending jobs and takes over killed
runs; killed shard supervisors, child runs, Prefect servers and workers; runs and sweeps racing
for one job."""

import json
import os
import re
import signal
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from deployments.local_stack import Stack, exited, revive_warm_runner, start_stack
from pagecast.faults import CRASH_AT_ENV
from pagecast.launch import STACK_FILE
from pagecast.models import SendJob
from pagecast.processes import is_same_process
from tests.engine import (
    create_job,
    job_row,
    recipient_counts,
)
from tests.stack import (
    SCHEDULE_WAIT_SECONDS,
    WAIT_SECONDS,
    Ops,
    ended,
    finish,
    runs_ended,
    scheduled_sweeps,
    sent_once,
    sent_once_within_the_bound,
    spawn_pagecast,
)


@dataclass
class Unattended:
    """Jobs left for the scheduled sweep alone at ``since`` (one pending, one whose runner was
    killed, ``in_flight_at_kill`` rows in flight then), as they ended."""

    pending: SendJob
    killed: SendJob
    in_flight_at_kill: int
    since: datetime


@pytest.fixture(scope="module")
def unattended(ops) -> Unattended:
    since = datetime.now(UTC)
    pending = create_job(ops.engine, 120, text="scheduled pickup").id
    ops.sandbox.configure(latency_ms=300)
    killed = create_job(ops.engine, 300, rate=40.0, concurrency=20, text="scheduled takeover").id
    ops.start("send-job/send-job", {"job_id": str(killed)})
    ops.wait_for(lambda: job_row(ops.engine, killed).sent >= 30, "sending to start")
    ops.kill_run(job_row(ops.engine, killed).lease_owner)  # the run that holds the job
    in_flight = recipient_counts(ops.engine, killed).get("sending", 0)
    ops.sandbox.configure(latency_ms=0)
    with scheduled_sweeps(ops):
        ended_rows = [ended(ops, job, SCHEDULE_WAIT_SECONDS) for job in (pending, killed)]
    return Unattended(*ended_rows, in_flight, since)


def _only_scheduled_sweeps_ran(ops: Ops, unattended: Unattended) -> None:
    """Every sweep run that started since the jobs were left was started by the schedule (the
    session's stack ran sweeps by hand before)."""
    sweeps = ops.runs_of("sweep/sweep", started_after=unattended.since)
    assert sweeps and all(r["auto_scheduled"] for r in sweeps)
    assert any(r["state"]["type"] == "COMPLETED" for r in sweeps)


def test_the_scheduled_sweep_starts_a_pending_job(ops, unattended):
    finished = unattended.pending
    assert (finished.status, finished.sent, finished.attempt) == ("completed", 120, 1)
    delivered = ops.delivered_psids("scheduled pickup")
    assert len(delivered) == len(set(delivered)) == 120
    _only_scheduled_sweeps_ran(ops, unattended)


def test_the_scheduled_sweep_takes_over_a_killed_run(ops, unattended):
    finished = unattended.killed
    assert finished.sent + finished.unknown == 300
    assert finished.unknown == unattended.in_flight_at_kill
    assert finished.attempt == 2
    delivered = ops.delivered_psids("scheduled takeover")
    assert len(delivered) == len(set(delivered)) >= finished.sent
    _only_scheduled_sweeps_ran(ops, unattended)


def test_a_shard_supervisor_killed_mid_job_is_recovered_by_the_sweep(ops):
    text = "supervisor killed"
    job = create_job(ops.engine, 2400, rate=150.0, text=text)
    # Killed on its second round, whatever it did in its first: a parent that sent its ranges
    # itself (no child run started in time, a loaded machine) can end on its second round.
    with scheduled_sweeps(ops):
        parent = ops.start(
            "send-job/send-job", {"job_id": str(job.id)}, env={CRASH_AT_ENV: "supervisor@2"}
        )
        finished = ended(ops, job.id, WAIT_SECONDS + SCHEDULE_WAIT_SECONDS)
    assert ops.api("GET", f"/flow_runs/{parent['id']}").json()["state"]["type"] == "CRASHED"
    assert finished.attempt >= 2  # a run the sweep started took the job over
    sent_once_within_the_bound(ops, job.id, text, 2400)


def test_a_child_run_killed_mid_range_is_replaced_without_duplicates(ops):
    text = "child killed"
    job = create_job(ops.engine, 2400, rate=150.0, text=text)
    ops.start("send-job/send-job", {"job_id": str(job.id)})

    def sending_child() -> str | None:
        with ops.engine.connect() as connection:
            return connection.execute(
                sa.text(
                    "SELECT lease_owner FROM send_job_shards WHERE job_id = :id "
                    "AND status = 'running' LIMIT 1"
                ),
                {"id": job.id},
            ).scalar()

    child = ops.wait_for(sending_child, "a child run sending")
    ops.wait_for(lambda: job_row(ops.engine, job.id).sent >= 200, "sending to start")
    ops.kill_run(child)
    ended(ops, job.id)  # the parent run starts the range again
    sent_once_within_the_bound(ops, job.id, text, 2400)


RACE_ROUNDS = 5


def test_job_runs_and_sweeps_started_at_once_send_a_job_once(ops):
    """4 ``pagecast job run``s and 2 ``pagecast sweep --once`` of one job at once, for 5 jobs at
    once: one run claims each job and sends every recipient once; every other process says why it
    sent nothing."""
    jobs = [
        (create_job(ops.engine, 200, rate=100.0, text=f"race {n}").id, f"race {n}")
        for n in range(RACE_ROUNDS)
    ]
    started = [
        (
            [spawn_pagecast(ops, "job", "run", str(job_id)) for _ in range(4)],
            [spawn_pagecast(ops, "sweep", "--once") for _ in range(2)],
        )
        for job_id, _ in jobs
    ]
    rounds = [
        (job_id, text, [finish(p) for p in runs], [finish(p) for p in sweeps])
        for (job_id, text), (runs, sweeps) in zip(jobs, started, strict=True)
    ]
    for run in runs_ended(ops, [job_id for job_id, *_ in rounds]):
        assert run["state"]["type"] == "COMPLETED"  # a sweep's run, whether it claimed or not
    for job_id, text, runs, sweeps in rounds:
        sent_once(ops, job_id, text, 200)
        not_sent_here = re.compile(
            rf"job {job_id} is (running: runner \S+ is sending it|completed: it has ended)"
        )
        for run in runs:
            if run.returncode == 0:
                assert "completed" in run.stdout, run.stdout
            else:
                assert run.returncode == 1 and not_sent_here.search(run.stderr), run.stderr
        for sweep in sweeps:
            assert sweep.returncode == 0, sweep.stderr
            lines = [line for line in sweep.stdout.splitlines() if str(job_id) in line]
            assert all(line.startswith(f"job {job_id} (due): send-job run ") for line in lines)


def _restart_server(ops: Ops) -> None:
    """SIGKILL the stack's Prefect server (its whole process group) and start it again on the
    same port and database; the worker and the warm runner stay."""
    os.killpg(ops.stack.server_pid, signal.SIGKILL)
    ops.wait_for(lambda: exited(ops.stack.server_pid), "the server to exit")
    time.sleep(3)  # down for a while: runs, tasks and the worker find no server
    home = ops.ledger.parent
    port = int(ops.stack.api_url.rsplit(":", 1)[1].split("/")[0])
    server = start_stack(home, port=port, database_url=ops.prefect_url, worker=False, env=ops.env)
    kept = {  # the worker and the warm runner stay
        name: getattr(ops.stack, name)
        for name in ("worker_pid", "worker_started", "runner_pid", "runner_started")
    }
    ops.stack = Stack(**asdict(server) | kept)
    (home / STACK_FILE).write_text(json.dumps(asdict(ops.stack)))


def test_a_prefect_server_killed_mid_run_and_restarted_the_job_still_finishes_once(ops):
    text = "server killed"
    job = create_job(ops.engine, 1500, rate=100.0, text=text)
    ops.start("send-job/send-job", {"job_id": str(job.id)})
    ops.wait_for(lambda: len(ops.delivered_psids(text)) >= 200, "sending to start")
    _restart_server(ops)
    ended(ops, job.id)
    sent_once(ops, job.id, text, 1500)


@pytest.fixture(scope="module")
def dead_worker(ops):
    """The worker process is gone (a worker host went down); the server still counts it online
    until three of its heartbeat intervals have passed."""
    os.killpg(ops.stack.worker_pid, signal.SIGKILL)
    ops.wait_for(lambda: exited(ops.stack.worker_pid), "the worker to exit")
    return ops


@pytest.fixture(scope="module")
def without_worker(dead_worker):
    """No worker at all: the dead one is forgotten by the server too."""
    ops = dead_worker
    for worker in ops.api("POST", "/work_pools/pagecast/workers/filter", json={}).json():
        ops.api("DELETE", f"/work_pools/pagecast/workers/{worker['name']}")
    return ops


def _job_run_sends_a_large_job_once(ops: Ops, text: str) -> uuid.UUID:
    """``pagecast job run`` of a job of two ranges: completed, every recipient reached once."""
    job = create_job(ops.engine, 1500, rate=300.0, text=text)
    result = ops.pagecast("job", "run", str(job.id), PAGECAST_CHILD_PICKUP_SECONDS="15")
    assert result.returncode == 0, result.stderr
    finished = job_row(ops.engine, job.id)
    assert (finished.status, finished.sent) == ("completed", 1500)
    delivered = ops.delivered_psids(text)
    assert len(delivered) == len(set(delivered)) == 1500
    return job.id


def test_child_runs_no_worker_starts_are_sent_by_the_jobs_own_run(dead_worker):
    job_id = _job_run_sends_a_large_job_once(dead_worker, "dead worker, large")
    children = dead_worker.send_job_runs(job_id)
    assert len(children) == 2 and all(r["state"]["type"] == "SCHEDULED" for r in children)


def test_without_a_worker_a_large_job_run_sends_every_range_itself(without_worker):
    job_id = _job_run_sends_a_large_job_once(without_worker, "no worker, large")
    assert without_worker.send_job_runs(job_id) == []  # no child run left waiting for a worker


def test_without_a_worker_submit_says_what_the_job_waits_for_and_a_sweep_sends_it(
    without_worker,
):
    ops = without_worker
    job = create_job(ops.engine, 50, text="no worker, submitted")
    submit = ops.pagecast("job", "submit", str(job.id))
    assert submit.returncode == 0, submit.stderr
    assert "the job waits for a worker on work pool 'pagecast'" in submit.stderr
    status = json.loads(ops.pagecast("job", "status", str(job.id), "--json").stdout)
    assert status["status"] == "pending"
    assert status["waiting_for"].startswith(
        "a worker on work pool 'pagecast' to start send-job run"
    )
    swept = ops.pagecast("sweep")
    assert swept.returncode == 0, swept.stderr
    lines = swept.stdout.splitlines()
    assert lines[0].endswith("in this process: no worker is online for work pool 'pagecast'")
    assert f"job {job.id} (due): sent here, completed: 50 sent" in swept.stdout
    assert job_row(ops.engine, job.id).waiting_for is None


def test_a_forked_job_run_outlives_the_warm_runner_that_forked_it(ops):
    """The warm runner stops mid-run (``make down``): its child sends the job to the end, and
    ``job run`` watches it to the end by its pid."""
    text = "runner stopped"
    job = create_job(ops.engine, 200, rate=20.0, text=text)
    run = spawn_pagecast(ops, "job", "run", str(job.id))
    try:
        ops.wait_for(lambda: job_row(ops.engine, job.id).sent >= 20, "sending to start")
        os.kill(ops.stack.runner_pid, signal.SIGTERM)
        ops.wait_for(lambda: exited(ops.stack.runner_pid), "the warm runner to stop")
        finished = finish(run)
    finally:  # as `make up` of the running stack does
        revived = revive_warm_runner(ops.ledger.parent, ops.env)
        ops.stack = Stack(**json.loads((ops.ledger.parent / STACK_FILE).read_text()))
    assert revived and is_same_process(ops.stack.runner_pid, ops.stack.runner_started)
    said = " ".join(finished.stderr.split())
    assert finished.returncode == 0, said
    assert "forked by the stack's warm runner" in said
    assert "the warm runner stopped before the flow run ended" in said
    sent_once(ops, job.id, text, 200)
