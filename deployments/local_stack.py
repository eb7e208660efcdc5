"""A local Prefect server, a process worker and the warm runner for pagecast, in the background.

    uv run python -m deployments.local_stack up [--port 4200]    (or: make up)
    uv run python -m deployments.local_stack down                (or: make down)

Prefect keeps its own database, ``prefect``, on PostgreSQL (SQLite locks under concurrent flow
runs): on the server of ``PAGECAST_DATABASE_URL`` when it has the ``pg_trgm`` extension Prefect
needs, else on an embedded server of its own under ``$PAGECAST_HOME/prefect-pgdata`` (pagecast's
embedded build lacks ``pg_trgm``), which runs until ``down``. The state file
``$PAGECAST_HOME/prefect-stack.json`` lets ``pagecast job run`` use this server, and its flow run is
forked by the warm runner (``deployments/warm_runner.py``), which has Prefect imported already."""

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pagecast.db import ensure_database
from pagecast.launch import STACK_FILE, stack_api_url
from pagecast.processes import is_same_process, process_started, started_as_recorded
from pagecast.sandbox_process import wait_answering
from pagecast.settings import get_settings
from pagecast.warm import WARM_RUNNER_SOCKET

PROJECT_DIR = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120.0
STOP_SECONDS = 10.0
KILL_SECONDS = 5.0
PREFECT_DATABASE = "prefect"
PREFECT_PGDATA = "prefect-pgdata"
# How often the worker asks for runs to start: Prefect's default, 10 s, delays a submitted job's
# first message by ~5 s on average.
WORKER_QUERY_SECONDS = 1


@dataclass
class Stack:
    """The background processes of a local stack, each with its creation time: a later ``down``
    signals no process that was given a recorded pid after the stack's own died."""

    api_url: str
    ui_url: str
    server_pid: int
    server_started: float | None = None
    worker_pid: int | None = None
    worker_started: float | None = None
    runner_pid: int | None = None
    runner_started: float | None = None


def has_pg_trgm(server_url: str) -> bool:
    """Whether ``server_url``'s server offers ``pg_trgm`` (Prefect's migrations need it)."""
    engine = sa.create_engine(server_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return bool(
                connection.execute(
                    sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
                ).first()
            )
    finally:
        engine.dispose()


def prefect_database_url(server_url: str, name: str = PREFECT_DATABASE) -> str:
    """Prefect's database ``name`` on the server of ``server_url`` (created if missing) as an
    asyncpg URL."""
    url = sa.make_url(ensure_database(server_url, name)).set(drivername="postgresql+asyncpg")
    if "sslmode" in url.query:  # asyncpg takes libpq's sslmode as ssl
        url = url.difference_update_query(["sslmode"]).update_query_dict(
            {"ssl": url.query["sslmode"]}
        )
    return url.render_as_string(hide_password=False)


def _prefect_server(pgdata: Path, cleanup_mode: str | None) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(pgdata.resolve(), cleanup_mode=cleanup_mode)


def embedded_prefect_server_url(pgdata: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL with ``pg_trgm`` at ``pgdata`` and return its
    URL; it keeps running after this process exits, until ``stop_embedded_prefect_server``."""
    return (
        _prefect_server(pgdata, cleanup_mode=None)
        .get_uri()
        .replace("postgresql://", "postgresql+psycopg://", 1)
    )


def stop_embedded_prefect_server(pgdata: Path) -> None:
    """Stop the embedded PostgreSQL at ``pgdata`` if it runs: a fast shutdown (SIGINT) of the
    postmaster its ``postmaster.pid`` names (when that process started as the file says: the file
    of a server that died outlives it), waited for (never started to be stopped)."""
    try:
        pid, _, started = (pgdata / "postmaster.pid").read_text().split("\n")[:3]
        postmaster, started_at = int(pid), float(started)
    except (FileNotFoundError, ValueError):
        return
    _stop_process(postmaster, signal.SIGINT, started=started_at)


def _spawn(args: list[str], *, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python -m ARGS`` in a session of its own, appending to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=PROJECT_DIR,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_stack(
    home: Path,
    *,
    port: int,
    database_url: str,
    worker: bool = True,
    env: dict[str, str] | None = None,
) -> Stack:
    """Start a Prefect server on ``port`` (loopback) with its database at ``database_url`` and,
    with ``worker``, a process worker polling every ``WORKER_QUERY_SECONDS`` unless ``env`` says
    otherwise, and the warm runner."""
    base = f"http://127.0.0.1:{port}"
    runner_env = _runner_env(env, f"{base}/api")
    env = (
        {"PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_SECONDS)}
        | runner_env
        | {"PREFECT_UI_API_URL": f"{base}/api", "PAGECAST_PROJECT_DIR": str(PROJECT_DIR)}
    )
    server_log = home / "logs" / "prefect-server.log"
    server = _spawn(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log=server_log,
        env=env | {"PREFECT_API_DATABASE_CONNECTION_URL": database_url},
    )
    try:
        wait_answering(
            f"{base}/api/health",
            server,
            what=f"prefect server (see {server_log})",
            seconds=STARTUP_SECONDS,
        )
    except BaseException:
        _stop_process(server.pid, signal.SIGTERM, group=True)
        raise
    stack = Stack(
        api_url=f"{base}/api",
        ui_url=base,
        server_pid=server.pid,
        server_started=process_started(server.pid),
    )
    if worker:
        stack.worker_pid = _spawn(
            ["prefect", "worker", "start", "--pool", "pagecast", "--type", "process"],
            log=home / "logs" / "prefect-worker.log",
            env=env,
        ).pid
        stack.worker_started = process_started(stack.worker_pid)
        stack.runner_pid, stack.runner_started = start_warm_runner(home, runner_env)
    (home / STACK_FILE).write_text(json.dumps(asdict(stack)))
    return stack


def _runner_env(env: dict[str, str] | None, api_url: str) -> dict[str, str]:
    """The warm runner's environment: what ``pagecast job run`` gives its flow runs, so that
    Prefect's settings read at the runner's import hold for the runs it forks."""
    return (env or dict(os.environ)) | {
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def revive_warm_runner(home: Path, env: dict[str, str] | None = None) -> bool:
    """Start the running stack's warm runner again if it is gone; whether it was."""
    stack = Stack(**json.loads((home / STACK_FILE).read_text()))
    if stack.runner_pid is not None and is_same_process(stack.runner_pid, stack.runner_started):
        return False
    stack.runner_pid, stack.runner_started = start_warm_runner(
        home, _runner_env(env, stack.api_url)
    )
    (home / STACK_FILE).write_text(json.dumps(asdict(stack)))
    return True


def start_warm_runner(home: Path, env: dict[str, str]) -> tuple[int, float | None]:
    """Start the warm runner for ``home`` with the environment ``job run`` gives its flow runs;
    its pid and creation time."""
    runner = _spawn(
        ["deployments.warm_runner", str(home / WARM_RUNNER_SOCKET)],
        log=home / "logs" / "warm-runner.log",
        env=env,
    )
    return runner.pid, process_started(runner.pid)


def exited(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped here when it is a child of this process)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a child of this process: reaped
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_process(
    pid: int,
    stop: signal.Signals,
    *,
    started: float | None = None,
    group: bool = False,
    grace_seconds: float = STOP_SECONDS,
) -> None:
    """Send ``stop`` to ``pid`` (with ``group``, to the process group it leads, also once the
    leader is gone) unless ``pid`` now belongs to a process not created at ``started``; SIGKILL if
    ``pid`` outlives the grace, and wait a little for it to be gone."""
    created = process_started(pid)
    if created is None:
        if not group:  # gone; a process group may outlive its leader, and keeps its id meanwhile
            return
    elif not started_as_recorded(created, started):
        return
    send = os.killpg if group else os.kill
    try:
        send(pid, stop)
    except ProcessLookupError:
        return
    if _exits_within(pid, grace_seconds):
        return
    with contextlib.suppress(ProcessLookupError):
        send(pid, signal.SIGKILL)
    _exits_within(pid, KILL_SECONDS)


def _exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_stack(home: Path) -> None:
    """Stop the processes recorded in the state file (the server last), then Prefect's embedded
    database, and remove the file."""
    state = home / STACK_FILE
    if state.exists():
        stack = Stack(**json.loads(state.read_text()))
        for pid, started in (
            (stack.runner_pid, stack.runner_started),
            (stack.worker_pid, stack.worker_started),
            (stack.server_pid, stack.server_started),
        ):
            if pid is not None:
                _stop_process(pid, signal.SIGTERM, started=started, group=True)
        state.unlink()
    stop_embedded_prefect_server(home / PREFECT_PGDATA)


def main() -> None:
    parser = argparse.ArgumentParser(description="A local Prefect server and worker for pagecast.")
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    settings = get_settings()
    home = settings.home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    if args.command == "down":
        stop_stack(home)
        print("local Prefect stack stopped")
        return
    if stack_api_url(home):
        if revive_warm_runner(home):
            print("warm runner started again")
        print(f"already running: {stack_api_url(home)}")
        return
    server_url = settings.database_url
    if not (server_url and has_pg_trgm(server_url)):
        server_url = embedded_prefect_server_url(home / PREFECT_PGDATA)
    try:
        stack = start_stack(home, port=args.port, database_url=prefect_database_url(server_url))
    except BaseException:
        stop_embedded_prefect_server(home / PREFECT_PGDATA)
        raise
    print(f"Prefect UI: {stack.ui_url}")
    print(f"export PREFECT_API_URL={stack.api_url}   # then: make deploy")


if __name__ == "__main__":
    main()
