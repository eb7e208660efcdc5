"""Scale: creating large jobs and reading their status, pagecast beside bare PostgreSQL.

    uv run python -m benchmarks.scale [--sizes 10000,100000,1000000]

For each size, in one run on one embedded PostgreSQL:
- ``pagecast job create`` from a PSID file (a process of its own: wall time and peak RSS) beside a
  bare ``COPY`` of the same PSIDs into a scratch table (the floor for getting rows in);
- ``job status``'s query (``repo.job_progress``: the job, its recipients by status, its errors),
  median of 5, beside reading the job's row alone.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import sqlalchemy as sa

from pagecast import db, repo
from pagecast.settings import Settings

PAGE_ID = "100200300"


def _psid_file(directory: Path, size: int) -> Path:
    path = directory / f"psids_{size}.txt"
    path.write_text("".join(f"{10**15 + n}\n" for n in range(size)))
    return path


def _job_create(home: Path, psids: Path) -> tuple[float, float, uuid.UUID]:
    """Wall seconds and peak RSS (MB) of ``pagecast job create``, and the job's id."""
    create = ("job", "create", "--page-id", PAGE_ID, "--text", "Scale", "--recipients", str(psids))
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pagecast", *create, "--json"],
        env={k: v for k, v in os.environ.items() if not k.startswith("PAGECAST_")}
        | {"PAGECAST_HOME": str(home)},
        stdout=subprocess.PIPE,
        text=True,
    )
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pagecast job create failed ({status})")
    return elapsed, usage.ru_maxrss / 1024, uuid.UUID(json.loads(output)["id"])


def _bare_copy(engine: sa.Engine, psids: Path) -> float:
    """Seconds to COPY the file's PSIDs into a scratch table with a primary key."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("CREATE TEMP TABLE scratch (psid text PRIMARY KEY)")
        started = time.perf_counter()
        with psids.open() as source, cursor.copy("COPY scratch (psid) FROM STDIN") as copy:
            for line in source:
                copy.write_row((line.strip(),))
        raw.commit()
        elapsed = time.perf_counter() - started
        cursor.execute("DROP TABLE scratch")
        raw.commit()
        return elapsed
    finally:
        raw.close()


def _read(engine: sa.Engine, query: Callable[..., object], job_id: uuid.UUID) -> None:
    with db.session_scope(engine) as session:
        query(session, job_id=job_id)


def _median_ms(work: Callable[[], object], times: int = 5) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory) / "home"
        engine = db.ready_engine(Settings(home=home, database_url=None))
        print(
            f"{'recipients':>10}  {'job create s':>12}  {'COPY s':>7}  {'ratio':>6}  "
            f"{'peak RSS MB':>11}  {'status ms':>9}  {'row ms':>7}"
        )
        for size in sizes:
            psids = _psid_file(Path(directory), size)
            create_s, peak_mb, job_id = _job_create(home, psids)
            copy_s = _bare_copy(engine, psids)

            status_ms = _median_ms(partial(_read, engine, repo.job_progress, job_id))
            row_ms = _median_ms(partial(_read, engine, repo.get_job, job_id))
            print(
                f"{size:>10,}  {create_s:>12.2f}  {copy_s:>7.2f}  {create_s / copy_s:>6.1f}  "
                f"{peak_mb:>11.0f}  {status_ms:>9.1f}  {row_ms:>7.1f}"
            )
        engine.dispose()
        db.stop_embedded_database(home)


if __name__ == "__main__":
    main()
