"""Operations end to end on a running stack: bootstrap, the sweep, cancellation, child runs and
retries, REST and UI triggers, bad broadcasts, the finish notification, a shared page's rate and
ten jobs through one worker."""

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from deployments.local_stack import PROJECT_DIR
from pagecast.processes import is_same_process
from pagecast.sandbox_process import busiest
from pagecast.warm import WARM_RUNNER_SOCKET
from tests.engine import (
    PAGE,
    create_job,
    job_row,
)
from tests.stack import (
    SWEEP_INTERVAL_SECONDS,
    TOKEN,
    Ops,
    Receiver,
    bootstrap,
    ended,
    finish,
    pool_paused,
    runs_ended,
    sent_once,
    server_errors,
    spawn_pagecast,
)


def test_the_log_scan_finds_every_error_record(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "prefect-server.log").write_text(
        "10:00:00.000 | INFO    | prefect.server - started\n"
        "10:01:00.000 | ERROR   | prefect.server.services.scheduler - schedule_deployments\n"
        "Traceback (most recent call last):\n"
        "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\n"
        "10:01:01.000 | INFO    | prefect.server - still here\n"
    )
    (error,) = server_errors(tmp_path)
    assert "schedule_deployments" in error and "bulk DML" in error and "still here" not in error


def test_bootstrap_is_idempotent_and_deploys_everything(ops):
    again = bootstrap(ops.env)
    assert again.returncode == 0, again.stdout + again.stderr
    ops.pause_sweeps()  # deploying resumed the schedule
    deployments = {d["name"]: d for d in ops.api("POST", "/deployments/filter", json={}).json()}
    assert set(deployments) >= {"send-job", "broadcast", "sweep", "retry-failed"}
    sweep = deployments["sweep"]
    assert [s["schedule"]["interval"] for s in sweep["schedules"]] == [SWEEP_INTERVAL_SECONDS]
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
    assert ended(ops, job.id).attempt == 1  # claimed once, whatever runs were started
    delivered = ops.delivered_psids("swept")
    assert len(delivered) == len(set(delivered)) == 120


def test_cancelling_the_flow_run_cancels_the_job(ops):
    ops.sandbox.configure(latency_ms=100)
    try:
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
    finally:  # the next module shares the sandbox
        ops.sandbox.configure(latency_ms=0)
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
    ops.sandbox.configure(fail_psids=dict.fromkeys(failing, "1"))
    try:
        ops.start("send-job/send-job", {"job_id": str(job.id)})
        first = ended(ops, job.id)
    finally:
        ops.sandbox.configure(fail_psids={})
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
    # The sandbox stamps arrivals on a busy machine: 302 of 300 measured once, so 2 % headroom.
    assert ops.sandbox.stats()["pages"][PAGE]["max_per_second"] <= 1.02 * 300


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


def test_a_broadcast_dry_run_shows_its_preview_and_writes_nothing(ops):
    with ops.engine.connect() as connection:
        jobs_before = connection.execute(sa.text("SELECT count(*) FROM send_jobs")).scalar()
    parameters = {"page_id": PAGE, "text": "Preview {first_name}", "psids": "6001 6002 6002"}
    run = ops.start("broadcast/broadcast", parameters | {"dry_run": True})
    ops.wait_for(
        lambda: ops.api("GET", f"/flow_runs/{run['id']}").json()["state"]["type"] == "COMPLETED",
        "the dry run",
    )
    body = {"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "type": {"any_": ["table"]}}}
    (artifact,) = ops.api("POST", "/artifacts/filter", json=body).json()
    table = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    preview = {row["item"]: row["value"] for row in table}
    assert (preview["recipients"], preview["duplicates_removed"], preview["to_send"]) == (2, 1, 2)
    assert preview["sample 6001"] == "Preview "
    with ops.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM send_jobs")).scalar() == jobs_before
    assert not [p for p in ops.delivered_psids("Preview ") if p in ("6001", "6002")]


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
        lambda: next((r for r in Receiver.received if str(job.id) in json.dumps(r)), None),
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


def _job_run(ops: Ops, text: str) -> tuple[uuid.UUID, str]:
    """``pagecast job run`` of a new job of 100: sent once, no failure said; the job and what the
    command said on stderr."""
    job = create_job(ops.engine, 100, text=text)
    run = ops.pagecast("job", "run", str(job.id))
    said = " ".join(run.stderr.split())  # rich wraps lines at 80 columns
    assert run.returncode == 0 and "the flow run failed" not in said, said
    sent_once(ops, job.id, text, 100)
    return job.id, said


def _warm_runner_answers(ops: Ops) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(str(ops.ledger.parent / WARM_RUNNER_SOCKET)) == 0


def test_job_run_on_the_stack_is_forked_by_its_warm_runner(ops):
    job_id, said = _job_run(ops, "forked run")
    assert "the flow run is forked by the stack's warm runner" in said
    logs = ops.ledger.parent / "logs"
    assert f"job {job_id} ended completed" in (logs / f"send-job-{job_id}.log").read_text()
    assert not [log.name for log in logs.iterdir() if TOKEN in log.read_text(errors="replace")]


def test_the_warm_runner_leaves_a_changed_checkout_to_a_process_of_its_own(ops):
    module = PROJECT_DIR / "tasks" / "__init__.py"
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # within the second: pycs hold
    try:
        _, refused = _job_run(ops, "changed checkout")
        assert "the checkout changed since the warm runner imported it" in refused
        assert "the flow runs in a process of its own" in refused
        ops.wait_for(lambda: _warm_runner_answers(ops), "the runner to import the checkout again")
        assert is_same_process(ops.stack.runner_pid, ops.stack.runner_started)
        assert "forked by the stack's warm runner" in _job_run(ops, "changed checkout, again")[1]
    finally:  # the runner imports it once more, at the next run
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))


SHARED_PAGE = "100200301"


def test_two_jobs_on_one_page_sent_at_once_share_its_rate(ops):
    """Two jobs of one page, each run by its own ``pagecast job run`` at the same time: the page's
    busiest second stays within 5 % of its rate, and both jobs send every recipient once."""
    rate = 100.0
    texts = ("shared page, first", "shared page, second")
    jobs = [create_job(ops.engine, 400, page_id=SHARED_PAGE, rate=rate, text=t) for t in texts]
    runs = [spawn_pagecast(ops, "job", "run", str(job.id)) for job in jobs]
    for run in map(finish, runs):
        assert run.returncode == 0, run.stderr
    for job, text in zip(jobs, texts, strict=True):
        sent_once(ops, job.id, text, 400)
    page = ops.sandbox.stats()["pages"][SHARED_PAGE]
    assert page["delivered"] == 800 and page["max_per_second"] <= 1.05 * rate
    records = [json.loads(line) for line in ops.ledger.read_text().splitlines()]
    first, second = ([r["t"] for r in records if r["text"] == text] for text in texts)
    assert min(first) < max(second) and min(second) < max(first)  # the jobs sent at once


LOAD_RATE = 50.0

LOAD_PAGES = {str(100200400 + n): 2000 for n in range(10)} | {"100200410": 200}

# One flow run per job, chunks of 500 (the stack's small chunks and shards serve the other tests):
# eleven flow run processes on two cores, not thirty.
LOAD_SETTINGS = {
    "PAGECAST_CHUNK_SIZE": "500",
    "PAGECAST_PARALLEL_CHUNKS": "1",
    "PAGECAST_SHARD_SIZE": "50000",
}


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


def test_one_worker_sends_ten_jobs_on_ten_pages_at_their_rates(ops, record_property):
    """Ten jobs of 2,000 recipients on ten pages and one of 200, started at once through the
    send-job deployment and run by the stack's one worker: every job completes and reaches each
    recipient once, and each page's rate holds within 5 % (on average, and over any 10 s). The peak memory
    of the worker and of every flow run is printed; a run of 2,000 recipients peaks within 1.5×
    of the run of 200."""
    jobs = {
        page: create_job(ops.engine, total, page_id=page, rate=LOAD_RATE, text=f"load {page}")
        for page, total in LOAD_PAGES.items()
    }

    with PeakMemory(ops.stack.worker_pid) as memory:
        # the pool is paused while the runs are created: all eleven start together
        with pool_paused(ops):
            for job in jobs.values():
                ops.start("send-job/send-job", {"job_id": str(job.id)}, env=LOAD_SETTINGS)
        started = time.monotonic()
        for job in jobs.values():
            ended(ops, job.id)
        elapsed = time.monotonic() - started
    runs = runs_ended(ops, [job.id for job in jobs.values()])
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
    ops.sandbox.stats()  # flushes the ledger
    records = [json.loads(line) for line in ops.ledger.read_text().splitlines()]
    for page, job in jobs.items():
        sent_once(ops, job.id, f"load {page}", LOAD_PAGES[page])
        stamps = sorted(r["t"] for r in records if r["text"] == f"load {page}")
        assert (len(stamps) - 1) / (stamps[-1] - stamps[0]) <= 1.05 * LOAD_RATE, page
        # The sandbox stamps calls when its event loop gets to them, on two cores shared with
        # eleven flow runs and the other test worker: a stall of half a second moves that much
        # into the next second (22 then 66 at 50/s, on every page at once; busiest 5 s: 263),
        # so the busiest window is taken over 10 s here (488 measured; the strict 1.05 × rate
        # over 1 s is held in tests/test_engine.py and the shared-page test above).
        assert busiest(stamps, seconds=10.0) <= 1.05 * 10 * LOAD_RATE, page

    def peak_of_runs(recipients: int) -> int:
        return max(
            memory.peak_kb[p] for p, r in role.items() if r.endswith(f" {recipients:,} recipients")
        )

    assert peak_of_runs(2000) <= 1.5 * peak_of_runs(200)


def test_a_job_created_over_the_http_api_is_sent_by_the_worker(ops, monkeypatch, tmp_path):
    """POST /v1/jobs starts send-job on the running stack; the worker sends it, once."""
    from pagecast import apikeys, db
    from pagecast.server import create_server, serving
    from pagecast.settings import Settings

    monkeypatch.setenv("PREFECT_API_URL", ops.stack.api_url)
    settings = Settings(database_url=ops.env["PAGECAST_DATABASE_URL"], home=tmp_path)
    with db.session_scope(ops.engine) as session:
        _, key = apikeys.create_key(session, name="stack-test")
    text = "Sent over the API"
    body = {"page_id": PAGE, "text": text, "psids": [str(7100 + i) for i in range(40)]}
    headers = {"Authorization": f"Bearer {key}"}
    with serving(create_server(settings, ops.engine)) as url:
        answer = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
        assert answer.status_code == 201, answer.text
        job = answer.json()
        assert job["started"] is True, job
        job_id = uuid.UUID(job["id"])
        ops.wait_for(lambda: job_row(ops.engine, job_id).status == "completed", "the job's run")
    sent_once(ops, job_id, text, 40)
    (run,) = ops.send_job_runs(job_id)
    assert run["id"] == job["flow_run_id"]
