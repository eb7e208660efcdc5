"""Many pages at once: six jobs of 5,000 recipients on six pages at R = 300/s each (1,800 msg/s
offered), started through the REST trigger of the send-job deployment and run by the stack's one
worker; beside them, in the same run, the bare aiohttp client sending the same 30,000 messages
unpaced. Prints the aggregate rates and the CPU each spends per message, by process: the cost of
durability.

    uv run python -m benchmarks.many_pages [--pages 6] [--recipients 5000] [--rate 300]
        [--latency-ms 50]
"""

import argparse
import asyncio
import resource
import time

from benchmarks.harness import (
    Bench,
    bare_sends,
    cpu_seconds,
    postmaster_pid,
    running_bench,
)
from deployments.local_stack import PREFECT_PGDATA

CONCURRENCY = 100  # per job; the bare client has as much in flight as all the jobs together


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _processes(bench: Bench) -> dict[str, int]:
    return {
        "worker and its flow runs": bench.stack.worker_pid or 0,
        "Prefect server": bench.stack.server_pid,
        "Prefect's PostgreSQL": postmaster_pid(bench.home / PREFECT_PGDATA),
        "pagecast's PostgreSQL": postmaster_pid(bench.home / "pgdata"),
    }


def _pagecast(bench: Bench, pages: list[str], count: int, rate: float) -> tuple[float, float]:
    """Sends the jobs; returns their start and end (wall clock)."""
    jobs = [bench.create_job(page, count, rate=rate, concurrency=CONCURRENCY) for page in pages]
    started = time.time()
    for job_id in jobs:
        bench.trigger(job_id)
    for job_id in jobs:
        bench.sent_all(job_id)
    return started, time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--recipients", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--latency-ms", type=float, default=50)
    args = parser.parse_args()
    total = args.pages * args.recipients
    bare_pages = [str(920000000 + i) for i in range(args.pages)]
    pages = [str(910000000 + i) for i in range(args.pages)]
    with running_bench("--latency-ms", str(args.latency_ms), "--rate-limit", "100000") as bench:
        cpu_before = _own_cpu_seconds()
        started = time.time()
        asyncio.run(
            bare_sends(
                bench.sandbox.url,
                bare_pages,
                total,
                rate=None,
                concurrency=CONCURRENCY * args.pages,
            )
        )
        bare_seconds = time.time() - started
        bare_cpu = _own_cpu_seconds() - cpu_before
        processes = _processes(bench)
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        started, ended = _pagecast(bench, pages, args.recipients, args.rate)
        time.sleep(1.0)  # the flow runs' processes exit and are reaped by the worker
        spent = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
        stamps = sorted(s for page in pages for s in bench.stamps(page))
    bare_rate = total / bare_seconds
    rate = len(stamps) / (stamps[-1] - started)
    steady_low, steady_high = len(stamps) // 10, len(stamps) * 9 // 10
    steady = (steady_high - steady_low) / (stamps[steady_high] - stamps[steady_low])
    print(
        f"{args.pages} pages × {args.recipients} recipients at R = {args.rate:g}/s "
        f"({args.pages * args.rate:g} msg/s offered), latency {args.latency_ms:g} ms"
    )
    print(f"bare client, unpaced, {CONCURRENCY * args.pages} in flight: {bare_rate:8.1f} msg/s")
    print(
        f"pagecast, one worker:   {rate:8.1f} msg/s end to end, {steady:.1f} steady "
        f"(first to last job: {ended - started:.1f} s)"
    )
    print(f"pagecast / bare client: {rate / bare_rate:.3f} (target ≥ 0.75)")
    print(f"{'CPU per message':34} {'ms':>7}")
    print(f"{'bare client':34} {1000 * bare_cpu / total:7.3f}")
    for name, seconds in spent.items():
        print(f"{'pagecast: ' + name:34} {1000 * seconds / total:7.3f}")
    print(f"{'pagecast: all':34} {1000 * sum(spent.values()) / total:7.3f}")


if __name__ == "__main__":
    main()
