"""Processes named by pid in state files (the local stack's, PostgreSQL's ``postmaster.pid``):
once such a process has died its pid may belong to another one, so a pid is taken with the time
its process was created."""

import psutil

# A recorded creation time matches within this: psutil derives it from the boot time, in whole
# seconds and moved by clock steps, and postmaster.pid holds its own in whole seconds.
SAME_PROCESS_SECONDS = 5.0


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
