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
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from deployments.local_stack import PROJECT_DIR, Stack, start_stack, stop_stack
from pagecast import db
from pagecast.sandbox import Sandbox, SandboxConfig, running_sandbox
from tests.conftest import _admin_execute
from tests.engine import PAGE, create_job, job_row, recipient_counts

TOKEN = "ops-test-token"
LEASE_SECONDS = 6
WAIT_SECONDS = 120


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

    def start(self, name: str, parameters: dict, key: str | None = None) -> dict:
        body = {"parameters": parameters} | ({"idempotency_key": key} if key else {})
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
        stack = start_stack(home, port=_free_port(), env=env)
        env["PREFECT_API_URL"] = stack.api_url
        try:
            first = _bootstrap(env)
            assert first.returncode == 0, first.stdout + first.stderr
            yield Ops(stack, db.engine_for(database_url), sandbox, ledger, env)
        finally:
            stop_stack(home)
            receiver.shutdown()
            db.engine_for(database_url).dispose()
            _admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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
    ops.wait_for(lambda: job_row(ops.engine, job.id).status == "completed", "the swept job")
    assert len(ops.send_job_runs(job.id)) == 1
    delivered = ops.delivered_psids("swept")
    assert len(delivered) == len(set(delivered)) == 120


def test_killed_runner_is_taken_over_by_the_sweep(ops):
    ops.sandbox.config.latency_ms = 300
    job = create_job(ops.engine, 300, rate=40.0, concurrency=20, text="takeover")
    run = ops.start("send-job/send-job", {"job_id": str(job.id)})
    ops.wait_for(lambda: job_row(ops.engine, job.id).sent >= 30, "sending to start")
    pid = ops.wait_for(
        lambda: ops.api("GET", f"/flow_runs/{run['id']}").json().get("infrastructure_pid"),
        "the run's pid",
    )
    os.kill(int(str(pid).rsplit(":", 1)[-1]), signal.SIGKILL)
    in_flight = recipient_counts(ops.engine, job.id).get("sending", 0)
    ops.sandbox.config.latency_ms = 0
    time.sleep(LEASE_SECONDS + 1)
    ops.start("sweep/sweep", {})
    finished = ops.wait_for(
        lambda: (
            (j := job_row(ops.engine, job.id)).status in ("completed", "completed_with_errors")
            and j
        ),
        "the takeover to finish",
    )
    assert finished.sent + finished.unknown == 300
    assert finished.unknown == in_flight
    delivered = ops.delivered_psids("takeover")
    assert len(delivered) == len(set(delivered)) >= finished.sent
    assert len(ops.send_job_runs(job.id)) == 2


def test_cancelling_the_flow_run_cancels_the_job(ops):
    ops.sandbox.config.latency_ms = 100
    job = create_job(ops.engine, 300, rate=20.0, text="cancelled run")
    run = ops.start("send-job/send-job", {"job_id": str(job.id)})
    ops.wait_for(lambda: job_row(ops.engine, job.id).sent >= 10, "sending to start")
    ops.api(
        "POST",
        f"/flow_runs/{run['id']}/set_state",
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


def test_a_large_job_is_sent_by_child_runs_over_disjoint_ranges(ops):
    job = create_job(ops.engine, 2400, rate=300.0, text="sharded")
    ops.start("send-job/send-job", {"job_id": str(job.id)})
    finished = ops.wait_for(
        lambda: (j := job_row(ops.engine, job.id)).status == "completed" and j, "the sharded job"
    )
    runs = ops.send_job_runs(job.id)
    assert sorted(r["parameters"].get("shard", -1) for r in runs) == [-1, 0, 1, 2]
    delivered = ops.delivered_psids("sharded")
    assert finished.sent == len(delivered) == len(set(delivered)) == 2400
    assert ops.sandbox.stats()["pages"][PAGE]["max_per_second"] <= 300


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
    with pytest.raises(httpx.HTTPStatusError) as rejected:
        ops.start("broadcast/broadcast", {"page_id": PAGE, "text": "x" * 2001, "psids": "1"})
    assert rejected.value.response.status_code == 409
    run = ops.start("broadcast/broadcast", {"page_id": PAGE, "text": "Hi {nick}", "psids": "1"})
    ops.wait_for(
        lambda: ops.api("GET", f"/flow_runs/{run['id']}").json()["state"]["type"] == "FAILED",
        "the invalid broadcast to fail",
    )
    with ops.engine.connect() as connection:
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM send_jobs WHERE text = 'Hi {nick}'")
            ).scalar()
            == 0
        )


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
            re.compile(rf".*/deployments/deployment/{deployment}(\?.*)?$"), timeout=30_000
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
