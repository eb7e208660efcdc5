"""Deterministic crash points for the crash matrix: with ``PAGECAST_CRASH_AT=name`` (or
``name@n``) the process kills itself with SIGKILL the first (n-th) time it reaches ``name``.
Unset, a crash point costs one dictionary lookup."""

import os
import signal
import threading

CRASH_AT_ENV = "PAGECAST_CRASH_AT"

_reached: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here, as a ``kill -9`` would, when ``PAGECAST_CRASH_AT`` names this point."""
    spec = os.environ.get(CRASH_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    with _lock:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] != int(nth or 1):
            return
    os.kill(os.getpid(), signal.SIGKILL)
