"""The Send API sandbox in a process of its own (``pagecast sandbox serve``), driven over its
control endpoints: it stamps calls as they arrive however busy the sender's process is. Also the
helpers of any server started in a process for a test or a benchmark: a free port, and waiting
until it answers."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_SECONDS = 60.0


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_answering(
    url: str, process: subprocess.Popen, *, what: str, seconds: float = STARTUP_SECONDS
) -> None:
    """Return once a GET of ``url`` gets a 2xx answer; ``RuntimeError`` naming ``what`` when
    ``process`` exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2).is_success:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {seconds:.0f} s")
        time.sleep(0.2)


def busiest(stamps: list[float], seconds: float) -> int:
    """The most of the ledger's ``stamps`` (in order) within any window of ``seconds``."""
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


class SandboxProcess:
    """A running sandbox process, at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def configure(self, **changes: object) -> None:
        httpx.post(f"{self.url}/__config", json=changes, timeout=10).raise_for_status()

    def stats(self) -> dict:
        """Its counters; the ledger file is flushed first."""
        return httpx.get(f"{self.url}/__stats", timeout=30).json()


@contextmanager
def sandbox_process(ledger: Path, env: dict[str, str], *options: str) -> Iterator[SandboxProcess]:
    """The sandbox (``options`` are ``pagecast sandbox serve``'s) logging to ``sandbox.log``
    beside ``ledger``, at a higher scheduling priority where allowed (root): Meta's servers do not
    share our cores, and a sandbox starved by busy neighbours bunches the calls it stamps."""
    port = free_port()
    serve = ("sandbox", "serve", "--port", str(port), "--ledger", str(ledger), *options)
    log_path = ledger.with_name("sandbox.log")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagecast", *serve], env=env, stdout=log, stderr=log
        )
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, process.pid, -10)
    sandbox = SandboxProcess(f"http://127.0.0.1:{port}")
    try:
        wait_answering(f"{sandbox.url}/__stats", process, what=f"the sandbox (its log: {log_path})")
        yield sandbox
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
