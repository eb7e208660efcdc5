"""Running the send-job flow from the command line: a child process runs the Prefect flow (against
``PREFECT_API_URL``, else the local stack of ``make up``, else an ephemeral Prefect server) while
this one shows its progress from the job's counters in Postgres."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import Session

from pagecast import repo
from pagecast.errors import ConfigurationError
from pagecast.models import JobStatus, SendJob
from pagecast.reports import job_summary_rows, waiting_for
from pagecast.settings import Settings

POLL_SECONDS = 0.5
# A recorded creation time matches within this: psutil derives it from the boot time, in whole
# seconds and moved by clock steps, and postmaster.pid holds its own in whole seconds.
SAME_PROCESS_SECONDS = 5.0
STACK_FILE = "prefect-stack.json"
WARM_RUNNER_SOCKET = "warm-runner.sock"
SUCCESSFUL = (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS)
UNKNOWN_EXIT = -1  # a forked flow run's, when the warm runner stopped before it ended
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


def process_started(pid: int) -> float | None:
    """When ``pid`` was created (seconds since the epoch), ``None`` when no such process runs (a
    zombie has ended)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.Error, ValueError):  # ValueError: not a pid (negative)
        return None


def is_same_process(pid: int, started: float | None) -> bool:
    """Whether ``pid`` runs and is the process created at ``started`` (any process with that pid
    when ``started`` is unknown): a pid a file recorded may since belong to another process."""
    created = process_started(pid)
    return created is not None and started_as_recorded(created, started)


def started_as_recorded(created: float, started: float | None) -> bool:
    """Whether a process created at ``created`` is the one recorded as started at ``started``
    (``None``: not recorded, any)."""
    return started is None or abs(created - started) <= SAME_PROCESS_SECONDS


def prefect_api_url(settings: Settings) -> str | None:
    """The Prefect API to use: ``PREFECT_API_URL``, else the local stack's, else ``None``."""
    return os.environ.get("PREFECT_API_URL") or stack_api_url(settings.home.expanduser().resolve())


class WarmChild:
    """A flow run process forked by the local stack's warm runner (``deployments/warm_runner.py``),
    watched like a child process: its exit code comes over the runner's connection. If the runner
    stops first, the process is watched by its pid, and its exit code is ``UNKNOWN_EXIT``."""

    def __init__(self, connection: socket.socket, pid: int, received: bytes) -> None:
        self._connection: socket.socket | None = connection
        self._received = received
        self.pid = pid
        self._started = process_started(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._connection is not None:
                self._read_answer(self._connection)
            elif not is_same_process(self.pid, self._started):
                self.returncode = UNKNOWN_EXIT
        return self.returncode

    def _read_answer(self, connection: socket.socket) -> None:
        if b"\n" not in self._received:
            if not select.select([connection], [], [], 0)[0]:
                return
            chunk = connection.recv(4096)
            self._received += chunk
            if chunk and b"\n" not in self._received:
                return
        line = self._received.partition(b"\n")[0]
        connection.close()
        self._connection = None
        if line:
            self.returncode = json.loads(line)["returncode"]

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)


def _read_line(connection: socket.socket) -> tuple[bytes, bytes]:
    """One line from ``connection`` (empty at its end) and whatever came after it."""
    received = b""
    while b"\n" not in received and (chunk := connection.recv(4096)):
        received += chunk
    line, _, rest = received.partition(b"\n")
    return line, rest


def _flow_env(settings: Settings) -> dict[str, str]:
    """The flow process's environment: this one's, with this process's home and its stack."""
    home = settings.home.expanduser().resolve()
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PAGECAST_HOME": str(home)}
    api_url = stack_api_url(home)
    if "PREFECT_API_URL" not in env and api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _fork_warm(home: Path, request: dict) -> WarmChild | str | None:
    """The flow run forked by the stack's warm runner; why the runner refused (a message), or
    ``None`` when none runs for ``home``."""
    if stack_api_url(home) is None:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(5)
        connection.connect(str(home / WARM_RUNNER_SOCKET))
        connection.sendall(json.dumps(request).encode() + b"\n")
        line, rest = _read_line(connection)
        answer = json.loads(line or b"{}")
    except (OSError, ValueError):
        connection.close()
        return None
    if "pid" not in answer:
        connection.close()
        return str(answer.get("error", "no answer"))
    return WarmChild(connection, answer["pid"], rest)


def start_flow(
    settings: Settings, job_id: uuid.UUID, *, log_path: Path, say: Callable[[str], None]
) -> subprocess.Popen[bytes] | WarmChild:
    """Run ``flows/send_job.py`` for the job logging to ``log_path``: forked by the local stack's
    warm runner when it runs and serves the request, else in a child process (``say`` tells
    which); either uses the same database (the embedded one too) as this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = _flow_env(settings)
    home = Path(env["PAGECAST_HOME"])
    warm = _fork_warm(home, {"job_id": str(job_id), "env": env, "log": str(log_path.resolve())})
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
