"""A running stack for end-to-end tests: a real `prefect server start` on a free loopback port
(its database on PostgreSQL), a process worker and bootstrap, and helpers to drive them."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
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
from pagecast.sandbox_process import SandboxProcess, free_port, sandbox_process
from tests.engine import (
    PAGE,
    admin_execute,
    assert_counters_match_rows,
    job_row,
    recipient_counts,
)

TOKEN = "ops-test-token"

LEASE_SECONDS = 6

WAIT_SECONDS = 240  # a loaded 2-core machine can take ~50 s to start a flow run process

SWEEP_INTERVAL_SECONDS = 15
SCHEDULE_WAIT_SECONDS = 120  # a scheduled sweep comes within 15 s; its run may take ~50 s to start


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        Receiver.received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@dataclass
class Ops:
    stack: Stack
    engine: sa.Engine
    sandbox: SandboxProcess
    ledger: Path
    env: dict[str, str]
    prefect_url: str = ""

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        for _ in range(5):  # a busy Prefect server answers 503
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

    def runs_of(self, name: str, started_after: datetime | None = None) -> list[dict]:
        body: dict = {"deployments": {"id": {"any_": [self.deployment_id(name)]}}}
        if started_after is not None:
            body["flow_runs"] = {"start_time": {"after_": started_after.isoformat()}}
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

    def pause_sweeps(self) -> None:
        """No sweep from here on, scheduled or in progress: one would start a test's pending jobs,
        and each is a flow-run process of ~4 CPU-s."""
        self.api("POST", f"/deployments/{self.deployment_id('sweep/sweep')}/pause_deployment")
        self.wait_for(
            lambda: (
                not [
                    r
                    for r in self.runs_of("sweep/sweep")
                    if r["state"]["type"] in ("PENDING", "RUNNING")
                ]
            ),
            "the sweeps in progress to end",
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


def bootstrap(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.bootstrap"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def running_stack(
    home: Path, server_url: str, template_database: str, prefect_server_url: str
) -> Iterator[Ops]:
    """A stack under ``home``: pagecast's database cloned from ``template_database``, Prefect's on
    ``prefect_server_url``'s server, the sandbox in a process of its own, the sweep's schedule
    paused (tests that rely on it run it with ``scheduled_sweeps``). On exit it fails on any ERROR
    the Prefect server logged."""
    name = f"pagecast_ops_{uuid.uuid4().hex[:8]}"
    admin_execute(server_url, f"CREATE DATABASE {name} TEMPLATE {template_database}")
    database_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    ledger = home / "ledger.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGECAST_", "PREFECT_"))}
    with sandbox_process(ledger, env) as sandbox:
        env |= {
            "PAGECAST_HOME": str(home),
            "PAGECAST_DATABASE_URL": database_url,
            "PAGECAST_GRAPH_API_URL": sandbox.url,
            f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}": TOKEN,
            "PAGECAST_PAGE_ACCESS_TOKEN": TOKEN,  # every other test page's
            "PAGECAST_LEASE_SECONDS": str(LEASE_SECONDS),
            "PAGECAST_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS),
            "PAGECAST_CHUNK_SIZE": "50",
            "PAGECAST_SHARD_SIZE": "1000",
            "PAGECAST_NOTIFY_URL": f"http://127.0.0.1:{receiver.server_port}/hook",
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        prefect_url = prefect_database_url(prefect_server_url, f"prefect_{name}")
        stack = start_stack(home, port=free_port(), database_url=prefect_url, env=env)
        env["PREFECT_API_URL"] = stack.api_url
        try:
            first = bootstrap(env)
            assert first.returncode == 0, first.stdout + first.stderr
            ops = Ops(stack, db.engine_for(database_url), sandbox, ledger, env, prefect_url)
            ops.pause_sweeps()
            yield ops
        finally:
            stop_stack(home)
            errors = server_errors(home)
            receiver.shutdown()
            db.engine_for(database_url).dispose()
            admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin_execute(
                prefect_server_url, f"DROP DATABASE IF EXISTS prefect_{name} WITH (FORCE)"
            )
        assert not errors, "the Prefect server logged errors:\n" + "\n".join(errors)


class SharedStack:
    """A running stack started by the first ``get`` and stopped by ``close`` (which fails on any
    ERROR its Prefect server logged)."""

    def __init__(self, start: Callable[[], AbstractContextManager[Ops]]) -> None:
        self._start = start
        self._exits = ExitStack()
        self._ops: Ops | None = None

    def get(self) -> Ops:
        if self._ops is None:
            self._ops = self._exits.enter_context(self._start())
        return self._ops

    def close(self) -> None:
        self._exits.close()


_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


def server_errors(home: Path) -> list[str]:
    """ERROR records of the Prefect server's log (a record runs until the next timestamped line):
    an incompatible dependency, such as a scheduler that fails every minute, shows up here before
    any user sees it."""
    records: list[list[str]] = []
    for line in (home / "logs" / "prefect-server.log").read_text().splitlines():
        if _LOG_RECORD.match(line):
            records.append([line])
        elif records:
            records[-1].append(line)
    return ["\n".join(record) for record in records if "| ERROR" in record[0]]


def ended(ops: Ops, job_id: uuid.UUID, timeout: float = WAIT_SECONDS):
    """The job's row once it completed; on a timeout the error shows the row and its runs."""
    try:
        return ops.wait_for(
            lambda: (
                (j := job_row(ops.engine, job_id)).status in ("completed", "completed_with_errors")
                and j
            ),
            f"job {job_id} to end",
            timeout,
        )
    except AssertionError as timeout_error:
        runs = [(r["name"], r["state"]["type"]) for r in ops.send_job_runs(job_id)]
        raise AssertionError(
            f"{timeout_error}: {job_row(ops.engine, job_id)}; runs {runs}"
        ) from None


def spawn_pagecast(ops: Ops, *args: str, **env: str) -> subprocess.Popen[str]:
    """``pagecast ARGS`` against the stack, started and not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "pagecast", *args],
        cwd=PROJECT_DIR,
        env=ops.env | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=WAIT_SECONDS)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def runs_ended(ops: Ops, job_ids: list[uuid.UUID]) -> list[dict]:
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


def sent_once(ops: Ops, job_id: uuid.UUID, text: str, total: int) -> None:
    """The job completed after one claim, every recipient delivered once, counters = rows."""
    job = job_row(ops.engine, job_id)
    assert (job.status, job.sent, job.attempt) == ("completed", total, 1)
    assert_counters_match_rows(ops.engine, job_id)
    delivered = ops.delivered_psids(text)
    assert len(delivered) == len(set(delivered)) == total


def sent_once_within_the_bound(ops: Ops, job_id: uuid.UUID, text: str, total: int) -> None:
    job = job_row(ops.engine, job_id)
    counts = recipient_counts(ops.engine, job_id)
    assert set(counts) <= {"sent", "unknown"}
    assert (job.sent, job.unknown) == (counts.get("sent", 0), counts.get("unknown", 0))
    assert job.unknown <= job.concurrency + 0.5 * job.rate_per_second
    delivered = ops.delivered_psids(text)
    assert len(delivered) == len(set(delivered)) and job.sent <= len(delivered) <= total


@contextmanager
def scheduled_sweeps(ops: Ops) -> Iterator[None]:
    """The sweep's schedule running meanwhile (the stack keeps it paused otherwise)."""
    ops.api("POST", f"/deployments/{ops.deployment_id('sweep/sweep')}/resume_deployment")
    try:
        yield
    finally:
        ops.pause_sweeps()


@contextmanager
def pool_paused(ops: Ops) -> Iterator[None]:
    """The work pool paused: its worker starts no run meanwhile."""
    ops.api("PATCH", "/work_pools/pagecast", json={"is_paused": True})
    try:
        yield
    finally:
        ops.api("PATCH", "/work_pools/pagecast", json={"is_paused": False})
