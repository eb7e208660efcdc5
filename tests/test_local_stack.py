"""The local stack's state files name processes by pid: once such a process has died, its pid may
belong to another one, which ``make down`` and ``pagecast job run`` must leave alone."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

import pytest

from deployments.local_stack import Stack, exited, stop_embedded_prefect_server, stop_stack
from pagecast.launch import STACK_FILE, process_started, stack_api_url


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process leading a process group of its own, as a pid's next owner might; it dies of
    SIGINT and SIGTERM (a background shell would have it ignore SIGINT)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(60)",
        ],
        start_new_session=True,
    )
    yield process
    process.kill()
    process.wait()


def _state(tmp_path, pid: int, started: float | None) -> None:
    stack = Stack(
        api_url="http://127.0.0.1:1/api",
        ui_url="http://127.0.0.1:1",
        server_pid=pid,
        server_started=started,
        worker_pid=pid,
        worker_started=started,
    )
    (tmp_path / STACK_FILE).write_text(json.dumps(asdict(stack)))


def test_down_leaves_alone_a_process_that_was_given_a_dead_stack_s_pid(tmp_path, bystander):
    _state(tmp_path, bystander.pid, process_started(bystander.pid) - 60)
    assert stack_api_url(tmp_path) is None  # job run does not take it for the stack's server
    stop_stack(tmp_path)
    time.sleep(0.2)
    assert bystander.poll() is None
    assert not (tmp_path / STACK_FILE).exists()


def test_down_stops_the_stack_s_own_processes(tmp_path, bystander):
    _state(tmp_path, bystander.pid, process_started(bystander.pid))
    assert stack_api_url(tmp_path) == "http://127.0.0.1:1/api"
    stop_stack(tmp_path)
    assert exited(bystander.pid)


def test_a_stale_postmaster_pid_file_signals_nobody(tmp_path, bystander):
    pgdata = tmp_path / "prefect-pgdata"
    pgdata.mkdir()
    stale_start = int(process_started(bystander.pid)) - 3600
    (pgdata / "postmaster.pid").write_text(f"{bystander.pid}\n{pgdata}\n{stale_start}\n5432\n")
    stop_embedded_prefect_server(pgdata)
    time.sleep(0.2)
    assert bystander.poll() is None
    (pgdata / "postmaster.pid").write_text(
        f"{bystander.pid}\n{pgdata}\n{int(process_started(bystander.pid))}\n5432\n"
    )
    stop_embedded_prefect_server(pgdata)
    assert exited(bystander.pid)
