"""No secret leaves the request that needs it.

A page token, an app secret and the ``appsecret_proof`` derived from them travel in a Send API
request's ``Authorization`` header and body only. Jobs sent, refused and crashed with recognisable
secrets prove they appear in no log line (DEBUG), Prefect flow or task run, log, artifact or event
(read back from the server), database row, error message, traceback or CLI output, and in no URL the
sandbox was called on."""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
import sqlalchemy as sa
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.filters import EventAnyResourceFilter, EventFilter
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

import tasks.sending
from flows.send_job import send_job  # at collection: it sets up logging, dropping caplog
from pagecast.cli import app
from pagecast.errors import GraphError
from pagecast.graph import GraphClient
from pagecast.sandbox import Sandbox
from pagecast.settings import get_settings
from tasks.tokens import secret_block_name
from tests.engine import PAGE, create_job, job_row

TOKEN = f"EAAG-SECRET-TOKEN-{uuid.uuid4().hex}"
APP_SECRET = f"APP-SECRET-{uuid.uuid4().hex}"
PROOF = hmac.new(APP_SECRET.encode(), TOKEN.encode(), hashlib.sha256).hexdigest()
SECRETS = {"the page token": TOKEN, "the app secret": APP_SECRET, "appsecret_proof": PROOF}
SERVER_WAIT_SECONDS = 20.0
EVENTS_PER_PAGE = 50  # the most the server returns at once
T = TypeVar("T")


def assert_no_secret(text: str, where: str) -> None:
    """Fail naming which secret ``text`` holds (not quoting it)."""
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"{' and '.join(leaked)} found in {where}"


def error_chain_text(error: BaseException) -> str:
    """The traceback of ``error`` and the ``repr`` of each exception in its chain, walked as Python
    and error trackers walk it (``__cause__``, else ``__context__`` unless suppressed)."""
    texts = ["".join(traceback.format_exception(error))]
    link: BaseException | None = error
    while link is not None:
        texts.append(repr(link))
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return "\n".join(texts)


def database_text(engine: sa.Engine) -> str:
    """Every row of every table in the public schema, each cast to text."""
    with engine.connect() as connection:
        tables = connection.execute(
            sa.text(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ).scalars()
        return "\n".join(
            row
            for table in list(tables)
            for row in connection.execute(sa.text(f'SELECT t::text FROM "{table}" t')).scalars()
        )


def eventually(read: Callable[[], T], done: Callable[[T], bool]) -> T:
    """``read()`` again until ``done`` says its answer is complete (the server records runs, logs
    and events a little after they happen)."""
    deadline = time.monotonic() + SERVER_WAIT_SECONDS
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def _as_json(models: list) -> str:
    return json.dumps([m.model_dump(mode="json") for m in models])


def server_record(client: SyncPrefectClient, flow_run_id: uuid.UUID, job_id: uuid.UUID) -> dict:
    """What the Prefect server holds about a flow run, as text: the run, its task runs, logs,
    artifacts and events (once the run's ``pagecast.job.*`` event has been persisted)."""
    APILogWorker.drain_all()
    EventsWorker.drain_all()
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    related = EventFilter(
        any_resource=EventAnyResourceFilter(
            id=[f"prefect.flow-run.{flow_run_id}", f"pagecast.job.{job_id}"]
        )
    )
    page = eventually(
        lambda: client.read_events(related, limit=EVENTS_PER_PAGE),
        lambda page: any(e.resource.id == f"pagecast.job.{job_id}" for e in page.events),
    )
    events = list(page.events)
    while page.next_page:
        page = client.read_events_page(str(page.next_page))
        events += page.events
    return {
        "flow run": json.dumps(client.read_flow_run(flow_run_id).model_dump(mode="json")),
        "task runs": _as_json(client.read_task_runs(flow_run_filter=runs)),
        "logs": _as_json(
            client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        ),
        "artifacts": _as_json(
            client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
        ),
        "events": _as_json(events),
    }


@pytest.fixture
def debug_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG (SQLAlchemy's statements with their parameters too), captured.
    Prefect reads ``PREFECT_LOGGING_LEVEL`` once, at import, so its loggers are set here, and its
    non-propagating ones made to reach ``caplog``."""
    caplog.set_level(logging.DEBUG)
    for name in ("prefect", "sqlalchemy", "prefect._internal", "prefect.extra"):
        caplog.set_level(logging.DEBUG, logger=name)
    for name in ("prefect._internal", "prefect.extra"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    return caplog


@pytest.fixture
def secret_sandbox(
    database_url: str,
    sandbox: tuple[str, Sandbox, Callable[[], list[dict]]],
    monkeypatch: pytest.MonkeyPatch,
    prefect_harness: None,
) -> Iterator[Sandbox]:
    """The sandbox, accepting ``TOKEN`` alone, with the job's database and the secrets in the
    environment as a deployment has them."""
    url, state, _ = sandbox
    state.config.valid_tokens = [TOKEN]
    monkeypatch.setenv("PAGECAST_DATABASE_URL", database_url)
    monkeypatch.setenv("PAGECAST_GRAPH_API_URL", url)
    monkeypatch.setenv("PAGECAST_CHUNK_SIZE", "5")
    monkeypatch.setenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}", TOKEN)
    monkeypatch.setenv("PAGECAST_APP_SECRET", APP_SECRET)
    get_settings.cache_clear()
    yield state
    get_settings.cache_clear()


def test_a_sent_job_leaves_no_secret_anywhere(engine, secret_sandbox, debug_logs, capfd):
    psids = [str(10**15 + i) for i in range(4)]
    secret_sandbox.config.fail_psids = {
        psids[0]: "551",
        psids[1]: "10/2018278",
        psids[2]: "reset",
        psids[3]: "html_502",
    }
    job = create_job(engine, 20)
    flow_state = send_job(job.id, return_state=True)
    assert flow_state.result()["status"] == "completed_with_errors"
    with get_client(sync_client=True) as client:
        record = server_record(client, flow_state.state_details.flow_run_id, job.id)
    for where, text in record.items():
        assert_no_secret(text, f"the server's {where}")
    assert json.loads(record["flow run"])["parameters"] == {"job_id": str(job.id), "shard": None}
    assert "task_inputs" in record["task runs"] and "ended" in record["logs"]
    assert "sent" in record["artifacts"] and psids[0] not in record["artifacts"]  # nor PSIDs
    assert "pagecast.job.finished" in record["events"]
    assert "ended completed_with_errors" in debug_logs.text
    assert "UPDATE send_job_recipients" in debug_logs.text
    assert_no_secret(debug_logs.text, "the captured DEBUG logs")
    assert_no_secret("".join(capfd.readouterr()), "the console output")
    dump = database_text(engine)
    assert str(job.id) in dump and "551" in dump
    assert_no_secret(dump, "the job's database")
    stats = secret_sandbox.stats()
    assert stats["token_via"] == {"header": stats["requests"]}
    assert_no_secret(json.dumps(stats["urls"]), "the request URLs")


def test_a_refused_token_from_a_secret_block_fails_the_job_without_leaking(
    engine, secret_sandbox, debug_logs
):
    page = "900800700"
    Secret(value=TOKEN).save(secret_block_name(page), overwrite=True)
    secret_sandbox.config.valid_tokens = ["another-token"]
    job = create_job(engine, 20, page_id=page)
    try:
        flow_state = send_job(job.id, return_state=True)
    finally:
        Secret.delete(secret_block_name(page))
    failed = job_row(engine, job.id)
    assert failed.status == "failed" and failed.last_error.startswith("190/460")
    assert set(secret_sandbox.stats()["errors"]) == {"190/460"}
    with get_client(sync_client=True) as client:
        record = server_record(client, flow_state.state_details.flow_run_id, job.id)
    assert "pagecast.job.failed" in record["events"]
    for where, text in record.items():
        assert_no_secret(text, f"the server's {where}")
    assert_no_secret(debug_logs.text, "the captured DEBUG logs")
    assert_no_secret(database_text(engine), "the job's database")


def test_a_crashed_run_leaves_no_secret_in_its_error(
    engine, secret_sandbox, debug_logs, monkeypatch
):
    """The chunk task's frames hold the token as a local: the traceback, the run's state message,
    ``last_error`` and the logs must not show it."""

    async def crashes(*args, **kwargs):
        raise ValueError("disk on fire")

    monkeypatch.setattr(tasks.sending.send_chunk, "retries", 0)
    monkeypatch.setattr(tasks.sending, "send_chunk_core", crashes)
    job = create_job(engine, 20)
    flow_state = send_job(job.id, return_state=True)
    assert flow_state.is_failed()
    error = flow_state.result(raise_on_failure=False)
    assert isinstance(error, ValueError)
    assert_no_secret(error_chain_text(error), "the run's exception")
    assert job_row(engine, job.id).last_error == "the run crashed: ValueError: disk on fire"
    with get_client(sync_client=True) as client:
        record = server_record(client, flow_state.state_details.flow_run_id, job.id)
    assert "disk on fire" in record["flow run"] and "Traceback" in record["logs"]
    for where, text in record.items():
        assert_no_secret(text, f"the server's {where}")
    assert_no_secret(debug_logs.text, "the captured DEBUG logs")
    assert_no_secret(database_text(engine), "the job's database")


@contextlib.asynccontextmanager
async def raw_server(answer: bytes | None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads each request and sends ``answer`` as is (``None``: never answers); its
    URL and the requests it received."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            received.append(head + await reader.readexactly(int(length[1]) if length else 0))
            if answer is None:
                await asyncio.sleep(10)
            writer.write(answer or b"")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", received


@pytest.mark.parametrize(
    ("answer", "token"),
    [
        (b"NOT HTTP\r\n\r\n", TOKEN),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", TOKEN),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", TOKEN),
        (b"", TOKEN),
        (None, TOKEN),
        (b"", TOKEN + "\u00e9"),
        (b"", TOKEN + "\n"),
    ],
    ids=["not-http", "bad-header", "truncated", "closed", "no-answer", "non-ascii", "newline"],
)
async def test_a_call_without_an_answer_raises_no_secret(answer, token):
    """The error of a call that got no usable answer shows neither the Authorization header nor
    the body (``appsecret_proof``) in its message, ``repr`` or chain (aiohttp's errors hold the
    request's headers). The last two tokens cannot go in a header at all."""
    async with raw_server(answer) as (url, received):
        client = GraphClient(
            base_url=url,
            version="v25.0",
            token_for=lambda _page: token,
            concurrency=1,
            app_secret=APP_SECRET,
            send_timeout=0.5,
        )
        async with client:
            with pytest.raises(GraphError) as raised:
                await client.send_text(page_id=PAGE, psid="1", text="hi", messaging_type="UPDATE")
    assert_no_secret(error_chain_text(raised.value), "the error's message, repr and chain")
    for request in received:  # the secrets travel in the header and the body, and nowhere else
        text = request.decode()
        head, _, body = text.partition("\r\n\r\n")
        request_line, *header_lines = head.split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines)
        assert {k.lower(): v for k, v in headers.items()}["authorization"] == f"Bearer {TOKEN}"
        assert json.loads(body)["appsecret_proof"] == PROOF
        assert TOKEN not in request_line and APP_SECRET not in text
    assert bool(received) == (token == TOKEN)


def test_the_cli_prints_no_secret(engine, secret_sandbox, monkeypatch, tmp_path):
    """``job run`` (a flow process logging at DEBUG) and ``job status`` print no secret, and the
    flow process's log file holds none."""
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("PAGECAST_HOME", str(tmp_path))
    secret_sandbox.config.fail_psids = {str(10**15): "551"}
    job = create_job(engine, 20)
    runner = CliRunner()
    run = runner.invoke(app, ["job", "run", str(job.id)], catch_exceptions=False)
    assert run.exit_code == 0, run.stderr
    status = runner.invoke(app, ["job", "status", str(job.id)], catch_exceptions=False)
    as_json = runner.invoke(app, ["job", "status", str(job.id), "--json"], catch_exceptions=False)
    flow_log = (tmp_path / "logs" / f"send-job-{job.id}.log").read_text()
    assert "DEBUG" in flow_log and "551" in status.stdout
    for where, text in {
        "job run": run.stdout + run.stderr,
        "job status": status.stdout + status.stderr,
        "job status --json": as_json.stdout,
        "the flow process's log": flow_log,
    }.items():
        assert_no_secret(text, where)
