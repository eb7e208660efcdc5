"""Live progress viewers against the sender: a 300/s job sent twice on one sandbox, once with
nobody watching and once with 100 Server-Sent-Events viewers on ``pagecast serve``, in one run.

The sandbox, the server and the viewers each run in a process of their own; the job is sent by
the engine in this process. Prints both jobs' steady rates (from the sandbox's ledger), their
ratio, and what the viewers received.

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
    parser.add_argument(
        "--watch", nargs=3, metavar=("URL", "KEY", "JOB_ID"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.watch:
        asyncio.run(_watch(*args.watch, args.viewers))
        return
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), database_url=None)
        engine = db.ready_engine(settings)
        url = db.database_url(settings)
        env = os.environ | {"PAGECAST_DATABASE_URL": url}
        with db.session_scope(engine) as session:
            _, key = apikeys.create_key(session, name="bench")
        ledger = Path(home) / "ledger.jsonl"
        with (
            _server(env, "pagecast", "serve") as webhook_url,
            sandbox_process(ledger, env, "--latency-ms", "50") as sandbox,
        ):
            api = webhook_url.removesuffix("/webhook") + "/v1"
            send = settings.model_copy(update={"database_url": url, "graph_api_url": sandbox.url})
            alone = _job(engine, args.recipients, "alone")
            started_alone = _send(engine, send, alone)
            watched = _job(engine, args.recipients, "watched")
            watch = [sys.executable, "-m", "benchmarks.sse_viewers", "--viewers"]
            viewers = subprocess.Popen(
                [*watch, str(args.viewers), "--watch", api, key, str(watched)], env=env
            )
            time.sleep(2.0)  # every viewer connected before the job starts
            started_watched = _send(engine, send, watched)
            viewers.wait(60)
            sandbox.stats()
            records = [json.loads(line) for line in ledger.read_text().splitlines()]
        engine.dispose()
    figures = {
        name: Figures.of(sorted(r["t"] for r in records if r["text"] == name), started)
        for name, started in (("alone", started_alone), ("watched", started_watched))
    }
    for name, fig in figures.items():
        print(f"{name:<8} steady {fig.steady:6.1f} msg/s   busiest second {fig.busiest}")
    ratio = figures["watched"].steady / figures["alone"].steady
    print(f"steady rate with {args.viewers} viewers / without: {ratio:.3f}")


if __name__ == "__main__":
    main()
