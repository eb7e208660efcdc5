"""What the benchmarks through Prefect share: a running stack (a Prefect server and a process
worker, both databases on embedded PostgreSQL) with the sandbox in a process of its own, jobs,
and figures read from the sandbox's ledger, which stamps every delivery as it arrives."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil
import sqlalchemy as sa

from deployments.local_stack import (
    PREFECT_PGDATA,
    PROJECT_DIR,
    Stack,
    embedded_prefect_server_url,
    prefect_database_url,
    start_stack,
    stop_stack,
)
from pagecast import db, repo
from pagecast.audience import recipients_from_psids
from pagecast.models import JobStatus, SendJob
from pagecast.sandbox_process import SandboxProcess, busiest, free_port, sandbox_process
from pagecast.validation import validate_message

TOKEN = "bench-token"
WAIT_SECONDS = 600.0


@dataclass
class Bench:
    home: Path
    env: dict[str, str]  # for pagecast and Prefect processes; PREFECT_API_URL is the stack's
    engine: sa.Engine
    sandbox: SandboxProcess
    ledger: Path
    stack: Stack

    def pagecast(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``pagecast *args`` in a process of its own, its output discarded."""
        return subprocess.Popen(
            [sys.executable, "-m", "pagecast", *args],
            cwd=PROJECT_DIR,
            env=env or self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def create_job(self, page_id: str, count: int, *, rate: float, concurrency: int) -> uuid.UUID:
        psids = [str(10**15 + i) for i in range(count)]
        request = repo.JobRequest(
            page_id=page_id,
            message=validate_message("Benchmark {first_name}", "UPDATE", None),
            audience=recipients_from_psids(psids),
            concurrency=concurrency,
            rate_per_second=rate,
        )
        with db.session_scope(self.engine) as session:
            return repo.create_job(session, request=request).job.id

    def trigger(self, job_id: uuid.UUID) -> None:
        """Start a run of the send-job deployment for the job, as a web app or the UI's Run
        button does (``POST /deployments/{id}/create_flow_run``)."""
        api = self.stack.api_url
        deployment = httpx.get(f"{api}/deployments/name/send-job/send-job", timeout=30).json()
        httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": {"job_id": str(job_id)}},
            timeout=30,
        ).raise_for_status()

    def sent_all(self, job_id: uuid.UUID) -> SendJob:
        """The job once it has ended (polled from the database); ``RuntimeError`` unless it
        completed with every recipient sent, as it must on the benchmarks' faultless sandbox."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            with db.session_scope(self.engine) as session:
                job = repo.get_job(session, job_id=job_id)
            if job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
                if job.status != JobStatus.COMPLETED or job.sent != job.total:
                    raise RuntimeError(
                        f"job {job_id} ended {job.status} with {job.sent} of {job.total} sent: "
                        f"{job.last_error}"
                    )
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not end within {WAIT_SECONDS:.0f} s")

    def stamps(self, page_id: str) -> list[float]:
        """The wall-clock times of the page's deliveries, in order."""
        self.sandbox.stats()  # flushes the ledger
        with self.ledger.open(encoding="utf-8") as lines:
            records = (json.loads(line) for line in lines)
            return sorted(r["t"] for r in records if r["page_id"] == page_id)


@dataclass(frozen=True)
class Figures:
    """What the ledger shows of one contender's sends to its page."""

    count: int
    first_after: float  # seconds from the contender's start to its first delivery
    steady: float  # msg/s from the 10th to the 90th percentile of its deliveries
    end_to_end: float  # msg/s from its start to its last delivery
    busiest: int  # most deliveries in any one second

    @classmethod
    def of(cls, stamps: list[float], started: float) -> "Figures":
        if len(stamps) < 10:
            raise ValueError(f"only {len(stamps)} deliveries: nothing to measure")
        low, high = len(stamps) // 10, len(stamps) * 9 // 10
        return cls(
            count=len(stamps),
            first_after=stamps[0] - started,
            steady=(high - low) / (stamps[high] - stamps[low]),
            end_to_end=len(stamps) / (stamps[-1] - started),
            busiest=busiest(stamps, 1.0),
        )


async def bare_sends(
    url: str, page_ids: list[str], count: int, *, rate: float | None, concurrency: int
) -> None:
    """The bare client: one aiohttp session sending ``count`` messages over ``page_ids`` in turn,
    ``concurrency`` in flight at most, one started every 1/``rate`` s (as fast as it can with no
    rate); no retries, no records."""
    slots = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(page_id: str, psid: str) -> None:
            body = {"recipient": {"id": psid}, "messaging_type": "UPDATE", "message": {"text": "x"}}
            try:
                async with session.post(
                    f"{url}/v25.0/{page_id}/messages", json=body, headers=headers
                ) as response:
                    await response.read()
            finally:
                slots.release()

        loop = asyncio.get_running_loop()
        start, sends = loop.time(), []
        for i in range(count):
            await slots.acquire()
            if rate:
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            page_id = page_ids[i % len(page_ids)]
            sends.append(asyncio.create_task(one(page_id, str(10**15 + i))))
        await asyncio.gather(*sends)


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid`` and its descendants (the exited ones they reaped too)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def postmaster_pid(pgdata: Path) -> int:
    """The pid of the PostgreSQL running in ``pgdata``."""
    return int((pgdata / "postmaster.pid").read_text().split()[0])


@contextmanager
def running_bench(*sandbox_options: str) -> Iterator[Bench]:
    """A stack under a temporary home with every page's token, deployed by bootstrap; the sandbox
    takes ``sandbox_options``. Everything stops on exit."""
    home = Path(tempfile.mkdtemp(prefix="pagecast-bench-"))
    ledger = home / "ledger.jsonl"
    database_url = db.embedded_database_url(home)
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGECAST_", "PREFECT_"))}
    try:
        with sandbox_process(ledger, env, *sandbox_options) as sandbox:
            env |= {
                "PAGECAST_HOME": str(home),
                "PAGECAST_DATABASE_URL": database_url,
                "PAGECAST_GRAPH_API_URL": sandbox.url,
                "PAGECAST_PAGE_ACCESS_TOKEN": TOKEN,
                "PREFECT_HOME": str(home / "prefect"),
                "PREFECT_LOGGING_LEVEL": "WARNING",
            }
            prefect_server = embedded_prefect_server_url(home / PREFECT_PGDATA)
            stack = start_stack(
                home, port=free_port(), database_url=prefect_database_url(prefect_server), env=env
            )
            env["PREFECT_API_URL"] = stack.api_url
            subprocess.run(
                [sys.executable, "-m", "deployments.bootstrap"],
                cwd=PROJECT_DIR,
                env=env,
                check=True,
                capture_output=True,
            )
            yield Bench(home, env, engine, sandbox, ledger, stack)
    finally:
        stop_stack(home)
        engine.dispose()
        db.stop_embedded_database(home)
        shutil.rmtree(home, ignore_errors=True)
