"""The local stack's warm runner: a process that has imported Prefect and the send-job flow once
and forks a child per ``pagecast job run``, so a run's flow starts at once instead of after the
~2.5 s a fresh process spends importing them.

    python -m deployments.warm_runner SOCKET

A client (``pagecast.launch``) sends one JSON line, ``{"job_id", "env", "log"}``; the runner
answers ``{"pid": …}`` once the child runs, ``{"returncode": …}`` when it exits, or ``{"error": …}``
when it cannot serve the request (``pagecast.warm`` is the client; it then starts a process of its
own). The child takes the
request's environment and has Prefect read its settings and logging levels from it again. The
runner forks only while it has no other thread; each child leads a session of its own (stopping
the stack does not stop a job's run)."""

import atexit
import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path

from prefect.context import refresh_global_settings_context
from prefect.logging.configuration import setup_logging

from flows.send_job import send_job
from pagecast.launch import project_root
from pagecast.warm import read_line

# What a flow run imports on its first call (214 modules, ~0.5 s), imported once here: the engines,
# the database driver, the parameters' encoder and the flow graph's renderer.
FIRST_RUN_IMPORTS = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.utilities.visualization",
    "fastapi.encoders",
    "psycopg",
    "sqlalchemy.dialects.postgresql.psycopg",
)
for _module in FIRST_RUN_IMPORTS:
    importlib.import_module(_module)

_clients: dict[int, socket.socket] = {}  # child pid → the connection that asked for it


def _sources() -> dict[str, int | None]:
    """Modification times of the checkout's own modules this process has imported (not its
    environment's: ``make up`` again after changing dependencies); ``None`` for one that is gone."""
    root, environment = str(project_root()) + os.sep, sys.prefix + os.sep
    sources: dict[str, int | None] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(root) and not path.startswith(environment):
            try:
                sources[path] = os.stat(path).st_mtime_ns
            except OSError:
                sources[path] = None
    return sources


_IMPORTED = _sources()
CHANGED = "the checkout changed since the warm runner imported it"


def _prefect_env(env: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("PREFECT_")}


def _run_child(request: dict, connection: socket.socket, listener: socket.socket) -> None:
    """In the forked child: become the request's process (its log, its environment, a session
    of its own), run the flow and exit with its outcome as ``python -m flows.send_job`` would;
    never returns (``serve``'s cleanup is the runner's, not the child's)."""
    code: int = 1
    try:
        for inherited in (listener, connection, *_clients.values()):
            inherited.close()
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for stream in (1, 2):
            os.dup2(log, stream)
        os.close(log)
        nothing = os.open(os.devnull, os.O_RDONLY)
        os.dup2(nothing, 0)
        os.close(nothing)
        prefect_env = _prefect_env(os.environ)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(project_root())
        if _prefect_env(os.environ) != prefect_env:  # else the settings read at import hold
            refresh_global_settings_context()
            setup_logging()
        send_job(uuid.UUID(request["job_id"]))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # the flow's error, as a fresh process would report it
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # Prefect drains its log and event workers at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _refusal() -> str | None:
    if threading.active_count() != 1:
        return "the warm runner has started threads: forking it is unsafe"
    if _sources() != _IMPORTED:
        return CHANGED
    return None


def _answer(connection: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # the client went away; its child runs on
        connection.sendall(json.dumps(message).encode() + b"\n")


def _serve_request(connection: socket.socket, listener: socket.socket) -> str | None:
    """Fork a child for the request on ``connection``, or answer why not (returned)."""
    connection.settimeout(5)
    try:
        request = json.loads(read_line(connection)[0])
    except (OSError, ValueError):
        connection.close()
        return None
    refusal = _refusal()
    if refusal is not None:
        _answer(connection, {"error": refusal})
        connection.close()
        return refusal
    try:
        pid = os.fork()
    except OSError as error:  # out of processes or memory: the client starts its own
        _answer(connection, {"error": f"fork failed: {error}"})
        connection.close()
        return None
    if pid == 0:
        _run_child(request, connection, listener)
    _clients[pid] = connection
    _answer(connection, {"pid": pid})
    return None


def _reap() -> None:
    while _clients:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = _clients.pop(pid, None)
        if connection is not None:
            _answer(connection, {"returncode": os.waitstatus_to_exitcode(status)})
            connection.close()


def serve(path: Path) -> None:
    """Serve run requests on the unix socket ``path`` until SIGTERM; once the checkout changed,
    refuse them until no child runs, then import it again (the same pid, a new image)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o077)  # requests carry page tokens: the socket's owner alone may connect
    listener.bind(str(path))
    os.umask(umask)
    listener.listen(64)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    changed = False
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        try:
            while not stopping.is_set() and not (changed and not _clients):
                if selector.select(timeout=0.1):
                    with contextlib.suppress(OSError):  # out of file descriptors: a later turn
                        changed |= _serve_request(listener.accept()[0], listener) == CHANGED
                _reap()
        finally:
            listener.close()
            path.unlink(missing_ok=True)
    if changed and not stopping.is_set():
        os.execv(sys.executable, [sys.executable, "-m", "deployments.warm_runner", str(path)])


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
