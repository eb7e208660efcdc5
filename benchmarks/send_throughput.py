"""Send throughput: pagecast's engine vs a bare concurrent sender, on one sandbox, in one run.

    uv run python -m benchmarks.send_throughput [--recipients 10000] [--concurrency 100]
        [--latency-ms 50] [--rate 300]

The reference sends the same number of messages with the same client and concurrency but no
bookkeeping and no rate limit. pagecast holds the page's rate, so the printed ratios are achieved
rate / configured rate, and pagecast / reference.
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from pagecast import db, repo
from pagecast.audience import recipients_from_psids
from pagecast.graph import GraphClient
from pagecast.runner import run_in_process
from pagecast.sandbox import SandboxConfig, running_sandbox
from pagecast.settings import Settings
from pagecast.validation import validate_message

PAGE_ID = "100200300"


async def _reference(url: str, count: int, concurrency: int) -> float:
    slots = asyncio.Semaphore(concurrency)
    client = GraphClient(
        base_url=url, version="v25.0", token_for=lambda p: "t", concurrency=concurrency
    )

    async def one(index: int) -> None:
        async with slots:
            await client.send_text(
                page_id="999", psid=str(index), text="hi", messaging_type="UPDATE"
            )

    started = time.perf_counter()
    async with client:
        await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - started)


def _count_statements(engine: sa.Engine) -> list[int]:
    """A counter of the statements ``engine`` runs from now on (round trips to the database)."""
    count = [0]

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(*_args: object) -> None:
        count[0] += 1

    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--rate", type=float, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home))
        engine = db.ready_engine(settings)
        with running_sandbox(SandboxConfig(latency_ms=args.latency_ms)) as (url, sandbox):
            reference = asyncio.run(_reference(url, args.recipients, args.concurrency))
            sandbox.reset()
            with db.session_scope(engine) as session:
                job = repo.create_job(
                    session,
                    request=repo.JobRequest(
                        page_id=PAGE_ID,
                        message=validate_message("Benchmark {first_name}", "UPDATE", None),
                        audience=recipients_from_psids(
                            [str(10**15 + i) for i in range(args.recipients)]
                        ),
                        concurrency=args.concurrency,
                        rate_per_second=args.rate,
                    ),
                ).job
            run_settings = settings.model_copy(update={"graph_api_url": url})
            statements = _count_statements(engine)
            started = time.perf_counter()
            finished = asyncio.run(
                run_in_process(engine, run_settings, job_id=job.id, token_for=lambda _page: "bench")
            )
            elapsed = time.perf_counter() - started
            stats = sandbox.stats()
        engine.dispose()
    achieved = finished.sent / elapsed
    print(
        f"recipients {args.recipients}, concurrency {args.concurrency}, latency {args.latency_ms:g} ms"
    )
    print(f"reference (no rate limit, no bookkeeping): {reference:8.1f} msg/s")
    print(
        f"pagecast at rate {args.rate:g}/s:            {achieved:8.1f} msg/s  ({finished.status})"
    )
    print(f"achieved / configured rate:  {achieved / args.rate:.3f}")
    print(f"pagecast / reference:        {achieved / reference:.3f}")
    print(
        f"peak msgs in any 1 s window: {stats['pages'][PAGE_ID]['max_per_second']}, duplicates {stats['duplicates']}"
    )
    print(
        f"database statements: {statements[0]} = {statements[0] / finished.sent:.4f} per message, "
        f"{statements[0] / elapsed:.1f} per second"
    )


if __name__ == "__main__":
    main()
