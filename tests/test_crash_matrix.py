"""The crash matrix: a runner killed with SIGKILL at each named point of a send, then recovered by
``pagecast sweep`` alone. Every case ends with each recipient terminal, the counters equal to the
rows, no message delivered twice, every delivery recorded ``sent`` or ``unknown``, and ``unknown``
within the bound: concurrency + 0.5 s × rate.

Each case has its own database and page and runs real processes (``python -m pagecast sweep
--once``, no Prefect), all cases at once against one sandbox."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from pagecast import db
from pagecast.audience import recipients_from_psids
from pagecast.faults import CRASH_AT_ENV
from pagecast.sandbox import SandboxConfig, running_sandbox
from tests.engine import create_job, job_row, recipient_counts

LEASE_SECONDS = 5
RECOVERY_SECONDS = 120
TERMINAL = {"completed", "completed_with_errors"}


@dataclass(frozen=True)
class Case:
    """Kill the first sweep at ``point``; with ``then``, kill the recovering sweep there too."""

    point: str
    recipients: int = 400
    rate: float = 200.0
    concurrency: int = 30
    then: str | None = None
    nothing_marked: bool = False

    @property
    def bound(self) -> float:
        return self.concurrency + 0.5 * self.rate


CASES = [
    Case("before-claim", nothing_marked=True),
    Case("after-claim", nothing_marked=True),
    Case("chunk-claimed", nothing_marked=True),  # the first claim: no chunk marked yet
    Case("marked@3"),
    Case("answer@150"),  # mid-dispatch: other requests in flight
    Case("before-flush@4"),  # answers received, not yet recorded
    Case("after-flush@4"),
    Case("finishing", recipients=150),
    Case("answer@60", then="takeover"),  # the sweep that takes over dies mid-takeover
    Case("answer@30", recipients=120, rate=20.0, concurrency=50),  # the defaults
    Case("answer@700", recipients=1500, rate=300.0, concurrency=100),
]


def _sweep(env: dict[str, str], crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = env | ({CRASH_AT_ENV: crash_at} if crash_at else {})
    return subprocess.run(
        [sys.executable, "-m", "pagecast", "sweep", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RECOVERY_SECONDS,
    )


def _crash(env: dict[str, str], point: str) -> None:
    """Run sweeps with the crash point until one dies there (a takeover waits for the lease)."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while time.monotonic() < deadline:
        result = _sweep(env, point)
        if result.returncode == -9:
            return
        assert result.returncode == 0, result.stderr
        time.sleep(1)
    pytest.fail(f"no sweep reached {point}")


def _recover(engine: sa.Engine, env: dict[str, str], job_id) -> None:
    deadline = time.monotonic() + RECOVERY_SECONDS
    while job_row(engine, job_id).status not in TERMINAL:
        assert time.monotonic() < deadline, recipient_counts(engine, job_id)
        result = _sweep(env)
        assert result.returncode == 0, result.stderr
        time.sleep(1)


def _run_case(case: Case, index: int, database_url: str, base_env, deliveries) -> dict:
    engine = db.engine_for(database_url)
    page = f"77{index:04d}"
    psids = [f"{index + 1}{n:015d}" for n in range(case.recipients)]
    job = create_job(
        engine,
        0,
        page_id=page,
        audience=recipients_from_psids(psids),
        rate=case.rate,
        concurrency=case.concurrency,
        text=f"crash at {case.point}",
    )
    env = base_env | {
        "PAGECAST_DATABASE_URL": database_url,
        f"PAGECAST_PAGE_ACCESS_TOKEN__{page}": "crash-token",
    }
    _crash(env, case.point)
    killed = recipient_counts(engine, job.id)
    if case.then:
        _crash(env, case.then)
    _recover(engine, env, job.id)
    job = job_row(engine, job.id)
    with engine.connect() as connection:
        rows = dict(
            connection.execute(
                sa.text(
                    "SELECT psid, status || ':' || COALESCE(message_id, '') "
                    "FROM send_job_recipients WHERE job_id = :id"
                ),
                {"id": job.id},
            ).all()
        )
    engine.dispose()
    return {"job": job, "rows": rows, "killed": killed, "delivered": deliveries(page)}


def test_a_runner_killed_anywhere_is_recovered_by_the_sweep_exactly_once(tmp_path, fresh_database):
    ledger = tmp_path / "ledger.jsonl"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGECAST_", "PREFECT_"))}
    base_env |= {
        "PAGECAST_HOME": str(tmp_path / "home"),
        "PAGECAST_CHUNK_SIZE": "50",
        "PAGECAST_LEASE_SECONDS": str(LEASE_SECONDS),
        "PAGECAST_STALL_BACKOFF_SECONDS": "0",
    }
    urls = [fresh_database() for _ in CASES]
    with running_sandbox(SandboxConfig(latency_ms=50, ledger_path=ledger)) as (url, sandbox):
        base_env["PAGECAST_GRAPH_API_URL"] = url

        def deliveries(page: str) -> list[tuple[str, str]]:
            sandbox.stats()  # flushes the ledger
            records = [json.loads(line) for line in ledger.read_text().splitlines()]
            return [(r["psid"], r["message_id"]) for r in records if r["page_id"] == page]

        with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
            futures = [
                pool.submit(_run_case, case, i, urls[i], base_env, deliveries)
                for i, case in enumerate(CASES)
            ]
            results = [future.result() for future in futures]

    for case, result in zip(CASES, results, strict=True):
        job, rows, delivered = result["job"], result["rows"], result["delivered"]
        statuses = Counter(value.split(":")[0] for value in rows.values())
        label = f"{case.point}: {dict(statuses)}, at the kill {result['killed']}"
        assert job.status in TERMINAL, label
        assert set(statuses) <= {"sent", "unknown"}, label
        assert (job.sent, job.unknown, job.failed, job.skipped) == (
            statuses["sent"],
            statuses["unknown"],
            0,
            0,
        ), label
        times = Counter(psid for psid, _ in delivered)
        assert max(times.values()) == 1, f"{label}: delivered twice"
        sent = {
            psid: value.split(":")[1] for psid, value in rows.items() if value.startswith("sent")
        }
        assert sent.items() <= dict(delivered).items(), label  # every sent row was delivered once
        assert set(times) - set(sent) <= {p for p, v in rows.items() if v.startswith("unknown")}
        assert statuses["unknown"] <= case.bound, label
        if case.nothing_marked:
            assert statuses["unknown"] == 0, label
