"""Sending at scale: jobs of 10 k and 100 k recipients at R = 300/s and latency 5 ms, started by
the REST trigger of the send-job deployment on a running stack (a large job splits into child
runs, all on the one worker). Prints the peak RSS of every process of the worker's tree, whether
it stays flat from 10 k to 100 k, and the database transactions per message (PostgreSQL's own
count; each is one or more round trips).

    uv run python -m benchmarks.send_scale [--sizes 10000,100000] [--rate 300] [--latency-ms 5]
"""

import argparse
import threading
import time
from contextlib import suppress

import psutil
import sqlalchemy as sa

from benchmarks.harness import Bench, running_bench

CONCURRENCY = 100
SAMPLE_SECONDS = 0.2
_TRANSACTIONS = sa.text(
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


def _transactions(bench: Bench) -> int:
    time.sleep(1.5)  # PostgreSQL publishes its statistics within a second
    with bench.engine.connect() as connection:
        return int(connection.execute(_TRANSACTIONS).scalar_one())


def _peak_rss(root_pid: int, stop: threading.Event, peaks: dict[int, tuple[str, float]]) -> None:
    """Sample the RSS (MB) of ``root_pid`` and its descendants until ``stop``; keep each one's
    peak under its pid, with what it runs."""
    root = psutil.Process(root_pid)
    while not stop.wait(SAMPLE_SECONDS):
        for process in [root, *root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss = process.memory_info().rss / 2**20
                if rss > peaks.get(process.pid, ("", 0.0))[1]:
                    peaks[process.pid] = (_role(process), rss)


def _role(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "worker start" in command:
        return "worker"
    if "prefect.engine" in command or "flows." in command:
        return "flow run"
    return command[:40]


def _send(bench: Bench, count: int, rate: float) -> tuple[float, dict[int, tuple[str, float]], int]:
    """Send one job of ``count``; its seconds, peak RSS by process, and transactions used."""
    page_id = str(930000000 + count)
    job_id = bench.create_job(page_id, count, rate=rate, concurrency=CONCURRENCY)
    peaks: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    sampler = threading.Thread(
        target=_peak_rss, args=(bench.stack.worker_pid, stop, peaks), daemon=True
    )
    before = _transactions(bench)
    started = time.monotonic()
    sampler.start()
    bench.trigger(job_id)
    while bench.sandbox.stats()["pages"].get(page_id, {}).get("delivered", 0) < count:
        time.sleep(1.0)  # watched at the sandbox: polling the database would add to its count
    bench.sent_all(job_id)
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    return seconds, peaks, _transactions(bench) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--latency-ms", type=float, default=5)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = {}
    with running_bench("--latency-ms", str(args.latency_ms), "--rate-limit", "100000") as bench:
        for size in sizes:
            results[size] = _send(bench, size, args.rate)
    print(f"R = {args.rate:g}/s, latency {args.latency_ms:g} ms, concurrency {CONCURRENCY}")
    print(
        f"{'recipients':>10} {'seconds':>8} {'msg/s':>7} {'worker MB':>9} {'flow runs':>9} "
        f"{'largest run MB':>14} {'transactions/msg':>16}"
    )
    largest: dict[int, float] = {}
    for size, (seconds, peaks, transactions) in results.items():
        runs = [rss for role, rss in peaks.values() if role == "flow run"]
        worker = max((rss for role, rss in peaks.values() if role == "worker"), default=0.0)
        largest[size] = max(runs, default=0.0)
        print(
            f"{size:>10} {seconds:8.1f} {size / seconds:7.1f} {worker:9.0f} {len(runs):9} "
            f"{largest[size]:14.0f} {transactions / size:16.4f}"
        )
    if len(sizes) > 1:
        print(
            f"largest run's peak RSS, {sizes[-1]} / {sizes[0]}: "
            f"{largest[sizes[-1]] / largest[sizes[0]]:.2f} (target ≤ 1.3, each ≤ 250 MB)"
        )


if __name__ == "__main__":
    main()
