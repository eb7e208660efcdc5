"""The webhook receiver under load: 1,000 events/s for 30 s while a job sends through the sandbox,
which posts that job's receipts to the same receiver.

Prints the receiver's answer times (50th/95th percentile) beside a reference receiver on the same
machine that only checks the signature and answers (no database), and checks that nothing was
lost or applied twice: every distinct event stored once, all applied, contacts = distinct
senders, the job's delivered count = its recipients with a delivery time.

    python -m benchmarks.webhook_load [--seconds 30] [--per-second 1000]
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from fastapi import FastAPI, Request, Response

from pagecast import db, repo
from pagecast.audience import recipients_from_psids
from pagecast.runner import run_in_process
from pagecast.sandbox_process import free_port, sandbox_process, wait_answering
from pagecast.settings import Settings
from pagecast.validation import validate_message
from pagecast.webhook_app import healthz
from pagecast.webhooks import SIGNATURE_HEADER, settled, signature, signature_valid

PAGE = "100200300"
_BATCH = 50
_REPLAYED = 0.05


@dataclass
class Flood:
    """What a flood posted: distinct events, replayed bodies, answer times (s) and statuses."""

    events: int = 0
    senders: set[str] = field(default_factory=set)
    replays: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, share: float) -> float:
        return statistics.quantiles(self.latencies, n=100)[int(share * 100) - 1]


def _body(rng: random.Random, serial: int, count: int) -> tuple[bytes, list[str]]:
    now = int(time.time() * 1000)
    senders = [str(9_000_000_000 + rng.randrange(20_000)) for _ in range(count)]
    items = [
        {
            "sender": {"id": psid},
            "recipient": {"id": PAGE},
            "timestamp": now,
            "message": {"mid": f"m_load_{serial}_{i}", "text": "hi"},
        }
        for i, psid in enumerate(senders)
    ]
    body = {"object": "page", "entry": [{"id": PAGE, "time": now, "messaging": items}]}
    return json.dumps(body).encode(), senders


async def flood(url: str, secret: str, *, seconds: float, per_second: int) -> Flood:
    """Post ``per_second`` message events a second for ``seconds``, in signed bodies of 50,
    each on its own schedule (answers are not awaited before the next post); a share of the
    bodies is posted a second time, as Meta redelivers."""
    result, rng = Flood(), random.Random(7)
    interval = _BATCH / per_second
    async with httpx.AsyncClient(timeout=30) as client:

        async def post(body: bytes) -> None:
            started = time.perf_counter()
            answer = await client.post(
                url, content=body, headers={SIGNATURE_HEADER: signature(secret, body)}
            )
            result.latencies.append(time.perf_counter() - started)
            result.statuses[answer.status_code] = result.statuses.get(answer.status_code, 0) + 1

        posts, start = [], time.perf_counter()
        for serial in range(int(seconds * per_second / _BATCH)):
            await asyncio.sleep(max(0.0, start + serial * interval - time.perf_counter()))
            body, senders = _body(rng, serial, _BATCH)
            result.events += len(senders)
            result.senders.update(senders)
            posts.append(asyncio.create_task(post(body)))
            if rng.random() < _REPLAYED:
                result.replays += 1
                posts.append(asyncio.create_task(post(body)))
        await asyncio.gather(*posts)
    return result


def reference_app(secret: str) -> FastAPI:
    """A receiver that checks the signature and answers, storing nothing: the floor."""
    app = FastAPI(openapi_url=None)
    app.get("/healthz")(healthz)

    @app.post("/webhook")
    async def receive(request: Request) -> Response:
        body = await request.body()
        ok = signature_valid(secret, body, request.headers.get(SIGNATURE_HEADER))
        json.loads(body)
        return Response(status_code=200 if ok else 403)

    return app


def lost_or_twice(engine: sa.Engine, flood_result: Flood) -> list[str]:
    """What breaks "none lost, none applied twice" (empty when nothing does)."""
    problems = []
    with engine.connect() as connection:
        stored, unapplied = connection.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE kind = 'message'), "
                "count(*) FILTER (WHERE applied_at IS NULL) FROM webhook_events"
            )
        ).one()
        contacts = connection.execute(
            sa.text("SELECT count(*) FROM contacts WHERE page_id = :page"), {"page": PAGE}
        ).scalar_one()
        miscounted = connection.execute(
            sa.text(
                "SELECT count(*) FROM send_jobs j WHERE delivered <> (SELECT count(*) FROM "
                "send_job_recipients r WHERE r.job_id = j.id AND delivered_at IS NOT NULL)"
            )
        ).scalar_one()
    if stored != flood_result.events:
        problems.append(f"{flood_result.events} distinct message events posted, {stored} stored")
    if unapplied:
        problems.append(f"{unapplied} events not applied")
    if contacts != len(flood_result.senders):
        problems.append(f"{len(flood_result.senders)} senders, {contacts} contacts")
    if miscounted:
        problems.append(f"{miscounted} jobs whose delivered count differs from their rows")
    return problems


async def load_while_sending(
    engine: sa.Engine,
    settings: Settings,
    *,
    receiver_url: str,
    secret: str,
    seconds: float,
    per_second: int,
    recipients: int,
) -> Flood:
    """Flood the receiver while a job of ``recipients`` sends at 300/s through the sandbox at
    ``settings.graph_api_url`` (which posts the job's receipts to the same receiver)."""
    job = _create_job(engine, recipients)
    flooding = asyncio.create_task(
        flood(receiver_url, secret, seconds=seconds, per_second=per_second)
    )
    await run_in_process(engine, settings, job_id=job, token_for=lambda _page: "load-token")
    return await flooding


def _create_job(engine: sa.Engine, count: int) -> uuid.UUID:
    request = repo.JobRequest(
        page_id=PAGE,
        message=validate_message("Hello {first_name}", "UPDATE", None),
        audience=recipients_from_psids([str(10**15 + i) for i in range(count)]),
        concurrency=100,
        rate_per_second=300.0,
    )
    with db.session_scope(engine) as session:
        return repo.create_job(session, request=request).job.id


def wait_settled(engine: sa.Engine, receipts_waiting: Callable[[], int], timeout: float) -> None:
    """Wait until the sandbox has posted every receipt and the receiver applied every event."""
    if not settled(engine, timeout=timeout, waiting_elsewhere=receipts_waiting):
        raise TimeoutError(f"receipts or events left after {timeout:g} s")


@contextmanager
def _server(env: dict[str, str], *command: str) -> Iterator[str]:
    """A receiver in a process of its own; yields its ``/webhook`` URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", *command, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(f"{url}/healthz", process, what=" ".join(command))
        yield f"{url}/webhook"
    finally:
        process.terminate()
        process.wait(10)


def reference_from_env() -> FastAPI:
    """The reference receiver for uvicorn's ``--factory``, its secret from the environment."""
    return reference_app(os.environ["PAGECAST_APP_SECRET"])


def _line(name: str, result: Flood) -> str:
    return (
        f"{name:<28} p50 {result.percentile(0.50) * 1000:6.1f} ms   "
        f"p95 {result.percentile(0.95) * 1000:6.1f} ms   answers {result.statuses}"
    )


async def _main(seconds: float, per_second: int) -> None:
    secret = "bench-app-secret"
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), database_url=None)  # its own embedded server
        engine = db.ready_engine(settings)
        url = db.database_url(settings)
        env = os.environ | {
            "PAGECAST_DATABASE_URL": url,
            "PAGECAST_APP_SECRET": secret,
            "PAGECAST_WEBHOOK_VERIFY_TOKEN": "bench",
        }
        with (
            _server(env, "pagecast", "webhook", "serve") as receiver,
            sandbox_process(
                Path(home) / "ledger.jsonl", env, "--latency-ms", "30", "--webhook-url", receiver
            ) as sandbox,
        ):
            send = settings.model_copy(update={"database_url": url, "graph_api_url": sandbox.url})
            product = await load_while_sending(
                engine,
                send,
                receiver_url=receiver,
                secret=secret,
                seconds=seconds,
                per_second=per_second,
                recipients=int(seconds * 250),
            )
            wait_settled(engine, lambda: sandbox.stats()["receipts"]["waiting"], 120)
        problems = lost_or_twice(engine, product)
        reference_command = ("uvicorn", "--factory", "benchmarks.webhook_load:reference_from_env")
        with _server(env, *reference_command, "--log-level", "warning") as bare:
            reference = await flood(bare, secret, seconds=seconds, per_second=per_second)
        engine.dispose()
    print(_line("pagecast webhook serve", product))
    print(_line("reference (no database)", reference))
    ratio = product.percentile(0.95) / reference.percentile(0.95)
    print(f"p95 ratio pagecast / reference: {ratio:.2f}")
    print("lost or applied twice: " + ("; ".join(problems) if problems else "none"))
    if problems:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--per-second", type=int, default=1000)
    args = parser.parse_args()
    print(f"webhook load: {args.per_second} events/s for {args.seconds:g} s while a job sends")
    asyncio.run(_main(args.seconds, args.per_second))


if __name__ == "__main__":
    main()
