"""The client side of the local stack's warm runner (``deployments/warm_runner.py``), which
forks ``pagecast job run``'s flow runs from a process that has imported Prefect already.

One JSON line goes to its unix socket, ``{"job_id", "env", "log"}``; the runner answers
``{"pid": …}`` once the child runs, then ``{"returncode": …}`` when it exits, or ``{"error": …}``
when it refuses."""

import json
import os
import select
import signal
import socket
import struct
import uuid
from contextlib import suppress
from pathlib import Path

from pagecast.errors import WarmRunnerSilent
from pagecast.processes import is_same_process, process_started

WARM_RUNNER_SOCKET = "warm-runner.sock"
CONNECT_SECONDS = 5.0
ANSWER_SECONDS = 60.0  # the runner answers a request as soon as it has forked


class WarmChild:
    """A flow run process forked by the local stack's warm runner (``deployments/warm_runner.py``),
    watched like a child process: its exit code comes over the runner's connection. If the runner
    stops first, the process is watched by its pid and ``exit_unknown`` is set when it is gone."""

    def __init__(self, connection: socket.socket, pid: int, received: bytes) -> None:
        self._connection: socket.socket | None = connection
        self._received = received
        self.pid = pid
        self._started = process_started(pid)
        self.returncode: int | None = None
        self.exit_unknown = False

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._connection is not None:
                self._read_answer(self._connection)
            elif not is_same_process(self.pid, self._started):
                self.returncode, self.exit_unknown = -1, True
        return self.returncode

    def _read_answer(self, connection: socket.socket) -> None:
        if b"\n" not in self._received:
            if not select.select([connection], [], [], 0)[0]:
                return
            try:
                chunk = connection.recv(4096)
            except OSError:  # reset: the runner is gone
                chunk = b""
            self._received += chunk
            if chunk and b"\n" not in self._received:
                return
        line, complete, _ = self._received.partition(b"\n")
        connection.close()
        self._connection = None
        if complete:
            self.returncode = json.loads(line).get("returncode", -1)

    def terminate(self) -> None:
        if self.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)


def read_line(connection: socket.socket) -> tuple[bytes, bytes]:
    """One line from ``connection`` (empty at its end) and whatever came after it: the framing of
    both sides."""
    received = b""
    while b"\n" not in received and (chunk := connection.recv(4096)):
        received += chunk
    line, _, rest = received.partition(b"\n")
    return line, rest


def _own_process(connection: socket.socket) -> bool:
    """Whether the peer of a unix socket runs as this process's user (Linux's ``SO_PEERCRED``;
    elsewhere the socket's owner-only mode stands alone)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    return struct.unpack("3i", credentials)[1] == os.getuid()


def fork(home: Path, job_id: uuid.UUID, request: dict) -> WarmChild | str | None:
    """The flow run the warm runner of ``home``'s stack forked; why the runner refused (a
    message); or ``None`` when none answers or it ended before answering. ``WarmRunnerSilent``
    when it took the request and stays silent: it may have started the run, so none is started."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(CONNECT_SECONDS)
        connection.connect(str(home / WARM_RUNNER_SOCKET))
        if not _own_process(connection):  # the request carries page tokens
            connection.close()
            return None
        connection.sendall(json.dumps(request).encode() + b"\n")
        connection.settimeout(ANSWER_SECONDS)
        line, rest = read_line(connection)
    except TimeoutError:
        connection.close()
        raise WarmRunnerSilent(job_id, ANSWER_SECONDS) from None
    except OSError:
        connection.close()
        return None
    answer = json.loads(line) if line else {}
    if "pid" not in answer:
        connection.close()
        return answer.get("error")
    return WarmChild(connection, answer["pid"], rest)
