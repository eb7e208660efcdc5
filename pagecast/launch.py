"""Running the send-job flow from the command line: a process forked by the local stack's warm
runner, else a child process, runs the Prefect flow (against ``PREFECT_API_URL``, else the local
stack of ``make up``, else an ephemeral Prefect server) while this one shows its progress from the
job's counters in Postgres."""

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import Session

from pagecast import repo
from pagecast.errors import ConfigurationError
from pagecast.models import JobStatus, SendJob
from pagecast.processes import is_same_process
from pagecast.reports import job_summary_rows, waiting_for
from pagecast.settings import Settings
from pagecast.warm import WarmChild, fork

POLL_SECONDS = 0.5
STACK_FILE = "prefect-stack.json"
SUCCESSFUL = (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The checkout holding ``flows/``: the flow runs from there, as ``prefect.yaml`` says."""
    if not (_PROJECT_ROOT / "flows" / "send_job.py").is_file():
        raise ConfigurationError(
            f"flows/send_job.py not found under {_PROJECT_ROOT}: run from a checkout"
        )
    return _PROJECT_ROOT


def stack_api_url(home: Path) -> str | None:
    """The API URL of the local stack ``make up`` started under ``home``, if it still runs."""
    state = home / STACK_FILE
    if not state.is_file():
        return None
    stack = json.loads(state.read_text())
    if not is_same_process(stack["server_pid"], stack.get("server_started")):
        return None
    return str(stack["api_url"])


def prefect_api_url(settings: Settings) -> str | None:
    """The Prefect API to use: ``PREFECT_API_URL``, else the local stack's, else ``None``."""
    return os.environ.get("PREFECT_API_URL") or stack_api_url(settings.home.expanduser().resolve())


def _flow_env(home: Path, stack_url: str | None) -> dict[str, str]:
    """The flow process's environment: this one's, with its home and its stack's API."""
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PAGECAST_HOME": str(home)}
    if "PREFECT_API_URL" not in env and stack_url:
        env["PREFECT_API_URL"] = stack_url
    return env


def start_flow(
    settings: Settings, job_id: uuid.UUID, *, log_path: Path, say: Callable[[str], None]
) -> subprocess.Popen[bytes] | WarmChild:
    """Run ``flows/send_job.py`` for the job logging to ``log_path``: forked by the local stack's
    warm runner when it runs and serves the request, else in a child process (``say`` tells
    which); either uses the same database (the embedded one too) as this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    home = settings.home.expanduser().resolve()
    stack_url = stack_api_url(home)
    env = _flow_env(home, stack_url)
    request = {"job_id": str(job_id), "env": env, "log": str(log_path.resolve())}
    warm = fork(home, job_id, request) if stack_url else None
    if isinstance(warm, WarmChild):
        say(f"the flow run is forked by the stack's warm runner (pid {warm.pid})")
        return warm
    if warm is not None:
        say(f"the stack's warm runner refused ({warm}): the flow runs in a process of its own")
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.send_job", str(job_id)],
            cwd=project_root(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _job_and_wait(engine: sa.Engine, job_id: uuid.UUID, lease_seconds: int) -> tuple[SendJob, str]:
    with Session(engine, expire_on_commit=False) as session:
        job = repo.get_job(session, job_id=job_id)
        waiting = waiting_for(session, job, lease_seconds=lease_seconds)
    return job, f"{job.status}: waiting for {waiting}" if waiting else str(job.status)


def _counts(job: SendJob) -> str:
    return (
        f"[green]{job.sent} sent[/] [red]{job.failed} failed[/] "
        f"[yellow]{job.skipped} skipped[/] [magenta]{job.unknown} unknown[/]"
    )


def watch(
    engine: sa.Engine,
    job_id: uuid.UUID,
    process: subprocess.Popen[bytes] | WarmChild,
    console: Console,
    *,
    lease_seconds: int,
) -> SendJob:
    """Show a progress bar from the job's counters until the flow process exits; its description
    is the job's status and whatever the job waits for."""
    job, line = _job_and_wait(engine, job_id, lease_seconds)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(line, total=job.total, counts=_counts(job))
        while True:
            finished = process.poll() is not None
            job, line = _job_and_wait(engine, job_id, lease_seconds)
            done = job.sent + job.failed + job.skipped + job.unknown
            progress.update(bar, completed=done, counts=_counts(job), description=line)
            if finished:
                return job
            time.sleep(POLL_SECONDS)


def summary_table(engine: sa.Engine, job: SendJob) -> Table:
    """The job's summary as a rich table."""
    with Session(engine) as session:
        errors = repo.error_counts(session, job_id=job.id)
    table = Table("", "count", "detail", title=f"job {job.id}")
    for row in job_summary_rows(job, errors):
        table.add_row(row["item"], str(row["value"]), str(row["detail"]))
    return table
