"""The recipient state machine under random runs, against real PostgreSQL.

A hypothesis ``RuleBasedStateMachine`` drives jobs through every operation that moves their
recipients, in random order: a run is started (``claim_job``), claims chunks, marks rows
``sending`` (``flush`` with marks), records answers (``flush`` with outcomes), heartbeats, stops its
job, finishes, dies and is swept or taken over; a rival runner tries to claim a live job; an
operator cancels, pauses, resumes and retries. Runners whose lease was lost keep acting too, and
must be fenced out. Every rule calls pagecast as the product does; the only SQL of the test reads
rows, and ages a heartbeat to play a dead runner.

After every step the invariants read the database:

1. the job's rows are exactly its recipients, in valid statuses, summing to ``total``;
2. the ``sent``/``failed``/``skipped``/``unknown`` counters equal the rows in those statuses;
3. a row in a final status (sent, failed, skipped, unknown) changes only by an explicit retry
   (of a retryable failure, or of an unknown row when asked), and a sent row never changes;
4. nothing is both sent and pending: a row once recorded ``sent`` stays ``sent``, message id kept;
5. a job that ended (final status, no lease held) has no ``claimed`` or ``sending`` row.

Each rule also checks its own effect against the rows it read before: what a claim, a flush, a
retry moves exactly; that a fenced runner changes nothing; that a refused command changes nothing.
"""

import itertools
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import Session

from pagecast import commands, db, lifecycle, recipients
from pagecast.errors import (
    AmbiguousDelivery,
    JobStateConflict,
    LeaseLost,
    RecipientGraphError,
    TransientGraphError,
)
from pagecast.graph import OUTSIDE_WINDOW
from pagecast.leases import Lease
from pagecast.lifecycle import Recovery
from pagecast.models import TERMINAL_JOB_STATUSES, JobStatus, RecipientStatus
from pagecast.recipients import CANCELLED_REASON, IN_FLIGHT_KEY, Outcome
from pagecast.sender import TEXT_TOO_LONG
from tests.engine import create_job

T = TypeVar("T")

RECOVERY = Recovery(lease_seconds=60, max_stalled_runs=3, backoff_seconds=30.0)
FINAL = frozenset({"sent", "failed", "skipped", "unknown"})
IN_FLIGHT = frozenset({"claimed", "sending"})
COUNTED = ("sent", "failed", "skipped", "unknown")
OVER = frozenset({"completed", "cancelled"})  # nothing of the job can be sent again
_jobs = itertools.count()

# What a runner can learn of a row it marked (a call was made), and of a row it only claimed.
ANSWERS = ("sent", "failed", "failed_retryable", "skipped", "unknown", "claimed", "pending")
NO_CALL = ("outside_window", "too_long", "pending")
# A runner finishes its run, heartbeats, stops its job (a job-fatal error: failed; too many
# permanent failures: paused); the lease holder dies, and a sweep or a new runner ends its run; a
# rival runner tries to claim the job.
RUNNER_EVENTS = (
    "finish",
    "heartbeat",
    "finish",
    "stop_failed",
    "stop_paused",
    "die_and_sweep",
    "die_and_take_over",
    "rival",
)
# Pause is drawn twice as often: a pause that lands while a runner still holds the job is what the
# other commands must cope with. Cancel comes last: the simplest examples do not end at once.
OPERATOR_COMMANDS = ("pause", "resume", "retry", "pause", "retry_all", "cancel")


class Row(NamedTuple):
    status: str
    message_id: str | None
    error_key: str | None
    retryable: bool
    attempts: int


@dataclass(frozen=True)
class Snapshot:
    """The job's row and its recipients' rows, as read in one transaction."""

    job: dict[str, Any]
    rows: dict[str, Row]

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` passes the fence now."""
        return (self.job["lease_owner"], self.job["attempt"]) == (lease.owner, lease.attempt)

    def with_status(self, *statuses: str) -> list[str]:
        return sorted(psid for psid, row in self.rows.items() if row.status in statuses)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(RecipientStatus, 0)
        for row in self.rows.values():
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts


_JOB_COLUMNS = (
    "status, total, sent, failed, skipped, unknown, lease_owner, attempt, cancel_requested, "
    "heartbeat_at, stalled_runs, last_error, finished_at, resend_unknown"
)


def read(engine: sa.Engine, job_id: uuid.UUID) -> Snapshot:
    with engine.connect() as connection, connection.begin():
        job = connection.execute(
            sa.text(f"SELECT {_JOB_COLUMNS} FROM send_jobs WHERE id = :id"), {"id": job_id}
        ).one()
        rows = connection.execute(
            sa.text(
                "SELECT psid, status, message_id, error_key, retryable, attempts "
                "FROM send_job_recipients WHERE job_id = :id"
            ),
            {"id": job_id},
        ).all()
    return Snapshot(dict(job._mapping), {r[0]: Row(*r[1:]) for r in rows})


def _outcome(psid: str, kind: str, message_id: str) -> Outcome:
    """An answer (or the decision not to call) as the chunk sender makes it."""
    if kind == "sent":
        return Outcome(psid, RecipientStatus.SENT, message_id=message_id)
    if kind == "failed":
        error = RecipientGraphError("blocked", code=551, subcode=1545041)
        return Outcome(psid, RecipientStatus.FAILED, error=error)
    if kind == "failed_retryable":  # transient errors, retried until exhausted
        error = TransientGraphError("down", code=2)
        return Outcome(psid, RecipientStatus.FAILED, error=error, retryable=True)
    if kind == "skipped":
        error = RecipientGraphError("window", code=10, subcode=2018278, skip_reason=OUTSIDE_WINDOW)
        return Outcome(psid, RecipientStatus.SKIPPED, error=error, reason=OUTSIDE_WINDOW)
    if kind == "unknown":
        return Outcome(psid, RecipientStatus.UNKNOWN, error=AmbiguousDelivery("timed out"))
    if kind == "outside_window":
        return Outcome(psid, RecipientStatus.SKIPPED, reason=OUTSIDE_WINDOW)
    if kind == "too_long":
        return Outcome(psid, RecipientStatus.FAILED, reason=TEXT_TOO_LONG)
    # claimed: a transient error, to be marked again; pending: stopped or job-fatal, not delivered
    return Outcome(psid, RecipientStatus(kind))


def _most_of(data: st.DataObject, pool: list[str], label: str) -> list[str]:
    """A non-empty subset of ``pool`` (when it has any), all of it in the simplest case: simple
    examples make progress."""
    if not pool:
        return []
    left_out = data.draw(
        st.lists(st.sampled_from(pool), unique=True, max_size=len(pool) - 1), label=label
    )
    return [psid for psid in pool if psid not in left_out]


class JobMachine(RuleBasedStateMachine):
    """A job, its runners (every lease ever handed out for it) and its operator; when the job is
    over for good, the next one."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__()
        self.engine = engine
        self.job_id: uuid.UUID | None = None
        self.psids: list[str] = []
        self.resend_unknown = False
        self.runners: list[Lease] = []
        self.sent: dict[str, str] = {}  # psid -> message id, as recorded
        self.previous: Snapshot | None = None  # as the invariants read it after the last step
        self.fresh = False  # nothing was written since ``previous`` was read
        self.retried: frozenset[str] = frozenset()  # final rows the last step could re-queue
        self.names = itertools.count()

    # --- reading and writing -------------------------------------------------------------------

    def now(self) -> Snapshot:
        """The job as it is (the invariants' read, when nothing was written since)."""
        return self.previous if self.fresh else read(self.engine, self.job_id)

    def call(self, operation: Callable[..., T], **kwargs: Any) -> T:
        """``operation(session, **kwargs)`` in a transaction, as pagecast's callers run it."""
        self.fresh = False
        with db.session_scope(self.engine) as session:
            return operation(session, **kwargs)

    def assert_unchanged(self, before: Snapshot, what: str) -> None:
        after = read(self.engine, self.job_id)
        assert after == before, f"{what} changed the job: {_diff(before, after)}"

    def heartbeat_is_fresh(self) -> bool:
        """Whether the job's heartbeat is recent enough for its runner to count as alive."""
        with self.engine.connect() as connection:
            return connection.execute(
                sa.text(
                    "SELECT COALESCE(heartbeat_at >= now() - make_interval(secs => :seconds), "
                    "false) FROM send_jobs WHERE id = :id"
                ),
                {"id": self.job_id, "seconds": RECOVERY.lease_seconds},
            ).scalar_one()

    def draw_runner(self, data: st.DataObject) -> Lease:
        """A runner, most often the newest (the one most likely to hold the lease)."""
        newest = self.runners[-1:]
        return data.draw(st.sampled_from(newest * 4 + self.runners), label="runner")

    # --- jobs ----------------------------------------------------------------------------------

    @initialize(count=st.integers(6, 12), resend_unknown=st.booleans())
    def create(self, count: int, resend_unknown: bool) -> None:
        """A new job of ``count`` recipients (its own text: the jobs of all examples share the
        test's database), with no runner yet."""
        text = f"state machine {next(_jobs)}"
        job = create_job(self.engine, count, text=text, resend_unknown=resend_unknown)
        self.job_id, self.resend_unknown = job.id, resend_unknown
        self.psids = [str(10**15 + i) for i in range(count)]
        self.runners, self.sent = [], {}
        self.retried = frozenset()
        self.previous, self.fresh = read(self.engine, job.id), True

    @precondition(lambda self: self.previous.job["status"] in OVER)
    @rule(count=st.integers(6, 12), resend_unknown=st.booleans())
    def next_job(self, count: int, resend_unknown: bool) -> None:
        """The job is over for good (nothing of it can be sent again): go on with a new one."""
        self.create(count, resend_unknown)

    # --- the work of a run ---------------------------------------------------------------------

    @precondition(lambda self: self.previous.job["status"] == "pending")
    @rule()
    def start_run(self) -> None:
        """A new runner claims the job: it wins when the job is pending (and no cancel is
        requested), or running under a dead runner, whose run is ended first."""
        before = self.now()
        job = before.job
        alive = job["status"] == "running" and self.heartbeat_is_fresh()
        owner = f"runner-{next(self.names)}"
        lease = self.call(lifecycle.claim_job, job_id=self.job_id, owner=owner, recovery=RECOVERY)
        if lease is None:
            dead_holder = job["lease_owner"] is not None and not self.heartbeat_is_fresh()
            claimable = (
                job["status"] == "pending"
                and not job["cancel_requested"]
                and (job["lease_owner"] is None or dead_holder)
            )
            assert not claimable, "a pending, due job was not claimed"
            if job["status"] != "running" and dead_holder:
                self.assert_let_go(before)  # a dead runner's stopped job: its lease is ended
            elif job["status"] != "running" or alive:
                self.assert_unchanged(before, "a refused claim")
            return
        after = read(self.engine, self.job_id)
        assert not alive, "a live runner's job was taken over"
        assert (lease.owner, lease.attempt) == (owner, job["attempt"] + 1)
        assert after.holds(lease) and after.job["status"] == "running"
        assert not after.with_status(*IN_FLIGHT), "the claim left another run's rows in flight"
        self.runners.append(lease)

    @precondition(lambda self: self.runners and self.previous.job["status"] == "running")
    @rule(data=st.data())
    def claim_chunk(self, data: st.DataObject) -> None:
        """Claim the chunk after < psid ≤ last (the whole job in the simplest case)."""
        lease = self.draw_runner(data)
        first = data.draw(st.integers(0, len(self.psids) - 1), label="first")
        stop = len(self.psids) - 1 - data.draw(st.integers(0, len(self.psids) - 1 - first))
        after, last = ("" if first == 0 else self.psids[first - 1]), self.psids[stop]
        before = self.now()
        claimed = self.call(recipients.claim, lease=lease, after=after, last=last)
        job = before.job
        if not (before.holds(lease) and job["status"] == "running" and not job["cancel_requested"]):
            assert claimed == []
            return self.assert_unchanged(before, "a claim that may not claim")
        expected = dict(before.rows)
        for psid in self.psids[first : stop + 1]:
            row = before.rows[psid]
            if row.status in ("pending", "claimed") or (
                row.status == "sending" and self.resend_unknown
            ):
                expected[psid] = row._replace(status="claimed")
            elif row.status == "sending":  # an earlier attempt of the chunk died in flight
                expected[psid] = row._replace(status="unknown", error_key=IN_FLIGHT_KEY)
        actual = read(self.engine, self.job_id).rows
        assert actual == expected, _rows_diff(expected, actual)
        in_range = self.psids[first : stop + 1]
        assert [c.psid for c in claimed] == [p for p in in_range if expected[p].status == "claimed"]

    @precondition(lambda self: self.runners and self.previous.with_status("claimed"))
    @rule(data=st.data())
    def dispatch(self, data: st.DataObject) -> None:
        """Mark claimed rows ``sending`` just before their calls (now and then other rows too)."""
        lease = self.draw_runner(data)
        stray = data.draw(st.integers(0, 4), label="stray") == 4
        pool = self.psids if stray else self.now().with_status("claimed")
        self._flush(lease, [], _most_of(data, pool, "not marked"))

    @precondition(lambda self: self.runners and self.previous.with_status(*IN_FLIGHT))
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        """Record the answers of sending rows and the decisions on claimed rows (no call), now and
        then for rows no longer in flight; with marks of the claimed rows not answered."""
        lease = self.draw_runner(data)
        now = self.now()
        stray = data.draw(st.integers(0, 4), label="stray") == 4
        psids = _most_of(data, self.psids if stray else now.with_status(*IN_FLIGHT), "unanswered")
        outcomes = []
        for psid in psids:
            status = now.rows[psid].status
            kind = data.draw(
                st.sampled_from(NO_CALL if status == "claimed" else ANSWERS),
                label=f"{psid} {status}",
            )
            outcomes.append(_outcome(psid, kind, f"m_{self.job_id.hex[:8]}_{next(self.names)}"))
        others = [psid for psid in now.with_status("claimed") if psid not in psids]
        marks = data.draw(st.lists(st.sampled_from(others), unique=True)) if others else []
        self._flush(lease, outcomes, marks)

    def _flush(self, lease: Lease, outcomes: list[Outcome], marks: list[str]) -> None:
        before = self.now()
        flushed = self.call(recipients.flush, lease=lease, outcomes=outcomes, marks=marks)
        if not before.holds(lease):
            assert flushed is None, "a runner that lost its lease could flush"
            return self.assert_unchanged(before, "a fenced flush")
        job = before.job
        expected = dict(before.rows)
        recorded = 0
        for outcome in outcomes:
            row = before.rows[outcome.psid]
            if row.status in IN_FLIGHT:  # rows settled meanwhile keep their state
                recorded += 1
                expected[outcome.psid] = row._replace(
                    status=outcome.status.value,
                    message_id=outcome.message_id,
                    error_key=outcome.key,
                    retryable=outcome.retryable,
                )
        marking = job["status"] == "running" and not job["cancel_requested"]
        marked = {psid for psid in marks if marking and before.rows[psid].status == "claimed"}
        for psid in marked:
            row = before.rows[psid]
            expected[psid] = row._replace(status="sending", attempts=row.attempts + 1)
        assert flushed is not None
        assert (flushed.marked, flushed.recorded) == (marked, recorded)
        assert (flushed.job_status, flushed.cancel_requested) == (
            job["status"],
            job["cancel_requested"],
        )
        actual = read(self.engine, self.job_id).rows
        assert actual == expected, _rows_diff(expected, actual)
        for outcome in outcomes:
            if expected[outcome.psid].status == "sent" and outcome.psid not in self.sent:
                self.sent[outcome.psid] = outcome.message_id

    # --- what else happens to a run, and the operator ------------------------------------------

    @precondition(lambda self: self.runners)
    @rule(data=st.data(), event=st.sampled_from(RUNNER_EVENTS))
    def runner_event(self, data: st.DataObject, event: str) -> None:
        """What befalls a runner besides its work (see ``RUNNER_EVENTS``)."""
        if event.startswith("die"):
            return self.crash(takeover=event == "die_and_take_over")
        if event == "rival":
            return self.start_run()
        lease = self.draw_runner(data)
        if event == "stop_failed":
            return self.stop(lease, JobStatus.FAILED)
        if event == "stop_paused":
            return self.stop(lease, JobStatus.PAUSED)
        getattr(self, event)(lease)

    @rule(command=st.sampled_from(OPERATOR_COMMANDS))
    def operate(self, command: str) -> None:
        """What an operator does, at any time (see ``OPERATOR_COMMANDS``)."""
        if command.startswith("retry"):
            return self.retry(include_unknown=command == "retry_all")
        getattr(self, command)()

    def heartbeat(self, lease: Lease) -> None:
        before = self.now()
        try:
            self.call(lifecycle.heartbeat, lease=lease)
        except LeaseLost:
            assert not before.holds(lease)
            return self.assert_unchanged(before, "a refused heartbeat")
        assert before.holds(lease), "a runner that lost its lease could heartbeat"

    def stop(self, lease: Lease, status: JobStatus) -> None:
        before = self.now()
        self.call(lifecycle.stop_running_job, lease=lease, status=status, reason="stopped")
        if not (before.holds(lease) and before.job["status"] == "running"):
            return self.assert_unchanged(before, "a stop that may not stop")
        after = read(self.engine, self.job_id)
        assert after.job["status"] == status and after.rows == before.rows

    def finish(self, lease: Lease) -> None:
        before = self.now()
        try:
            self.call(lifecycle.finish_job, lease=lease, recovery=RECOVERY)
        except LeaseLost:
            assert not before.holds(lease)
            return self.assert_unchanged(before, "a fenced finish")
        assert before.holds(lease), "a runner that lost its lease could finish"
        after = read(self.engine, self.job_id)
        job, status = before.job, after.job["status"]
        assert after.job["lease_owner"] is None
        assert not after.with_status(*IN_FLIGHT), "the run ended with rows in flight"
        if job["cancel_requested"] and job["status"] not in TERMINAL_JOB_STATUSES:
            assert status == "cancelled"
        elif job["status"] != "running":
            assert status == job["status"]
        elif job["cancel_requested"]:
            assert status == "cancelled"
        elif after.with_status("pending"):
            assert status in ("pending", "failed")  # failed: too many runs without progress
        else:
            errors = after.job["failed"] + after.job["unknown"]
            assert status == ("completed_with_errors" if errors else "completed")

    def assert_let_go(self, before: Snapshot) -> None:
        """A dead runner's job that it had stopped (paused, failed, or since resumed) loses the
        lease and its rows in flight, and keeps its status (``cancelled`` if one was requested)."""
        after = read(self.engine, self.job_id)
        expected = "cancelled" if before.job["cancel_requested"] else before.job["status"]
        assert (after.job["status"], after.job["lease_owner"]) == (expected, None)
        assert not after.with_status(*IN_FLIGHT), "a dead runner's rows stayed in flight"

    def crash(self, takeover: bool) -> None:
        """The lease holder dies (its heartbeat ages); a sweep or a new runner ends its run, and
        the dead runner, should it come back, is fenced out."""
        before = self.now()
        if before.job["lease_owner"] is None:
            return
        dead = next(lease for lease in reversed(self.runners) if before.holds(lease))
        self.fresh = False
        with self.engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE send_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id"
                ),
                {"id": self.job_id},
            )
        if takeover:
            self.start_run()
        else:
            ended = self.call(lifecycle.end_dead_runs, recovery=RECOVERY, job_id=self.job_id)
            assert len(ended) == 1
            if before.job["status"] != "running":
                self.assert_let_go(before)
        after = read(self.engine, self.job_id)
        assert not after.holds(dead), "the dead runner still holds the job"
        rows = after.with_status(*IN_FLIGHT) or self.psids
        outcomes = [Outcome(rows[0], RecipientStatus.SENT, message_id="zombie")]
        flushed = self.call(recipients.flush, lease=dead, outcomes=outcomes, marks=rows)
        assert flushed is None, "the old lease still writes after the takeover"
        claimed = self.call(recipients.claim, lease=dead, after="", last=self.psids[-1])
        assert claimed == []
        self.assert_unchanged(after, "the fenced old runner")

    def _command(self, command: Callable[..., Any], allowed: bool, **kwargs: Any) -> bool:
        """Run an operator command; ``False`` when it was refused (and then nothing changed)."""
        before = self.now()
        what = f"{command.__name__} of a {before.job['status']} job"
        try:
            self.call(command, job_id=self.job_id, **kwargs)
        except JobStateConflict:
            assert not allowed, f"{what} was refused"
            self.assert_unchanged(before, f"a refused {what}")
            return False
        assert allowed, f"{what} was not refused"
        return True

    def cancel(self) -> None:
        before = self.now()
        job = before.job
        held = job["lease_owner"] is not None and self.heartbeat_is_fresh()
        allowed = job["status"] not in TERMINAL_JOB_STATUSES
        if not self._command(commands.cancel_job, allowed, recovery=RECOVERY):
            return
        after = read(self.engine, self.job_id)
        if held:  # its live runner stops calling and ends the job cancelled
            assert after.job["cancel_requested"] and after.rows == before.rows
            return
        assert after.job["status"] == "cancelled" and after.job["lease_owner"] is None
        for psid in before.with_status("pending"):
            assert after.rows[psid].status == "skipped"
            assert after.rows[psid].error_key == CANCELLED_REASON
        lost = "skipped" if job["resend_unknown"] else "unknown"
        for psid in before.with_status("claimed", "sending"):  # its runner is dead
            expected = lost if before.rows[psid].status == "sending" else "skipped"
            assert after.rows[psid].status == expected

    def pause(self) -> None:
        before = self.now()
        allowed = before.job["status"] in ("pending", "running")
        if self._command(commands.pause_job, allowed and not before.job["cancel_requested"]):
            after = read(self.engine, self.job_id)
            assert after.job["status"] == "paused" and after.rows == before.rows

    def resume(self) -> None:
        before = self.now()
        if self._command(commands.resume_job, before.job["status"] == "paused"):
            after = read(self.engine, self.job_id)
            assert after.job["status"] == "pending" and after.rows == before.rows

    def retry(self, include_unknown: bool) -> None:
        before = self.now()
        requeued = frozenset(
            psid
            for psid, row in before.rows.items()
            if (row.status == "failed" and row.retryable)
            or (row.status == "unknown" and include_unknown)
        )
        allowed = before.job["status"] not in ("running", "pending", "cancelled") and bool(
            requeued or before.with_status("pending")
        )
        if not self._command(commands.requeue_job, allowed, include_unknown=include_unknown):
            return
        after = read(self.engine, self.job_id)
        assert after.job["status"] == "pending"
        expected = dict(before.rows)
        for psid in requeued:
            expected[psid] = before.rows[psid]._replace(
                status="pending", error_key=None, retryable=False
            )
        assert after.rows == expected, _rows_diff(expected, after.rows)
        self.retried = requeued

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def invariants(self) -> None:
        now = read(self.engine, self.job_id)
        job, counts = now.job, now.counts()
        # 1. the rows are the job's recipients, in valid statuses, and sum to the total
        assert sorted(now.rows) == self.psids
        assert set(counts) <= set(RecipientStatus), counts
        assert sum(counts.values()) == job["total"] == len(self.psids)
        # 2. the counters equal the rows
        assert {name: job[name] for name in COUNTED} == {name: counts[name] for name in COUNTED}
        # 3. a final row changes only by a retry; a sent row never
        for psid, old in self.previous.rows.items():
            new = now.rows[psid]
            if old.status in FINAL and new != old:
                assert old.status != "sent", f"sent row {psid} changed: {old} -> {new}"
                assert psid in self.retried, f"final row {psid} changed: {old} -> {new}"
        # 4. nothing is both sent and pending: what was sent stays sent, with its message id
        for psid, message_id in self.sent.items():
            assert now.rows[psid].status == "sent", f"{psid} was sent, now {now.rows[psid]}"
            assert now.rows[psid].message_id == message_id
        # 5. a job that ended holds no row in flight
        if job["status"] in TERMINAL_JOB_STATUSES and job["lease_owner"] is None:
            in_flight = set(now.with_status(*IN_FLIGHT))
            assert not in_flight, f"job {job['status']} with rows in flight: {sorted(in_flight)}"
        self.previous, self.fresh, self.retried = now, True, frozenset()


def _rows_diff(expected: dict[str, Row], actual: dict[str, Row]) -> str:
    return "; ".join(
        f"{psid}: expected {expected.get(psid)}, got {actual.get(psid)}"
        for psid in sorted(set(expected) | set(actual))
        if expected.get(psid) != actual.get(psid)
    )


def _diff(before: Snapshot, after: Snapshot) -> str:
    job = {k: (v, after.job[k]) for k, v in before.job.items() if after.job[k] != v}
    return f"job {job}; rows {_rows_diff(before.rows, after.rows)}"


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_recipient_state_machine(engine: sa.Engine) -> None:
    """Every example sends its own jobs in the test's database (see ``JobMachine.create``)."""
    run_state_machine_as_test(lambda: JobMachine(engine), settings=SETTINGS)


@pytest.mark.parametrize("then", ["pause", "pause_and_resume"])
def test_cancel_of_a_job_a_runner_still_holds_settles_its_rows(engine: sa.Engine, then: str):
    """The sequence the machine found: a runner claims and marks rows, the job is paused (and
    resumed) while the runner still holds it, then cancelled; the runner records the call it made
    and ends its run. No row may stay in flight in the cancelled job."""
    job = create_job(engine, 6, text=f"cancel while held {then}")
    with db.session_scope(engine) as session:
        lease = lifecycle.claim_job(session, job_id=job.id, owner="a", recovery=RECOVERY)
        claimed = recipients.claim(session, lease=lease, after="", last=str(10**15 + 1))
        psids = [c.psid for c in claimed]
        recipients.flush(session, lease=lease, outcomes=[], marks=psids[:1])
        commands.pause_job(session, job_id=job.id)
        if then == "pause_and_resume":
            commands.resume_job(session, job_id=job.id)
    with db.session_scope(engine) as session:
        commands.cancel_job(session, job_id=job.id)
    with db.session_scope(engine) as session:  # the call was delivered: the runner records it
        outcomes = [Outcome(psids[0], RecipientStatus.SENT, message_id="m.1")]
        recipients.flush(session, lease=lease, outcomes=outcomes, marks=[])
    with suppress(LeaseLost), Session(engine) as session, session.begin():  # and ends its run
        lifecycle.finish_job(session, lease=lease, recovery=RECOVERY)
    after = read(engine, job.id)
    assert after.job["status"] == "cancelled"
    stuck = {psid: after.rows[psid].status for psid in after.with_status(*IN_FLIGHT)}
    assert not stuck, f"cancelled job with rows stuck in flight: {stuck}"
