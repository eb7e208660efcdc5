"""Sending through Prefect, measured at the sandbox: a job at R = 300/s through `pagecast job run`
and through the send-job deployment (`job submit`, the REST trigger) on a running stack, and
through `job run` with Prefect's ephemeral server; beside them the ceiling (a bare aiohttp loop
paced at R) and the naive design (one Prefect task per recipient). Each contender sends to a page
of its own, one after the other; the last sends two jobs on one page at once.

    uv run python -m benchmarks.through_prefect [--recipients 10000] [--rate 300]
        [--latency-ms 50] [--naive-recipients 1000]
"""

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import Bench, Figures, bare_sends, running_bench
from deployments.local_stack import PROJECT_DIR

CONCURRENCY = 100


@dataclass(frozen=True)
class Contender:
    name: str
    page_id: str
    run: Callable[[Bench, str, int, float], float]  # sends; returns its start (wall clock)
    first_target: float | None = None  # seconds to the first message, issue 11's target


def ceiling(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """A bare aiohttp loop starting one call every 1/R s, 100 in flight at most."""
    started = time.time()
    asyncio.run(bare_sends(bench.sandbox.url, [page_id], count, rate=rate, concurrency=CONCURRENCY))
    return started


def _timed_cli(
    bench: Bench,
    page_id: str,
    count: int,
    rate: float,
    *args: str,
    env: dict[str, str] | None = None,
) -> float:
    """Create a job, then time ``pagecast *args JOB_ID`` from its start until the job ends."""
    job_id = bench.create_job(page_id, count, rate=rate, concurrency=CONCURRENCY)
    started = time.time()
    bench.pagecast(*args, str(job_id), env=env).wait()
    bench.sent_all(job_id)
    return started


def job_run(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """`pagecast job run` with the stack running: its flow runs in a child of the CLI."""
    return _timed_cli(bench, page_id, count, rate, "job", "run")


def ephemeral_job_run(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """`pagecast job run` with no Prefect server: Prefect starts an ephemeral one."""
    alone = bench.home / "no-stack"
    env = {k: v for k, v in bench.env.items() if k != "PREFECT_API_URL"} | {
        "PAGECAST_HOME": str(alone),
        "PREFECT_HOME": str(alone / "prefect"),
    }
    return _timed_cli(bench, page_id, count, rate, "job", "run", env=env)


def job_submit(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """`pagecast job submit`: a run of the send-job deployment, started by the worker."""
    return _timed_cli(bench, page_id, count, rate, "job", "submit")


def rest_trigger(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """The REST call a web app (or the UI's Run button) makes: create a run of send-job."""
    job_id = bench.create_job(page_id, count, rate=rate, concurrency=CONCURRENCY)
    started = time.time()
    bench.trigger(job_id)
    bench.sent_all(job_id)
    return started


def naive(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """One Prefect task per recipient (benchmarks/naive_flow.py) against the stack."""
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.naive_flow", page_id, str(count)],
        cwd=PROJECT_DIR,
        env=bench.env,
        check=True,
        capture_output=True,
    )
    return started


def two_runs_on_one_page(bench: Bench, page_id: str, count: int, rate: float) -> float:
    """Two `pagecast job run`s of half the recipients each, on one page at once."""
    jobs = [
        bench.create_job(page_id, count // 2, rate=rate, concurrency=CONCURRENCY) for _ in range(2)
    ]
    started = time.time()
    for process in [bench.pagecast("job", "run", str(job_id)) for job_id in jobs]:
        process.wait()
    for job_id in jobs:
        bench.sent_all(job_id)
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--naive-recipients", type=int, default=1_000)
    args = parser.parse_args()
    contenders = [
        Contender("ceiling: bare aiohttp paced at R", "900000001", ceiling),
        Contender("job run, running stack", "900000002", job_run, 2.0),
        Contender("job submit (send-job deployment)", "900000003", job_submit, 5.0),
        Contender("REST trigger of send-job (= UI run)", "900000004", rest_trigger, 5.0),
        Contender("job run, ephemeral Prefect", "900000005", ephemeral_job_run, 12.0),
        Contender("naive: a Prefect task per recipient", "900000006", naive),
        Contender("two job runs sharing one page", "900000007", two_runs_on_one_page),
    ]
    rows: list[tuple[Contender, Figures]] = []
    options = ("--latency-ms", str(args.latency_ms), "--rate-limit", "100000")
    with running_bench(*options) as bench:
        for contender in contenders:
            count = args.naive_recipients if contender.run is naive else args.recipients
            started = contender.run(bench, contender.page_id, count, args.rate)
            rows.append((contender, Figures.of(bench.stamps(contender.page_id), started)))
            print(f"  {contender.name}: done", file=sys.stderr)
    ceiling_rate = rows[0][1].end_to_end
    rate = args.rate
    print(
        f"{args.recipients} recipients at R = {rate:g}/s (naive: {args.naive_recipients}), "
        f"latency {args.latency_ms:g} ms, concurrency {CONCURRENCY}; from the sandbox's ledger"
    )
    print(
        f"{'contender':38} {'first msg s':>11} {'steady /R':>10} {'end-to-end msg/s':>17} "
        f"{'/ ceiling':>9} {'busiest 1 s /R':>14}"
    )
    for contender, figures in rows:
        target = f" (≤ {contender.first_target:g})" if contender.first_target else ""
        print(
            f"{contender.name:38} {figures.first_after:7.2f}{target:>4} "
            f"{figures.steady / rate:10.3f} {figures.end_to_end:17.1f} "
            f"{figures.end_to_end / ceiling_rate:9.3f} {figures.busiest / rate:14.3f}"
        )
    print(
        "targets: steady ≥ 0.97 R; end to end ≥ 0.9 × ceiling with the stack, ≥ 0.7 ephemeral; "
        "busiest 1 s ≤ 1.02 R"
    )


if __name__ == "__main__":
    main()
