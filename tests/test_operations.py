"""Operations end to end: a real `prefect server start` on a free loopback port, a process worker,
bootstrap, the sweep, SIGKILL takeover, REST triggers and the finish notification."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from deployments.local_stack import (
    PROJECT_DIR,
    Stack,
    prefect_database_url,
    start_stack,
    stop_stack,
)
from pagecast import db
from pagecast.faults import CRASH_AT_ENV
from pagecast.launch import STACK_FILE
from pagecast.sandbox import Sandbox, SandboxConfig, running_sandbox
from tests.conftest import _admin_execute
from tests.engine import (
    PAGE,
    assert_counters_match_rows,
    create_job,
    job_row,
    recipient_counts,
)

TOKEN = "ops-test-token"
LEASE_SECONDS = 6
WAIT_SECONDS = 240  # a loaded 2-core machine can take ~50 s to start a flow run process
SCHEDULE_WAIT_SECONDS = 150  # the sweep's cron fires every minute; a run then starts in seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        _Receiver.received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@dataclass
class Ops:
    stack: Stack
    engine: sa.Engine
    sandbox: Sandbox
    ledger: Path
    env: dict[str, str]
    prefect_url: str | None = None

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        for _ in range(5):  # the SQLite-backed test server answers 503 while it is busy
            response = httpx.request(method, f"{self.stack.api_url}{path}", timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1)
        response.raise_for_status()
        return response

    def deployment_id(self, name: str) -> str:
        return self.api("GET", f"/deployments/name/{name}").json()["id"]

    def start(
        self, name: str, parameters: dict, key: str | None = None, env: dict | None = None
    ) -> dict:
        body = {"parameters": parameters} | ({"idempotency_key": key} if key else {})
        body |= {"job_variables": {"env": env}} if env else {}
        return self.api(
            "POST", f"/deployments/{self.deployment_id(name)}/create_flow_run", json=body
        ).json()

    def runs_of(self, name: str) -> list[dict]:
        body = {"deployments": {"id": {"any_": [self.deployment_id(name)]}}}
        return self.api("POST", "/flow_runs/filter", json=body).json()

    def send_job_runs(self, job_id) -> list[dict]:
        return [
            r
            for r in self.runs_of("send-job/send-job")
            if r["parameters"].get("job_id") == str(job_id)
        ]

    def wait_for(self, predicate, what: str, timeout: float = WAIT_SECONDS):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def pagecast(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pagecast", *args],
            cwd=PROJECT_DIR,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def kill_run(self, flow_run_id: str) -> None:
        """SIGKILL the process of a flow run (its runner dies mid-job)."""
        pid = self.wait_for(
            lambda: self.api("GET", f"/flow_runs/{flow_run_id}").json().get("infrastructure_pid"),
            "the run's pid",
        )
        os.kill(int(str(pid).rsplit(":", 1)[-1]), signal.SIGKILL)

    def delivered_psids(self, text: str) -> list[str]:
        """PSIDs the sandbox delivered ``text`` to, once per delivery."""
        self.sandbox.stats()
        records = [json.loads(line) for line in self.ledger.read_text().splitlines()]
        return [r["psid"] for r in records if r["text"] == text]


def _bootstrap(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.bootstrap"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def ops(tmp_path_factory, server_url, template_database):
    home = tmp_path_factory.mktemp("ops-home")
    name = f"pagecast_ops_{uuid.uuid4().hex[:8]}"
    _admin_execute(server_url, f"CREATE DATABASE {name} TEMPLATE {template_database}")
    database_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    ledger = home / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=ledger)) as (sandbox_url, sandbox):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGECAST_", "PREFECT_"))}
        env |= {
            "PAGECAST_HOME": str(home),
            "PAGECAST_DATABASE_URL": database_url,
            "PAGECAST_GRAPH_API_URL": sandbox_url,
            f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}": TOKEN,
            "PAGECAST_LEASE_SECONDS": str(LEASE_SECONDS),
            "PAGECAST_CHUNK_SIZE": "50",
            "PAGECAST_SHARD_SIZE": "1000",
            "PAGECAST_NOTIFY_URL": f"http://127.0.0.1:{receiver.server_port}/hook",
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        prefect_url = prefect_database_url(server_url, f"prefect_{name}")  # None: SQLite
        stack = start_stack(home, port=_free_port(), database_url=prefect_url, env=env)
        env["PREFECT_API_URL"] = stack.api_url
        try:
            first = _bootstrap(env)
            assert first.returncode == 0, first.stdout + first.stderr
            yield Ops(stack, db.engine_for(database_url), sandbox, ledger, env, prefect_url)
        finally:
            stop_stack(home)
            errors = _server_errors(home)
            receiver.shutdown()
            db.engine_for(database_url).dispose()
            _admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            _admin_execute(server_url, f"DROP DATABASE IF EXISTS prefect_{name} WITH (FORCE)")
        assert not errors, "the Prefect server logged errors:\n" + "\n".join(errors)


_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")
# Prefect 3.8 on SQLite (the stack's database when the session's server is the embedded one, which
# lacks pg_trgm) logs write conflicts between its own services as ERRORs (a deferred transaction
# that cannot take the write lock; PrefectHQ/prefect#23051, #19771). They are load, not a broken
# dependency, and Prefect retries them; when its event persister runs out of retries it drops the
# batch, and its last retry fails on the batch's half-written rows (NOT NULL events.occurred); while
# connections wait on the write lock, a request may find the server's pool of 15 taken.
# Every other ERROR fails the suite.
SQLITE_CONTENTION = (
    "sqlite3.OperationalError: database is locked",
    "event_persister - Max flush retries",
    "QueuePool limit of size 5 overflow 10 reached",
)


def _server_errors(home: Path) -> list[str]:
    """ERROR records of the Prefect server's log (a record runs until the next timestamped line):
    an incompatible dependency, such as a scheduler that fails every minute, shows up here before
    any user sees it."""
    records: list[list[str]] = []
    for line in (home / "logs" / "prefect-server.log").read_text().splitlines():
        if _LOG_RECORD.match(line):
            records.append([line])
        elif records:
            records[-1].append(line)
    return [
        "\n".join(record)
        for record in records
        if "| ERROR" in record[0]
        and not any(sign in line for line in record for sign in SQLITE_CONTENTION)
    ]


def test_the_log_scan_fails_on_a_broken_scheduler_but_not_on_sqlite_contention(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "prefect-server.log").write_text(
        "10:00:00.000 | INFO    | prefect.server - started\n"
        "10:00:01.000 | ERROR   | docket.dependencies - mark_work_queues_ready\n"
        "Traceback (most recent call last):\n"
        "sqlite3.OperationalError: database is locked\n"
        "10:01:00.000 | ERROR   | prefect.server.services.scheduler - schedule_deployments\n"
        "Traceback (most recent call last):\n"
        "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\n"
    )
    (error,) = _server_errors(tmp_path)
    assert "schedule_deployments" in error and "bulk DML" in error


@dataclass
class Unattended:
    """Jobs left for the scheduled sweep alone: one pending, one whose runner was killed."""

    pending: uuid.UUID
    killed: uuid.UUID
    in_flight_at_kill: int


@pytest.fixture(scope="module")
def unattended(ops) -> Unattended:
    pending = create_job(ops.engine, 120, text="scheduled pickup").id
    ops.sandbox.config.latency_ms = 300
    killed = create_job(ops.engine, 300, rate=40.0, concurrency=20, text="scheduled takeover").id
    ops.start("send-job/send-job", {"job_id": str(killed)})
    ops.wait_for(lambda: job_row(ops.engine, killed).sent >= 30, "sending to start")
    ops.kill_run(job_row(ops.engine, killed).lease_owner)  # the run that holds the job
    in_flight = recipient_counts(ops.engine, killed).get("sending", 0)
    ops.sandbox.config.latency_ms = 0
    return Unattended(pending, killed, in_flight)


def _ended(ops: Ops, job_id: uuid.UUID, timeout: float = WAIT_SECONDS):
    return ops.wait_for(
        lambda: (
            (j := job_row(ops.engine, job_id)).status in ("completed", "completed_with_errors")
            and j
        ),
        f"job {job_id} to end",
        timeout,
    )


def _only_scheduled_sweeps_ran(ops: Ops) -> None:
    sweeps = ops.runs_of("sweep/sweep")
    assert sweeps and all(r["auto_scheduled"] for r in sweeps)
    assert any(r["state"]["type"] == "COMPLETED" for r in sweeps)


def test_the_scheduled_sweep_starts_a_pending_job(ops, unattended):
    finished = _ended(ops, unattended.pending, SCHEDULE_WAIT_SECONDS)
    assert (finished.status, finished.sent, finished.attempt) == ("completed", 120, 1)
    delivered = ops.delivered_psids("scheduled pickup")
    assert len(delivered) == len(set(delivered)) == 120
    _only_scheduled_sweeps_ran(ops)


def test_the_scheduled_sweep_takes_over_a_killed_run(ops, unattended):
    finished = _ended(ops, unattended.killed, SCHEDULE_WAIT_SECONDS)
    assert finished.sent + finished.unknown == 300
    assert finished.unknown == unattended.in_flight_at_kill
    assert finished.attempt == 2
    delivered = ops.delivered_psids("scheduled takeover")
    assert len(delivered) == len(set(delivered)) >= finished.sent
    _only_scheduled_sweeps_ran(ops)


def test_bootstrap_is_idempotent_and_deploys_everything(ops):
    again = _bootstrap(ops.env)
    assert again.returncode == 0, again.stdout + again.stderr
    deployments = {d["name"]: d for d in ops.api("POST", "/deployments/filter", json={}).json()}
    assert set(deployments) >= {"send-job", "broadcast", "sweep", "retry-failed"}
    sweep = deployments["sweep"]
    assert [s["schedule"]["cron"] for s in sweep["schedules"]] == ["* * * * *"]
    assert sweep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert all(d["work_pool_name"] == "pagecast" for d in deployments.values())
    schema = deployments["broadcast"]["parameter_openapi_schema"]["properties"]
    assert schema["text"]["maxLength"] == 2000 and schema["page_id"]["pattern"]
    limits = ops.api("POST", "/concurrency_limits/filter", json={}).json()
    assert any(limit["tag"] == "pagecast-send" for limit in limits)
    secrets = ops.api("POST", "/block_documents/filter", json={}).json()
    assert any(b["name"] == f"pagecast-page-token-{PAGE}" for b in secrets)


def test_sweep_starts_a_pending_job_once(ops):
    job = create_job(ops.engine, 120, text="swept")
    ops.start("sweep/sweep", {})
    ops.start("sweep/sweep", {})
    assert _ended(ops, job.id).attempt == 1  # claimed once, whatever runs were started
    delivered = ops.delivered_psids("swept")
    assert len(delivered) == len(set(delivered)) == 120


def test_cancelling_the_flow_run_cancels_the_job(ops):
    ops.sandbox.config.latency_ms = 100
    job = create_job(ops.engine, 300, rate=20.0, text="cancelled run")
    ops.start("send-job/send-job", {"job_id": str(job.id)})
    ops.wait_for(lambda: job_row(ops.engine, job.id).sent >= 10, "sending to start")
    ops.api(
        "POST",
        f"/flow_runs/{job_row(ops.engine, job.id).lease_owner}/set_state",  # the holding run
        json={"state": {"type": "CANCELLING"}, "force": True},
    )
    finished = ops.wait_for(
        lambda: (j := job_row(ops.engine, job.id)).status == "cancelled" and j,
        "the job to be cancelled",
    )
    ops.sandbox.config.latency_ms = 0
    assert finished.sent < 300
    assert finished.sent + finished.unknown + finished.skipped == 300
    assert len(ops.delivered_psids("cancelled run")) == len(
        set(ops.delivered_psids("cancelled run"))
    )


def _ranges_sent_by_children(ops: Ops, job_id: uuid.UUID) -> list[int]:
    """The ranges of the job's child runs, a range once per run: a range still unclaimed when the
    launch period turns gets one more run, and the job's own runs are left out (a scheduled sweep
    may start one more that finds the job claimed)."""
    runs = ops.send_job_runs(job_id)
    return sorted(
        r["parameters"]["shard"] for r in runs if r["parameters"].get("shard") is not None
    )


def test_a_large_job_is_sent_by_child_runs_and_a_retry_resends_its_failures(ops):
    job = create_job(ops.engine, 2400, rate=300.0, text="sharded")
    failing = [str(10**15 + 7), str(10**15 + 2300)]  # in the first and the last range
    ops.sandbox.config.fail_psids = dict.fromkeys(failing, "1")
    try:
        ops.start("send-job/send-job", {"job_id": str(job.id)})
        first = _ended(ops, job.id)
    finally:
        ops.sandbox.config.fail_psids = {}
    assert (first.status, first.sent, first.failed) == ("completed_with_errors", 2398, 2)
    before = _ranges_sent_by_children(ops, job.id)
    assert (first.attempt, set(before)) == (1, {0, 1, 2})
    retry = ops.pagecast("job", "retry", str(job.id), "--no-run")
    assert retry.returncode == 0, retry.stderr
    assert "re-queued 2 failed" in retry.stderr
    submit = ops.pagecast("job", "submit", str(job.id))
    assert submit.returncode == 0, submit.stderr
    finished = ops.wait_for(
        lambda: (j := job_row(ops.engine, job.id)).status == "completed" and j, "the retry"
    )
    after = Counter(_ranges_sent_by_children(ops, job.id)) - Counter(before)
    assert (finished.attempt, set(after)) == (2, {0, 2})  # only the ranges that had failures
    delivered = ops.delivered_psids("sharded")
    assert finished.sent == len(delivered) == len(set(delivered)) == 2400
    assert ops.sandbox.stats()["pages"][PAGE]["max_per_second"] <= 300


def _sent_once_within_the_bound(ops: Ops, job_id: uuid.UUID, text: str, total: int) -> None:
    job = job_row(ops.engine, job_id)
    counts = recipient_counts(ops.engine, job_id)
    assert set(counts) <= {"sent", "unknown"}
    assert (job.sent, job.unknown) == (counts.get("sent", 0), counts.get("unknown", 0))
    assert job.unknown <= job.concurrency + 0.5 * job.rate_per_second
    delivered = ops.delivered_psids(text)
    assert len(delivered) == len(set(delivered)) and job.sent <= len(delivered) <= total


def test_a_shard_supervisor_killed_mid_job_is_recovered_by_the_sweep(ops):
    text = "supervisor killed"
    job = create_job(ops.engine, 2400, rate=150.0, text=text)
    parent = ops.start(
        "send-job/send-job", {"job_id": str(job.id)}, env={CRASH_AT_ENV: "supervisor@3"}
    )
    finished = _ended(ops, job.id, WAIT_SECONDS + SCHEDULE_WAIT_SECONDS)
    assert ops.api("GET", f"/flow_runs/{parent['id']}").json()["state"]["type"] == "CRASHED"
    assert finished.attempt >= 2  # a run the sweep started took the job over
    _sent_once_within_the_bound(ops, job.id, text, 2400)


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
    _ended(ops, job.id, WAIT_SECONDS + SCHEDULE_WAIT_SECONDS)
    _sent_once_within_the_bound(ops, job.id, text, 2400)


def test_broadcast_over_rest_with_an_idempotency_key(ops):
    parameters = {
        "page_id": PAGE,
        "text": "REST {first_name}",
        "psids": "5001\n5002\n5003",
        "idempotency_key": "rest-1",
    }
    first = ops.start("broadcast/broadcast", parameters, key="broadcast-rest-1")
    second = ops.start("broadcast/broadcast", parameters, key="broadcast-rest-1")
    assert first["id"] == second["id"]
    ops.wait_for(
        lambda: ops.api("GET", f"/flow_runs/{first['id']}").json()["state"]["type"] == "COMPLETED",
        "the broadcast run",
    )
    with ops.engine.connect() as connection:
        jobs = connection.execute(
            sa.text("SELECT total, status FROM send_jobs WHERE idempotency_key = 'rest-1'")
        ).all()
    assert jobs == [(3, "completed")]


def test_bad_broadcast_values_are_rejected_before_anything_is_written(ops):
    """Each bad value is refused by the REST API (the deployment's parameter schema: HTTP 409) or
    fails its run (pagecast's validation in the flow); no row is written either way."""
    cases = [  # parameters over {page_id, psids: "1"}, and how they may be rejected
        ({"text": "x" * 2001}, {"refused"}),
        # 1,001 emoji fit the schema (code points), not pagecast's rule (2,002 UTF-16 units)
        ({"text": "😀" * 1001}, {"failed"}),
        ({"text": "Hi {nick}"}, {"failed"}),
        ({"text": "hi", "rate_per_second": 0}, {"refused"}),
        ({"text": "hi", "rate_per_second": float("inf")}, {"refused"}),
        # NaN passes a JSON schema's bounds (every comparison is false): the run then fails
        ({"text": "hi", "rate_per_second": float("nan")}, {"refused", "failed"}),
        ({"text": "hi", "concurrency": 0}, {"refused"}),
        ({"text": "hi", "concurrency": 100_000}, {"refused"}),
        ({"text": "hi", "idempotency_key": "k" * 10_240}, {"refused"}),
        ({"text": "hi", "tag": "HUMAN_AGENT"}, {"failed"}),
        ({"text": "hi", "psids": "1\n0002"}, {"failed"}),
    ]

    def rows() -> list[int]:
        with ops.engine.connect() as connection:
            return [
                connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
                for table in ("send_jobs", "send_job_recipients", "contacts")
            ]

    def submit(parameters: dict) -> str | dict:
        """'refused', or the flow run; raw JSON carries NaN and Infinity, which httpx refuses."""
        body = json.dumps({"parameters": {"page_id": PAGE, "psids": "1"} | parameters})
        try:
            return ops.api(
                "POST",
                f"/deployments/{ops.deployment_id('broadcast/broadcast')}/create_flow_run",
                content=body,
                headers={"content-type": "application/json"},
            ).json()
        except httpx.HTTPStatusError as refused:
            assert refused.response.status_code == 409, refused.response.text
            return "refused"

    def final_state(run: dict) -> str:
        def ended() -> str | None:
            state = ops.api("GET", f"/flow_runs/{run['id']}").json()["state"]["type"]
            return state.lower() if state in ("FAILED", "CRASHED", "COMPLETED") else None

        return ops.wait_for(ended, "the invalid broadcast to end")

    before = rows()
    outcomes = [submit(parameters) for parameters, _ in cases]  # runs end side by side
    for (parameters, allowed), outcome in zip(cases, outcomes, strict=True):
        how = outcome if outcome == "refused" else final_state(outcome)
        assert how in allowed, (parameters, how)
    assert rows() == before


def test_finished_jobs_notify_the_webhook(ops):
    job = create_job(ops.engine, 10, text="notify")
    ops.start("send-job/send-job", {"job_id": str(job.id)})
    summary = ops.wait_for(
        lambda: next((r for r in _Receiver.received if str(job.id) in json.dumps(r)), None),
        "the webhook",
    )
    assert "ended completed: 10 sent" in summary["summary"]


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PAGECAST_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
def test_broadcast_form_in_the_prefect_ui(ops, tmp_path):
    from playwright.sync_api import sync_playwright

    deployment = ops.deployment_id("broadcast/broadcast")
    psids = "8001\n8002\n8003\n8004"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(
            f"{ops.stack.ui_url}/deployments/deployment/{deployment}/run", wait_until="networkidle"
        )
        fields = page.locator("textarea")
        fields.nth(0).fill(PAGE)
        fields.nth(1).fill("Hi {first_name}, from the UI")
        fields.nth(2).fill(psids)
        page.screenshot(path=tmp_path / "broadcast-form.png", full_page=True)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(
            re.compile(rf".*/deployments/deployment/{deployment}(\?.*)?$"), timeout=120_000
        )
        browser.close()
    run = ops.wait_for(
        lambda: next(
            (
                r
                for r in ops.runs_of("broadcast/broadcast")
                if r["parameters"].get("psids") == psids
            ),
            None,
        ),
        "the run the form created",
    )
    ops.wait_for(
        lambda: ops.api("GET", f"/flow_runs/{run['id']}").json()["state"]["type"] == "COMPLETED",
        "the form's run to complete",
    )
    with ops.engine.connect() as connection:
        job = connection.execute(
            sa.text(
                "SELECT total, sent, status FROM send_jobs WHERE text = 'Hi {first_name}, from the UI'"
            )
        ).one()
    assert tuple(job) == (4, 4, "completed")
    assert (tmp_path / "broadcast-form.png").stat().st_size > 10_000


def _spawn_pagecast(ops: Ops, *args: str, **env: str) -> subprocess.Popen[str]:
    """``pagecast ARGS`` against the stack, started and not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "pagecast", *args],
        cwd=PROJECT_DIR,
        env=ops.env | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=WAIT_SECONDS)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _runs_ended(ops: Ops, job_ids: list[uuid.UUID]) -> list[dict]:
    """Every send-job deployment run of the jobs, once all of them have ended."""
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    return ops.wait_for(
        lambda: (
            (runs := [r for job_id in job_ids for r in ops.send_job_runs(job_id)])
            and all(r["state"]["type"] in final for r in runs)
            and runs
        ),
        "the send-job runs to end",
    )


def _sent_once(ops: Ops, job_id: uuid.UUID, text: str, total: int) -> None:
    """The job completed after one claim, every recipient delivered once, counters = rows."""
    job = job_row(ops.engine, job_id)
    assert (job.status, job.sent, job.attempt) == ("completed", total, 1)
    assert_counters_match_rows(ops.engine, job_id)
    delivered = ops.delivered_psids(text)
    assert len(delivered) == len(set(delivered)) == total


RACE_ROUNDS = 5
LOAD_RATE = 50.0
LOAD_PAGES = {str(100200400 + n): 2000 for n in range(10)} | {"100200410": 200}
# One chunk task of 500 per run: eleven runs of four 200-recipient chunks keep ~40 tasks polling for
# the 16 slots of the pagecast-send tag limit, which a SQLite-backed server (the test stack's: the
# embedded PostgreSQL lacks pg_trgm) serves too slowly; on PostgreSQL the defaults pass.
LOAD_SETTINGS = {
    "PAGECAST_CHUNK_SIZE": "500",
    "PAGECAST_PARALLEL_CHUNKS": "1",
    "PAGECAST_SHARD_SIZE": "50000",
}


def test_job_runs_and_sweeps_started_at_once_send_a_job_once(ops):
    """4 ``pagecast job run``s and 2 ``pagecast sweep --once`` of one job at once, 5 times: one
    run claims it and sends every recipient once; every other process says why it sent nothing."""
    rounds = []
    for round_ in range(RACE_ROUNDS):
        text = f"race {round_}"
        job = create_job(ops.engine, 200, rate=100.0, text=text)
        runs = [_spawn_pagecast(ops, "job", "run", str(job.id)) for _ in range(4)]
        sweeps = [_spawn_pagecast(ops, "sweep", "--once") for _ in range(2)]
        rounds.append((job.id, text, [_finish(p) for p in runs], [_finish(p) for p in sweeps]))
    for run in _runs_ended(ops, [job_id for job_id, *_ in rounds]):
        assert run["state"]["type"] == "COMPLETED"  # a sweep's run, whether it claimed or not
    for job_id, text, runs, sweeps in rounds:
        _sent_once(ops, job_id, text, 200)
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


SHARED_PAGE = "100200301"


@contextmanager
def _sweeps_paused(ops: Ops) -> Iterator[None]:
    """No scheduled sweep meanwhile (it would start pending jobs on the worker, whose environment
    has no token for other test pages than ``PAGE``)."""
    sweep = ops.deployment_id("sweep/sweep")
    ops.api("POST", f"/deployments/{sweep}/pause_deployment")
    try:
        yield
    finally:
        ops.api("POST", f"/deployments/{sweep}/resume_deployment")


@contextmanager
def _pool_paused(ops: Ops) -> Iterator[None]:
    """The work pool paused: its worker starts no run meanwhile."""
    ops.api("PATCH", "/work_pools/pagecast", json={"is_paused": True})
    try:
        yield
    finally:
        ops.api("PATCH", "/work_pools/pagecast", json={"is_paused": False})


def test_two_jobs_on_one_page_sent_at_once_share_its_rate(ops):
    """Two jobs of one page, each run by its own ``pagecast job run`` at the same time: the page's
    busiest second stays within 5 % of its rate, and both jobs send every recipient once."""
    rate = 100.0
    texts = ("shared page, first", "shared page, second")
    token = {f"PAGECAST_PAGE_ACCESS_TOKEN__{SHARED_PAGE}": TOKEN}
    with _sweeps_paused(ops):
        jobs = [create_job(ops.engine, 400, page_id=SHARED_PAGE, rate=rate, text=t) for t in texts]
        runs = [_spawn_pagecast(ops, "job", "run", str(job.id), **token) for job in jobs]
        for run in map(_finish, runs):
            assert run.returncode == 0, run.stderr
    for job, text in zip(jobs, texts, strict=True):
        _sent_once(ops, job.id, text, 400)
    page = ops.sandbox.stats()["pages"][SHARED_PAGE]
    assert page["delivered"] == 800 and page["max_per_second"] <= 1.05 * rate
    records = [json.loads(line) for line in ops.ledger.read_text().splitlines()]
    first, second = ([r["t"] for r in records if r["text"] == text] for text in texts)
    assert min(first) < max(second) and min(second) < max(first)  # the jobs sent at once


def _restart_server(ops: Ops) -> None:
    """SIGKILL the stack's Prefect server (its whole process group) and start it again on the
    same port and database; the worker stays."""
    os.killpg(ops.stack.server_pid, signal.SIGKILL)
    ops.wait_for(lambda: _gone(ops.stack.server_pid), "the server to exit")
    time.sleep(3)  # down for a while: runs, tasks and the worker find no server
    home = ops.ledger.parent
    port = int(ops.stack.api_url.rsplit(":", 1)[1].split("/")[0])
    server = start_stack(home, port=port, database_url=ops.prefect_url, worker=False, env=ops.env)
    ops.stack = Stack(**asdict(server) | {"worker_pid": ops.stack.worker_pid})
    (home / STACK_FILE).write_text(json.dumps(asdict(ops.stack)))


def test_a_prefect_server_killed_mid_run_and_restarted_the_job_still_finishes_once(ops):
    text = "server killed"
    job = create_job(ops.engine, 1500, rate=100.0, text=text)
    ops.start("send-job/send-job", {"job_id": str(job.id)})
    ops.wait_for(lambda: len(ops.delivered_psids(text)) >= 200, "sending to start")
    _restart_server(ops)
    _ended(ops, job.id)
    _sent_once(ops, job.id, text, 1500)


def _process_tree(root: int) -> set[int]:
    """``root`` and its descendants, from the parent pids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process exited meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


class PeakMemory(threading.Thread):
    """The peak resident memory (``VmHWM``, kB) of a process and of each of its descendants, with
    the Prefect flow run a descendant runs, sampled every 0.5 s while the ``with`` block runs."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_kb: dict[int, int] = {}
        self.flow_run: dict[int, str | None] = {}
        self._done = threading.Event()

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        while not self._done.wait(0.5):
            for pid in _process_tree(self.root):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                peak = re.search(r"VmHWM:\s+(\d+) kB", status)
                if peak:  # a zombie has none
                    self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), int(peak[1]))
                    self.flow_run[pid] = next(
                        (
                            v[21:].decode()
                            for v in environ
                            if v.startswith(b"PREFECT__FLOW_RUN_ID=")
                        ),
                        None,
                    )


@pytest.mark.load
def test_one_worker_sends_ten_jobs_on_ten_pages_at_their_rates(ops, record_property):
    """Ten jobs of 2,000 recipients on ten pages and one of 200, started at once through the
    send-job deployment and run by the stack's one worker: every job completes and reaches each
    recipient once, and each page's busiest second stays within 10 % of its rate. The peak memory
    of the worker and of every flow run is printed; a run of 2,000 recipients peaks within 1.5×
    of the run of 200."""
    jobs = {
        page: create_job(ops.engine, total, page_id=page, rate=LOAD_RATE, text=f"load {page}")
        for page, total in LOAD_PAGES.items()
    }
    env = LOAD_SETTINGS | {f"PAGECAST_PAGE_ACCESS_TOKEN__{page}": TOKEN for page in jobs}

    with _sweeps_paused(ops), PeakMemory(ops.stack.worker_pid) as memory:
        # the pool is paused while the runs are created: beside the processes of runs the worker
        # starts, the SQLite-backed server can take over 30 s to answer
        with _pool_paused(ops):
            for job in jobs.values():
                ops.start("send-job/send-job", {"job_id": str(job.id)}, env=env)
        started = time.monotonic()
        for job in jobs.values():
            _ended(ops, job.id)
        elapsed = time.monotonic() - started
    runs = _runs_ended(ops, [job.id for job in jobs.values()])
    assert all(r["state"]["type"] == "COMPLETED" for r in runs)

    total_of_job = {str(job.id): LOAD_PAGES[page] for page, job in jobs.items()}
    recipients_of_run = {r["id"]: total_of_job[r["parameters"]["job_id"]] for r in runs}
    role = {}
    for pid, run in memory.flow_run.items():
        if run in recipients_of_run:
            role[pid] = f"send-job run, {recipients_of_run[run]:,} recipients"
        else:
            role[pid] = (
                "another flow run"
                if run
                else "worker"
                if pid == ops.stack.worker_pid
                else "other process"
            )
    table = [f"{LOAD_RATE:g}/s per page, {sum(LOAD_PAGES.values()):,} messages in {elapsed:.0f} s"]
    table += [f"{'pid':>8}  {'role':<38} peak RSS MB"]
    table += [
        f"{pid:>8}  {role[pid]:<38} {memory.peak_kb[pid] / 1024:>11.0f}"
        for pid in sorted(role, key=lambda pid: (role[pid], pid))
    ]
    print("\n".join(table))
    record_property("peak_memory", "\n".join(table))
    pages = ops.sandbox.stats()["pages"]
    for page, job in jobs.items():
        _sent_once(ops, job.id, f"load {page}", LOAD_PAGES[page])
        # The sandbox stamps calls when its event loop gets to them, in a process sharing two
        # cores with eleven flow runs: its stalls bunch arrivals (54/s measured at 50/s; the
        # strict 1.05 × rate is held in tests/test_engine.py and the shared-page test above).
        assert pages[page]["max_per_second"] <= 1.1 * LOAD_RATE, (page, pages[page])

    def peak_of_runs(recipients: int) -> int:
        return max(
            memory.peak_kb[p] for p, r in role.items() if r.endswith(f" {recipients:,} recipients")
        )

    assert peak_of_runs(2000) <= 1.5 * peak_of_runs(200)


@pytest.fixture(scope="module")
def dead_worker(ops):
    """The worker process is gone (a worker host went down); the server still counts it online
    until three of its heartbeat intervals have passed."""
    os.killpg(ops.stack.worker_pid, signal.SIGKILL)
    ops.wait_for(lambda: _gone(ops.stack.worker_pid), "the worker to exit")
    return ops


@pytest.fixture(scope="module")
def without_worker(dead_worker):
    """No worker at all: the dead one is forgotten by the server too."""
    ops = dead_worker
    for worker in ops.api("POST", "/work_pools/pagecast/workers/filter", json={}).json():
        ops.api("DELETE", f"/work_pools/pagecast/workers/{worker['name']}")
    return ops


def _gone(pid: int) -> bool:
    """The process exited (a zombie until its parent, this test process, reaps it)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


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
