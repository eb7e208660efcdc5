"""The local stack's state files name processes by pid: once such a process has died, its pid may
belong to another one, which ``make down`` and ``pagecast job run`` must leave alone. And how
``job run`` watches a flow run its warm runner forked."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest

from deployments.local_stack import Stack, exited, stop_embedded_prefect_server, stop_stack
from pagecast import warm
from pagecast.errors import WarmRunnerSilent
from pagecast.launch import STACK_FILE, stack_api_url
from pagecast.processes import process_started
from pagecast.warm import WARM_RUNNER_SOCKET


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


JOB = uuid.uuid4()


@contextmanager
def _runner_answering(home: Path, *answers: dict) -> Iterator[Callable[[], None]]:
    """A stand-in warm runner for ``home`` that takes one request, sends ``answers``, and closes
    the connection when the returned function is called."""
    _state(home, os.getpid(), process_started(os.getpid()))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / WARM_RUNNER_SOCKET))
    listener.listen(1)
    accepted: list[socket.socket] = []

    def serve() -> None:
        connection = listener.accept()[0]
        accepted.append(connection)
        connection.makefile("rb").readline()
        for answer in answers:
            connection.sendall(json.dumps(answer).encode() + b"\n")

    def close() -> None:
        server.join(5)
        accepted[0].close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield close
    finally:
        listener.close()


def _fork(home: Path) -> warm.WarmChild | str | None:
    return warm.fork(home, JOB, {"job_id": str(JOB), "env": {}, "log": "/dev/null"})


def test_a_forked_run_s_exit_code_comes_from_the_runner(tmp_path, bystander):
    with _runner_answering(tmp_path, {"pid": bystander.pid}, {"returncode": 3}) as close:
        child = _fork(tmp_path)
        close()
        assert isinstance(child, warm.WarmChild) and child.pid == bystander.pid
        assert child.poll() == 3 and not child.exit_unknown


def test_a_forked_run_is_watched_by_its_pid_once_the_runner_is_gone(tmp_path, bystander):
    with _runner_answering(tmp_path, {"pid": bystander.pid}) as close:
        child = _fork(tmp_path)
        close()
        assert isinstance(child, warm.WarmChild)
        assert child.poll() is None and child.poll() is None  # the runner's end, then its pid
        child.terminate()
        bystander.wait(5)
        assert child.poll() is not None and child.exit_unknown


def test_a_runner_s_refusal_is_passed_on_and_no_runner_is_none(tmp_path):
    assert _fork(tmp_path) is None  # nothing listens
    with _runner_answering(tmp_path, {"error": "busy"}) as close:
        assert _fork(tmp_path) == "busy"
        close()


def test_a_runner_that_took_the_request_and_stays_silent_starts_no_other_run(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "ANSWER_SECONDS", 0.2)
    with _runner_answering(tmp_path) as close:
        with pytest.raises(WarmRunnerSilent, match="did not answer"):
            _fork(tmp_path)
        close()
