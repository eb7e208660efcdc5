"""The Prefect shell, run against one ``prefect_test_harness`` for the whole session."""

import json
import re
import uuid

import pytest
import sqlalchemy as sa
from prefect.blocks.system import Secret

from pagecast.errors import JobFatalGraphError, LeaseLost, MissingPageToken
from pagecast.sandbox import SandboxConfig, running_sandbox
from pagecast.settings import get_settings
from tests.engine import PAGE, assert_counters_match_rows, create_job, job_row, recipient_counts

TOKEN = "flow-test-token-3f9a1c"


@pytest.fixture
def sandbox(tmp_path, database_url, monkeypatch, prefect_harness):
    path = tmp_path / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=path)) as (url, state):
        monkeypatch.setenv("PAGECAST_DATABASE_URL", database_url)
        monkeypatch.setenv("PAGECAST_GRAPH_API_URL", url)
        monkeypatch.setenv("PAGECAST_CHUNK_SIZE", "100")
        monkeypatch.setenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}", TOKEN)
        get_settings.cache_clear()

        def ledger():
            state.stats()
            return [json.loads(line) for line in path.read_text().splitlines()]

        yield state, ledger
    get_settings.cache_clear()


def test_flow_sends_a_job_exactly_once(engine, sandbox):
    from flows.send_job import send_job

    state, ledger = sandbox
    job = create_job(engine, 1000)
    flow_state = send_job(job.id, return_state=True)
    assert flow_state.result()["status"] == "completed"
    assert job_row(engine, job.id).sent == 1000
    psids = [r["psid"] for r in ledger()]
    assert len(psids) == len(set(psids)) == 1000
    assert_counters_match_rows(engine, job.id)
    assert state.stats()["token_via"] == {"header": 1000}


def test_second_run_of_a_finished_job_sends_nothing(engine, sandbox):
    from flows.send_job import send_job

    state, _ = sandbox
    job = create_job(engine, 20)
    send_job(job.id)
    assert send_job(job.id) == {"job_id": str(job.id), "claimed": False}
    assert state.stats()["delivered"] == 20


def test_missing_token_fails_the_job_before_sending(engine, sandbox, monkeypatch):
    from flows.send_job import send_job

    state, _ = sandbox
    monkeypatch.delenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}")
    monkeypatch.delenv("PAGECAST_PAGE_ACCESS_TOKEN", raising=False)
    job = create_job(engine, 20)
    assert send_job(job.id)["status"] == "failed"
    failed = job_row(engine, job.id)
    assert f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}" in failed.last_error
    assert state.stats()["requests"] == 0


def test_token_from_a_secret_block(engine, sandbox, monkeypatch):
    from flows.send_job import send_job
    from tasks.tokens import secret_block_name

    state, _ = sandbox
    monkeypatch.delenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}")
    monkeypatch.delenv("PAGECAST_PAGE_ACCESS_TOKEN", raising=False)
    Secret(value="block-token").save(secret_block_name(PAGE), overwrite=True)
    state.config.valid_tokens = ["block-token"]
    job = create_job(engine, 30)
    assert send_job(job.id)["status"] == "completed"
    assert state.stats()["delivered"] == 30


def _prefect_env(monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


def test_cli_job_run_shows_progress_and_exits_by_status(engine, sandbox, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from pagecast.cli import app

    _prefect_env(monkeypatch)
    monkeypatch.setenv("PAGECAST_HOME", str(tmp_path))
    state, _ = sandbox
    job = create_job(engine, 120)
    result = CliRunner().invoke(app, ["job", "run", str(job.id)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "completed" in result.stdout and "120" in result.stdout
    assert state.stats()["delivered"] == 120
    state.config.revoke_after = 5
    failing = create_job(engine, 60, text="second")
    result = CliRunner().invoke(app, ["job", "run", str(failing.id)], catch_exceptions=False)
    assert result.exit_code == 1
    assert job_row(engine, failing.id).status == "failed"


def test_cli_demo(sandbox, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from pagecast.cli import app
    from pagecast.demo import DEMO_PAGE_ID

    _prefect_env(monkeypatch)
    monkeypatch.setenv("PAGECAST_HOME", str(tmp_path))
    monkeypatch.setenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{DEMO_PAGE_ID}", "restored-after-the-test")
    result = CliRunner().invoke(app, ["demo", "--contacts", "300"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "sent" in result.stdout and "duration" in result.stdout
    assert "0 duplicates" in result.stderr
    receipts = re.search(r"webhook receipts: (\d+) delivered .*, (\d+) read", result.stderr)
    assert receipts, result.stderr
    delivered, read = map(int, receipts.groups())
    assert 0 < read < delivered  # the sandbox reports most deliveries and about half read


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConnectionError("database went away"), True),
        (TimeoutError("slow network"), True),
        (LeaseLost(uuid.uuid4()), False),
        (MissingPageToken("1"), False),
        (JobFatalGraphError("bad token", code=190), False),
    ],
)
def test_chunk_tasks_retry_only_transient_failures(error, retried):
    from prefect.states import Failed

    from tasks.sending import retry_transient_only

    assert retry_transient_only(None, None, Failed(data=error)) is retried


def _second_chunk_raises(monkeypatch, error: Exception) -> list[int]:
    """Make the run's second chunk task raise ``error`` (without Prefect retries); the returned
    list counts the chunk calls."""
    import tasks.sending

    real_send = tasks.sending.send_chunk_core
    calls = [0]

    async def raising_on_the_second(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise error
        return await real_send(*args, **kwargs)

    monkeypatch.setattr(tasks.sending.send_chunk, "retries", 0)
    monkeypatch.setattr(tasks.sending, "send_chunk_core", raising_on_the_second)
    return calls


def test_a_chunk_task_failing_in_prefect_is_submitted_again(engine, sandbox, monkeypatch):
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    from flows import send_job as send_job_flow

    _, ledger = sandbox
    calls = _second_chunk_raises(
        monkeypatch, ConcurrencySlotAcquisitionError("the server answered 503")
    )
    monkeypatch.setattr(send_job_flow, "RESUBMIT_MAX_SECONDS", 0.1)
    job = create_job(engine, 1000)
    assert send_job_flow.send_job(job.id, return_state=True).result()["status"] == "completed"
    psids = [r["psid"] for r in ledger()]
    assert len(psids) == len(set(psids)) == 1000
    assert calls[0] > 2  # the failed chunk ran again, and the others after it
    assert_counters_match_rows(engine, job.id)


def test_an_unexpected_error_ends_the_job_failed_with_the_rest_pending(
    engine, sandbox, monkeypatch
):
    from flows.send_job import send_job

    state, _ = sandbox
    _second_chunk_raises(monkeypatch, ValueError("disk on fire"))
    job = create_job(engine, 1000)
    assert send_job(job.id, return_state=True).is_failed()
    failed = job_row(engine, job.id)
    assert (failed.status, failed.lease_owner) == ("failed", None)
    assert failed.last_error == "the run crashed: ValueError: disk on fire"
    counts = recipient_counts(engine, job.id)
    assert "sending" not in counts and counts["pending"] >= 100
    assert counts.get("sent", 0) == failed.sent == state.stats()["delivered"]


def test_a_broadcast_with_test_psids_holds_its_job_until_submitted_again(engine, sandbox):
    from flows.broadcast import broadcast
    from pagecast.errors import InvalidField

    _, ledger = sandbox
    form = {"page_id": PAGE, "text": "Hi {first_name}", "psids": "1001 1002 1003"}
    with pytest.raises(InvalidField, match="idempotency_key: is required with test_psids"):
        broadcast(**form, test_psids=["5005"])
    form["idempotency_key"] = "launch-7"
    held = broadcast(**form, test_psids=["5005", "5006"])
    assert held["held"] and [s["status"] for s in held["test_sends"]] == ["sent", "sent"]
    job = job_row(engine, uuid.UUID(held["job_id"]))
    assert (job.status, job.sent, job.total) == ("paused", 0, 3)
    assert sorted(r["psid"] for r in ledger()) == ["5005", "5006"]

    again = broadcast(**form, test_psids=["5005"])  # still held: another test, nothing else
    assert again["job_id"] == held["job_id"] and not again["created"]
    sent = broadcast(**form)
    assert sent["status"] == "completed" and not sent["created"]
    assert sorted(r["psid"] for r in ledger()) == ["1001", "1002", "1003", "5005", "5005", "5006"]
    with engine.connect() as connection:
        jobs = connection.execute(sa.text("SELECT count(*) FROM send_jobs")).scalar_one()
    assert jobs == 1
