"""A local Prefect server and a process worker for pagecast, in the background.

    uv run python -m deployments.local_stack up [--port 4200]    (or: make up)
    uv run python -m deployments.local_stack down                (or: make down)

Prefect keeps its own database (SQLite under PREFECT_HOME); pagecast's data stays in its Postgres.
The state file ``$PAGECAST_HOME/prefect-stack.json`` lets ``pagecast job run`` use this server."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from pagecast.launch import STACK_FILE, stack_api_url
from pagecast.settings import get_settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120.0


@dataclass
class Stack:
    """The background processes of a local stack."""

    api_url: str
    ui_url: str
    server_pid: int
    worker_pid: int | None = None


def _spawn(args: list[str], *, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            cwd=PROJECT_DIR,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_healthy(api_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited; see {log}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server did not answer within {STARTUP_SECONDS:.0f} s; see {log}")


def start_stack(
    home: Path, *, port: int, worker: bool = True, env: dict[str, str] | None = None
) -> Stack:
    """Start a Prefect server on ``port`` (loopback) and, with ``worker``, a process worker."""
    base = f"http://127.0.0.1:{port}"
    env = (env or dict(os.environ)) | {
        "PREFECT_API_URL": f"{base}/api",
        "PREFECT_UI_API_URL": f"{base}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PAGECAST_PROJECT_DIR": str(PROJECT_DIR),
    }
    server_log = home / "logs" / "prefect-server.log"
    server = _spawn(
        ["server", "start", "--host", "127.0.0.1", "--port", str(port)], log=server_log, env=env
    )
    _wait_healthy(f"{base}/api", server, server_log)
    stack = Stack(api_url=f"{base}/api", ui_url=base, server_pid=server.pid)
    if worker:
        stack.worker_pid = _spawn(
            ["worker", "start", "--pool", "pagecast", "--type", "process"],
            log=home / "logs" / "prefect-worker.log",
            env=env,
        ).pid
    (home / STACK_FILE).write_text(json.dumps(asdict(stack)))
    return stack


def stop_stack(home: Path) -> None:
    """Stop the processes recorded in the state file (worker first) and remove it."""
    state = home / STACK_FILE
    if not state.exists():
        return
    stack = Stack(**json.loads(state.read_text()))
    for pid in (stack.worker_pid, stack.server_pid):
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    state.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="A local Prefect server and worker for pagecast.")
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    home = get_settings().home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    if args.command == "down":
        stop_stack(home)
        print("local Prefect stack stopped")
        return
    if stack_api_url(home):
        print(f"already running: {stack_api_url(home)}")
        return
    stack = start_stack(home, port=args.port)
    print(f"Prefect UI: {stack.ui_url}")
    print(f"export PREFECT_API_URL={stack.api_url}   # then: make deploy")


if __name__ == "__main__":
    main()
