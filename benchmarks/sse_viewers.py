"""Live progress viewers against the sender: 300/s jobs sent on one sandbox, alternately with
nobody watching and with 100 Server-Sent-Events viewers on ``pagecast serve`` (alone, watched,
watched, alone: the order evens out drift), in one run.

The sandbox, the server and the viewers each run in a process of their own; the jobs are sent by
the engine in this process. Prints each job's steady rate (from the sandbox's ledger), the ratio
of the watched jobs' mean to the others', and what the viewers received.

    python -m benchmarks.sse_viewers [--viewers 100] [--recipients 6000]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from benchmarks.harness import TOKEN, Figures
from benchmarks.webhook_load import PAGE, _server
from pagecast import apikeys, db, repo
from pagecast.audience import recipients_from_psids
from pagecast.runner import run_in_process
from pagecast.sandbox_process import sandbox_process
from pagecast.settings import Settings
from pagecast.validation import validate_message

RATE = 300.0


def _job(engine, count: int, text: str) -> uuid.UUID:
    request = repo.JobRequest(
        page_id=PAGE,
        message=validate_message(text, "UPDATE", None),
        audience=recipients_from_psids([str(10**15 + i) for i in range(count)]),
        concurrency=100,
        rate_per_second=RATE,
    )
    with db.session_scope(engine) as session:
        return repo.create_job(session, request=request).job.id


async def _watch(url: str, key: str, job_id: str, viewers: int) -> None:
    """``viewers`` SSE streams of the job until its end event; prints how many events they got."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=viewers + 1)

    async def one(client: httpx.AsyncClient) -> int:
        events = 0
        async with client.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers) as answer:
            async for line in answer.aiter_lines():
                events += line.startswith("event: ")
        return events

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        counts = await asyncio.gather(*(one(client) for _ in range(viewers)))
    print(json.dumps({"viewers": viewers, "events_min": min(counts), "events_max": max(counts)}))


def _send(engine, settings: Settings, job_id: uuid.UUID) -> float:
    started = time.time()
    asyncio.run(run_in_process(engine, settings, job_id=job_id, token_for=lambda _page: TOKEN))
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--recipients", type=int, default=6000)
    parser.add_argument("--watch", nargs=2, metavar=("URL", "JOB_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        url, job_id = args.watch
        asyncio.run(_watch(url, os.environ["PAGECAST_BENCH_KEY"], job_id, args.viewers))
        return
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), database_url=None)
        engine = db.ready_engine(settings)
        url = db.database_url(settings)
        with db.session_scope(engine) as session:
            _, key = apikeys.create_key(session, name="bench")
        env = os.environ | {"PAGECAST_DATABASE_URL": url, "PAGECAST_BENCH_KEY": key}
        ledger = Path(home) / "ledger.jsonl"
        with (
            _server(env, "pagecast", "serve") as webhook_url,
            sandbox_process(ledger, env, "--latency-ms", "50") as sandbox,
        ):
            api = webhook_url.removesuffix("/webhook") + "/v1"
            send = settings.model_copy(update={"database_url": url, "graph_api_url": sandbox.url})
            watch = [sys.executable, "-m", "benchmarks.sse_viewers", "--viewers", str(args.viewers)]
            started = {}
            for name in ("alone 1", "watched 1", "watched 2", "alone 2"):
                job = _job(engine, args.recipients, name)
                viewers = None
                if name.startswith("watched"):
                    viewers = subprocess.Popen([*watch, "--watch", api, str(job)], env=env)
                    time.sleep(2.0)  # every viewer connected before the job starts
                started[name] = _send(engine, send, job)
                if viewers is not None:
                    viewers.wait(60)
            sandbox.stats()
            records = [json.loads(line) for line in ledger.read_text().splitlines()]
        engine.dispose()
    steady = {}
    for name, at in started.items():
        figures = Figures.of(sorted(r["t"] for r in records if r["text"] == name), at)
        steady[name] = figures.steady
        print(f"{name:<10} steady {figures.steady:6.1f} msg/s   busiest second {figures.busiest}")
    watched = (steady["watched 1"] + steady["watched 2"]) / 2
    alone = (steady["alone 1"] + steady["alone 2"]) / 2
    print(f"steady rate with {args.viewers} viewers / without: {watched / alone:.3f}")


if __name__ == "__main__":
    main()
